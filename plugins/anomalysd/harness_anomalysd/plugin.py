"""Registers AnomalySD with the harness (entry point ``anomalysd`` in the group ``harness``).

No official code is public, so the paper's text is the specification (see
:mod:`harness_anomalysd.model` for the choices made where it is silent).

Profiles
--------
``paper``
    Sec. 5.1: 512 × 512 inputs; Stable Diffusion v1.5 inpainting (UNet, KL autoencoder, CLIP
    ViT-L/14 text encoder and tokenizer) read from a local diffusers folder or the Hugging Face
    cache; Adam at 1e-4, batch 8, 4000 UNet epochs and 200 decoder epochs; β = 0.1 (LPIPS weight
    of the decoder loss); γ ∈ {0, 0.2, 0.5}; 50 denoising steps from λ·T with λ = 0.4 (the value
    the paper gives for capsule, wood and screw; per-category values are a setting); grids
    k ∈ {1, 2, 4, 8}; prototype masks from EfficientNet-b6 (ImageNet weights from disk); α = 0.1;
    Gaussian σ = 4. Each image costs 85 grid + 1 prototype inpaintings of 20 UNet steps each.
``tiny``
    The same code on a CPU: 64 px, toy UNet / autoencoder / text encoder (random, then trained on
    the shots; the encoder is trained too since nothing is pretrained), a character-level CLIP
    tokenizer generated at run time, a random LPIPS trunk (the package's linear weights), a
    random EfficientNet-b0 with BatchNorm statistics re-estimated on the shots; grids k ∈ {1, 2, 4}
    and 5 DDIM steps (2 from λ = 0.4).
"""

from __future__ import annotations

from harness import MethodSpec, PaperRef, hookimpl
from harness_anomalysd.model import AnomalySD

#: Categories whose whole image is foreground for the training masks (MVTec AD's textures and
#: the synthetic set's).
TEXTURE_CATEGORIES = ("carpet", "grid", "leather", "tile", "wood", "weave", "grain", "tiles")

_COMMON = {
    "T": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "sd_model": "stable-diffusion-v1-5/stable-diffusion-inpainting", "sd_path": "", "alexnet_file": "",
    "backbone_layers": (2, 3), "backbone_file": "",
    "batch_size": 8, "decoder_lpips_weight": 0.1, "mask_gammas": (0.0, 0.2, 0.5), "mask_side_range": (0.1, 1.0),
    "aug_brightness": 0.2, "aug_contrast": 0.2, "aug_scale": (0.9, 1.1), "aug_rotation": 15.0,
    "texture_categories": TEXTURE_CATEGORIES, "prompt_mode": "hierarchical", "prompts_file": "",
    "noise_strength": 0.4, "noise_strength_per_category": {}, "guidance_scale": 1.0,
    "prototype_masks": True, "prototype_rotations": (0, 90, 180, 270), "alpha": 0.1, "inference_seed": 0,
}

PROFILES = {
    "paper": {
        **_COMMON, "architecture": "sd15-inpainting", "pretrained": True, "image_size": 512, "eval_batch_size": 4,
        "backbone": "tf_efficientnet_b6", "unet_epochs": 4000, "decoder_epochs": 200, "lr_unet": 1e-4,
        "lr_decoder": 1e-4, "train_encoder": False, "latent_scale": "config", "num_inference_steps": 50,
        "scales": (1, 2, 4, 8), "inpaint_batch": 32, "smoothing_sigma": 4.0,
    },
    "tiny": {
        **_COMMON, "architecture": "tiny", "pretrained": False, "image_size": 64, "eval_batch_size": 30,
        "backbone": "efficientnet_b0", "unet_epochs": 60, "decoder_epochs": 40, "lr_unet": 1e-3,
        "lr_decoder": 1e-3, "train_encoder": True, "latent_scale": "auto", "num_inference_steps": 5,
        "scales": (1, 2, 4), "inpaint_batch": 240, "smoothing_sigma": 2.0,
    },
}

SETTINGS_HELP = {
    "architecture": "network sizes: 'sd15-inpainting' (Stable Diffusion v1.5 inpainting) or 'tiny'",
    "pretrained": "load SD, AlexNet and EfficientNet weights from disk (never downloaded); false = random init",
    "sd_model": "Hugging Face repository id of the SD inpainting pipeline, looked up in --weights-dir and the HF cache",
    "sd_path": "explicit local diffusers folder of the pipeline (unet/, vae/, text_encoder/, tokenizer/)",
    "alexnet_file": "explicit path of torchvision's ImageNet AlexNet weights for LPIPS (else alexnet-owt-7be5be79.pth "
                    "in --weights-dir or the torch hub cache)",
    "backbone": "timm name of the prototype feature extractor (EfficientNet-b6 in the paper)",
    "backbone_layers": "timm feature stages concatenated for the prototypes (2, 3: strides 8 and 16)",
    "backbone_file": "explicit path of the backbone's ImageNet weights (optional)",
    "image_size": "side of the square input", "eval_batch_size": "images per predict call (the FPS figure states it)",
    "T": "diffusion steps of the noise schedule", "beta_start": "first beta", "beta_end": "last beta",
    "beta_schedule": "diffusers beta schedule name (SD: scaled_linear)",
    "batch_size": "fine-tuning batch", "unet_epochs": "UNet fine-tuning epochs over the shots",
    "decoder_epochs": "decoder fine-tuning epochs over the shots", "lr_unet": "Adam learning rate of the UNet",
    "lr_decoder": "Adam learning rate of the decoder", "decoder_lpips_weight": "β of Eq. 9 (MSE + β·LPIPS)",
    "train_encoder": "also train the VAE encoder with the decoder (only sensible for random networks)",
    "latent_scale": "'config' (the VAE's scaling factor) or 'auto' (1 / std of the shots' latents, for random VAEs)",
    "mask_gammas": "IoU thresholds γ of the training masks, one drawn per mask",
    "mask_side_range": "training rectangle sides as fractions of the image side",
    "aug_brightness": "brightness jitter ±", "aug_contrast": "contrast jitter ±", "aug_scale": "zoom range",
    "aug_rotation": "maximum rotation (degrees) of the shots' augmentation",
    "texture_categories": "categories whose whole image is foreground for the training masks",
    "prompt_mode": "'hierarchical' (paper), 'coarse', 'simple' ('A photo of [c].') or 'none'",
    "prompts_file": "JSON file of extra / replacement prompts (format of harness_anomalysd/prompts/*.json)",
    "noise_strength": "λ: denoising starts at λ·T", "noise_strength_per_category": "{category: λ} overrides",
    "num_inference_steps": "DDIM steps of the full schedule (λ of them are run)",
    "guidance_scale": "classifier-free guidance scale; 1 = condition only (no unconditional pass)",
    "scales": "grid sizes k of the multi-scale masks", "inpaint_batch": "inpaintings per UNet call",
    "prototype_masks": "use the prototype-guided mask (needs shots)",
    "prototype_rotations": "rotations (degrees, multiples of 90) of the shots in the prototype bank",
    "alpha": "α of Eq. 21", "smoothing_sigma": "Gaussian σ (pixels) of the final map",
    "inference_seed": "seed of the starting noise at inference",
}

PAPER = PaperRef(
    title="AnomalySD: Few-Shot Multi-Class Anomaly Detection with Stable Diffusion Model",
    venue="arXiv 2024",
    url="https://arxiv.org/abs/2408.01960",
    code="",
)


@hookimpl
def harness_methods():
    """Return the AnomalySD method spec."""
    return [MethodSpec(
        name="anomalysd", paper=PAPER, protocols=("fewshot",), profiles=PROFILES, factory=AnomalySD,
        settings_help=SETTINGS_HELP,
        description="Stable Diffusion inpainting fine-tuned on k shots per category with hierarchical prompts and "
                    "foreground-aware masks; multi-scale grid and prototype-guided masks at inference, LPIPS "
                    "distances fused by a harmonic mean. Few-shot and zero-shot (--shots 0).",
    )]
