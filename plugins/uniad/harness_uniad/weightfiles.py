"""UniAD's pinned weight files: the EfficientNet-b4 ImageNet file its code loads.

Apart from the plugin module so that the model imports it without importing the plugin, and
cheap to import (no torch, no timm). The rule is the toolkit's, shared by UniAD and LafitE
(:func:`harness.toolkit.efficientnet.multiscale_backbone_files`).
"""

from __future__ import annotations

from harness.toolkit.efficientnet import multiscale_backbone_files as weight_files

__all__ = ["weight_files"]
