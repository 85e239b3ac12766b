"""The pretrained files of anomalib's models, declared as the harness's pinned ``WeightFile``s.

Apart from the plugin module so that the fitting hooks import it without importing the plugin;
cheap to import (timm loads only when a timm file is named).
"""

from __future__ import annotations

from typing import Any, Mapping

from harness import WeightFile
from harness_anomalib.variants import Variant

__all__ = ["OPEN_CLIP", "TORCHVISION", "weight_files"]

#: Files anomalib fetches itself in ``on_train_start`` (GitHub release archives of anomalib).
_RELEASE = "https://github.com/open-edge-platform/anomalib/releases/download"
TORCHVISION = "https://download.pytorch.org/models"
OPEN_CLIP = WeightFile(key="clip", what="open_clip ViT-B-16-plus-240 (laion400m_e31), WinCLIP's backbone",
                       filenames=("vit_b_16_plus_240-laion400m_e31-8fb26589.pt",),
                       url="https://github.com/mlfoundations/open_clip/releases/download/v0.2-weights/"
                           "vit_b_16_plus_240-laion400m_e31-8fb26589.pt")


def _timm_file(key: str, name: str) -> WeightFile:
    """The pretrained file of timm model ``name`` (its default tag; timm resolves it offline)."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    hub = (cfg.hf_hub_id if cfg is not None and cfg.hf_hub_id else f"timm/{name}")
    return WeightFile(key=name, what=f"timm {hub.split('/', 1)[-1]} pretrained weights (anomalib's {key})",
                      filenames=(f"{name}.safetensors", f"{hub.split('/', 1)[-1]}.safetensors"), repo_id=hub,
                      filename="model.safetensors")


def weight_files(variant: Variant, settings: Mapping[str, Any]) -> list[WeightFile]:
    """The pretrained files a job with ``settings`` loads (none with ``backbone_pretrained=false``).

    timm backbones resolve to timm's default tag of the name: ``wide_resnet50_2`` is timm's
    ``wide_resnet50_2.racm_in1k`` (RandAugment, cosine schedule), **not** the torchvision V1 file
    the PatchCore paper used (the harness's own ``patchcore`` loads that one). The ``paper``
    profiles keep anomalib's choice, so ``anomalib_patchcore``'s numbers are anomalib's PatchCore.
    """
    if not settings["backbone_pretrained"]:
        return []
    files = []
    for key in variant.timm:
        if "pre_trained" in settings and not settings["pre_trained"]:
            continue
        files.append(_timm_file(key, str(settings[key])))
    for name in variant.torchvision:
        files.append(WeightFile(key=name, what=f"torchvision {name}", filenames=(name,), url=f"{TORCHVISION}/{name}"))
    if variant.name == "dsr":
        # Published inside a zip archive: `harness weights pull` cannot unpack it, so the file is
        # declared without a URL and its description says where the archive is.
        files.append(WeightFile(key="vq_model", what="DSR's pretrained VQ-VAE (unpack "
                                f"{_RELEASE}/dsr_pretrained_weights/dsr_vq_model_pretrained.zip into --weights-dir)",
                                filenames=("vq_model_pretrained_128_4096.pckl",)))
    if variant.name == "efficientad":
        size = str(settings["model_size"])
        files.append(WeightFile(key="teacher", what=f"EfficientAD's pretrained {size} teacher (unpack "
                                f"{_RELEASE}/efficientad_pretrained_weights/efficientad_pretrained_weights.zip into "
                                "--weights-dir)", filenames=(f"pretrained_teacher_{size}.pth",)))
    if variant.name == "winclip":
        files.append(OPEN_CLIP)
    return files
