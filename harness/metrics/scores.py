"""The per-category bundle every metric is computed from, with its curves built once."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Mapping, Sequence

import numpy as np

from harness.metrics.exact import BinaryCurve, ProCurve, binary_curve, pro_curve


@dataclass
class CategoryScores:
    """Image scores, labels, anomaly maps and masks of one category's test set.

    The seven standard metrics are computed together, once, by the exact engine
    (:class:`harness.metrics.MetricAccumulator`) and cached in :attr:`standard_metrics`. The
    runner computes them while it predicts and passes them as ``standard``; it then keeps
    ``maps`` and ``masks`` only when an installed metric plugin other than the standard seven
    may need them (they are None otherwise).

    Attributes
    ----------
    image_scores : numpy.ndarray of shape (N,)
    labels : numpy.ndarray of shape (N,)
        0 normal, 1 anomalous.
    maps : numpy.ndarray of shape (N, H, W) or None
        Anomaly maps at the evaluation size.
    masks : numpy.ndarray of shape (N, H, W), bool, or None
        Ground truth at the evaluation size.
    name : str
        Category name, used in error messages.
    keys : sequence of str, optional
        Sample keys, used to name the image in error messages.
    standard : mapping of str to float, optional
        The seven standard metrics, already computed (e.g. while streaming).
    samples : sequence of Sample, optional
        The samples scored, in order.
    """

    image_scores: np.ndarray
    labels: np.ndarray
    maps: np.ndarray | None = None
    masks: np.ndarray | None = None
    name: str = ""
    keys: Sequence[str] = field(default_factory=tuple)
    standard: Mapping[str, float] | None = None
    #: The test samples, in the order of the maps (metrics that read more ground truth than one
    #: mask per image, e.g. sPRO's mask channels, or the defect folder of each image).
    samples: Sequence = field(default_factory=tuple)
    #: A threshold chosen on the category's validation images (normal only), for threshold
    #: metrics such as MVTec AD 2's SegF1; None when the dataset has no validation split.
    validation_threshold: float | None = None

    def __post_init__(self) -> None:
        self.image_scores = np.asarray(self.image_scores, dtype=np.float64).ravel()
        self.labels = np.asarray(self.labels).ravel().astype(bool)
        where = f" in category {self.name!r}" if self.name else ""
        if self.maps is None or self.masks is None:
            if self.standard is None:
                raise ValueError(f"CategoryScores needs maps and masks, or the standard metrics{where}")
            self.maps = self.masks = None
            return
        self.maps = np.asarray(self.maps)
        self.masks = np.asarray(self.masks).astype(bool)
        if self.maps.shape != self.masks.shape:
            raise ValueError(f"anomaly maps {self.maps.shape} and masks {self.masks.shape} differ in shape{where}")
        if not (self.image_scores.size == self.labels.size == self.maps.shape[0]):
            raise ValueError(f"{self.image_scores.size} image scores, {self.labels.size} labels and "
                             f"{self.maps.shape[0]} maps{where}: they must match")
        for i in range(self.maps.shape[0]):
            if not np.isfinite(self.maps[i]).all() or not np.isfinite(self.image_scores[i]):
                name = self.keys[i] if i < len(self.keys) else f"image {i}"
                raise ValueError(f"NaN or inf in the anomaly map or score of {name}{where}")

    @cached_property
    def standard_metrics(self) -> dict[str, float]:
        """The seven standard metrics (exact engine), computed once."""
        if self.standard is not None:
            return dict(self.standard)
        from harness.metrics.engine import MetricAccumulator

        accumulator = MetricAccumulator(name=self.name)
        accumulator.update(self.maps, self.masks, image_scores=self.image_scores, labels=self.labels,
                           names=list(self.keys) or None)
        return accumulator.compute()

    def _need_maps(self) -> None:
        if self.maps is None:
            raise ValueError("this CategoryScores holds no maps (the runner keeps them only when a metric "
                             "plugin other than the standard seven is installed)")

    @cached_property
    def image_curve(self) -> BinaryCurve:
        """Confusion counts over image scores."""
        return binary_curve(self.image_scores, self.labels)

    @cached_property
    def pixel_curve(self) -> BinaryCurve:
        """Confusion counts over all pixels of all maps."""
        self._need_maps()
        return binary_curve(self.maps, self.masks)

    @cached_property
    def region_curve(self) -> ProCurve:
        """The per-region-overlap curve (AUPRO)."""
        self._need_maps()
        return pro_curve(self.maps, self.masks)
