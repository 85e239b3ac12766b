"""Metrics: exact AUROC, AP, F1max and AUPRO, per category, then averaged over categories.

Public API
----------
- :func:`evaluate` scores anomaly maps from any codebase against masks.
- :class:`CategoryScores` is what each metric plugin's ``compute`` receives.
- :func:`mean_over_categories` gives the papers' ``m`` values and mAD.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from harness.metrics.exact import (AUPRO_FPR_LIMIT, UndefinedMetricWarning, aupro, auroc, average_precision,
                                   binary_curve, f1max, pro_curve)
from harness.metrics.scores import CategoryScores

#: The seven standard metrics, in table order.
METRIC_NAMES = ("image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro")
#: Column titles used in tables.
METRIC_LABELS = {
    "image_auroc": "I-AUROC", "image_ap": "I-AP", "image_f1max": "I-F1max", "pixel_auroc": "P-AUROC",
    "pixel_ap": "P-AP", "pixel_f1max": "P-F1max", "pixel_aupro": "P-AUPRO", "mad": "mAD",
}
#: mAD is the mean of these (ADer's summary, also DiAD's).
MAD_METRICS = METRIC_NAMES

__all__ = [
    "AUPRO_FPR_LIMIT", "CategoryScores", "MAD_METRICS", "METRIC_LABELS", "METRIC_NAMES", "UndefinedMetricWarning",
    "aupro", "auroc", "average_precision", "binary_curve", "evaluate", "f1max", "mean_over_categories", "pro_curve",
]


def _as_stack(arrays, name: str, dtype) -> np.ndarray:
    if isinstance(arrays, np.ndarray):
        out = arrays
    else:
        arrays = [np.asarray(a) for a in arrays]
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise ValueError(f"{name} have different shapes {sorted(shapes)}; resize them to one size first")
        out = np.stack(arrays) if arrays else np.zeros((0, 1, 1))
    if out.ndim == 4 and out.shape[1] == 1:
        out = out[:, 0]
    if out.ndim != 3:
        raise ValueError(f"{name} must be (N, H, W) or a sequence of (H, W) arrays, got shape {out.shape}")
    return out.astype(dtype, copy=False)


def evaluate(anomaly_maps, masks, image_scores=None, labels=None) -> dict[str, float]:
    """Compute the seven standard metrics of one category.

    Parameters
    ----------
    anomaly_maps : array of shape (N, H, W) or sequence of (H, W) arrays
        Higher means more anomalous. NaN or inf is an error naming the image.
    masks : same shape as ``anomaly_maps``
        Boolean or 0/255 ground truth; a pixel is defective when > 0.
    image_scores : array of shape (N,), optional
        Defaults to each map's maximum.
    labels : array of shape (N,), optional
        Defaults to "the mask has a defect pixel".

    Returns
    -------
    dict
        ``image_auroc, image_ap, image_f1max, pixel_auroc, pixel_ap, pixel_f1max, pixel_aupro`` as
        fractions in [0, 1]; NaN (with an :class:`UndefinedMetricWarning`) where undefined.
    """
    from harness.metrics.builtin import STANDARD_METRICS

    maps = _as_stack(anomaly_maps, "anomaly maps", np.float32)
    mask_arr = _as_stack(masks, "masks", None) > 0
    for i, amap in enumerate(maps):
        if not np.isfinite(amap).all():
            raise ValueError(f"anomaly map {i} contains NaN or inf")
    if image_scores is None:
        image_scores = maps.reshape(maps.shape[0], -1).max(axis=1) if maps.size else np.zeros(0)
    if labels is None:
        labels = mask_arr.reshape(mask_arr.shape[0], -1).any(axis=1)
    scores = CategoryScores(image_scores=image_scores, labels=labels, maps=maps, masks=mask_arr)
    return {spec.name: float(spec.compute(scores)) for spec in STANDARD_METRICS}


def mean_over_categories(per_category: Mapping[str, Mapping[str, float | None]]) -> dict[str, float]:
    """Unweighted mean of each metric over categories, plus ``mad``.

    A category where a metric is undefined (NaN or None) is left out of that metric's mean; a
    metric undefined everywhere stays NaN. ``mad`` is the mean of :data:`MAD_METRICS` and is only
    given when all of them are defined.

    Parameters
    ----------
    per_category : mapping of category to mapping of metric to value

    Returns
    -------
    dict of str to float
    """
    names: list[str] = []
    for values in per_category.values():
        names.extend(n for n in values if n not in names)
    out: dict[str, float] = {}
    for name in names:
        vals = [v for c in per_category.values() if (v := c.get(name)) is not None and not math.isnan(v)]
        out[name] = float(np.mean(vals)) if vals else float("nan")
    mad = [out.get(n, float("nan")) for n in MAD_METRICS]
    if not any(math.isnan(v) for v in mad):
        out["mad"] = float(np.mean(mad))
    return out
