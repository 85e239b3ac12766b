"""PatchCore's pinned weight files: what ``harness weights`` lists and a fit reads from disk.

Apart from the plugin module so that the model imports it without importing the plugin, and
cheap to import (no torch, no timm).
"""

from __future__ import annotations

from harness import WeightFile
from harness.toolkit.weightfiles import timm_backbone_file

__all__ = ["WRN50_V1", "weight_files"]

#: torchvision's ImageNet WideResNet-50-2 V1 weights, which the paper and the authors' code use
#: (``torchvision.models.wide_resnet50_2(pretrained=True)``). The V2 file (IMAGENET1K_V2, a newer
#: training recipe, 81.6 % vs 78.5 % top-1) is refused by name and, renamed, by its sha256: the 8 hex
#: digits in a torchvision file name are the start of the file's sha256 (torch.hub checks them).
#: The full V1 digest is not published with the file; the resolver records it for every job.
WRN50_V1 = WeightFile(
    key="backbone", what="ImageNet WideResNet-50-2 weights (torchvision V1, IMAGENET1K_V1)",
    filenames=("wide_resnet50_2-95faca4d.pth",),
    url="https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth", setting="backbone_weights_file",
    refuse=("wide_resnet50_2-9ba9bcbe.pth",), refuse_sha256=("9ba9bcbe",),
)


def weight_files(settings) -> list[WeightFile]:
    """The backbone's ImageNet weights, unless the backbone is randomly initialised."""
    if not settings.backbone_pretrained:
        return []
    if settings.backbone == "wide_resnet50_2":
        return [WRN50_V1]
    return [timm_backbone_file(settings.backbone)]
