"""UniAD's pinned weight files: the EfficientNet-b4 ImageNet file its code loads.

Apart from the plugin module so that the model imports it without importing the plugin, and
cheap to import (no torch, no timm).
"""

from __future__ import annotations

from harness import WeightFile
from harness.toolkit.efficientnet import UNIAD_EFFICIENTNET_B4
from harness.toolkit.weightfiles import timm_backbone_file

__all__ = ["weight_files"]


def weight_files(settings) -> list[WeightFile]:
    """The EfficientNet-b4 file UniAD loads (another timm backbone's own file), unless randomly initialised."""
    if not settings.backbone_pretrained:
        return []
    if settings.backbone == "tf_efficientnet_b4":
        return [UNIAD_EFFICIENTNET_B4]
    return [timm_backbone_file(settings.backbone)]
