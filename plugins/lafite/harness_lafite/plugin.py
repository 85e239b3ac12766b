"""Registers LafitE with the harness (entry point ``lafite`` in the group ``harness``).

No official code is public, so the paper's text is the specification. Facts from the paper
(Section 4.1): 224 x 224 inputs, ImageNet EfficientNet-b4, stages 1-4 resized to 32 x 32 and
concatenated (UniAD's aggregation: 24 + 32 + 56 + 160 = 272 channels; UniAD itself uses 14 x 14,
settable through ``feature_size``), a U-Net with base 256 channels and multipliers (1, 2, 3, 4),
1000 epochs at batch 64, T = 1000 with the cosine schedule, AdamW (lr 1e-4, weight decay 1e-4,
lr x 0.1 after 800 epochs), a 10 % coreset, Gaussian sigma 4, tau and K chosen on a
pseudo-validation set.

Choices where the paper is silent (all settings):

- U-Net depth and attention: two residual blocks per level, self-attention (32-wide heads) at
  16, 8 and 4 px, as the latent-diffusion U-Nets with multipliers (1, 2, 3, 4) have;
- features standardised per channel with training statistics (the schedule assumes unit scale);
- DDIM: deterministic (eta = 0), ``ddim_steps`` U-Net evaluations evenly spaced from tau down
  (10 in ``paper``);
- image score: maximum after a 16 x 16 stride-1 average pooling (UniAD's evaluation);
- candidate grids: tau in 100..800 by 100, K in (2, 3, 5, 10, 20) (Fig. 6 is not in our copy of
  the text); 20 pseudo-validation images per category (half anomalous);
- Eq. 10's weights are used as printed (``editing_weights="paper"``; they sum to K - 1),
  ``"normalized"`` makes them a convex combination.

Profiles
--------
``paper``
    As above; needs the EfficientNet-b4 ImageNet weights on disk and a GPU.
``tiny``
    The same code at toy scale for a CPU (2 cores, ~100 s for the synthetic set): 128 px, a
    randomly initialised ResNet-18 (layer1 + layer2, 192 channels; BatchNorm re-estimated on the
    training images) aggregated on an 8 x 8 grid, a two-level 64-channel U-Net without attention,
    8 epochs at lr 3e-3, three DDIM evaluations, tau in (25, 100), K in (2, 5), and a 50 %
    coreset. Why not EfficientNet-b4: at 128 px it is several times slower on a CPU, and its random
    features separated the synthetic defects worse (nearest-neighbour image AUROC 0.62 vs 0.73
    for ResNet-18 layers 1-2); a 10 % coreset of random features lost a further ~0.05 AUROC.
"""

from __future__ import annotations

from harness import MethodSpec, PaperRef, hookimpl
from harness_lafite.model import LafitE

PAPER = PaperRef(
    title="LafitE: Latent Diffusion Model with Feature Editing for Unsupervised Multi-class Anomaly Detection",
    venue="arXiv 2023",
    url="https://arxiv.org/abs/2307.08059",
    code="",
)

_COMMON = {
    "backbone": "efficientnet_b4", "layers": (0, 1, 2, 3), "weights_file": "", "feature_standardize": True,
    "T": 1000, "beta_schedule": "squaredcos_cap_v2", "dropout": 0.0, "attention_head_dim": 32,
    "weight_decay": 1e-4, "lr_drop_at": 0.8, "lr_drop_factor": 0.1,
    "coreset_ratio": 0.1, "coreset_projection_dim": 128, "feature_editing": True, "editing_weights": "paper",
    "ddim_eta": 0.0, "smoothing_sigma": 4.0, "score_pool_size": 16, "inference_seed": 0, "pseudo_val_seed": 0,
}

PROFILES = {
    "paper": {
        **_COMMON, "pretrained": True, "image_size": 224, "feature_size": 32,
        "base_channels": 256, "channel_mults": (1, 2, 3, 4), "layers_per_block": 2,
        "attention_resolutions": (16, 8, 4), "norm_groups": 32,
        "epochs": 1000, "batch_size": 64, "lr": 1e-4, "feature_batch_size": 32, "eval_batch_size": 32,
        "ddim_steps": 10, "tau_grid": (100, 200, 300, 400, 500, 600, 700, 800), "k_grid": (2, 3, 5, 10, 20),
        "pseudo_val_per_category": 20,
    },
    "tiny": {
        **_COMMON, "backbone": "resnet18", "layers": (1, 2), "pretrained": False, "image_size": 128, "feature_size": 8,
        "base_channels": 64, "channel_mults": (1, 2), "layers_per_block": 1,
        "attention_resolutions": (), "norm_groups": 16,
        "epochs": 8, "batch_size": 32, "lr": 3e-3, "feature_batch_size": 40, "eval_batch_size": 30,
        "coreset_ratio": 0.5, "ddim_steps": 3, "tau_grid": (25, 100), "k_grid": (2, 5),
        "pseudo_val_per_category": 8,
    },
}

SETTINGS_HELP = {
    "backbone": "timm model name of the feature extractor (efficientnet_b4 in the paper)",
    "layers": "timm out_indices of the aggregated stages ((0, 1, 2, 3) = UniAD's stages 1-4, 272 channels)",
    "pretrained": "load ImageNet weights from disk (never downloaded); false = seeded random init + BatchNorm "
                  "re-estimation, recorded as backbone_init=random",
    "weights_file": "explicit path of the backbone weights (optional)",
    "image_size": "side of the square input (224 in the paper)",
    "feature_size": "side of the aggregated feature grid (paper text: 32; UniAD: 14)",
    "feature_standardize": "standardise each feature channel with training statistics before diffusion",
    "T": "diffusion steps of the noise schedule", "beta_schedule": "diffusers beta schedule (squaredcos_cap_v2 = cosine)",
    "base_channels": "U-Net width of the first level", "channel_mults": "U-Net width multiplier per level",
    "layers_per_block": "U-Net residual blocks per level",
    "attention_resolutions": "feature-map sides with self-attention in the U-Net",
    "attention_head_dim": "width of one attention head", "norm_groups": "GroupNorm groups in the U-Net",
    "dropout": "dropout in the U-Net residual blocks",
    "epochs": "training epochs of the diffusion U-Net", "batch_size": "training batch of feature tensors",
    "lr": "initial AdamW learning rate", "weight_decay": "AdamW weight decay",
    "lr_drop_at": "fraction of the epochs after which the learning rate drops",
    "lr_drop_factor": "factor of that drop",
    "feature_batch_size": "images per backbone forward pass during fit",
    "eval_batch_size": "images per predict call (the FPS figure states it)",
    "coreset_ratio": "fraction of training feature slices kept in the memory bank",
    "coreset_projection_dim": "random projection size used while selecting the coreset (0: none)",
    "feature_editing": "edit features with the memory bank before diffusion (false = the 'w/o F.E.' ablation)",
    "editing_weights": "'paper' (Eq. 10 as printed, weights sum to K-1) or 'normalized' (weights sum to 1)",
    "ddim_steps": "U-Net evaluations of the DDIM reverse process from tau to 0",
    "ddim_eta": "DDIM eta (0 = deterministic)",
    "tau_grid": "candidate corruption steps tau (one value: fixed, no search)",
    "k_grid": "candidate numbers of neighbours K >= 2 (one value: fixed, no search)",
    "pseudo_val_per_category": "pseudo-validation images per category (half synthetic anomalies)",
    "pseudo_val_seed": "seed of the pseudo-validation set",
    "smoothing_sigma": "Gaussian sigma (pixels) applied to the upsampled anomaly map",
    "score_pool_size": "average-pooling window (pixels) before the max that gives the image score",
    "inference_seed": "seed of the forward-diffusion noise at inference",
}


@hookimpl
def harness_methods():
    """Return the LafitE method spec."""
    return [MethodSpec(
        name="lafite", paper=PAPER, protocols=("multiclass", "oneclass", "fewshot"), profiles=PROFILES,
        factory=LafitE, settings_help=SETTINGS_HELP,
        description="Diffusion model over aggregated EfficientNet-b4 features; query features edited with a "
                    "coreset memory bank (weighted K nearest neighbours), noised to step tau and denoised by "
                    "DDIM; anomaly = feature reconstruction error. tau and K chosen on a pseudo-validation set "
                    "of pasted-fragment anomalies made from training images.",
    )]
