"""Registers DiAD with the harness (entry point ``diad`` in the group ``harness``).

Profiles
--------
``paper``
    The paper (AAAI 2024, arXiv Table 11) and the authors' code (lewandofskee/DiAD): 256 x 256
    inputs; SD v1.5's UNet (859 M parameters), the SG network (ControlNet copy of the UNet
    encoder and middle block, 361 M, plus the SFF block, 111 M: 471 M as Table 11 counts it) and
    the KL-f8 autoencoder (83.7 M), all from a local SD v1.5 (diffusers folder, HF cache or
    ``v1-5-pruned.ckpt``); T = 1000 with SD's scaled-linear betas 0.00085-0.012 ("linear" in LDM);
    autoencoder fine-tuning with the authors' ``finetune_autoencoder.py`` settings, then the
    denoiser with AdamW 1e-5, batch 12, gradient accumulation 4, 1000 epochs; DDIM with 10 steps
    from step 999; ResNet-50 stages f2-f4, Gaussian sigma 5, 8 rounds of 8 x 8 average pooling.
    Where paper and code differ, the code is followed: AdamW (the paper says Adam, citing AdamW);
    ImageNet-normalised pixels everywhere (``pixel_normalization``); only SG block 4 (after SFF)
    and the middle block are connected (``sg_skip_connections``, the code's ``only_mid_control``).
``tiny``
    The same code at toy scale on a CPU: 32 px (latents 8 x 8), a two-level UNet and three-level
    autoencoder with random initialisation (no SD weights), a random ResNet-18 with BatchNorm
    statistics re-estimated on the training images, 15 + 15 epochs at larger learning rates,
    DDIM from step 300 instead of 999, and pooling and smoothing scaled to the smaller maps.
"""

from __future__ import annotations

from harness import MethodSpec, PaperRef, hookimpl
from harness_diad.model import DiAD

_COMMON = {
    "T": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "ddim_steps": 10, "start_step": 999, "sg_skip_connections": "last_block", "pixel_normalization": "imagenet",
    "feature_layers": (1, 2, 3), "inference_seed": 0, "sd_path": "", "backbone_file": "", "vgg16_file": "",
    "ae_kl_weight": 1e-6,
}

PROFILES = {
    "paper": {
        **_COMMON, "architecture": "sd15", "pretrained": True, "image_size": 256, "eval_batch_size": 8,
        "backbone": "resnet50", "backbone_pretrained": True,
        "ae_epochs": 1000, "ae_batch_size": 4, "ae_grad_accumulation": 8, "ae_lr": 4 * 4.5e-5,
        "ae_perceptual_weight": 1.0,
        "epochs": 1000, "batch_size": 12, "grad_accumulation": 4, "lr": 1e-5,
        "smoothing_sigma": 5.0, "pool_kernel": 8, "pool_rounds": 8,
    },
    # A random toy denoiser trained for a minute cannot generate from pure noise (image AUROC
    # 0.49 from step 999 in our runs): the tiny profile starts DDIM at step 300, where the noisy
    # latent still carries the image, and spends its budget on the autoencoder, whose
    # reconstructions the scores compare (0.56 from step 500, 0.63 from 300 with 15 autoencoder
    # epochs instead of 6; more denoiser epochs changed nothing).
    "tiny": {
        **_COMMON, "architecture": "tiny", "pretrained": False, "image_size": 32, "eval_batch_size": 30,
        "backbone": "resnet18", "backbone_pretrained": False, "start_step": 300,
        "ae_epochs": 15, "ae_batch_size": 8, "ae_grad_accumulation": 1, "ae_lr": 2e-3,
        "ae_perceptual_weight": 0.0,
        "epochs": 15, "batch_size": 12, "grad_accumulation": 1, "lr": 1e-3,
        "smoothing_sigma": 0.6, "pool_kernel": 2, "pool_rounds": 8,
    },
}

SETTINGS_HELP = {
    "architecture": "network sizes: 'sd15' (Stable Diffusion v1.5) or 'tiny'",
    "pretrained": "load SD v1.5 from disk (never downloaded); false = seeded random initialisation",
    "sd_path": "explicit SD v1.5 diffusers folder or single-file checkpoint (v1-5-pruned.ckpt); empty = search",
    "image_size": "side of the square input the harness resizes images to",
    "eval_batch_size": "images per predict call (the FPS figure states it)",
    "T": "diffusion steps of the noise schedule",
    "beta_start": "first beta of the schedule", "beta_end": "last beta of the schedule",
    "beta_schedule": "diffusers beta schedule ('scaled_linear' is LDM's 'linear')",
    "ddim_steps": "DDIM sampling steps at inference",
    "start_step": "diffusion step the input latent is noised to before DDIM (999 = T)",
    "sg_skip_connections": "'last_block' (code: SG block 4 after SFF + middle block) or 'all' (ControlNet)",
    "pixel_normalization": "'imagenet' (code: autoencoder, hint and backbone see ImageNet-normalised images) "
                           "or 'symmetric' (SD's [-1, 1])",
    "backbone": "timm model of the feature extractor (paper: resnet50)",
    "backbone_pretrained": "load the backbone's ImageNet weights from disk; false = random + BatchNorm re-estimation",
    "backbone_file": "explicit path of the backbone weights (optional)",
    "feature_layers": "timm feature indices compared (1, 2, 3 = f2-f4: 64, 32, 16 px at 256 input)",
    "vgg16_file": "explicit path of torchvision's VGG-16 weights for the LPIPS term (optional)",
    "ae_epochs": "autoencoder fine-tuning epochs (0 = no fine-tuning)",
    "ae_batch_size": "autoencoder fine-tuning batch", "ae_grad_accumulation": "autoencoder gradient accumulation",
    "ae_lr": "autoencoder Adam learning rate (code: 4.5e-5 x batch)",
    "ae_kl_weight": "weight of the KL term of the autoencoder loss",
    "ae_perceptual_weight": "weight of the LPIPS-VGG term of the autoencoder loss (0 = L1 only)",
    "epochs": "denoiser training epochs", "batch_size": "denoiser training batch",
    "grad_accumulation": "denoiser gradient accumulation (batches per optimiser step)",
    "lr": "AdamW learning rate of the denoiser",
    "smoothing_sigma": "Gaussian sigma (px) applied to the anomaly map",
    "pool_kernel": "average-pooling window of the image score (stride 1)",
    "pool_rounds": "successive average poolings before the maximum",
    "inference_seed": "seed of the posterior sample and forward-diffusion noise at inference",
}

PAPER = PaperRef(
    title="DiAD: A Diffusion-based Framework for Multi-class Anomaly Detection",
    venue="AAAI 2024",
    url="https://arxiv.org/abs/2312.06607",
    code="https://github.com/lewandofskee/DiAD",
)


@hookimpl
def harness_methods():
    """Return the DiAD method spec."""
    return [MethodSpec(
        name="diad", paper=PAPER, protocols=("multiclass", "oneclass", "fewshot"), profiles=PROFILES,
        factory=DiAD, settings_help=SETTINGS_HELP,
        description="Stable Diffusion v1.5 latent denoiser with a Semantic-Guided ControlNet-style copy of its "
                    "encoder and the SFF block; the input is noised to T and reconstructed by 10 DDIM steps "
                    "guided by the image; anomaly = ResNet-50 feature distance (f2-f4) to the reconstruction, "
                    "image score = max after 8 rounds of 8 x 8 average pooling.",
    )]
