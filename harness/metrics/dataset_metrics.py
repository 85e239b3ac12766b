"""Building blocks of the metrics that belong to one benchmark's own evaluation.

The dataset plugins declare their metrics (``harness_metrics`` in their modules, limited to
their dataset by ``MetricSpec.datasets``) from these functions; the core names no dataset:

- :func:`spro_metric`: AUC-sPRO from the samples' mask channels (MVTec LOCO AD);
- :func:`group_image_auroc`: image AUROC of some defect folders against all normal images (LOCO's
  logical and structural anomalies);
- :func:`sample_image_auroc`: AUROC over samples made of several images (Real-IAD's five views);
- :func:`pixel_segf1`: SegF1 at a threshold chosen on validation normals (MVTec AD 2);
- :func:`aupro_at`: AU-PRO to another FPR limit (MVTec AD 2's 0.05).

``harness evaluate`` computes them the same way from maps made elsewhere.
"""

from __future__ import annotations

import warnings
from typing import Callable, Sequence

import numpy as np

from harness.metrics.exact import UndefinedMetricWarning, auroc
from harness.metrics.scores import CategoryScores
from harness.metrics.segf1 import THRESHOLD_METRICS


def _spro(scores: CategoryScores) -> dict[str, float]:
    """sPRO metrics of a category, computed once per :class:`CategoryScores`."""
    cached = scores.__dict__.get("_spro")
    if cached is None:
        from harness.metrics.spro import spro_of_samples

        if scores.maps is None or not scores.samples:
            raise ValueError(f"sPRO of {scores.name!r} needs the maps and the samples (with their mask channels)")
        cached = spro_of_samples(scores.maps, scores.samples)
        scores.__dict__["_spro"] = cached
    return cached


def spro_metric(key: str = "pixel_spro") -> Callable[[CategoryScores], float]:
    """A ``compute`` giving one value of :func:`harness.metrics.spro.spro_metrics`.

    ``key``: ``pixel_spro`` (FPR 0.05, mean over the anomaly folders, each with all normal
    images), ``pixel_spro_<folder without _anomalies>`` or ``pixel_spro_fpr<limit>``.
    """
    def compute(scores: CategoryScores) -> float:
        return _spro(scores).get(key, float("nan"))

    compute.__doc__ = f"``{key}`` of :func:`harness.metrics.spro.spro_metrics`."
    return compute


def group_image_auroc(defects: Sequence[str]) -> Callable[[CategoryScores], float]:
    """A ``compute``: image AUROC of the images of ``defects`` (folders) against all normal images."""
    wanted = tuple(defects)

    def compute(scores: CategoryScores) -> float:
        if len(scores.samples) != scores.image_scores.size:
            raise ValueError(f"image AUROC by anomaly type of {scores.name!r} needs the samples")
        keep = np.array([s.label == 0 or s.defect in wanted for s in scores.samples])
        return auroc(scores.image_scores[keep], scores.labels[keep])

    compute.__doc__ = f"Image AUROC of {', '.join(wanted)} against all normal images."
    return compute


def sample_image_auroc(sample_of: Callable[[str], str]) -> Callable[[CategoryScores], float]:
    """A ``compute``: AUROC over samples of several images (e.g. the views of one object).

    ``sample_of(key)`` names the sample an image belongs to. A sample is anomalous when any of its
    images is; its score is the maximum of its images' scores; the AUROC is exact (ties half).
    """
    def compute(scores: CategoryScores) -> float:
        if len(scores.keys) != scores.image_scores.size:
            raise ValueError(f"sample-level AUROC of {scores.name!r} needs the sample keys")
        names, inverse = np.unique(np.asarray([sample_of(k) for k in scores.keys]), return_inverse=True)
        best = np.full(names.size, -np.inf)
        np.maximum.at(best, inverse, scores.image_scores)
        label = np.zeros(names.size, dtype=bool)
        np.logical_or.at(label, inverse, scores.labels)
        return auroc(best, label)

    compute.__doc__ = "AUROC over samples: max of their images' scores, anomalous when any image is."
    return compute


def pixel_segf1(scores: CategoryScores) -> float:
    """SegF1 at the threshold chosen on validation normals (see :mod:`harness.metrics.segf1`)."""
    from harness.metrics.segf1 import segf1

    if scores.validation_threshold is None:
        warnings.warn(f"SegF1 of {scores.name!r} needs a threshold from validation images; returning NaN",
                      UndefinedMetricWarning, stacklevel=2)
        return float("nan")
    if scores.maps is None:
        raise ValueError(f"SegF1 of {scores.name!r} needs the maps")
    return segf1(scores.maps, scores.masks, scores.validation_threshold)


def aupro_at(limit: float) -> Callable[[CategoryScores], float]:
    """A ``compute``: AU-PRO to FPR ``limit``, normalised by it (the MVTec AD definition otherwise)."""
    def compute(scores: CategoryScores) -> float:
        from harness.metrics.exact import aupro_from_curve

        return aupro_from_curve(scores.region_curve, limit)

    compute.__doc__ = f"AU-PRO up to FPR {limit:g}, normalised by {limit:g}."
    return compute


__all__ = ["THRESHOLD_METRICS", "aupro_at", "group_image_auroc", "pixel_segf1", "sample_image_auroc", "spro_metric"]
