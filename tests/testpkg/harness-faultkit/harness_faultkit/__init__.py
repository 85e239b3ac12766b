"""Test-only plugins: ``slowtoy``, a method whose fit takes many small checkpointed steps, and ``dots``.

The fault-injection tests run them in subprocesses (killed, signalled, run twice at once). Each
fit start and each optimiser step is logged to ``$HARNESS_FAULTKIT_LOG`` so a test can tell how
often a job trained and where a resumed fit started.
"""

from __future__ import annotations

import os
import time
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from harness import (CategoryData, DatasetIndex, DatasetSpec, FitContext, Method, MethodSpec, PaperRef, Prediction,
                     Sample, Setting, TrainSet, hookimpl)
from harness.settings import eval_batch_size, image_size

SIZE = 24


def _image(seed: int, defect: bool) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = np.clip(120 + rng.normal(0, 10, (SIZE, SIZE, 3)), 0, 255)
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    if defect:
        y, x = rng.integers(2, SIZE - 8, 2)
        image[y:y + 6, x:x + 6] = 250
        mask[y:y + 6, x:x + 6] = True
    return image.astype(np.uint8), mask


def load_dots(root: Any = None, categories: Sequence[str] | None = None) -> DatasetIndex:
    """Two categories of grey noise with bright squares as defects."""
    cats = {}
    for c, name in enumerate(("left", "right")):
        if categories and name not in categories:
            continue
        train = [Sample(f"{name}/train/good/{i:03d}", name, "train", 0, "good",
                        image=lambda s=100 * c + i: _image(s, False)[0]) for i in range(6)]
        test = []
        for i in range(6):
            bad = i >= 3
            seed = 1000 + 100 * c + i
            test.append(Sample(f"{name}/test/{'dot' if bad else 'good'}/{i:03d}", name, "test", int(bad),
                               "dot" if bad else "good", image=lambda s=seed, b=bad: _image(s, b)[0],
                               mask=(lambda s=seed: _image(s, True)[1]) if bad else None))
        cats[name] = CategoryData(name, train, test)
    return DatasetIndex("dots", cats)


def _log(line: str) -> None:
    path = os.environ.get("HARNESS_FAULTKIT_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(f"{os.getpid()} {line}\n")


class SlowToy(Method):
    """Learns a per-pixel template by SGD, one step at a time, sleeping between steps."""

    def __init__(self, settings: Mapping[str, Any]) -> None:
        super().__init__(settings)
        self.template = torch.nn.Parameter(torch.zeros(3, SIZE, SIZE))
        self.net = torch.nn.Module()
        self.net.template = self.template

    def networks(self) -> Mapping[str, torch.nn.Module]:
        return {"net": self.net}

    def fit(self, train: TrainSet, context: FitContext) -> None:
        _log("fit-start")
        opt = torch.optim.SGD([self.template], lr=0.2, momentum=0.5)
        rng = np.random.default_rng(context.seed)
        images = torch.stack([x for x, _ in train.images()])
        steps = self.settings.steps
        with context.checkpoint.stage("train", net=self.net, optimiser=opt, rng=rng) as position:
            if position.steps:
                _log(f"resumed-at {position.steps}")
            for epoch in range(position.epoch, 1):
                for index in range(steps):
                    if position.skip(epoch, index):
                        continue
                    pick = torch.from_numpy(rng.choice(len(images), size=2, replace=False))
                    noise = torch.randn(3, SIZE, SIZE) * 0.01
                    loss = ((self.template - images[pick].mean(0) + noise) ** 2).mean()
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    _log(f"step {index + 1}")
                    time.sleep(self.settings.step_seconds)
                    position.step(epoch=epoch, batch=index + 1)
        context.info["steps"] = steps

    def predict(self, images: torch.Tensor, categories: Sequence[str]) -> Prediction:
        maps = (images - self.template.detach()).abs().mean(1)
        return Prediction(maps, maps.flatten(1).amax(1))


@hookimpl
def harness_methods():
    settings = (image_size(SIZE), eval_batch_size(6),
                Setting("steps", int, 30, "optimiser steps", minimum=1),
                Setting("step_seconds", float, 0.05, "sleep after each step", minimum=0.0))
    return [MethodSpec(name="slowtoy", paper=PaperRef(title="A slow toy"), protocols=("multiclass", "oneclass"),
                       profiles={"tiny": {}, "paper": {}}, factory=SlowToy, settings=settings)]


@hookimpl
def harness_datasets():
    return [DatasetSpec(name="dots", categories=("left", "right"), loader=load_dots, needs_root=False,
                        default_profile="tiny", description="test-only dots")]
