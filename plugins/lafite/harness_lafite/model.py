"""LafitE as a harness method: feature diffusion, coreset feature editing, pseudo-validation.

Fit (three checkpointed stages, :mod:`harness.engine.support.checkpoint`; a killed fit resumes where it stopped)
    0. When tau or K is searched, a seeded ``holdout_fraction`` of every category's training
       images is set aside (:func:`harness.toolkit.pseudo_validation.split_holdout`); those images
       build the pseudo-validation set and are used for nothing else: not in the standardisation
       statistics, not in the memory bank, not in the U-Net's training set.
    1. ``features``: the backbone gets the weights UniAD uses (``backbone_pretrained``), or seeded
       random weights with BatchNorm statistics re-estimated on the fitting images (``tiny``,
       ``--weights random``); recorded in ``context.info["backbone_init"]``. The aggregated
       feature tensor of every fitting image (:mod:`harness.toolkit.multiscale`) is standardised per
       channel with the fitting images' mean and standard deviation when ``feature_standardize``
       (off in ``paper``: neither the paper nor UniAD standardises, and it would reweight the
       channels in Eq. 12's error and the editing distances; on in ``tiny``); editing,
       diffusion and the reconstruction error all live in that space. Every feature slice goes
       into the memory bank, reduced to a greedy coreset (``coreset_ratio``).
    2. ``unet``: the U-Net is trained on the feature tensors (Eq. 6), AdamW, the learning rate
       dropped by ``lr_drop_factor`` after ``lr_drop_at`` of the epochs. The batch order of an
       epoch depends only on (seed, epoch); the noise and time steps come from a generator that
       the checkpoint keeps, so a resumed fit continues the same sequence.
    3. ``selection``: tau (editing off) and then K are chosen on the pseudo-validation set
       (:mod:`harness_lafite.selection`), each candidate's AUROC recorded with its spread; each
       evaluated candidate is kept with the checkpoint. A grid of one value fixes it.

Predict
    Features -> (edit, Eq. 10) -> noise to tau (Eq. 11) -> DDIM back to 0 (Eq. 7) -> squared L2
    error to the unedited features -> bilinear upsampling -> Gaussian (sigma = 4) -> image score =
    max after average pooling (:mod:`harness_lafite.scoring`). ``feature_editing=False`` runs the
    paper's "LafitE w/o F.E." ablation (the diffusion starts from the unedited features).

A fast dev run (``--fast-dev-run``) runs the same stages with one epoch, two optimiser steps on
batches of at most four feature tensors, a selection over the first and last value of each grid
on two pseudo-validation images per category, and two DDIM evaluations (in selection and in
predict); the record says so.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from harness import FitContext, Method, Prediction, TrainSet
from harness.toolkit.multiscale import MultiScaleFeatures
from harness.toolkit.noise import ImageNoise
from harness.toolkit.precision import autocast
from harness_lafite.diffusion import build_noise_schedule, build_unet, reconstruct
from harness_lafite.editing import WEIGHTINGS, edit_features
from harness_lafite.scoring import image_scores, reconstruction_maps
from harness_lafite.training import LafitETraining

class LafitE(LafitETraining, Method):
    """Latent diffusion over pretrained CNN features with memory-bank feature editing.

    Parameters
    ----------
    settings : Settings
        See :data:`harness_lafite.plugin.SETTINGS`. Building reads no file, so it works under
        ``torch.device("meta")``.
    """

    def __init__(self, settings: Mapping[str, Any]) -> None:
        super().__init__(settings)
        s = self.settings
        if s.editing_weights not in WEIGHTINGS:
            raise ValueError(f"editing_weights must be one of {WEIGHTINGS}, not {s.editing_weights!r}")
        bad_k = [k for k in s.k_grid if k < 2]
        if bad_k:
            raise ValueError(f"k_grid values must be >= 2 (Eq. 10 is degenerate for K = 1), got {bad_k}")
        bad_tau = [t for t in s.tau_grid if not 1 <= t < s.timesteps]
        if bad_tau:
            raise ValueError(f"tau_grid values must be in [1, T-1] = [1, {s.timesteps - 1}], got {bad_tau}")
        self.features = MultiScaleFeatures(s.backbone, s.backbone_layers, s.feature_size, s.backbone_padding)
        channels = self.features.channels
        self.unet = build_unet(channels, s.feature_size, base_channels=s.base_channels,
                               channel_mults=s.channel_mults, layers_per_block=s.layers_per_block,
                               attention_resolutions=s.attention_resolutions,
                               attention_head_dim=s.attention_head_dim, norm_groups=s.norm_groups,
                               dropout=s.dropout)
        self.schedule = build_noise_schedule(s.timesteps, s.beta_schedule)
        self.mean = torch.zeros(channels)
        self.std = torch.ones(channels)
        self.bank = torch.zeros(0, channels)
        self.tau: int = int(s.tau_grid[0])
        self.k: int | None = int(s.k_grid[0]) if s.feature_editing else None
        self.ddim_steps: int = int(s.ddim_steps)

    def networks(self) -> Mapping[str, torch.nn.Module]:
        """The feature extractor and the noise-prediction U-Net."""
        return {"backbone": self.features, "unet": self.unet}

    def to(self, device: torch.device | str) -> "LafitE":
        """Move the networks, the standardisation statistics and the memory bank."""
        super().to(device)
        self.mean, self.std, self.bank = (t.to(self.device) for t in (self.mean, self.std, self.bank))
        return self

    # ------------------------------------------------------------------ features

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Standardised aggregated features (B, C, g, g), float32, of images in [0, 1]."""
        with autocast(self.device, self.settings.precision):
            feats = self.features(images.to(self.device).float()).float()
        if self.settings.feature_standardize:
            feats = (feats - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)
        return feats

    @torch.no_grad()
    def _encode_all(self, images: torch.Tensor | TrainSet, context: FitContext, desc: str) -> torch.Tensor:
        """Features of a TrainSet or an image tensor, batch by batch, on :attr:`device`."""
        size = self.settings.feature_batch_size
        if isinstance(images, TrainSet):
            batches = (x for x, _ in images.batches(size))
        else:
            batches = (images[i:i + size] for i in range(0, len(images), size))
        total = -(-len(images) // size)
        return torch.cat([self.encode(x) for x in context.progress.iterate(batches, total=total, desc=desc)])

    # ------------------------------------------------------------------ inference

    @torch.no_grad()
    def _score(self, x0: torch.Tensor, size: tuple[int, int], tau: int, k: int | None,
               seeds: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Maps (B, H, W) and image scores (B,) of standardised features ``x0`` for given tau, K.

        ``seeds``: one per image (else by position in the batch); each image's noise is drawn
        from its own seed mixed with ``inference_seed``.
        """
        s = self.settings
        start = edit_features(x0, self.bank, k, s.editing_weights) if k is not None else x0
        generator = ImageNoise(seeds, x0.shape[0], x0.device, base=s.inference_seed)
        with autocast(self.device, s.precision):
            rec = reconstruct(self.unet, self.schedule, start, tau, self.ddim_steps, s.ddim_eta, generator)
        maps = reconstruction_maps(x0, rec.float(), size, s.smoothing_sigma)
        return maps, image_scores(maps, s.score_pool_size)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, categories: Sequence[str],
                seeds: Sequence[int] | None = None) -> Prediction:
        """Reconstruct the (edited) features from step tau and score the reconstruction error.

        Parameters
        ----------
        images : torch.Tensor
            (B, 3, H, W) in [0, 1].
        categories : sequence of str
            Unused: one model and one memory bank serve every category.
        seeds : sequence of int, optional
            One per image (the runner's), so predictions do not depend on the batch.

        Returns
        -------
        Prediction
            Maps (B, H, W) and image scores (B,), float32.
        """
        x0 = self.encode(images)
        maps, scores = self._score(x0, tuple(images.shape[-2:]), self.tau, self.k, seeds)
        return Prediction(maps.float(), scores.float())

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Networks, standardisation statistics, memory bank, the chosen tau and K and the DDIM steps."""
        return {"backbone": self.features.state_dict(), "unet": self.unet.state_dict(), "mean": self.mean.cpu(),
                "std": self.std.cpu(), "bank": self.bank.cpu(), "tau": int(self.tau),
                "k": -1 if self.k is None else int(self.k), "ddim_steps": int(self.ddim_steps)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.features.load_state_dict(state["backbone"])
        self.unet.load_state_dict(state["unet"])
        self.mean, self.std, self.bank = (state[key].to(self.device) for key in ("mean", "std", "bank"))
        self.tau = int(state["tau"])
        self.k = None if int(state["k"]) < 0 else int(state["k"])
        self.ddim_steps = int(state.get("ddim_steps", self.settings.ddim_steps))
