"""Exact curve vertices from the metric engine, and thinning them for plots.

The engine (:mod:`harness.metrics.engine`) already reduces every pixel curve to two vertices per
distinct defect-pixel score; the image curves come from :func:`harness.metrics.binary_curve`.
This module turns both into plain polylines whose areas *are* the metrics:

- ROC: vertices (FPR, TPR) from (0, 0) to (1, 1); the trapezoid area is the AUROC (ties count
  half, because a tie group is one diagonal segment).
- PR: the step function of average precision, drawn as vertices ``(R_{k-1}, P_k), (R_k, P_k)``
  for every threshold ``k``; its area is AP (scikit-learn's step-wise definition), never the
  interpolated trapezoid that overestimates it.
- PRO: vertices (FPR, PRO) from (0, 0) to (1, 1); the area up to FPR 0.3 (interpolated there)
  divided by 0.3 is the AUPRO.

A category's pixel curves can have millions of vertices. :func:`thin` keeps a subset for
plotting (Ramer-Douglas-Peucker in the unit square): every dropped vertex lies within
``tolerance`` of the kept polyline, so the drawn curve differs from the exact one by less than a
pixel, and the area of the thinned polyline differs from the metric by at most ``4 *
tolerance``. Thinning never feeds back into a number: each :class:`Curve` carries the metric
computed from its *exact* vertices (and equal to the engine's value), and that is what a report
prints.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from harness.metrics.engine import MetricAccumulator, PixelCurves
from harness.metrics.exact import AUPRO_FPR_LIMIT, BinaryCurve, area_to_limit, binary_curve

#: Default thinning tolerance, in axis units of the unit square (a tenth of a percent).
PLOT_TOLERANCE = 1e-3
#: The curves :func:`category_curves` returns, with the metric each one's area gives.
CURVE_METRICS = {"image_roc": "image_auroc", "image_pr": "image_ap", "pixel_roc": "pixel_auroc",
                 "pixel_pr": "pixel_ap", "pixel_pro": "pixel_aupro"}


@dataclass(frozen=True)
class Curve:
    """One curve as a polyline.

    Attributes
    ----------
    name : str
        ``image_roc``, ``image_pr``, ``pixel_roc``, ``pixel_pr`` or ``pixel_pro``.
    x, y : numpy.ndarray of float64
        The vertices, ``x`` non-decreasing.
    metric : str
        The metric the curve's area gives (see :data:`CURVE_METRICS`).
    value : float
        That metric, computed from the exact vertices (a thinned copy keeps the exact value).
    n_exact : int
        Number of exact vertices (a thinned copy keeps the original count).
    """

    name: str
    x: np.ndarray
    y: np.ndarray
    metric: str
    value: float
    n_exact: int

    @property
    def area(self) -> float:
        """The metric as computed from these vertices (for a thinned curve: an approximation)."""
        return curve_area(self.name, self.x, self.y)

    def thinned(self, tolerance: float = PLOT_TOLERANCE) -> "Curve":
        """A copy with fewer vertices for plotting (see :func:`thin`); ``value`` stays exact."""
        keep = thin(self.x, self.y, tolerance)
        return replace(self, x=self.x[keep], y=self.y[keep])

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"name": self.name, "metric": self.metric, "value": self.value, "n_exact": self.n_exact,
                "x": self.x.tolist(), "y": self.y.tolist()}


def curve_area(name: str, x: np.ndarray, y: np.ndarray, fpr_limit: float = AUPRO_FPR_LIMIT) -> float:
    """The metric given by the polyline (x, y) of curve kind ``name``.

    ROC and PR curves: the trapezoid area. PRO: the area up to ``fpr_limit`` (interpolated
    there), divided by ``fpr_limit``.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if name == "pixel_pro":
        return area_to_limit(x, y, fpr_limit) / fpr_limit
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) * 0.5)


def _roc(name: str, fp: np.ndarray, tp: np.ndarray, n_neg: int, n_pos: int) -> Curve:
    x = fp.astype(np.float64) / n_neg
    y = tp.astype(np.float64) / n_pos
    return Curve(name, x, y, CURVE_METRICS[name], curve_area(name, x, y), int(x.size))


def _pr_steps(name: str, tp: np.ndarray, fp: np.ndarray, n_pos: int) -> Curve:
    """The AP step function: precision ``P_k`` held over recall (R_{k-1}, R_k]."""
    tp = tp.astype(np.float64)
    precision = tp / (tp + fp.astype(np.float64))
    recall = tp / n_pos
    before = np.r_[0.0, recall[:-1]]
    x = np.empty(2 * recall.size)
    y = np.empty_like(x)
    x[0::2], x[1::2] = before, recall
    y[0::2], y[1::2] = precision, precision
    value = float(np.sum((recall - before) * precision))
    return Curve(name, x, y, CURVE_METRICS[name], value, int(x.size))


def image_curves(curve: BinaryCurve) -> dict[str, Curve]:
    """Image-level ROC and PR curves (empty when a class is missing)."""
    if curve.n_pos == 0 or curve.n_neg == 0:
        return {}
    out = {"image_roc": _roc("image_roc", np.r_[0, curve.fps], np.r_[0, curve.tps], curve.n_neg, curve.n_pos)}
    out["image_pr"] = _pr_steps("image_pr", curve.tps, curve.fps, curve.n_pos)
    return out


def pixel_curves(curves: PixelCurves, fpr_limit: float = AUPRO_FPR_LIMIT) -> dict[str, Curve]:
    """Pixel-level ROC, PR and PRO curves from the engine's reduced curves.

    Empty when there is no defect pixel or no defect-free pixel (the metrics are undefined).
    Between two distinct defect-pixel scores only defect-free pixels enter, so recall stays
    constant there and the reduced thresholds give every step of AP exactly.
    """
    if curves.n_pos == 0 or curves.n_neg == 0:
        return {}
    fp, tp = curves.roc_points()
    out = {"pixel_roc": _roc("pixel_roc", fp, tp, curves.n_neg, curves.n_pos)}
    out["pixel_pr"] = _pr_steps("pixel_pr", curves.tps, curves.fps_ge, curves.n_pos)
    fpr, pro = curves.pro_points()
    out["pixel_pro"] = Curve("pixel_pro", fpr, pro, "pixel_aupro", area_to_limit(fpr, pro, fpr_limit) / fpr_limit,
                             int(fpr.size))
    return out


def category_curves(accumulator: MetricAccumulator) -> dict[str, Curve]:
    """Every exact curve of what ``accumulator`` holds (image ROC/PR, pixel ROC/PR/PRO).

    Parameters
    ----------
    accumulator : MetricAccumulator
        Fed with a category's maps; it may already have been computed (the sorted data is reused).

    Returns
    -------
    dict of str to Curve
        Only the curves that are defined.
    """
    scores, labels = accumulator.image_scores_and_labels()
    out = image_curves(binary_curve(scores, labels))
    out.update(pixel_curves(accumulator.pixel_curves(), accumulator.fpr_limit))
    return out


def thin(x: np.ndarray, y: np.ndarray, tolerance: float = PLOT_TOLERANCE) -> np.ndarray:
    """Indices of the vertices to keep so that the polyline moves by at most ``tolerance``.

    Ramer-Douglas-Peucker with the perpendicular distance in the unit square (curves here live
    in [0, 1]²): a vertex is dropped only when it lies within ``tolerance`` of the chord that
    replaces it. The first and last vertices are always kept. Works on millions of vertices:
    each split measures one segment's vertices with one NumPy expression.

    Parameters
    ----------
    x, y : array of shape (n,)
    tolerance : float
        0 keeps every vertex that is not exactly on a straight line between its neighbours.

    Returns
    -------
    numpy.ndarray of int
        Sorted indices into ``x`` and ``y``.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n = x.size
    if n <= 2:
        return np.arange(n)
    keep = np.zeros(n, dtype=bool)
    keep[0] = keep[-1] = True
    stack = [(0, n - 1)]
    while stack:
        start, end = stack.pop()
        if end - start < 2:
            continue
        dx, dy = x[end] - x[start], y[end] - y[start]
        px, py = x[start + 1:end] - x[start], y[start + 1:end] - y[start]
        length = float(np.hypot(dx, dy))
        if length == 0.0:
            distance = np.hypot(px, py)
        else:
            distance = np.abs(px * dy - py * dx) / length
        worst = int(np.argmax(distance))
        if distance[worst] > tolerance:
            split = start + 1 + worst
            keep[split] = True
            stack.append((start, split))
            stack.append((split, end))
    return np.flatnonzero(keep)


__all__ = ["CURVE_METRICS", "Curve", "PLOT_TOLERANCE", "category_curves", "curve_area", "image_curves",
           "pixel_curves", "thin"]
