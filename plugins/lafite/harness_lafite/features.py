"""Hierarchical feature extraction with multi-scale aggregation (LafitE, Section 3.1, Eq. 1).

A frozen CNN gives the feature maps of several stages; each is resized bilinearly to one
``grid`` x ``grid`` lattice and the maps are concatenated along the channel axis. With
EfficientNet-b4 and timm's stages 0-3 (strides 2, 4, 8, 16; 24 + 32 + 56 + 160 = 272 channels)
this is UniAD's aggregation, which LafitE follows ("stages 1 to 4", UniAD counts from 1). UniAD
resizes with ``UpsamplingBilinear2d`` (``align_corners=True``), which this module reproduces.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from harness.backbones import create_features, recalibrate_batchnorm
from harness.ops import imagenet_normalize


class MultiScaleFeatures(nn.Module):
    """A timm backbone whose selected stages are resized to one grid and concatenated.

    Parameters
    ----------
    backbone : str
        timm model name (``efficientnet_b4`` in the paper).
    layers : sequence of int
        timm ``out_indices`` of the stages to aggregate.
    grid : int
        Side of the aggregated feature tensor (32 in the paper's text for 224 px inputs).

    Notes
    -----
    The network is built without weights (see :func:`harness.backbones.create_features`), so it
    can be created on the meta device; pretrained weights are loaded in ``fit``.
    """

    def __init__(self, backbone: str, layers: Sequence[int], grid: int) -> None:
        super().__init__()
        if int(grid) < 1:
            raise ValueError(f"feature_size must be a positive grid side, got {grid!r}")
        self.backbone_name = backbone
        self.layers = tuple(int(i) for i in layers)
        self.grid = int(grid)
        self.backbone = create_features(backbone, self.layers)
        drop_unused_blocks(self.backbone)

    @property
    def channels(self) -> int:
        """Channels of the aggregated tensor (sum over the selected stages)."""
        return int(sum(self.backbone.feature_info.channels()))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Aggregated features of images in [0, 1].

        Parameters
        ----------
        images : torch.Tensor
            (B, 3, H, W) in [0, 1].

        Returns
        -------
        torch.Tensor
            (B, C, grid, grid).
        """
        maps = self.backbone(imagenet_normalize(images))
        size = (self.grid, self.grid)
        resized = [m if tuple(m.shape[-2:]) == size else
                   F.interpolate(m, size=size, mode="bilinear", align_corners=True) for m in maps]
        return torch.cat(resized, dim=1)

    def reinitialise(self, seed: int, batches: Iterable[torch.Tensor]) -> None:
        """Seeded random weights with BatchNorm statistics re-estimated on ``batches``.

        Used when no pretrained weights are wanted (the ``tiny`` profile): the factory's random
        weights depend on the global RNG state, so they are redrawn from ``seed``; BatchNorm
        statistics of a fresh network are (0, 1), which lets some channels saturate and others
        vanish, so they are re-estimated on normal training images (no gradients).

        Parameters
        ----------
        seed : int
        batches : iterable of torch.Tensor
            Normal training images (B, 3, H, W) in [0, 1], on the backbone's device.
        """
        device = next(self.backbone.parameters()).device
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            fresh = create_features(self.backbone_name, self.layers)
            drop_unused_blocks(fresh)
        self.backbone.load_state_dict(fresh.state_dict())
        self.backbone.to(device)
        recalibrate_batchnorm(self.backbone, (imagenet_normalize(x) for x in batches))


def drop_unused_blocks(backbone: nn.Module) -> None:
    """Remove the blocks after the last returned stage of a timm EfficientNet-style extractor.

    timm's ``EfficientNetFeatures`` keeps (and runs) every block even when only the early stages
    are returned; for EfficientNet-b4 stages 1-4 the two stride-32 blocks hold 10 M unused
    parameters. Pretrained checkpoints still load (their extra tensors are ignored). Other
    backbones are left unchanged.
    """
    blocks = getattr(backbone, "blocks", None)
    names = backbone.feature_info.module_name() if hasattr(backbone, "feature_info") else []
    if not isinstance(blocks, nn.Sequential) or getattr(backbone, "feature_hooks", None) is not None:
        return
    if not names or not all(n.startswith("blocks.") and n.split(".")[1].isdigit() for n in names):
        return
    last = max(int(n.split(".")[1]) for n in names)
    backbone.blocks = blocks[:last + 1]
