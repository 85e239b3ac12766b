"""Metrics: exact AUROC, AP, F1max and AUPRO, per category, then averaged over categories.

Public API
----------
- :func:`evaluate` scores anomaly maps from any codebase against masks.
- :class:`MetricAccumulator` gives the same numbers batch by batch, without keeping the maps.
- :class:`CategoryScores` is what each metric plugin's ``compute`` receives.
- :func:`mean_over_categories` gives the papers' ``m`` values and mAD.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from harness.metrics.engine import MetricAccumulator
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
    "AUPRO_FPR_LIMIT", "CategoryScores", "MAD_METRICS", "METRIC_LABELS", "METRIC_NAMES", "MetricAccumulator",
    "UndefinedMetricWarning",
    "aupro", "auroc", "average_precision", "binary_curve", "evaluate", "f1max", "mean_over_categories", "pro_curve",
]


def evaluate(anomaly_maps, masks, image_scores=None, labels=None) -> dict[str, float]:
    """Compute the seven standard metrics of one category, exactly.

    Parameters
    ----------
    anomaly_maps : array of shape (N, H, W) or sequence of (H, W) arrays
        Higher means more anomalous, any value range. NaN or inf is an error naming the image.
        float32 maps are sorted as float32; float64 maps keep their precision.
    masks : same shapes as ``anomaly_maps``
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

    See Also
    --------
    MetricAccumulator : the same numbers, fed batch by batch.
    """
    accumulator = MetricAccumulator()
    accumulator.update(anomaly_maps, masks, image_scores=image_scores, labels=labels)
    return accumulator.compute()


def mean_over_categories(per_category: Mapping[str, Mapping[str, float | None]],
                         mad_metrics: Sequence[str] | None = None) -> dict[str, float]:
    """Unweighted mean of each metric over categories, plus ``mad``.

    A category where a metric is undefined (NaN or None) is left out of that metric's mean; a
    metric undefined everywhere stays NaN. ``mad`` is the mean of ``mad_metrics`` (the metric
    specs marked ``in_mad``; default :data:`MAD_METRICS`) and is only given when all of them
    are defined.

    Parameters
    ----------
    per_category : mapping of category to mapping of metric to value
    mad_metrics : sequence of str, optional

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
    mad = [out.get(n, float("nan")) for n in (MAD_METRICS if mad_metrics is None else mad_metrics)]
    if not any(math.isnan(v) for v in mad):
        out["mad"] = float(np.mean(mad))
    return out
