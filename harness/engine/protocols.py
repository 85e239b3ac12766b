"""Evaluation protocols: which training images each fit sees, and which categories it is tested on.

``multiclass``
    One model trained on the normal training images of every category; tested per category.
``fewshot``
    ``k`` normal images per category drawn by seed, one model for all categories. The draw
    depends only on (dataset, category, k, seed) and the sorted sample keys, so every method sees
    the same shots.
``oneclass``
    One model per category (the classic setting).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from harness.data import DatasetIndex, Sample
from harness.errors import UsageError
from harness.specs import PROTOCOLS

PROTOCOL_HELP = {
    "multiclass": "one model on all categories' normal training images, tested per category",
    "fewshot": "k normal images per category (--shots), one model for all categories, repeated over --seeds",
    "oneclass": "one model per category",
}


@dataclass(frozen=True)
class FitUnit:
    """One model to fit and the categories it is then tested on.

    Attributes
    ----------
    name : str
        ``"all"`` for multi-class and few-shot, the category name for one-class.
    train : tuple of Sample
        Normal training samples the fit may see.
    test_categories : tuple of str
        Categories whose test sets this model is evaluated on.
    """

    name: str
    train: tuple[Sample, ...]
    test_categories: tuple[str, ...]


def stable_seed(*parts: object) -> int:
    """A 32-bit seed derived from ``parts`` that is the same in every process and Python version."""
    return zlib.crc32("\x1f".join(str(p) for p in parts).encode("utf-8"))


def draw_shots(samples: list[Sample], k: int, seed: int, dataset: str, category: str) -> list[Sample]:
    """Draw ``k`` training samples of one category, identically for every method.

    Parameters
    ----------
    samples : list of Sample
        The category's training samples (any order: they are sorted by key first).
    k : int
        Number of shots; 0 gives an empty list (zero-shot).
    seed : int
        The job's seed.
    dataset, category : str
        Mixed into the draw so that categories get independent draws.

    Returns
    -------
    list of Sample
        Sorted by key.
    """
    ordered = sorted(samples, key=lambda s: s.key)
    if k > len(ordered):
        raise UsageError(f"--shots {k} is more than the {len(ordered)} training images of {dataset}/{category}")
    rng = np.random.default_rng(stable_seed(dataset, category, k, seed))
    chosen = sorted(rng.choice(len(ordered), size=k, replace=False).tolist())
    return [ordered[i] for i in chosen]


def plan_fit_units(index: DatasetIndex, protocol: str, shots: int | None, seed: int) -> list[FitUnit]:
    """Split a dataset into the fits a job makes under ``protocol``.

    Parameters
    ----------
    index : DatasetIndex
        The loaded dataset (only its categories' training samples are used here).
    protocol : str
        One of :data:`harness.specs.PROTOCOLS`.
    shots : int or None
        Required for ``fewshot``.
    seed : int
        Seed of the few-shot draw.

    Returns
    -------
    list of FitUnit
    """
    cats = list(index.categories)
    if protocol == "multiclass":
        train = tuple(s for c in cats for s in index.categories[c].train)
        return [FitUnit("all", train, tuple(cats))]
    if protocol == "oneclass":
        return [FitUnit(c, tuple(index.categories[c].train), (c,)) for c in cats]
    if protocol == "fewshot":
        if shots is None or shots < 0:
            raise UsageError("the fewshot protocol needs --shots, e.g. --shots 1,2,4")
        train = tuple(s for c in cats for s in draw_shots(index.categories[c].train, shots, seed, index.name, c))
        return [FitUnit("all", train, tuple(cats))]
    raise UsageError(f"unknown protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
