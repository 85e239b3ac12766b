"""``patchnn``: per-category nearest neighbours of colour patches."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from harness import FitContext, Method, Prediction, TrainSet


class PatchNN(Method):
    """Images are reduced to a ``grid`` x ``grid`` map of average colours; each cell's patch (its
    ``window`` x ``window`` neighbourhood) is compared with the normal patches of its category."""

    def __init__(self, settings: Mapping[str, Any]) -> None:
        super().__init__(settings)
        # Buffers of a module move with .to() and travel in state_dict() without extra code.
        self.memory = torch.nn.Module()
        self.memory.register_buffer("bank", torch.zeros(0, 3 * self.settings.window ** 2))
        self.memory.register_buffer("owner", torch.zeros(0, dtype=torch.long))
        self.categories: list[str] = []

    def networks(self) -> Mapping[str, torch.nn.Module]:
        """The memory bank (buffers only: no trainable parameter)."""
        return {"memory": self.memory}

    def patches(self, images: torch.Tensor) -> torch.Tensor:
        """(B, grid*grid, 3*window^2) patch vectors."""
        s = self.settings
        cells = F.adaptive_avg_pool2d(images, s.grid)
        return F.unfold(cells, s.window, padding=s.window // 2).transpose(1, 2)

    def fit(self, train: TrainSet, context: FitContext) -> None:
        """Store every training patch, per category; one checkpointed stage (cheap to redo anyway)."""
        with context.checkpoint.stage("bank", memory=self.memory) as position:
            if position.done:
                self.categories = list(position.extra["categories"])
                return
            self.categories = list(train.categories)
            banks, owners = [], []
            for c, indices in enumerate(train.by_category().values()):
                images = torch.stack([train[i][0] for i in indices]).to(self.device)
                vectors = self.patches(images).reshape(-1, self.memory.bank.shape[1])
                banks.append(vectors)
                owners.append(torch.full((len(vectors),), c, dtype=torch.long, device=self.device))
            self.memory.bank = torch.cat(banks)
            self.memory.owner = torch.cat(owners)
            position.extra["categories"] = self.categories
        context.info["bank_size"] = int(self.memory.bank.shape[0])

    @torch.no_grad()
    def predict(self, images: torch.Tensor, categories: Sequence[str]) -> Prediction:
        """Distance of each cell's patch to its category's nearest normal patch, upsampled."""
        s = self.settings
        query = self.patches(images)
        maps = []
        for vectors, category in zip(query, categories):
            bank = self.memory.bank[self.memory.owner == self.categories.index(category)]
            maps.append(torch.cdist(vectors, bank).topk(s.k, largest=False).values.mean(1).view(s.grid, s.grid))
        stacked = F.interpolate(torch.stack(maps)[:, None], size=images.shape[-2:], mode="bilinear",
                                align_corners=False)[:, 0]
        return Prediction(stacked, stacked.flatten(1).amax(1))

    def state_dict(self) -> dict[str, Any]:
        """The bank and the category order (plain values: stored as safetensors + JSON)."""
        return {"memory": self.memory.state_dict(), "categories": list(self.categories)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.memory.bank = state["memory"]["bank"]
        self.memory.owner = state["memory"]["owner"]
        self.categories = list(state["categories"])
