"""sPRO, the saturated per-region overlap of MVTec LOCO AD, exactly and streamed.

Definition (the MVTec LOCO AD paper, Sec. 5, and its evaluation code)
--------------------------------------------------------------------
- Ground truth: each anomalous image has one or more masks ("channels"), one per annotated
  defect; they may overlap and are not merged. Each channel's defect type (its pixel value)
  has a saturation threshold in the category's ``defects_config.json``; its *saturation area*
  is ``int(threshold * area)`` when ``relative_saturation`` is true, else
  ``min(threshold, area)`` (``area``: the channel's pixel count).
- At an anomaly threshold ``t`` (a pixel is positive when its score is ``>= t``), a channel's
  sPRO is ``min(TP(t) / saturation_area, 1)`` with ``TP(t)`` its positive pixels; the curve's
  y value is the mean over all channels of all images scored.
- FPR(t): positive pixels among the pixels that are defect-free in *every* channel of their
  image, over all images scored (good images entirely), divided by their number.
- AUC-sPRO up to a limit: the area under the (FPR, sPRO) polyline from FPR 0 to the limit,
  interpolated linearly at the limit, divided by the limit. The official evaluation reports
  the limits 0.01, 0.05, 0.1, 0.3 and 1.0; 0.05 is the headline (:data:`SPRO_FPR_LIMIT`).
- Aggregation per category: logical anomalies are scored together with all good test images,
  structural anomalies likewise; the category's value is the mean of the two.

Exactness
---------
The official script evaluates the curve at thresholds it refines until adjacent points are
0.001 apart; this module evaluates it at *every* distinct score, which is the curve that
refinement converges to. Between two consecutive distinct scores of channel pixels only
defect-free pixels change side, so (as for AUPRO in :mod:`harness.metrics.engine`) two points
per distinct channel-pixel score give the whole polyline: ``(FP(> t), sPRO before t)`` and
``(FP(>= t), sPRO(t))``. The saturation is handled without a threshold loop: sorted within its
channel, the ``j``-th pixel raises that channel's sPRO by ``min(j/s, 1) - min((j-1)/s, 1)``, so
cumulative sums over all channel pixels sorted by score give sPRO at every threshold (pixels
tied at a score enter together, and the sum telescopes to the same value).

Memory: per image only its defect-free scores and its channel pixels' scores are kept (no map);
the defect-free scores of each part are sorted once when the curve is computed.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np

from harness.metrics.exact import UndefinedMetricWarning

#: The headline FPR limit of AUC-sPRO (MVTec LOCO AD).
SPRO_FPR_LIMIT = 0.05
#: Every limit the official evaluation reports.
SPRO_FPR_LIMITS = (0.01, 0.05, 0.1, 0.3, 1.0)


def saturation_area(channel: np.ndarray, threshold: float, relative: bool) -> float:
    """The saturation area of one channel, as the official ``GroundTruthChannel`` computes it.

    Parameters
    ----------
    channel : numpy.ndarray of bool
    threshold : float
        ``saturation_threshold`` of the channel's defect type.
    relative : bool
        ``relative_saturation`` of the channel's defect type.

    Returns
    -------
    float
    """
    area = int(np.count_nonzero(channel))
    return float(int(threshold * area)) if relative else float(min(threshold, area))


def read_channel(source, saturation: Mapping[int, tuple[float, bool]], shape: tuple[int, int] | None = None,
                 ) -> tuple[np.ndarray, float]:
    """Read one mask channel: its defect pixels and its saturation area.

    The file holds a single positive pixel value, the defect type's ``pixel_value``. When
    ``shape`` differs from the file's size the channel is resized by nearest neighbour and an
    absolute saturation threshold is scaled by the ratio of the areas (a relative one needs no
    scaling), so that the rule means the same share of the defect at any evaluation size.

    Parameters
    ----------
    source : path or callable
    saturation : mapping of int to (float, bool)
        ``{pixel_value: (saturation_threshold, relative_saturation)}``.
    shape : tuple of int, optional
        (H, W) of the evaluation grid.

    Returns
    -------
    (numpy.ndarray of bool, float)

    Raises
    ------
    ValueError
        When the file holds no or several positive values, or a value the config lacks.
    """
    from PIL import Image

    if callable(source):
        array = np.asarray(source())
    else:
        with Image.open(source) as img:
            array = np.asarray(img)
    if array.ndim == 3:
        array = array[..., 0]
    values = np.unique(array[array > 0])
    if values.size != 1:
        raise ValueError(f"mask {source} holds {values.size} positive values {values.tolist()[:5]}; a sPRO channel "
                         "holds exactly one (its defect type's pixel_value)")
    value = int(values[0])
    if value not in saturation:
        raise ValueError(f"mask {source} has pixel value {value}, which defects_config.json does not list "
                         f"(it lists {sorted(saturation)})")
    threshold, relative = saturation[value]
    channel = array > 0
    native = channel.shape
    if shape is not None and tuple(shape) != native:
        from harness.data import resize_mask  # the same nearest-neighbour rule as the union mask

        channel = resize_mask(channel, tuple(shape))
        if not relative:
            threshold = threshold * (shape[0] * shape[1]) / (native[0] * native[1])
    return channel, saturation_area(channel, threshold, relative)


@dataclass
class _Part:
    """What one group of images (e.g. the good ones, or the logical anomalies) contributes."""

    negatives: list[np.ndarray] = field(default_factory=list)
    channels: list[tuple[np.ndarray, float]] = field(default_factory=list)  # (scores, saturation area)


class SproAccumulator:
    """Exact AUC-sPRO, fed image by image; parts let groups share their good images.

    Examples
    --------
    >>> acc = SproAccumulator()
    >>> amap = np.zeros((4, 4)); amap[1:3, 1:3] = 1.0
    >>> channel = np.zeros((4, 4), bool); channel[1:3, 1:3] = True
    >>> acc.update(amap, [(channel, 4.0)], part="bad")
    >>> round(acc.compute(("bad",))[1.0], 6)
    1.0
    """

    def __init__(self) -> None:
        self.parts: dict[str, _Part] = {}

    def update(self, amap: np.ndarray, channels: Sequence[tuple[np.ndarray, float]], part: str = "") -> None:
        """Add one image: its anomaly map and its channels ``(bool mask, saturation area)``.

        Parameters
        ----------
        amap : numpy.ndarray of shape (H, W)
        channels : sequence of (numpy.ndarray of bool, float)
            Empty for a good image.
        part : str
            The group the image belongs to (its defect folder).
        """
        amap = np.asarray(amap)
        if amap.ndim != 2 or not np.isfinite(amap).all():
            raise ValueError(f"an sPRO anomaly map must be 2-D and finite; got shape {amap.shape}")
        entry = self.parts.setdefault(part, _Part())
        union = np.zeros(amap.shape, dtype=bool)
        for mask, area in channels:
            if mask.shape != amap.shape:
                raise ValueError(f"mask channel {mask.shape} and anomaly map {amap.shape} differ in shape")
            if not area > 0:
                raise ValueError("a mask channel has a saturation area of 0 (an empty mask, or a relative threshold "
                                 "below one pixel); its sPRO is undefined")
            union |= mask
            entry.channels.append((np.sort(amap[mask].astype(np.float64))[::-1], float(area)))
        entry.negatives.append(amap[~union].astype(np.float64))

    def curve(self, parts: Iterable[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The exact (FPR, sPRO) polyline of the images of ``parts`` (default: all), from (0, 0) to FPR 1.

        Returns
        -------
        (numpy.ndarray, numpy.ndarray)
            FPR (non-decreasing) and sPRO at its vertices; empty arrays when undefined.
        """
        chosen = [self.parts[p] for p in (self.parts if parts is None else parts) if p in self.parts]
        negatives = np.sort(np.concatenate([a for p in chosen for a in p.negatives] or [np.empty(0)]))
        channels = [c for p in chosen for c in p.channels]
        if not channels or negatives.size == 0:
            return np.empty(0), np.empty(0)
        scores = np.concatenate([s for s, _ in channels])
        steps = []
        for s, area in channels:
            j = np.arange(1, s.size + 1, dtype=np.float64)
            steps.append(np.minimum(j / area, 1.0) - np.minimum((j - 1) / area, 1.0))
        weights = np.concatenate(steps) / len(channels)
        order = np.argsort(-scores, kind="stable")
        scores, weights = scores[order], weights[order]
        last = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
        thresholds = scores[last]
        spro = np.cumsum(weights)[last]
        n = negatives.size
        fp_ge = n - np.searchsorted(negatives, thresholds, side="left")
        fp_gt = n - np.searchsorted(negatives, thresholds, side="right")
        k = thresholds.size
        fpr = np.empty(2 * k + 2)
        y = np.empty(2 * k + 2)
        fpr[0], y[0] = 0.0, 0.0
        fpr[1:-1:2], fpr[2:-1:2] = fp_gt / n, fp_ge / n
        y[1:-1:2] = np.r_[0.0, spro[:-1]]
        y[2:-1:2] = spro
        fpr[-1], y[-1] = 1.0, spro[-1]  # every pixel positive: FPR 1, every channel at its final sPRO
        return fpr, np.minimum(y, 1.0)

    def compute(self, parts: Iterable[str] | None = None,
                limits: Sequence[float] = SPRO_FPR_LIMITS) -> dict[float, float]:
        """AUC-sPRO up to each limit, normalised by the limit; NaN (with a warning) when undefined."""
        fpr, y = self.curve(parts)
        if fpr.size == 0:
            warnings.warn("sPRO is undefined without mask channels or defect-free pixels; returning NaN",
                          UndefinedMetricWarning, stacklevel=2)
            return {limit: float("nan") for limit in limits}
        return {limit: float(area_until(fpr, y, limit) / limit) for limit in limits}


def area_until(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoid area of the polyline (x, y) (x non-decreasing) up to ``x = limit``, interpolated there."""
    full = int(np.count_nonzero(x[1:] <= limit))
    area = float(np.sum((y[1:full + 1] + y[:full]) * (x[1:full + 1] - x[:full]))) * 0.5
    if full < x.size - 1 and x[full] < limit:
        x0, x1, y0, y1 = x[full], x[full + 1], y[full], y[full + 1]
        area += 0.5 * (y0 + y0 + (y1 - y0) * (limit - x0) / (x1 - x0)) * (limit - x0)
    return area


def spro_metrics(accumulator: SproAccumulator, normal: str = "good",
                 limits: Sequence[float] = SPRO_FPR_LIMITS) -> dict[str, float]:
    """The official aggregation: each anomaly part with all good images, then their mean.

    Parameters
    ----------
    accumulator : SproAccumulator
        Filled with parts named after the test folders (``good``, ``logical_anomalies``, ...).
    normal : str
        The part holding the good images.
    limits : sequence of float

    Returns
    -------
    dict
        ``pixel_spro`` (headline limit, mean over anomaly parts), ``pixel_spro_fpr<limit>`` for
        every limit, and ``pixel_spro_<part>`` (headline limit) per anomaly part.
    """
    anomalous = [p for p in accumulator.parts if p != normal]
    per_part = {p: accumulator.compute((normal, p), limits) for p in anomalous}
    out: dict[str, float] = {}
    for limit in limits:
        values = [v[limit] for v in per_part.values()]
        mean = float(np.mean(values)) if values and not np.isnan(values).any() else float("nan")
        out[f"pixel_spro_fpr{limit:g}"] = mean
    out["pixel_spro"] = out.get(f"pixel_spro_fpr{SPRO_FPR_LIMIT:g}", float("nan"))
    for part, values in per_part.items():
        out[f"pixel_spro_{part.removesuffix('_anomalies')}"] = values.get(SPRO_FPR_LIMIT, float("nan"))
    return out


def spro_of_samples(maps: Sequence[np.ndarray], samples: Sequence, limits: Sequence[float] = SPRO_FPR_LIMITS
                    ) -> dict[str, float]:
    """:func:`spro_metrics` of maps at the evaluation size and their samples (with ``channels``)."""
    accumulator = SproAccumulator()
    for amap, sample in zip(maps, samples):
        shape = np.asarray(amap).shape
        channels = [read_channel(c.source, c.saturation, shape) for c in getattr(sample, "channels", ())]
        accumulator.update(amap, channels, part=sample.defect if sample.label else "good")
    return spro_metrics(accumulator, limits=limits)


__all__ = ["SPRO_FPR_LIMIT", "SPRO_FPR_LIMITS", "SproAccumulator", "area_until", "read_channel", "saturation_area",
           "spro_metrics", "spro_of_samples"]
