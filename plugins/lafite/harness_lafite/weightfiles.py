"""LafitE's pinned weight files: the feature extractor's ImageNet weights (UniAD's EfficientNet-b4).

Apart from the plugin module so that the model imports it without importing the plugin, and
cheap to import (no torch, no timm).
"""

from __future__ import annotations

from harness import WeightFile
from harness.toolkit.efficientnet import UNIAD_EFFICIENTNET_B4
from harness.toolkit.weightfiles import timm_backbone_file

__all__ = ["weight_files"]


def weight_files(settings) -> list[WeightFile]:
    """The backbone's ImageNet weights, unless it is randomly initialised."""
    if not settings.backbone_pretrained:
        return []
    if settings.backbone == "tf_efficientnet_b4":
        return [UNIAD_EFFICIENTNET_B4]
    return [timm_backbone_file(settings.backbone)]
