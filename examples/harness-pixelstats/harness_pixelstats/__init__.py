"""An example method package written outside the harness repository.

Per category, it keeps the mean and standard deviation of every pixel of the normal training
images; the anomaly map is the channel-averaged z-score, the image score its maximum. It uses only
the harness's public API, so ``pip install`` of this folder is enough for
``harness run --methods pixelstats`` to work.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from harness import FitContext, Method, MethodSpec, PaperRef, Prediction, TrainSet, hookimpl


class PixelStats(Method):
    """Per-pixel Gaussian model of each category's normal images."""

    def __init__(self, settings: Mapping[str, Any]) -> None:
        super().__init__(settings)
        self.stats = torch.nn.Module()
        self.categories: list[str] = []

    def networks(self) -> Mapping[str, torch.nn.Module]:
        """No trainable network; the statistics are buffers."""
        return {"stats": self.stats}

    def fit(self, train: TrainSet, context: FitContext) -> None:
        """Mean and standard deviation per pixel and category."""
        groups = train.by_category()
        self.categories = list(groups)
        means, stds = [], []
        for indices in context.progress.iterate(groups.values(), total=len(groups), desc="categories"):
            stack = torch.stack([train[i][0] for i in indices])
            means.append(stack.mean(0))
            stds.append(stack.std(0, unbiased=False) + float(self.settings["min_std"]))
        self.stats.mean = torch.stack(means).to(self.device)
        self.stats.std = torch.stack(stds).to(self.device)

    def predict(self, images: torch.Tensor, categories: Sequence[str]) -> Prediction:
        """Channel-averaged absolute z-score; image score = map maximum."""
        idx = torch.tensor([self.categories.index(c) for c in categories], device=images.device)
        maps = ((images - self.stats.mean[idx]) / self.stats.std[idx]).abs().mean(1)
        return Prediction(maps, maps.flatten(1).amax(1))

    def state_dict(self) -> dict[str, Any]:
        """Statistics and category order."""
        return {"mean": self.stats.mean, "std": self.stats.std, "categories": self.categories}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.stats.mean, self.stats.std = state["mean"], state["std"]
        self.categories = list(state["categories"])


@hookimpl
def harness_methods():
    """The method this package provides."""
    profile = {"image_size": 64, "eval_batch_size": 16, "min_std": 0.02}
    return [MethodSpec(name="pixelstats", paper=PaperRef(title="Per-pixel Gaussian baseline", venue="example"),
                       protocols=("multiclass", "fewshot", "oneclass"), profiles={"paper": profile, "tiny": profile},
                       factory=PixelStats, description="Example of a third-party method package.")]
