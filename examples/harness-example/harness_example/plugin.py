"""The entry point of ``harness-example``: four hooks, one module, nothing heavy imported."""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np

from harness import (CategoryData, DatasetIndex, DatasetSpec, MethodSpec, MetricSpec, PaperRef, Sample, Setting,
                     hookimpl)
from harness.settings import eval_batch_size, image_size

SETTINGS = (
    image_size(64),
    eval_batch_size(8),
    Setting("grid", int, 16, "side of the grid of average colours", minimum=2),
    Setting("window", int, 3, "patch side, in grid cells (odd)", choices=(1, 3, 5)),
    Setting("k", int, 1, "nearest neighbours averaged", minimum=1),
)


def build(settings):
    """The factory (imports the method module only when a method is built)."""
    from harness_example.method import PatchNN

    return PatchNN(settings)


@hookimpl
def harness_methods():
    """``patchnn``."""
    return [MethodSpec(name="patchnn", paper=PaperRef(title="Patch nearest neighbours (example)", venue="example"),
                       protocols=("multiclass", "oneclass", "fewshot"), profiles={"paper": {}, "tiny": {"grid": 8}},
                       factory=build, settings=SETTINGS,
                       description="Colour patches scored by their distance to normal patches of the category.")]


def _checkerboard(seed: int, hue: int, defect: bool, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] // 8
    board = ((yy + xx) % 2).astype(float)
    image = np.stack([board * 200 + 30, np.full_like(board, hue), (1 - board) * 200 + 30], axis=2)
    image += rng.normal(0, 6, image.shape)
    mask = np.zeros((size, size), dtype=bool)
    if defect:
        y, x = rng.integers(4, size - 14, 2)
        image[y:y + 10, x:x + 10] = (255, 255 - hue, 0)
        mask[y:y + 10, x:x + 10] = True
    return np.clip(image, 0, 255).astype(np.uint8), mask


def load_checkers(root: Any = None, categories: Sequence[str] | None = None) -> DatasetIndex:
    """Two categories of generated checkerboards (8 train, 6 test each)."""
    out = {}
    for c, (name, hue) in enumerate((("cool", 60), ("warm", 180))):
        if categories and name not in categories:
            continue
        train = [Sample(f"{name}/train/good/{i:03d}", name, "train", 0, "good",
                        image=lambda s=10 * c + i, h=hue: _checkerboard(s, h, False)[0]) for i in range(8)]
        test = []
        for i in range(6):
            bad, seed = i >= 3, 500 + 10 * c + i
            defect = "stain" if bad else "good"
            test.append(Sample(f"{name}/test/{defect}/{i:03d}", name, "test", int(bad), defect,
                               image=lambda s=seed, h=hue, b=bad: _checkerboard(s, h, b)[0],
                               mask=(lambda s=seed, h=hue: _checkerboard(s, h, True)[1]) if bad else None))
        out[name] = CategoryData(name, train, test)
    return DatasetIndex("checkers", out)


@hookimpl
def harness_datasets():
    """``checkers``, generated in memory (``--profile auto`` picks ``tiny`` on it)."""
    return [DatasetSpec(name="checkers", categories=("cool", "warm"), loader=load_checkers, needs_root=False,
                        textures=("cool", "warm"), default_profile="tiny",
                        description="generated checkerboards with off-colour squares")]


def image_separation(scores) -> float:
    """(mean anomalous score - mean normal score) / std of the normal scores, per category."""
    normal, anomalous = scores.image_scores[~scores.labels], scores.image_scores[scores.labels]
    if len(normal) < 2 or not len(anomalous):
        return float("nan")
    return float((anomalous.mean() - normal.mean()) / max(normal.std(), 1e-12))


@hookimpl
def harness_metrics():
    """``image_separation``: shown as stored (scale 1), not part of mAD."""
    return [MetricSpec("image_separation", "image", True, image_separation, label="I-Sep", scale=1.0,
                       description="anomalous minus normal image score, in normal standard deviations")]


@hookimpl
def harness_job_finished(job, record):
    """Append the job's key, status and mean metrics to ``$HARNESS_EXAMPLE_LOG`` (if set)."""
    path = os.environ.get("HARNESS_EXAMPLE_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"job": record.job.as_dict(), "status": record.status, "mean": record.mean}) + "\n")
