"""Registers DiAD's DDPM baseline (entry point ``ddpm`` in the group ``harness``).

Importing this module is cheap: diffusers and timm load when the method is built.

Profiles
--------
``paper`` (the defaults)
    :class:`harness_diad.baselines.DDPMBaseline` as DiAD's paper runs it: Ho et al.'s 256 x 256
    pixel-space U-Net (113.7 M parameters) and linear betas 1e-4 ... 0.02 over T = 1000, trained
    from scratch with DiAD's implementation details (256 x 256 bilinear, AdamW 1e-5, batch 12,
    accumulation 4, 1000 epochs, fp32); DDIM with 10 steps from step 999 (DiAD's sampler and
    schedule of steps), timm ``resnet50.a1_in1k`` stages f2-f4, Gaussian sigma 5, 8 rounds of
    8 x 8 average pooling.
``tiny``
    The same code on a CPU: 32 px, a two-level U-Net with random initialisation, a random
    ResNet-18 with BatchNorm statistics re-estimated on the training images, 4 epochs at a
    larger learning rate, the image noised to DDIM step 101 and denoised from there (a toy
    denoiser cannot generate from pure noise), bicubic resizing and scoring scaled to the
    smaller maps (as DiAD's ``tiny``).
"""

from __future__ import annotations

from harness import MethodSpec, PaperRef, Resources, Setting, hookimpl
from harness.settings import eval_batch_size, image_size, interpolation, precision
from harness_diad import plugin as diad
from harness_diad.weightfiles import backbone_file

#: DiAD's settings the DDPM baseline shares unchanged (sampling, scoring, training loop).
_SHARED = ("ddim_steps", "start_step", "noise_to_first_ddim_step", "backbone", "backbone_layers",
           "backbone_pretrained", "backbone_weights_file", "epochs", "train_batch_size", "grad_accumulation",
           "smoothing_sigma", "pool_kernel", "pool_rounds", "inference_seed")
_BY_NAME = {s.name: s for s in diad.SETTINGS}

SETTINGS = (
    image_size(256),
    eval_batch_size(8),
    interpolation("bilinear", choice="as DiAD's data loaders (torchvision Resize on PIL images: bilinear)"),
    precision("fp32", choice="as DiAD's training (Lightning precision=32)"),
    Setting("gradient_checkpointing", bool, False, "recompute U-Net activations in the backward pass (saves "
            "memory, changes no number)"),
    Setting("architecture", str, "ddpm256", "pixel U-Net: 'ddpm256' (Ho et al.'s 256 x 256 models) or 'tiny'",
            choices=("ddpm256", "tiny"),
            choice="DiAD names DDPM (Ho et al. 2020) without its configuration; Ho et al.'s 256 x 256 U-Net is "
                   "the one for DiAD's 256 x 256 inputs"),
    Setting("T", int, 1000, "diffusion steps of the noise schedule", minimum=1),
    Setting("beta_start", float, 1e-4, "first beta of the schedule (Ho et al.)", minimum=0.0),
    Setting("beta_end", float, 0.02, "last beta of the schedule (Ho et al.)", minimum=0.0),
    Setting("beta_schedule", str, "linear", "'linear' (Ho et al.) or 'scaled_linear'",
            choices=("linear", "scaled_linear")),
    Setting("lr", float, 1e-5, "AdamW learning rate",
            minimum=0.0, choice="DiAD's implementation details (1e-5) for every diffusion model it trains; Ho et al. "
                                "used 2e-5 at batch 64 for their 256 x 256 models"),
    *(_BY_NAME[name] for name in _SHARED),
)

# No learning floor for the tiny profile (tests/test_tiny_profiles_learn.py): a pixel denoiser trained
# from scratch for 80 steps does not remove the noise of step 101, so its reconstructions differ
# from the input everywhere and the feature maps are near chance (synthetic set, seed 0: image
# AUROC 0.559, pixel AUROC 0.535) -- what DiAD reports of DDPM at full scale, in miniature.
PROFILES = {
    "paper": {},
    "tiny": {
        "architecture": "tiny", "image_size": 32, "eval_batch_size": 30, "interpolation": "bicubic",
        "backbone": "resnet18", "backbone_pretrained": False,
        "start_step": 101, "noise_to_first_ddim_step": True,
        "epochs": 4, "train_batch_size": 12, "grad_accumulation": 1, "lr": 2e-3,
        "smoothing_sigma": 0.6, "pool_kernel": 2, "pool_rounds": 8,
    },
}

PAPER = PaperRef(
    title="DDPM baseline as run by DiAD (Ho et al., Denoising Diffusion Probabilistic Models, NeurIPS 2020; "
          "DiAD, AAAI 2024, Tables 1-4)",
    venue="AAAI 2024 (DiAD)",
    url="https://arxiv.org/abs/2312.06607",
)

RESOURCES = {"paper": Resources(gpus=1, cpus=8, memory_gb=32), "tiny": Resources(cpus=1, memory_gb=2)}


def weight_files(settings):
    """Only the scoring backbone: the U-Net trains from scratch."""
    return [backbone_file(settings)] if settings.get("backbone_pretrained") else []


def build(settings):
    """The factory: the DDPM baseline (no weights are read; works on the meta device)."""
    from harness_diad.baselines import DDPMBaseline

    return DDPMBaseline(settings)


@hookimpl
def harness_methods():
    """Return the DDPM baseline's method spec."""
    return [MethodSpec(
        name="ddpm", paper=PAPER, protocols=("multiclass", "oneclass", "fewshot"), profiles=PROFILES,
        factory=build, settings=SETTINGS, paper_protocol="multiclass", resources=RESOURCES, weights=weight_files,
        paper_grid=diad.paper_grid,
        description="DiAD's DDPM baseline: a pixel-space DDPM (Ho et al.'s 256 x 256 U-Net) trained on the normal "
                    "images; the input is noised to T and reconstructed by 10 DDIM steps; DiAD's ResNet-50 "
                    "feature-cosine maps and pooled-max image score.",
    )]
