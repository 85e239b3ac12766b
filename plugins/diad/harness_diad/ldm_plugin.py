"""Registers DiAD's LDM baseline (entry point ``ldm`` in the group ``harness``).

Importing this module is cheap: the networks load when the method is built.

Profiles
--------
``paper`` (the defaults)
    DiAD's ``paper`` profile without the SG network (:class:`harness_diad.baselines.LDMBaseline`):
    SD v1.5's UNet and KL-f8 autoencoder, the autoencoder fine-tuned as DiAD's stage 1, then the
    whole UNet trained on the epsilon loss with the empty prompt (AdamW 1e-5, batch 12,
    accumulation 4, 1000 epochs), DDIM with 10 steps from 999, ResNet-50 f2-f4 scoring.
``tiny``
    DiAD's ``tiny`` profile without the SG network: 32 px, a toy UNet and autoencoder with
    random initialisation, 2 + 3 epochs, the latent noised to DDIM step 301.
"""

from __future__ import annotations

from harness import MethodSpec, PaperRef, Setting, hookimpl
from harness_diad import plugin as diad
from harness_diad.weightfiles import weight_files

#: DiAD's settings less those of the SG network and of the authors' DiAD checkpoints.
_NOT_LDM = ("only_mid_control", "authors_checkpoint")
SETTINGS = tuple(s for s in diad.SETTINGS if s.name not in _NOT_LDM) + (
    Setting("trained_unet", str, "all", "what the denoiser stage trains of the SD UNet: 'all' or 'decoder' "
            "(DiAD's split: decoder blocks and output layers)", choices=("all", "decoder"),
            choice="all: an LDM baseline has no SG network to carry the input, so its whole denoiser is trained; "
                   "DiAD's paper does not say"),
)

# DiAD's tiny profile with fewer epochs (2 + 3 instead of 15 + 15): without the SG network there is
# no guidance to train, and the main job's budget is shared by every method. No learning floor: with
# so few autoencoder epochs and an unguided latent denoiser the reconstructions are poor everywhere
# (synthetic set, seed 0, at 3 + 5 epochs: image AUROC 0.553, pixel AUROC 0.590).
PROFILES = {"paper": {}, "tiny": {**diad.PROFILES["tiny"], "ae_epochs": 2, "epochs": 3}}

PAPER = PaperRef(
    title="LDM baseline as run by DiAD (Rombach et al., High-Resolution Image Synthesis with Latent Diffusion "
          "Models, CVPR 2022; DiAD, AAAI 2024, Tables 1-4)",
    venue="AAAI 2024 (DiAD)",
    url="https://arxiv.org/abs/2312.06607",
)


def build(settings):
    """The factory: the LDM baseline (no weights are read; works on the meta device)."""
    from harness_diad.baselines import LDMBaseline

    return LDMBaseline(settings)


@hookimpl
def harness_methods():
    """Return the LDM baseline's method spec."""
    return [MethodSpec(
        name="ldm", paper=PAPER, protocols=("multiclass", "oneclass", "fewshot"), profiles=PROFILES,
        factory=build, settings=SETTINGS, paper_protocol="multiclass", resources=diad.RESOURCES,
        weights=weight_files, paper_grid=diad.paper_grid,
        description="DiAD's LDM baseline: Stable Diffusion v1.5's latent denoiser alone (no SG network), the input "
                    "latent noised to T and reconstructed by 10 DDIM steps; DiAD's ResNet-50 feature-cosine maps "
                    "and pooled-max image score.",
    )]
