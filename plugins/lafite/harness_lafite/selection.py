"""Hyperparameter selection on the pseudo-validation set (LafitE, Sections 3.4 and 4.5).

The corruption step tau is chosen first with feature editing off ("LafitE w/o F.E."); then, with
that tau, the number of neighbours K with editing on. The criterion is detection (image) AUROC on
the synthetic anomalies, computed per category and averaged over categories as the harness
reports test metrics. Only training images enter the pseudo-validation set.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from harness.metrics import auroc


def category_mean_auroc(scores: np.ndarray, labels: np.ndarray, categories: Sequence[str]) -> float:
    """Image AUROC per category, averaged over the categories that have both labels.

    Parameters
    ----------
    scores : numpy.ndarray
        (N,) image scores.
    labels : numpy.ndarray
        (N,) 1 for synthetic anomalies.
    categories : sequence of str

    Returns
    -------
    float
        NaN when no category has both a normal and an anomalous image.
    """
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    cats = np.asarray(list(categories))
    values = []
    for cat in dict.fromkeys(cats.tolist()):
        sel = cats == cat
        if 0 < labels[sel].sum() < sel.sum():
            values.append(auroc(scores[sel], labels[sel]))
    return float(np.mean(values)) if values else math.nan


def _best(grid: Sequence[dict], key: str) -> int | float:
    """The grid value with the highest AUROC (ties and NaN: the earliest in the grid)."""
    ranked = [(-(g["auroc"] if not math.isnan(g["auroc"]) else -math.inf), i) for i, g in enumerate(grid)]
    return grid[min(ranked)[1]][key]


def select_tau_then_k(evaluate: Callable[[int, int | None], np.ndarray], labels: np.ndarray,
                      categories: Sequence[str], taus: Sequence[int], ks: Sequence[int],
                      editing: bool = True) -> dict:
    """Choose tau (editing off), then K (editing on), by pseudo-validation image AUROC.

    Parameters
    ----------
    evaluate : callable
        ``evaluate(tau, k) -> scores`` for every pseudo-validation image; ``k=None`` means
        feature editing off.
    labels, categories
        Of the pseudo-validation images.
    taus, ks : sequence of int
        Candidate grids; a single value is taken without evaluation.
    editing : bool
        False (the "w/o F.E." ablation): K is not searched and stays None.

    Returns
    -------
    dict
        ``tau``, ``k`` (None without editing), and ``tau_grid`` / ``k_grid``: lists of
        ``{"tau"|"k": value, "auroc": float}`` for every candidate evaluated.
    """
    if not taus:
        raise ValueError("tau_grid is empty: give at least one corruption step")
    tau_grid = []
    if len(taus) == 1:
        tau = int(taus[0])
    else:
        for tau in taus:
            tau_grid.append({"tau": int(tau), "auroc": category_mean_auroc(evaluate(int(tau), None), labels, categories)})
        tau = int(_best(tau_grid, "tau"))
    k, k_grid = None, []
    if editing:
        if not ks:
            raise ValueError("k_grid is empty: give at least one number of neighbours (>= 2)")
        if len(ks) == 1:
            k = int(ks[0])
        else:
            for cand in ks:
                k_grid.append({"k": int(cand), "auroc": category_mean_auroc(evaluate(tau, int(cand)), labels, categories)})
            k = int(_best(k_grid, "k"))
    return {"tau": tau, "k": k, "tau_grid": tau_grid, "k_grid": k_grid}
