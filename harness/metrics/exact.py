"""Exact threshold-free metrics: AUROC, AP, F1max and AUPRO, as DESIGN.md defines them.

Every curve here is built the same way: sort the scores once, walk the thresholds from the
highest score down, and keep one curve point per *distinct* score. That is what makes tied
scores count half in AUROC and what makes F1max the maximum over every distinct threshold,
with no binning and no fixed threshold grid.

Undefined cases (no positive, no negative, no defect region) give NaN and an
:class:`UndefinedMetricWarning`, never an exception: a category can legitimately lack them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

#: The FPR limit of the AUPRO integral (MVTec AD's convention).
AUPRO_FPR_LIMIT = 0.3

# 8-connectivity: diagonal neighbours belong to the same defect region, as in the MVTec AD code.
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


class UndefinedMetricWarning(UserWarning):
    """A metric is undefined for the data given (e.g. no anomalous image); its value is NaN."""


def _undefined(what: str) -> float:
    warnings.warn(what, UndefinedMetricWarning, stacklevel=3)
    return float("nan")


@dataclass(frozen=True)
class BinaryCurve:
    """Cumulative true and false positives at every distinct threshold, highest first.

    Attributes
    ----------
    tps, fps : numpy.ndarray
        ``tps[i]`` / ``fps[i]`` count positives / negatives scoring ``>= thresholds[i]``.
    thresholds : numpy.ndarray
        The distinct scores, in decreasing order.
    """

    tps: np.ndarray
    fps: np.ndarray
    thresholds: np.ndarray

    @property
    def n_pos(self) -> int:
        """Number of positives."""
        return int(self.tps[-1]) if self.tps.size else 0

    @property
    def n_neg(self) -> int:
        """Number of negatives."""
        return int(self.fps[-1]) if self.fps.size else 0


def binary_curve(scores: np.ndarray, labels: np.ndarray) -> BinaryCurve:
    """Build the exact confusion counts at every distinct threshold.

    Parameters
    ----------
    scores : array of shape (n,)
        Higher means more likely positive. Must be finite.
    labels : array of shape (n,)
        Boolean or 0/1 ground truth.

    Returns
    -------
    BinaryCurve
    """
    scores = np.asarray(scores).ravel()
    labels = np.asarray(labels).ravel().astype(bool)
    if scores.shape != labels.shape:
        raise ValueError(f"scores and labels differ in size: {scores.size} vs {labels.size}")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or inf")
    order = np.argsort(scores, kind="stable")[::-1]
    sorted_scores = scores[order]
    # The last index of every run of equal scores is where that threshold's counts are complete.
    last_of_run = np.r_[np.flatnonzero(np.diff(sorted_scores)), sorted_scores.size - 1] if scores.size else np.array([], int)
    tps = np.cumsum(labels[order], dtype=np.int64)[last_of_run]
    fps = (last_of_run + 1) - tps
    return BinaryCurve(tps=tps, fps=fps, thresholds=sorted_scores[last_of_run])


def auroc_from_curve(curve: BinaryCurve) -> float:
    """Area under the ROC curve of ``curve`` (trapezoids: tied scores count half)."""
    if curve.n_pos == 0 or curve.n_neg == 0:
        return _undefined("AUROC is undefined when only one class is present; returning NaN")
    tpr = np.r_[0.0, curve.tps / curve.n_pos]
    fpr = np.r_[0.0, curve.fps / curve.n_neg]
    return float(np.trapezoid(tpr, fpr))


def ap_from_curve(curve: BinaryCurve) -> float:
    """Step-wise average precision of ``curve`` (scikit-learn's ``average_precision_score``)."""
    if curve.n_pos == 0:
        return _undefined("AP is undefined without positives; returning NaN")
    precision = curve.tps / (curve.tps + curve.fps)
    recall = curve.tps / curve.n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def f1max_from_curve(curve: BinaryCurve) -> float:
    """Maximum F1 over every distinct threshold of ``curve``."""
    if curve.n_pos == 0:
        return _undefined("F1max is undefined without positives; returning NaN")
    # F1 = 2TP / (2TP + FP + FN) = 2TP / (TP + FP + P): no division by a zero precision.
    f1 = 2.0 * curve.tps / (curve.tps + curve.fps + curve.n_pos)
    return float(f1.max())


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Exact ROC AUC; ties count half. NaN (with a warning) when one class is missing.

    Parameters
    ----------
    scores, labels : array-like of shape (n,)

    Returns
    -------
    float
    """
    return auroc_from_curve(binary_curve(scores, labels))


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Step-wise average precision (scikit-learn's definition). NaN without positives.

    Parameters
    ----------
    scores, labels : array-like of shape (n,)

    Returns
    -------
    float
    """
    return ap_from_curve(binary_curve(scores, labels))


def f1max(scores: np.ndarray, labels: np.ndarray) -> float:
    """Maximum F1 over every distinct threshold. NaN without positives.

    Parameters
    ----------
    scores, labels : array-like of shape (n,)

    Returns
    -------
    float
    """
    return f1max_from_curve(binary_curve(scores, labels))


@dataclass(frozen=True)
class ProCurve:
    """False-positive rate and per-region overlap at every distinct threshold, highest first.

    Attributes
    ----------
    fpr : numpy.ndarray
        Fraction of defect-free pixels at or above each threshold.
    pro : numpy.ndarray
        Mean over all defect regions of the fraction of the region at or above the threshold.
    n_regions : int
        Number of 8-connected defect regions over all images.
    """

    fpr: np.ndarray
    pro: np.ndarray
    n_regions: int


def pro_curve(maps: np.ndarray, masks: np.ndarray) -> ProCurve:
    """Per-region overlap against FPR, as the MVTec AD evaluation code computes it.

    Each pixel of a defect region contributes ``1 / (region size * number of regions)`` to the
    PRO; each defect-free pixel contributes ``1 / (number of defect-free pixels)`` to the FPR.
    Cumulating these over pixels sorted by decreasing score gives the curve exactly.

    Parameters
    ----------
    maps : array of shape (N, H, W)
        Anomaly maps, finite.
    masks : array of shape (N, H, W)
        Boolean ground truth.

    Returns
    -------
    ProCurve
    """
    maps = np.asarray(maps)
    masks = np.asarray(masks).astype(bool)
    if maps.shape != masks.shape:
        raise ValueError(f"maps {maps.shape} and masks {masks.shape} differ in shape")
    pro_weight = np.zeros(maps.shape, dtype=np.float64)
    n_regions = 0
    sizes_per_image = []
    for i in range(masks.shape[0]):
        labelled, count = ndimage.label(masks[i], structure=_EIGHT_CONNECTED)
        if count:
            sizes = np.bincount(labelled.ravel())
            sizes[0] = 0
            sizes_per_image.append((i, labelled, sizes))
            n_regions += count
    n_ok = int((~masks).sum())
    if n_regions == 0 or n_ok == 0:
        return ProCurve(np.array([]), np.array([]), n_regions)
    for i, labelled, sizes in sizes_per_image:
        inside = labelled > 0
        pro_weight[i][inside] = 1.0 / (sizes[labelled[inside]] * n_regions)
    fp_weight = (~masks).astype(np.float64) / n_ok
    scores = maps.ravel()
    order = np.argsort(scores, kind="stable")[::-1]
    sorted_scores = scores[order]
    last_of_run = np.r_[np.flatnonzero(np.diff(sorted_scores)), sorted_scores.size - 1]
    fpr = np.cumsum(fp_weight.ravel()[order])[last_of_run]
    pro = np.cumsum(pro_weight.ravel()[order])[last_of_run]
    # Rounding can push the cumulative sums a hair past 1; the MVTec code clips the same way.
    return ProCurve(np.clip(fpr, 0.0, 1.0), np.clip(pro, 0.0, 1.0), n_regions)


def area_to_limit(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under the piecewise-linear curve (x, y) from its start to ``x_max``.

    When ``x_max`` falls between two points, ``y`` is interpolated linearly there (the MVTec AD
    code's ``trapezoid`` with ``x_max``).

    Parameters
    ----------
    x : array, non-decreasing
    y : array, same length
    x_max : float

    Returns
    -------
    float
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if np.any(x == x_max):
        keep = x <= x_max
        return float(np.trapezoid(y[keep], x[keep]))
    ins = int(np.searchsorted(x, x_max, side="left"))
    keep = x < x_max
    area = float(np.trapezoid(y[keep], x[keep]))
    if 0 < ins < x.size:
        y_at = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1])
        area += 0.5 * (y_at + y[ins - 1]) * (x_max - x[ins - 1])
    return area


def aupro_from_curve(curve: ProCurve, fpr_limit: float = AUPRO_FPR_LIMIT) -> float:
    """Normalised area under the PRO curve up to ``fpr_limit``."""
    if curve.n_regions == 0:
        return _undefined("AUPRO is undefined without defect pixels; returning NaN")
    if curve.fpr.size == 0:
        return _undefined("AUPRO is undefined without defect-free pixels; returning NaN")
    fpr = np.r_[0.0, curve.fpr, 1.0]
    pro = np.r_[0.0, curve.pro, 1.0]
    return area_to_limit(fpr, pro, fpr_limit) / fpr_limit


def aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = AUPRO_FPR_LIMIT) -> float:
    """Per-region-overlap AUC up to ``fpr_limit``, normalised to [0, 1] (MVTec AD's AUPRO).

    Parameters
    ----------
    maps : array of shape (N, H, W)
    masks : array of shape (N, H, W)
    fpr_limit : float, default 0.3

    Returns
    -------
    float
    """
    return aupro_from_curve(pro_curve(maps, masks), fpr_limit)
