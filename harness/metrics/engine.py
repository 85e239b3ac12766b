"""The fast exact engine: all seven metrics of a category from one sort, fed batch by batch.

Why it is fast and exact
------------------------
Every pixel curve (ROC, precision-recall, PRO) changes direction only at a threshold where a
*defect* pixel enters: between two consecutive distinct defect-pixel scores, only defect-free
pixels are added, so TPR, recall and PRO stay constant and the curve runs straight (horizontally)
in FPR. The trapezoid area, AP's step sum, the F1 maximum and the interpolation at FPR 0.3 are
therefore determined exactly by two points per distinct defect-pixel score ``t``:

- just above ``t``: (defect-free pixels ``> t``, the counts of the previous threshold), and
- at ``t``:         (defect-free pixels ``>= t``, defect pixels ``>= t``, PRO at ``t``).

Tied scores are handled by the ``> t`` / ``>= t`` pair (the diagonal segment of a tie group),
which is what makes ties count half, as scikit-learn does.

So the engine sorts the defect-free scores once (a plain float sort, no index array) and
finds both counts for every defect-pixel threshold with a binary search. The defect pixels (a
few percent of a category) are sorted together with their 8-connected region id, packed into one
int64 per pixel, which gives the cumulative PRO weights from the same sort. Nothing is binned.

Memory
------
The accumulator keeps one score per defect-free pixel (in the maps' precision: float32 maps stay
float32), in sorted runs of up to 16M values that are never merged (counts over runs add up;
runs beyond ``$HARNESS_METRIC_MEMORY_MB``, 2048 by default, are moved to disk and searched there),
plus a score and a region id per defect pixel. The curves are then walked in blocks, so the
peak stays below twice the float32 maps (measured: at most 1.9x on MVTec-sized data, see the
README). Maps that are float64 and not exactly representable in float32 are kept in float64, so
that no two distinct scores are merged (that path sorts with an argsort and uses more memory).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from harness.metrics.runs import (REGION_BITS, REGION_MASK, SpilledRun, count_at_least_and_above, joined,
                                  orderable_bits, scores_from_bits, sorted_in_parts, walk_descending)
from harness.metrics.exact import (AUPRO_FPR_LIMIT, UndefinedMetricWarning, ap_from_curve, auroc_from_curve,
                                   binary_curve, f1max_from_curve)

# 8-connectivity: diagonal neighbours belong to the same defect region, as in the MVTec AD code.
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
# Dtypes whose every value a float32 holds exactly.
_FLOAT32_EXACT = {np.dtype(t) for t in (np.float32, np.float16, np.bool_, np.uint8, np.int8, np.uint16, np.int16)}
# Defect-free scores are sorted in runs of at least this many values (64 MiB of float32): a
# stream of small batches costs one extra copy of at most a run, and a few binary searches.
_RUN_SIZE = 1 << 24


#: Megabytes of sorted defect-free scores an accumulator keeps in memory before it spills them to disk.
DEFAULT_MEMORY_MB = 2048


def metric_memory_budget() -> int | None:
    """Bytes of sorted scores kept in memory (``$HARNESS_METRIC_MEMORY_MB``); None: never spill.

    Raises
    ------
    ValueError
        When the variable is not a number, naming it.
    """
    value = os.environ.get("HARNESS_METRIC_MEMORY_MB", "").strip() or str(DEFAULT_MEMORY_MB)
    try:
        megabytes = float(value)
    except ValueError:
        raise ValueError(f"$HARNESS_METRIC_MEMORY_MB={value!r}: expected megabytes, e.g. 2048 (0: never spill)") from None
    return int(megabytes * 2 ** 20) if megabytes > 0 else None


def _undefined(what: str) -> float:
    warnings.warn(what, UndefinedMetricWarning, stacklevel=4)
    return float("nan")


@dataclass(frozen=True)
class PixelCurves:
    """The reduced exact pixel curves: two points per distinct defect-pixel score, highest first.

    Attributes
    ----------
    thresholds : numpy.ndarray
        Distinct scores of defect pixels, decreasing.
    tps : numpy.ndarray of int64
        Defect pixels scoring ``>= thresholds[k]``.
    fps_ge, fps_gt : numpy.ndarray of int64
        Defect-free pixels scoring ``>= thresholds[k]`` and ``> thresholds[k]``.
    pro : numpy.ndarray of float64
        Per-region overlap at ``thresholds[k]`` (mean over regions of the covered fraction).
    n_pos, n_neg, n_regions : int
        Defect pixels, defect-free pixels and 8-connected defect regions.
    """

    thresholds: np.ndarray
    tps: np.ndarray
    fps_ge: np.ndarray
    fps_gt: np.ndarray
    pro: np.ndarray
    n_pos: int
    n_neg: int
    n_regions: int

    def roc_points(self) -> tuple[np.ndarray, np.ndarray]:
        """(false positives, true positives) vertices of the ROC polyline, from (0, 0) to (N, P)."""
        k = self.tps.size
        fp = np.empty(2 * k + 2, dtype=np.int64)
        tp = np.empty(2 * k + 2, dtype=np.int64)
        fp[0], tp[0] = 0, 0
        fp[1:-1:2], fp[2:-1:2] = self.fps_gt, self.fps_ge
        tp[1:-1:2] = np.r_[0, self.tps[:-1]]
        tp[2:-1:2] = self.tps
        fp[-1], tp[-1] = self.n_neg, self.n_pos
        return fp, tp

    def pro_points(self) -> tuple[np.ndarray, np.ndarray]:
        """(FPR, PRO) vertices of the PRO polyline, from (0, 0) to (1, 1), clipped to 1 like MVTec's."""
        k = self.pro.size
        fpr = np.empty(2 * k + 2, dtype=np.float64)
        pro = np.empty(2 * k + 2, dtype=np.float64)
        fpr[0], pro[0] = 0.0, 0.0
        fpr[1:-1:2] = self.fps_gt / self.n_neg
        fpr[2:-1:2] = self.fps_ge / self.n_neg
        pro[1:-1:2] = np.r_[0.0, self.pro[:-1]]
        pro[2:-1:2] = self.pro
        fpr[-1], pro[-1] = 1.0, 1.0
        return np.minimum(fpr, 1.0), np.minimum(pro, 1.0)


def _area_until(x: np.ndarray, y: np.ndarray, limit: float) -> tuple[float, bool]:
    """Trapezoid area of the polyline (x, y) (x non-decreasing) up to ``x = limit``.

    Returns the area and whether the limit was reached (then later segments add nothing). The
    segment that crosses the limit is interpolated there, as MVTec AD's ``trapezoid`` does.
    """
    full = int(np.count_nonzero(x[1:] <= limit))  # x is sorted: the segments ending by the limit are a prefix
    area = float(np.sum((y[1:full + 1] + y[:full]) * (x[1:full + 1] - x[:full]))) * 0.5
    if full == x.size - 1:
        return area, False
    x0, x1, y0, y1 = x[full], x[full + 1], y[full], y[full + 1]
    if x0 < limit:
        y_at = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        area += 0.5 * (y0 + y_at) * (limit - x0)
    return area, True


def pixel_metrics(curves: PixelCurves, fpr_limit: float = AUPRO_FPR_LIMIT, block: int = 1 << 16) -> dict[str, float]:
    """Pixel AUROC, AP, F1max and AUPRO from the reduced curves, exactly.

    The curves are walked in blocks of thresholds, so the temporaries stay small however many
    distinct defect-pixel scores there are.

    Parameters
    ----------
    curves : PixelCurves
    fpr_limit : float, default 0.3
    block : int
        Thresholds per block.

    Returns
    -------
    dict
        ``pixel_auroc, pixel_ap, pixel_f1max, pixel_aupro``; NaN with an
        :class:`UndefinedMetricWarning` where undefined.
    """
    n_pos, n_neg = curves.n_pos, curves.n_neg
    twice_auc = precision_sum = 0.0
    best_f1 = 0.0
    pro_area, pro_done = 0.0, n_neg == 0 or curves.n_regions == 0
    prev_tp, prev_ge, prev_pro = 0.0, 0.0, 0.0  # the last vertex so far
    for start in range(0, curves.tps.size, block):
        stop = start + block
        tp = curves.tps[start:stop].astype(np.float64)
        ge = curves.fps_ge[start:stop].astype(np.float64)
        gt = curves.fps_gt[start:stop].astype(np.float64)
        pro = np.minimum(curves.pro[start:stop], 1.0)
        tp_before = np.r_[prev_tp, tp[:-1]]
        ge_before = np.r_[prev_ge, ge[:-1]]
        # ROC: a horizontal run (defect-free pixels above t), then the tie group's diagonal.
        twice_auc += float(np.sum((gt - ge_before) * (2.0 * tp_before) + (ge - gt) * (tp_before + tp)))
        precision_sum += float(np.sum((tp - tp_before) * (tp / (tp + ge))))
        best_f1 = max(best_f1, float(np.max(2.0 * tp / (tp + ge + n_pos))))
        if not pro_done:
            x = np.empty(2 * tp.size + 1)
            y = np.empty_like(x)
            x[0], y[0] = prev_ge / n_neg, prev_pro
            x[1::2], x[2::2] = gt / n_neg, ge / n_neg
            y[1::2] = np.r_[prev_pro, pro[:-1]]
            y[2::2] = pro
            area, pro_done = _area_until(x, y, fpr_limit)
            pro_area += area
        prev_tp, prev_ge, prev_pro = float(tp[-1]), float(ge[-1]), float(pro[-1])
    twice_auc += (n_neg - prev_ge) * 2.0 * n_pos  # the last run of defect-free pixels, at TPR 1
    if not pro_done:
        area, _ = _area_until(np.array([prev_ge / n_neg, 1.0]), np.array([prev_pro, 1.0]), fpr_limit)
        pro_area += area
    out = {}
    if n_pos == 0 or n_neg == 0:
        out["pixel_auroc"] = _undefined("pixel AUROC is undefined when only one class of pixels is present; "
                                        "returning NaN")
    else:
        out["pixel_auroc"] = twice_auc / 2.0 / (float(n_pos) * float(n_neg))
    if n_pos == 0:
        out["pixel_ap"] = _undefined("pixel AP is undefined without defect pixels; returning NaN")
        out["pixel_f1max"] = _undefined("pixel F1max is undefined without defect pixels; returning NaN")
    else:
        out["pixel_ap"] = precision_sum / n_pos
        out["pixel_f1max"] = best_f1
    if curves.n_regions == 0:
        out["pixel_aupro"] = _undefined("AUPRO is undefined without defect pixels; returning NaN")
    elif n_neg == 0:
        out["pixel_aupro"] = _undefined("AUPRO is undefined without defect-free pixels; returning NaN")
    else:
        out["pixel_aupro"] = pro_area / fpr_limit
    return out


class MetricAccumulator:
    """Streaming exact metrics: ``update`` batch by batch, then ``compute`` the seven values.

    Gives exactly the numbers of :func:`harness.metrics.evaluate` on all batches at once; the
    maps themselves are not kept (see the module docstring for what is).

    Parameters
    ----------
    name : str, optional
        Category name, used in error messages.
    fpr_limit : float, default 0.3
        FPR limit of AUPRO.

    Examples
    --------
    >>> acc = MetricAccumulator()
    >>> for maps, masks in batches:            # doctest: +SKIP
    ...     acc.update(maps, masks)
    >>> acc.compute()["pixel_aupro"]            # doctest: +SKIP
    """

    def __init__(self, name: str = "", fpr_limit: float = AUPRO_FPR_LIMIT) -> None:
        self.name = name
        self.fpr_limit = fpr_limit
        self._dtype = np.dtype(np.float32)
        # Defect-free scores: sorted runs, plus batches not yet joined into a run.
        self._neg_runs: list[np.ndarray | SpilledRun] = []
        self._neg_pending: list[np.ndarray] = []
        self._pending_size = 0
        self._pos_scores: list[np.ndarray] = []
        self._pos_regions: list[np.ndarray] = []
        self._pos_key: np.ndarray | None = None  # float32 store: packed, sorted defect pixels of past computes
        self._region_sizes: list[np.ndarray] = []
        self._n_regions = 0
        self._image_scores: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._n_images = 0
        self._spill_dir: Path | None = None  # created on the first spill, removed with the accumulator
        self._n_spilled = 0

    @property
    def n_images(self) -> int:
        """Images added so far."""
        return self._n_images

    # -- input ------------------------------------------------------------------------------
    def _where(self, local: int, names: Sequence[str] | None) -> str:
        """Name image ``local`` of the current batch: its given name, else its overall index."""
        if names is not None and local < len(names):
            label = str(names[local])
        else:
            label = f"anomaly map {self._n_images + local}"
        return label + self._in_category()

    def _scores_dtype(self, amap: np.ndarray, where: str) -> np.ndarray:
        """``amap`` in the stored precision, widening the store to float64 when needed."""
        if amap.dtype in _FLOAT32_EXACT:
            return amap.astype(self._dtype, copy=False)
        if not np.issubdtype(amap.dtype, np.number) or np.iscomplexobj(amap):
            raise ValueError(f"{where}: anomaly maps must be real numbers, got dtype {amap.dtype}")
        wide = amap.astype(np.float64, copy=False)
        if self._dtype == np.float64:
            return wide
        narrow = wide.astype(np.float32)
        if np.array_equal(narrow, wide):
            return narrow
        self._widen()
        return wide

    def _widen(self) -> None:
        """Switch the store to float64 (lossless for what is already stored)."""
        if self._pos_key is not None:
            self._pos_scores.insert(0, scores_from_bits(self._pos_key >> REGION_BITS))
            self._pos_regions.insert(0, self._pos_key & REGION_MASK)
            self._pos_key = None
        self._dtype = np.dtype(np.float64)
        self._neg_runs = [(a.read() if isinstance(a, SpilledRun) else a).astype(np.float64) for a in self._neg_runs]
        self._neg_pending = [a.astype(np.float64) for a in self._neg_pending]
        self._pos_scores = [a.astype(np.float64) for a in self._pos_scores]

    def update(self, anomaly_maps: Any, masks: Any, image_scores: Any = None, labels: Any = None,
               names: Sequence[str] | None = None) -> None:
        """Add a batch of images.

        Parameters
        ----------
        anomaly_maps : array of shape (B, H, W) or sequence of (H, W) arrays
            Higher means more anomalous, any value range. Maps may differ in size from each other.
        masks : same shapes as ``anomaly_maps``
            Boolean or 0/255; a pixel is defective when > 0.
        image_scores : array of shape (B,), optional
            Defaults to each map's maximum.
        labels : array of shape (B,), optional
            Defaults to "the mask has a defect pixel".
        names : sequence of str, optional
            Names of the batch's images (e.g. file paths), used in error messages.

        Raises
        ------
        ValueError
            When a map contains NaN or inf, or a map and its mask differ in shape; the message
            names the image. Nothing of a rejected batch is kept.
        """
        maps = _as_maps(anomaly_maps, "anomaly maps")
        mask_list = _as_maps(masks, "masks")
        n = len(maps)
        if n != len(mask_list):
            raise ValueError(f"{n} anomaly maps but {len(mask_list)} masks{self._in_category()}")
        stacked = isinstance(maps, np.ndarray) and isinstance(mask_list, np.ndarray)
        for i in range(n):
            if maps[i].shape != mask_list[i].shape:
                raise ValueError(f"{self._where(i, names)}: map of shape {maps[i].shape} but mask of shape "
                                 f"{mask_list[i].shape}")
            if maps[i].size == 0:
                raise ValueError(f"{self._where(i, names)}: empty anomaly map")
        if stacked and n:
            top, bottom = maps.max(axis=(1, 2)), maps.min(axis=(1, 2))
        else:
            top = np.array([m.max() for m in maps]) if n else np.zeros(0)
            bottom = np.array([m.min() for m in maps]) if n else np.zeros(0)
        bad = np.flatnonzero(~(np.isfinite(top) & np.isfinite(bottom)))
        if bad.size:
            raise ValueError(f"{self._where(int(bad[0]), names)}: the anomaly map contains NaN or inf")
        batch_scores = top.astype(np.float64)
        if image_scores is not None:
            batch_scores = np.asarray(image_scores, dtype=np.float64).reshape(-1)
            if batch_scores.size != n:
                raise ValueError(f"{batch_scores.size} image scores for {n} anomaly maps{self._in_category()}")
            bad = np.flatnonzero(~np.isfinite(batch_scores))
            if bad.size:
                raise ValueError(f"{self._where(int(bad[0]), names)}: the image score is NaN or inf")
        if stacked:
            mask_bool = mask_list if mask_list.dtype == bool else mask_list > 0
            has_defect = mask_bool.reshape(n, -1).any(axis=1)
        else:
            mask_bool = [m if m.dtype == bool else m > 0 for m in mask_list]
            has_defect = np.array([m.any() for m in mask_bool], dtype=bool)
        batch_labels = has_defect
        if labels is not None:
            batch_labels = np.asarray(labels).reshape(-1).astype(bool)
            if batch_labels.size != n:
                raise ValueError(f"{batch_labels.size} labels for {n} anomaly maps{self._in_category()}")

        if stacked:
            self._widen_for(maps)
            # One boolean gather for the whole batch: one stored chunk, no per-image copies.
            self._add_negatives(maps.astype(self._dtype, copy=False)[~mask_bool])
            for i in np.flatnonzero(has_defect):
                self._add_regions(maps[i].astype(self._dtype, copy=False), mask_bool[i])
        else:
            for i in range(n):
                amap = self._stored(np.asarray(maps[i]), self._where(i, names))
                self._add_negatives(amap[~mask_bool[i]])
                if has_defect[i]:
                    self._add_regions(amap, mask_bool[i])
        self._image_scores.append(batch_scores)
        self._labels.append(batch_labels)
        self._n_images += n

    def _widen_for(self, maps: np.ndarray) -> None:
        """Widen the store to float64 when the stack does not convert to float32 exactly."""
        if maps.dtype in _FLOAT32_EXACT or self._dtype == np.float64:
            return
        if not np.array_equal(maps.astype(np.float32), maps):
            self._widen()

    def _stored(self, amap: np.ndarray, where: str) -> np.ndarray:
        """One map in the stored precision."""
        return self._scores_dtype(amap, where).astype(self._dtype, copy=False)

    def _add_negatives(self, scores: np.ndarray) -> None:
        self._neg_pending.append(scores)
        self._pending_size += scores.size
        if self._pending_size >= _RUN_SIZE:
            self._flush_negatives()

    def _flush_negatives(self) -> None:
        """Join the pending batches into one sorted run (bounded extra memory: one run)."""
        if not self._neg_pending:
            return
        run = joined(self._neg_pending, self._dtype)
        if run.base is not None or not run.flags.writeable:
            run = run.copy()  # a view of the caller's array: never sort it in place
        self._neg_runs.extend(sorted_in_parts(run))
        self._neg_pending = []
        self._pending_size = 0
        self._spill()

    def _spill(self) -> None:
        """Move the sorted runs to disk (read back as memory maps) when they outgrow the budget.

        The budget is ``$HARNESS_METRIC_MEMORY_MB`` (default :data:`DEFAULT_MEMORY_MB`; 0 never
        spills). Counting needs only binary searches in each run, so a run on disk costs a few
        page reads per threshold, and the peak stays near the budget plus one run in the making.
        """
        budget = metric_memory_budget()
        in_memory = [r for r in self._neg_runs if isinstance(r, np.ndarray)]
        if budget is None or sum(r.nbytes for r in in_memory) <= budget:
            return
        if self._spill_dir is None:
            base = os.environ.get("HARNESS_METRIC_SPILL_DIR") or None
            self._spill_dir = Path(tempfile.mkdtemp(prefix="harness-metrics-", dir=base))
            weakref.finalize(self, shutil.rmtree, str(self._spill_dir), True)
        runs = []
        for run in self._neg_runs:
            if isinstance(run, np.ndarray):
                path = self._spill_dir / f"run{self._n_spilled:06d}.bin"
                self._n_spilled += 1
                run = SpilledRun.write(run, path)
            runs.append(run)
        self._neg_runs = runs

    def _in_category(self) -> str:
        return f" in category {self.name!r}" if self.name else ""

    def _add_regions(self, amap: np.ndarray, mask: np.ndarray) -> None:
        rows = np.flatnonzero(mask.any(axis=1))
        cols = np.flatnonzero(mask.any(axis=0))
        if rows.size == 0:
            return
        # Label only the defects' bounding box: regions are the same, the work is much smaller.
        box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        mask, amap = mask[box], amap[box]
        labelled, count = ndimage.label(mask, structure=_EIGHT_CONNECTED)
        inside = labelled[mask]
        self._pos_scores.append(amap[mask])
        self._pos_regions.append(inside.astype(np.int64) + (self._n_regions - 1))  # 0-based global ids
        self._region_sizes.append(np.bincount(inside, minlength=count + 1)[1:])
        self._n_regions += count

    # -- output -----------------------------------------------------------------------------
    def pixel_curves(self) -> PixelCurves:
        """The exact reduced pixel curves of everything added so far."""
        self._flush_negatives()
        n_neg = int(sum(run.size for run in self._neg_runs))
        if not self._n_regions:
            empty = np.zeros(0, dtype=np.int64)
            return PixelCurves(np.zeros(0, self._dtype), empty, empty, empty, np.zeros(0), 0, n_neg, 0)
        sizes = np.concatenate(self._region_sizes).astype(np.float64)
        weight = 1.0 / (sizes * self._n_regions)  # PRO gained per pixel of each region
        if self._dtype == np.float32 and self._n_regions < REGION_MASK:
            key = self._packed_positives()
            thresholds, tps, pro = walk_descending(key, weight)
            n_pos = int(key.size)
        else:
            scores = joined(list(self._pos_scores), self._dtype)
            regions = joined(list(self._pos_regions), np.int64)
            order = np.argsort(scores, kind="stable")[::-1]
            scores, regions = scores[order], regions[order]
            # The last pixel of every run of equal scores completes that threshold's counts.
            last = np.r_[np.flatnonzero(scores[1:] != scores[:-1]), scores.size - 1]
            thresholds, tps = scores[last], (last + 1).astype(np.int64)
            pro = np.cumsum(weight[regions])[last]
            n_pos = int(scores.size)
        at_least, above = np.zeros(thresholds.size, np.int64), np.zeros(thresholds.size, np.int64)
        for run in self._neg_runs:
            # A spilled run is mapped only while it is searched: its pages leave the process after.
            values = run.open() if isinstance(run, SpilledRun) else run
            ge, gt = count_at_least_and_above(values, thresholds)
            del values
            at_least += ge
            above += gt
        return PixelCurves(thresholds, tps, at_least, above, pro, n_pos, n_neg, self._n_regions)

    def _packed_positives(self) -> np.ndarray:
        """All defect pixels as one sorted int64 key each (score bits above region id); kept for reuse."""
        parts = [] if self._pos_key is None else [self._pos_key]
        if self._pos_scores:
            scores = joined(self._pos_scores, np.float32)
            regions = joined(self._pos_regions, np.int64)
            key = orderable_bits(scores + np.float32(0.0))  # + 0: -0.0 becomes +0.0, one threshold with it
            del scores
            key <<= REGION_BITS
            key |= regions
            del regions
            parts.append(key)
            self._pos_scores, self._pos_regions = [], []
        key = joined(parts, np.int64)
        key.sort()
        self._pos_key = key
        return key

    def image_scores_and_labels(self) -> tuple[np.ndarray, np.ndarray]:
        """Image scores (float64) and labels (bool) of everything added so far."""
        scores = np.concatenate(self._image_scores) if self._image_scores else np.zeros(0)
        labels = np.concatenate(self._labels) if self._labels else np.zeros(0, dtype=bool)
        return scores, labels

    def compute(self) -> dict[str, float]:
        """The seven standard metrics of everything added so far.

        Returns
        -------
        dict
            ``image_auroc, image_ap, image_f1max, pixel_auroc, pixel_ap, pixel_f1max,
            pixel_aupro`` as fractions in [0, 1]; NaN (with an :class:`UndefinedMetricWarning`)
            where undefined.
        """
        scores, labels = self.image_scores_and_labels()
        image = binary_curve(scores, labels)
        out = {
            "image_auroc": _labelled(auroc_from_curve, image, "image"),
            "image_ap": _labelled(ap_from_curve, image, "image"),
            "image_f1max": _labelled(f1max_from_curve, image, "image"),
        }
        out.update(pixel_metrics(self.pixel_curves(), self.fpr_limit))
        return out


def _labelled(fn, curve, level: str) -> float:
    """Call an image-level metric, saying "image" in its undefined-case warning."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UndefinedMetricWarning)
        value = fn(curve)
    for w in caught:
        warnings.warn(f"{level} {w.message}", w.category, stacklevel=3)
    return value


def _as_maps(arrays: Any, name: str):
    """An (N, H, W) array stays one; anything else becomes a list of 2-D arrays."""
    if isinstance(arrays, np.ndarray):
        if arrays.ndim == 4 and arrays.shape[1] == 1:
            arrays = arrays[:, 0]
        if arrays.ndim == 2:
            arrays = arrays[None]
        if arrays.ndim != 3:
            raise ValueError(f"{name} must be (N, H, W) or a sequence of (H, W) arrays, got shape {arrays.shape}")
        return arrays
    out = []
    for i, a in enumerate(arrays):
        a = np.asarray(a)
        if a.ndim == 3 and a.shape[0] == 1:
            a = a[0]
        if a.ndim != 2:
            raise ValueError(f"{name}: item {i} has shape {a.shape}; expected (H, W)")
        out.append(a)
    return out


def evaluate_stream(batches, fpr_limit: float = AUPRO_FPR_LIMIT) -> dict[str, float]:
    """Metrics of ``(maps, masks)`` or ``(maps, masks, image_scores, labels)`` batches.

    Parameters
    ----------
    batches : iterable of tuple
    fpr_limit : float, default 0.3

    Returns
    -------
    dict of str to float
    """
    acc = MetricAccumulator(fpr_limit=fpr_limit)
    for batch in batches:
        acc.update(*batch)
    return acc.compute()


__all__ = ["MetricAccumulator", "PixelCurves", "evaluate_stream", "pixel_metrics"]
