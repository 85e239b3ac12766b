"""Registers DiffusionAD with the harness (entry point ``diffusionad`` in the group ``harness``).

Profiles
--------
``paper``
    The authors' code (HuiZhang0812/DiffusionAD, ``args1.json``): 256 x 256 inputs, a 128-channel
    UNet with multipliers (1, 1, 2, 2, 4, 4), a 64-channel six-stage segmentation U-Net, 3000
    epochs, batch 16, Adam with learning rates 1e-4 (UNet) and 1e-5 (segmentation), focal weight
    5, training levels split at 300, inference levels 200 and 400 with the norm-guided
    combination. (The paper's text says 500 epochs, batch 6, levels 100 and 200 averaged; set
    ``epochs=500 batch_size=6 levels=[100,200] combination=average`` for that.) No weights are
    pretrained, and nothing is downloaded.
``tiny``
    The same code at toy scale for CPU runs: 32 px, an 8-channel three-level UNet, a 16-channel
    four-stage segmentation U-Net, 40 epochs at batch 16, larger learning rates.
"""

from __future__ import annotations

from harness import MethodSpec, PaperRef, hookimpl
from harness_diffusionad.model import DiffusionAD

#: Categories the authors treat as textures (whole image is foreground): MVTec AD's textures
#: plus zipper, and DAGM's classes, as in their data code.
TEXTURE_CATEGORIES = ("carpet", "grid", "leather", "tile", "wood", "zipper") + tuple(f"Class{i}" for i in range(1, 11))

_COMMON = {
    "T": 1000, "beta_start": 1e-4, "beta_end": 0.02,
    "num_heads": 4, "time_conditioning": "scale_shift", "resample": "resnet",
    "focal_weight": 5.0, "smooth_l1_weight": 1.0, "focal_alpha": 0.5, "focal_gamma": 4.0,
    "weight_decay": 0.0, "normal_t_range": 300, "levels": (200, 400), "combination": "norm_guided",
    "guidance_weight": 1.0, "top_k": 50, "inference_seed": 0,
    "dtd_root": "", "foreground": "auto", "texture_categories": TEXTURE_CATEGORIES,
    "perlin_scale_exp": (0, 6), "perlin_threshold": 0.5, "beta_range": (0.2, 0.8),
}

PROFILES = {
    "paper": {
        **_COMMON, "image_size": 256, "eval_batch_size": 8,
        "base_channels": 128, "channel_mults": (1, 1, 2, 2, 4, 4), "layers_per_block": 2,
        "attention_resolutions": (32, 16, 8), "norm_groups": 32,
        "seg_base_channels": 64, "seg_depth": 6,
        "epochs": 3000, "batch_size": 16, "lr_denoiser": 1e-4, "lr_segmenter": 1e-5, "seg_cosine_tmax": 10,
    },
    # Trained from scratch on a CPU, the segmentation network only starts to separate the
    # synthetic set's defects after ~600 joint steps (image AUROC ~0.5 at 120 steps, ~0.65-0.7
    # at 600 in our runs), so the budget goes into steps rather than width or resolution:
    # 32 px, an 8-channel denoiser, batch 16, 40 epochs (~3 minutes on 2 cores).
    "tiny": {
        **_COMMON, "image_size": 32, "eval_batch_size": 30,
        "base_channels": 8, "channel_mults": (1, 2, 4), "layers_per_block": 1,
        "attention_resolutions": (16,), "norm_groups": 4,
        "seg_base_channels": 16, "seg_depth": 4,
        "epochs": 40, "batch_size": 16, "lr_denoiser": 2e-3, "lr_segmenter": 3e-3, "seg_cosine_tmax": 0,
        # 32 px images: lattices finer than 4 x 4 cells give speckles of a pixel or two.
        "perlin_scale_exp": (0, 3),
    },
}

SETTINGS_HELP = {
    "image_size": "side of the square input the harness resizes images to",
    "eval_batch_size": "images per predict call (the FPS figure states it)",
    "T": "diffusion steps of the noise schedule",
    "beta_start": "first beta of the linear schedule", "beta_end": "last beta of the linear schedule",
    "base_channels": "UNet width of the first level", "channel_mults": "UNet width multiplier per level",
    "layers_per_block": "UNet residual blocks per level (down path)",
    "attention_resolutions": "feature sides (px) with self-attention in the UNet",
    "num_heads": "attention heads at every UNet attention layer",
    "time_conditioning": "'scale_shift' (FiLM) or 'default' (additive, as the authors' ResBlock)",
    "resample": "'resnet' (residual up/down blocks, authors' biggan_updown) or 'conv'",
    "norm_groups": "GroupNorm groups in the UNet",
    "seg_base_channels": "segmentation U-Net width of the first stage", "seg_depth": "segmentation U-Net stages",
    "epochs": "training epochs over the union of the categories' training images",
    "batch_size": "training batch (half normal, half synthetic)",
    "lr_denoiser": "Adam learning rate of the UNet", "lr_segmenter": "Adam learning rate of the segmentation net",
    "seg_cosine_tmax": "T_max of the per-step cosine schedule of the segmentation lr (0: constant)",
    "weight_decay": "Adam weight decay of both networks",
    "focal_weight": "weight of the focal loss", "smooth_l1_weight": "weight of the smooth L1 loss",
    "focal_alpha": "focal loss alpha", "focal_gamma": "focal loss gamma",
    "normal_t_range": "training levels: low in [0, this), high in [this, T)",
    "levels": "the two inference noise levels (code 200, 400; paper text 100, 200)",
    "combination": "'norm_guided' (code: one segmentation on the norm-guided estimate) or 'average' "
                   "(paper text: mean of the segmentations at both levels)",
    "guidance_weight": "w of the norm-guided noise correction (code: condition_w = 1)",
    "top_k": "image score = mean of the top_k largest map values",
    "inference_seed": "seed of the forward-diffusion noise at inference",
    "dtd_root": "folder of DTD images for anomaly textures; empty: procedural textures",
    "foreground": "where anomalies go: 'auto' (whole image for textures, else Otsu), 'otsu' or 'whole'",
    "texture_categories": "categories treated as textures by foreground='auto'",
    "perlin_scale_exp": "Perlin lattice cells per axis are 2**k, k in [lo, hi)",
    "perlin_threshold": "Perlin noise threshold of the anomaly mask",
    "beta_range": "range of the opacity with which the normal image shows through an anomaly",
}

PAPER = PaperRef(
    title="DiffusionAD: Norm-guided One-step Denoising Diffusion for Anomaly Detection",
    venue="arXiv 2023 (IEEE TPAMI 2025)",
    url="https://arxiv.org/abs/2303.08730",
    code="https://github.com/HuiZhang0812/DiffusionAD",
)


@hookimpl
def harness_methods():
    """Return the DiffusionAD method spec."""
    return [MethodSpec(
        name="diffusionad", paper=PAPER, protocols=("multiclass", "oneclass", "fewshot"), profiles=PROFILES,
        factory=DiffusionAD, settings_help=SETTINGS_HELP,
        description="Pixel-space DDPM UNet and a segmentation U-Net trained jointly on Perlin-noise synthetic "
                    "anomalies; one-step (norm-guided) denoising at two noise levels, segmentation of (query, "
                    "reconstruction), image score = mean of the top 50 map values. No pretrained weights.",
    )]
