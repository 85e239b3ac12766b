"""AnomalySD's pinned weight files: the SD v1.5 inpainting pipeline, LPIPS's AlexNet, the prototype backbone.

Apart from the plugin module so that the model imports it without importing the plugin, and
cheap to import (no torch, no diffusers).
"""

from __future__ import annotations

from harness import WeightFile
from harness.toolkit.weightfiles import timm_backbone_file

__all__ = ["SD_REPO", "SD_REVISION", "SD_INPAINTING", "ALEXNET", "EFFICIENTNET_B6", "sd_file", "backbone_file",
           "weight_files"]

#: The hub repository of the SD v1.5 inpainting pipeline (the runwayml original's mirror).
SD_REPO = "stable-diffusion-v1-5/stable-diffusion-inpainting"
SD_REVISION = "8a4288a76071f7280aedbdb3253bdb9e9d5d84bb"

SD_INPAINTING = WeightFile(
    key="sd", what="Stable Diffusion v1.5 inpainting (diffusers folder: unet, vae, text_encoder, tokenizer)",
    filenames=("stable-diffusion-inpainting",), repo_id=SD_REPO, revision=SD_REVISION, folder=True,
    setting="sd_path",
    allow_patterns=("model_index.json", "scheduler/*", "tokenizer/*", "unet/config.json",
                    "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
                    "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json",
                    "text_encoder/model.safetensors"),
)

#: torchvision's ImageNet AlexNet (IMAGENET1K_V1): the LPIPS trunk. Its name carries the first
#: 8 hex digits of its sha256, which the method checks after resolving it.
ALEXNET = WeightFile(
    key="lpips_trunk", what="ImageNet AlexNet weights (torchvision IMAGENET1K_V1), the LPIPS trunk",
    filenames=("alexnet-owt-7be5be79.pth",), url="https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
    setting="lpips_weights_file",
)

#: EfficientNet-B6 trained on ImageNet-1k only (the paper names no extra data), pinned.
EFFICIENTNET_B6 = WeightFile(
    key="backbone", what="ImageNet EfficientNet-B6 weights (timm tf_efficientnet_b6.aa_in1k)",
    filenames=("tf_efficientnet_b6.aa_in1k.safetensors",), repo_id="timm/tf_efficientnet_b6.aa_in1k",
    revision="48bd93ba54a976b4e5eab6a4fb9b438029310ef6", filename="model.safetensors",
    setting="backbone_weights_file",
    # The noisy-student weights were trained with extra JFT-300M images: not what the paper says.
    refuse=("tf_efficientnet_b6.ns_jft_in1k.safetensors",),
)


def sd_file(settings) -> WeightFile:
    """The SD inpainting folder a job reads (the pinned snapshot unless ``sd_model`` names another)."""
    if settings.sd_model == SD_REPO:
        return SD_INPAINTING
    return WeightFile(key="sd", what=f"Stable Diffusion inpainting pipeline {settings.sd_model} (diffusers folder)",
                      filenames=(settings.sd_model.split("/")[-1],), repo_id=settings.sd_model, folder=True,
                      setting="sd_path", allow_patterns=SD_INPAINTING.allow_patterns)


def backbone_file(settings) -> WeightFile:
    """The prototype feature extractor's ImageNet weights."""
    if settings.backbone == "tf_efficientnet_b6":
        return EFFICIENTNET_B6
    return timm_backbone_file(settings.backbone)


def weight_files(settings) -> list[WeightFile]:
    """Every pretrained file a job with ``settings`` reads (none for the random networks)."""
    files = []
    if settings.sd_pretrained:
        files.append(sd_file(settings))
    if settings.lpips_pretrained:
        files.append(ALEXNET)
    if settings.anomaly_map != "multi_scale" and settings.backbone_pretrained:
        files.append(backbone_file(settings))
    return files
