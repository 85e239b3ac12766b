"""Inference noise drawn per image, so that predictions do not depend on the batch size.

The runner passes ``predict`` one seed per image (:func:`harness.method.image_seed`); a method
builds an :class:`ImageNoise` from them and draws every noise tensor of the batch through it.
Each image has its own generator, seeded from the image's seed mixed with the method's
``inference_seed`` setting, so an image gets the same noise whatever batch it is in and
wherever it sits in it. Called without seeds (a direct ``predict`` call in a test or a
hyperparameter search), the images of the batch are seeded by position.

Generators live on the batch's device, so drawing costs a kernel per image and no host copy.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def mix_seed(base: int, seed: int) -> int:
    """A 63-bit seed from a method's ``inference_seed`` and an image's seed (NumPy's SeedSequence)."""
    state = np.random.SeedSequence([int(base) & (2**63 - 1), int(seed) & (2**63 - 1)]).generate_state(1, np.uint64)
    return int(state[0]) >> 1


class ImageNoise:
    """Per-image noise streams for one batch.

    Parameters
    ----------
    seeds : sequence of int or None
        One seed per image (from the runner); None seeds images by position (``0 .. B-1``).
    batch_size : int
        B (checked against ``seeds``).
    device : torch.device or str
    base : int, default 0
        The method's ``inference_seed`` setting, mixed into every image's seed.
    """

    def __init__(self, seeds: Sequence[int] | None, batch_size: int, device: torch.device | str, base: int = 0) -> None:
        seeds = list(range(batch_size)) if seeds is None else [int(s) for s in seeds]
        if len(seeds) != batch_size:
            raise ValueError(f"predict got {len(seeds)} seeds for a batch of {batch_size} images")
        self.device = torch.device(device)
        self.generators = [torch.Generator(device=self.device).manual_seed(mix_seed(base, s)) for s in seeds]

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Standard normal noise of shape (B, *shape): row i from image i's generator."""
        return torch.stack([torch.randn(tuple(shape), generator=g, device=self.device, dtype=dtype)
                            for g in self.generators])

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        """Noise shaped like ``x`` (B, ...), on ``x``'s device and dtype."""
        if x.shape[0] != len(self):
            raise ValueError(f"noise for {x.shape[0]} images from a stream of {len(self)}")
        return self.randn(x.shape[1:], dtype=x.dtype).to(x.device)

    def subset(self, index: Sequence[int]) -> "ImageNoise":
        """The streams of some images of the batch (the generators are shared, not copied)."""
        out = object.__new__(ImageNoise)
        out.device = self.device
        out.generators = [self.generators[int(i)] for i in index]
        return out


__all__ = ["ImageNoise", "mix_seed"]
