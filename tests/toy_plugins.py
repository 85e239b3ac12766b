"""Small in-memory plugins for testing the core without the real methods and datasets.

They use only the public API, exactly as an outside plugin would.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch

from harness import (CategoryData, DatasetIndex, DatasetSpec, FitContext, Method, MethodSpec, PaperRef, Prediction,
                     Sample, Setting, TrainSet, WeightFile, hookimpl)

SIZE = 32


def _image(seed: int, colour: tuple[int, int, int], square: bool) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    img = np.clip(np.array(colour)[None, None, :] + rng.normal(0, 8, (SIZE, SIZE, 3)), 0, 255)
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    if square:
        y, x = rng.integers(2, SIZE - 10, 2)
        img[y:y + 8, x:x + 8] = 255
        mask[y:y + 8, x:x + 8] = True
    return img.astype(np.uint8), mask


def load_toy(root: Any = None, categories: Sequence[str] | None = None) -> DatasetIndex:
    """Two categories of flat noisy colour with white squares as defects."""
    colours = {"red": (180, 40, 40), "blue": (40, 40, 180)}
    cats = {}
    for c_idx, (name, colour) in enumerate(colours.items()):
        if categories and name not in categories:
            continue
        train = [Sample(f"{name}/train/good/{i:03d}", name, "train", 0, "good",
                        image=lambda s=1000 * c_idx + i, col=colour: _image(s, col, False)[0]) for i in range(6)]
        test = []
        for i in range(8):
            anomalous = i >= 4
            seed = 5000 + 1000 * c_idx + i
            defect = "square" if anomalous else "good"
            test.append(Sample(f"{name}/test/{defect}/{i:03d}", name, "test", int(anomalous), defect,
                               image=lambda s=seed, col=colour, a=anomalous: _image(s, col, a)[0],
                               mask=(lambda s=seed, col=colour: _image(s, col, True)[1]) if anomalous else None))
        cats[name] = CategoryData(name, train, test)
    return DatasetIndex("toy", cats)


class MeanImage(Method):
    """Distance to the per-category mean training image: a real, tiny method."""

    def __init__(self, settings: Mapping[str, Any]) -> None:
        super().__init__(settings)
        self.stats = torch.nn.Module()
        self.stats.register_buffer("means", torch.zeros(0, 3, *self.input_size))
        self.categories: list[str] = []
        self.fit_calls = 0
        self.seen_keys: list[str] = []

    def networks(self) -> Mapping[str, torch.nn.Module]:
        return {"stats": self.stats}

    def fit(self, train: TrainSet, context: FitContext) -> None:
        self.fit_calls += 1
        self.seen_keys = [s.key for s in train.samples]
        groups = train.by_category()
        self.categories = list(groups)
        means = [torch.stack([train[i][0] for i in idx]).mean(0) for idx in groups.values()]
        self.stats.means = torch.stack(means).to(self.device)
        context.info["categories_seen"] = self.categories
        context.info["n_train"] = len(train)

    def predict(self, images: torch.Tensor, categories: Sequence[str]) -> Prediction:
        idx = torch.tensor([self.categories.index(c) for c in categories], device=images.device)
        maps = (images - self.stats.means[idx]).abs().mean(1)
        return Prediction(maps, maps.flatten(1).amax(1))

    def state_dict(self) -> dict[str, Any]:
        return {"means": self.stats.means, "categories": self.categories}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.stats.means = state["means"]
        self.categories = list(state["categories"])


class RaisingMethod(MeanImage):
    """Fails in predict."""

    def predict(self, images, categories):  # noqa: D102
        raise RuntimeError("boom in predict")


class NaNMethod(MeanImage):
    """Returns NaN maps."""

    def predict(self, images, categories):  # noqa: D102
        out = super().predict(images, categories)
        out.anomaly_maps[:] = float("nan")
        return out


class BadShapeMethod(MeanImage):
    """Returns one map too few."""

    def predict(self, images, categories):  # noqa: D102
        out = super().predict(images, categories)
        return Prediction(out.anomaly_maps[1:], out.image_scores)


PROFILES = {"tiny": {"image_size": SIZE, "eval_batch_size": 4}, "paper": {"image_size": SIZE, "eval_batch_size": 4}}
PAPER = PaperRef(title="A toy", venue="tests")


def method_spec(name: str, cls: type = MeanImage, protocols=("multiclass", "fewshot", "oneclass")) -> MethodSpec:
    """A spec for one of the toy methods."""
    return MethodSpec(name=name, paper=PAPER, protocols=protocols, profiles=PROFILES, factory=cls)


class ToyPlugin:
    """Provides the toy dataset and the toy methods."""

    @hookimpl
    def harness_datasets(self):
        return [DatasetSpec(name="toy", categories=("red", "blue"), loader=load_toy, needs_root=False,
                            description="toy test set")]

    @hookimpl
    def harness_methods(self):
        return [method_spec("meanimage"), method_spec("raising", RaisingMethod), method_spec("nanmaps", NaNMethod),
                method_spec("badshape", BadShapeMethod)]


class TemplateMethod(MeanImage):
    """Reads a pretrained 'template' file (its declared weights) unless weights are random."""

    def fit(self, train: TrainSet, context: FitContext) -> None:
        super().fit(train, context)
        if not context.random_weights:
            from safetensors.torch import load_file

            path = context.weights.resolve(TEMPLATE_FILE, self.settings)
            self.stats.means = self.stats.means * 0 + load_file(str(path))["scale"].to(self.device)
        context.info["random_weights"] = context.random_weights


TEMPLATE_FILE = WeightFile(key="template", what="toy template weights", filenames=("toy-template.safetensors",),
                           repo_id="toy/template", filename="toy-template.safetensors", setting="template_file")


def template_spec() -> MethodSpec:
    """A typed method that declares one pinned weight file."""
    settings = (Setting("image_size", int, SIZE, "side"), Setting("eval_batch_size", int, 4, "batch"),
                Setting("template_file", str, "", "explicit path of the template"))
    return MethodSpec(name="template", paper=PAPER, protocols=("multiclass",), profiles={"tiny": {}, "paper": {}},
                      factory=TemplateMethod, settings=settings, weights=lambda s: [TEMPLATE_FILE])


class WeightedPlugin:
    """Provides the ``template`` method (with the toy dataset of :class:`ToyPlugin`)."""

    @hookimpl
    def harness_methods(self):
        return [template_spec()]
