"""Hyperparameter selection on the pseudo-validation set (LafitE, Sections 3.4 and 4.5).

The corruption step tau is chosen first with feature editing off ("LafitE w/o F.E."); then, with
that tau, the number of neighbours K with editing on. The criterion is detection (image) AUROC on
the synthetic anomalies, computed per category and averaged over categories as the harness
reports test metrics. Only held-out training images enter the pseudo-validation set.

How sure is a choice? For every candidate the record keeps, besides the mean AUROC, the AUROC of
each category, their standard deviation, and a stratified bootstrap of the mean (normal and
anomalous images of each category resampled with replacement, ``rounds`` times, seeded): its
standard deviation and 95 % interval. Two candidates whose intervals overlap widely are not told
apart by the pseudo-validation set.
"""

from __future__ import annotations

import math
from typing import Callable, MutableMapping, Sequence

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
    per = per_category_auroc(scores, labels, categories)
    return float(np.mean(list(per.values()))) if per else math.nan


def per_category_auroc(scores: np.ndarray, labels: np.ndarray, categories: Sequence[str]) -> dict[str, float]:
    """Image AUROC of every category that has both a normal and an anomalous image."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    cats = np.asarray(list(categories))
    out = {}
    for cat in dict.fromkeys(cats.tolist()):
        sel = cats == cat
        if 0 < labels[sel].sum() < sel.sum():
            out[cat] = float(auroc(scores[sel], labels[sel]))
    return out


def summarise(scores: np.ndarray, labels: np.ndarray, categories: Sequence[str], rounds: int = 0,
              seed: int = 0) -> dict:
    """The AUROC of one candidate and how much it would move on other pseudo-validation draws.

    Parameters
    ----------
    scores, labels, categories
        Of the pseudo-validation images.
    rounds : int
        Bootstrap resamples (0: no bootstrap).
    seed : int
        Seeds the resampling (the same for every candidate, so they are compared on the same draws).

    Returns
    -------
    dict
        ``auroc`` (mean over categories), ``per_category``, ``category_std`` and, with ``rounds``,
        ``bootstrap_std`` and ``bootstrap_ci95`` of the mean.
    """
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    cats = np.asarray(list(categories))
    per = per_category_auroc(scores, labels, cats)
    values = list(per.values())
    out = {"auroc": float(np.mean(values)) if values else math.nan, "per_category": per,
           "category_std": float(np.std(values)) if values else math.nan}
    if rounds > 0 and per:
        rng = np.random.default_rng(seed)
        groups = {c: (np.flatnonzero((cats == c) & (labels == 0)), np.flatnonzero((cats == c) & (labels == 1)))
                  for c in per}
        means = np.empty(int(rounds))
        for r in range(int(rounds)):
            draws = []
            for normal, anomalous in groups.values():
                pick = np.concatenate([rng.choice(normal, len(normal)), rng.choice(anomalous, len(anomalous))])
                draws.append(auroc(scores[pick], labels[pick]))
            means[r] = np.mean(draws)
        out["bootstrap_std"] = float(means.std(ddof=1)) if rounds > 1 else 0.0
        out["bootstrap_ci95"] = [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))]
    return out


def _best(grid: Sequence[dict], key: str) -> int | float:
    """The grid value with the highest AUROC (ties and NaN: the earliest in the grid)."""
    ranked = [(-(g["auroc"] if not math.isnan(g["auroc"]) else -math.inf), i) for i, g in enumerate(grid)]
    return grid[min(ranked)[1]][key]


def select_tau_then_k(evaluate: Callable[[int, int | None], np.ndarray], labels: np.ndarray,
                      categories: Sequence[str], taus: Sequence[int], ks: Sequence[int],
                      editing: bool = True, rounds: int = 0, seed: int = 0,
                      done: MutableMapping[str, dict] | None = None,
                      on_result: Callable[[str, dict], None] | None = None) -> dict:
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
    rounds, seed
        Bootstrap of each candidate's AUROC (:func:`summarise`).
    done : mutable mapping, optional
        Summaries already computed, by candidate name (``"tau=300"``, ``"tau=300,k=5"``): they are
        reused instead of evaluated (a resumed selection), and new ones are added.
    on_result : callable, optional
        ``on_result(name, summary)`` after each new evaluation (the caller checkpoints there).

    Returns
    -------
    dict
        ``tau``, ``k`` (None without editing), and ``tau_grid`` / ``k_grid``: lists of
        ``{"tau"|"k": value, **summary}`` for every candidate evaluated.
    """
    if not taus:
        raise ValueError("tau_grid is empty: give at least one corruption step")
    done = {} if done is None else done

    def run(name: str, tau: int, k: int | None) -> dict:
        if name not in done:
            done[name] = summarise(evaluate(tau, k), labels, categories, rounds, seed)
            if on_result is not None:
                on_result(name, done[name])
        return done[name]

    tau_grid = []
    if len(taus) == 1:
        tau = int(taus[0])
    else:
        for cand in taus:
            tau_grid.append({"tau": int(cand), **run(f"tau={int(cand)}", int(cand), None)})
        tau = int(_best(tau_grid, "tau"))
    k, k_grid = None, []
    if editing:
        if not ks:
            raise ValueError("k_grid is empty: give at least one number of neighbours (>= 2)")
        if len(ks) == 1:
            k = int(ks[0])
        else:
            for cand in ks:
                k_grid.append({"k": int(cand), **run(f"tau={tau},k={int(cand)}", tau, int(cand))})
            k = int(_best(k_grid, "k"))
    return {"tau": tau, "k": k, "tau_grid": tau_grid, "k_grid": k_grid}
