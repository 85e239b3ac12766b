"""Metrics that belong to one benchmark's own evaluation: sPRO (MVTec LOCO AD), sample-level
AUROC (Real-IAD), and MVTec AD 2's AU-PRO at FPR 0.05 and SegF1.

Each is a :class:`harness.MetricSpec` limited to its datasets (``MetricSpec.datasets``), so it
appears only in their records and tables. Definitions are in each function's docstring.
"""

from __future__ import annotations

import re

import numpy as np

from harness.metrics.exact import UndefinedMetricWarning, auroc
from harness.metrics.scores import CategoryScores
from harness.specs import MetricSpec

LOCO = ("mvtec_loco",)
REALIAD = ("realiad",)
AD2 = ("mvtec_ad2",)

# A Real-IAD image stem ends with its camera view and capture time: <object>_C<k>_<time>.
_VIEW = re.compile(r"^(?P<sample>.+)_C[1-9]_[^_]*$")


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


def pixel_spro(scores: CategoryScores) -> float:
    """AUC-sPRO up to FPR 0.05, mean of logical and structural anomalies (see :mod:`harness.metrics.spro`)."""
    return _spro(scores)["pixel_spro"]


def pixel_spro_logical(scores: CategoryScores) -> float:
    """AUC-sPRO (FPR 0.05) of the logical anomalies scored with all good images."""
    return _spro(scores).get("pixel_spro_logical", float("nan"))


def pixel_spro_structural(scores: CategoryScores) -> float:
    """AUC-sPRO (FPR 0.05) of the structural anomalies scored with all good images."""
    return _spro(scores).get("pixel_spro_structural", float("nan"))


def _group_auroc(scores: CategoryScores, defect: str) -> float:
    """Image AUROC of the anomalies of one defect folder against all normal images."""
    if len(scores.samples) != scores.image_scores.size:
        raise ValueError(f"image AUROC by anomaly type of {scores.name!r} needs the samples")
    keep = np.array([s.label == 0 or s.defect == defect for s in scores.samples])
    return auroc(scores.image_scores[keep], scores.labels[keep])


def image_auroc_logical(scores: CategoryScores) -> float:
    """Image AUROC of MVTec LOCO AD's logical anomalies against all good images (the paper's split)."""
    return _group_auroc(scores, "logical_anomalies")


def image_auroc_structural(scores: CategoryScores) -> float:
    """Image AUROC of MVTec LOCO AD's structural anomalies against all good images."""
    return _group_auroc(scores, "structural_anomalies")


def sample_groups(keys) -> list[str]:
    """The object each Real-IAD image belongs to: its key without ``_C<view>_<time>`` (else the key)."""
    out = []
    for key in keys:
        head, _, stem = str(key).rpartition("/")
        match = _VIEW.match(stem)
        out.append(f"{head.split('/')[0]}/{match.group('sample')}" if match else str(key))
    return out


def image_sample_auroc(scores: CategoryScores) -> float:
    """Real-IAD's sample-level AUROC: the five views of one object are one sample.

    Definition (Real-IAD paper, Sec. 4 "multi-view" setting): a sample is anomalous when any of
    its views is; its score is the maximum of its views' image scores; the AUROC is the exact
    ROC area over samples (ties count half). Views are grouped by their file stem without the
    camera and time suffix (``audiojack_0025_NG_AK`` for ``..._C1_<time>`` to ``..._C5_<time>``).
    """
    groups = sample_groups(scores.keys)
    if len(groups) != scores.image_scores.size:
        raise ValueError(f"sample-level AUROC of {scores.name!r} needs the sample keys")
    names, inverse = np.unique(np.asarray(groups), return_inverse=True)
    best = np.full(names.size, -np.inf)
    np.maximum.at(best, inverse, scores.image_scores)
    label = np.zeros(names.size, dtype=bool)
    np.logical_or.at(label, inverse, scores.labels)
    return auroc(best, label)


def pixel_segf1(scores: CategoryScores) -> float:
    """MVTec AD 2's SegF1 at the threshold chosen on validation normals (see :mod:`harness.metrics.segf1`)."""
    import warnings

    from harness.metrics.segf1 import segf1

    if scores.validation_threshold is None:
        warnings.warn(f"SegF1 of {scores.name!r} needs a threshold from validation images; returning NaN",
                      UndefinedMetricWarning, stacklevel=2)
        return float("nan")
    if scores.maps is None:
        raise ValueError(f"SegF1 of {scores.name!r} needs the maps")
    return segf1(scores.maps, scores.masks, scores.validation_threshold)


def pixel_aupro_05(scores: CategoryScores) -> float:
    """AU-PRO up to FPR 0.05, normalised by 0.05 (MVTec AD 2's localisation metric).

    The MVTec AD definition of AUPRO (8-connected regions, FPR over defect-free pixels, trapezoid
    with interpolation at the limit) with the FPR limit 0.05 that the MVTec AD 2 paper reports.
    """
    from harness.metrics.exact import aupro_from_curve

    return aupro_from_curve(scores.region_curve, 0.05)


DATASET_METRICS = (
    MetricSpec("image_auroc_logical", "image", True, image_auroc_logical, "I-AUROC-log", datasets=LOCO,
               needs_maps=False, description="image AUROC, logical anomalies with all good images"),
    MetricSpec("image_auroc_structural", "image", True, image_auroc_structural, "I-AUROC-str", datasets=LOCO,
               needs_maps=False, description="image AUROC, structural anomalies with all good images"),
    MetricSpec("pixel_spro", "pixel", True, pixel_spro, "P-sPRO", datasets=LOCO,
               description="AUC-sPRO up to FPR 0.05 (MVTec LOCO AD), mean of logical and structural"),
    MetricSpec("pixel_spro_logical", "pixel", True, pixel_spro_logical, "P-sPRO-log", datasets=LOCO,
               description="AUC-sPRO up to FPR 0.05, logical anomalies with all good images"),
    MetricSpec("pixel_spro_structural", "pixel", True, pixel_spro_structural, "P-sPRO-str", datasets=LOCO,
               description="AUC-sPRO up to FPR 0.05, structural anomalies with all good images"),
    MetricSpec("image_sample_auroc", "image", True, image_sample_auroc, "S-AUROC", datasets=REALIAD,
               needs_maps=False, description="Real-IAD sample-level AUROC: max over an object's views"),
    MetricSpec("pixel_segf1", "pixel", True, pixel_segf1, "SegF1", datasets=AD2,
               description="MVTec AD 2 SegF1: pixel F1 at mean + 3 std of the validation maps"),
    MetricSpec("pixel_aupro_fpr0.05", "pixel", True, pixel_aupro_05, "P-AUPRO@5%", datasets=AD2,
               description="AU-PRO up to FPR 0.05 (MVTec AD 2)"),
)

__all__ = ["DATASET_METRICS", "UndefinedMetricWarning", "image_sample_auroc", "pixel_spro", "sample_groups"]
