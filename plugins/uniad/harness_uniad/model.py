"""UniAD as a harness method: frozen multi-scale features reconstructed by a masked transformer.

Fit (two checkpointed stages, :mod:`harness.engine.support.checkpoint`; a killed fit resumes where it stopped)
    1. ``features``: the backbone gets the EfficientNet-b4 file UniAD loads
       (``backbone_pretrained``), or seeded random weights with BatchNorm statistics re-estimated
       on the training images (``tiny``, ``--weights random``); recorded in
       ``context.info["backbone_init"]``.
    2. ``reconstruction``: the transformer learns to reconstruct the aggregated features (MSE),
       AdamW, the authors' StepLR, gradient-norm clipping, jittered inputs. The backbone is frozen
       in eval mode and the MVTec-AD config has no augmentation, so each image's features are
       the same in every epoch: they are extracted once (kept on the CPU) instead of at every
       step as the authors' loop does, with the same result. The batch order of an epoch depends
       only on (seed, epoch); the jitter noise comes from a generator the checkpoint keeps, and
       dropout from the global RNG the checkpoint restores, so a resumed fit continues the same
       sequence.

Predict
    Features -> reconstruction (no jitter, dropout off) -> L2 error over channels -> x stride
    bilinear upsampling (``align_corners=True``) to the image size -> image score = max of the
    ``score_pool_size`` average-pooled map (:func:`harness.toolkit.scoring.pooled_max`). No
    smoothing: the authors' evaluation uses the raw upsampled map.

A fast dev run (``--fast-dev-run``) runs both stages with one epoch and two optimiser steps; the
record says so.
"""

from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from harness import FitContext, Method, Prediction, TrainSet
from harness.toolkit.multiscale import MultiScaleFeatures, prepare_features
from harness.toolkit.precision import autocast, grad_scaler
from harness.toolkit.scoring import pooled_max
from harness.toolkit.training import optimiser_step, train_batches
from harness_uniad.network import UniADReconstruction
from harness_uniad.weightfiles import weight_files


def step_lr_factor(epoch: int, step: int, gamma: float, offset: bool) -> float:
    """Learning-rate factor of (0-based) ``epoch`` under UniAD's StepLR.

    ``offset=True`` is the authors' loop: ``lr_scheduler.step(epoch)`` after epoch ``epoch`` sets
    the closed-form rate ``gamma ** (epoch // step)`` for epoch ``epoch + 1``, so epoch ``e >= 1``
    trains at ``gamma ** ((e - 1) // step)`` (epochs 0-800 at lr, then x0.1 with step 800).
    ``offset=False`` is a plain StepLR stepped once per epoch: ``gamma ** (e // step)``.
    """
    e = max(int(epoch) - 1, 0) if offset else int(epoch)
    return float(gamma) ** (e // int(step))


class UniAD(Method):
    """UniAD: one feature-reconstruction transformer for every category.

    Parameters
    ----------
    settings : Settings
        See :data:`harness_uniad.plugin.SETTINGS`. Building reads no file, so it works under
        ``torch.device("meta")``.
    """

    def __init__(self, settings: Mapping[str, Any]) -> None:
        super().__init__(settings)
        s = self.settings
        if int(s.image_size) % int(s.feature_stride):
            raise ValueError(f"image_size {s.image_size} must be a multiple of feature_stride {s.feature_stride} "
                             "(the authors' update_config asserts the same)")
        if len(s.neighbor_size) != 2 or len(s.neighbor_mask) != 3:
            raise ValueError(f"neighbor_size needs two values (rows, columns) and neighbor_mask three 0/1 switches "
                             f"(encoder, decoder first, decoder second); got {s.neighbor_size} and {s.neighbor_mask}")
        grid = int(s.image_size) // int(s.feature_stride)
        self.features = MultiScaleFeatures(s.backbone, s.backbone_layers, grid, s.backbone_padding)
        self.reconstruction = UniADReconstruction(
            self.features.channels, int(s.feature_stride), (grid, grid), hidden_dim=s.hidden_dim, nhead=s.nhead,
            num_encoder_layers=s.num_encoder_layers, num_decoder_layers=s.num_decoder_layers,
            dim_feedforward=s.dim_feedforward, dropout=s.dropout, activation=s.activation,
            normalize_before=s.normalize_before, pos_embed_type=s.pos_embed_type,
            neighbor_size=tuple(s.neighbor_size), neighbor_mask=tuple(bool(m) for m in s.neighbor_mask),
            jitter_scale=s.jitter_scale, jitter_prob=s.jitter_prob)

    def networks(self) -> Mapping[str, torch.nn.Module]:
        """The frozen feature extractor and the reconstruction transformer (the authors' names)."""
        return {"backbone": self.features, "reconstruction": self.reconstruction}

    # ------------------------------------------------------------------ features

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Aggregated features (B, C, g, g), float32, of images in [0, 1]."""
        with autocast(self.device, self.settings.precision):
            return self.features(images.to(self.device).float()).float()

    def _prepare_backbone(self, train: TrainSet, context: FitContext) -> dict[str, Any]:
        """Load the declared weights, or draw seeded random ones; return what the record says."""
        s = self.settings
        return prepare_features(self.features, weight_files(s), train, context, s, self.device, s.feature_batch_size)

    @torch.no_grad()
    def _encode_all(self, train: TrainSet, context: FitContext) -> torch.Tensor:
        """Features of every training image, on the CPU (the training set's order)."""
        size = self.settings.feature_batch_size
        total = -(-len(train) // size)
        batches = context.progress.iterate((x for x, _ in train.batches(size)), total=total, desc="uniad features")
        return torch.cat([self.encode(x).cpu() for x in batches])

    # ------------------------------------------------------------------ fit

    def fit(self, train: TrainSet, context: FitContext) -> None:
        """Prepare the backbone, then train the reconstruction transformer.

        Parameters
        ----------
        train : TrainSet
            Normal images of every category of the job.
        context : FitContext
            ``context.weights`` finds the backbone file (a missing file raises
            :class:`harness.WeightsNotFoundError` naming ``harness weights pull``);
            ``context.checkpoint`` keeps each stage; ``context.fast_dev_run`` shortens them.
        """
        if context.fast_dev_run:
            context.info["fast_dev_run"] = {"epochs": 1, "steps": "at most 2"}
        with context.checkpoint.stage("features", backbone=self.features) as position:
            if not position.done:
                position.extra["info"] = self._prepare_backbone(train, context)
        self.features.to(self.device).eval()
        context.info.update(position.extra.get("info", {}))
        self._train(train, context)

    def _train(self, train: TrainSet, context: FitContext) -> None:
        """Stage ``reconstruction``: the authors' optimiser, schedule and clipping, checkpointed per step."""
        s = self.settings
        epochs = context.epochs(s.epochs)
        net = self.reconstruction.to(self.device)
        optimiser = torch.optim.AdamW(net.parameters(), lr=s.lr, betas=(0.9, 0.999), weight_decay=s.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimiser, lambda e: step_lr_factor(e, s.lr_step, s.lr_gamma, s.lr_schedule_offset))
        scaler = grad_scaler(self.device, s.precision)
        jitter = torch.Generator(device=self.device).manual_seed(int(context.seed))
        # The backbone is tracked here too: a resume restores objects from the latest checkpoint only.
        with context.checkpoint.stage("reconstruction", backbone=self.features, reconstruction=net,
                                      optimiser=optimiser, scheduler=scheduler, scaler=scaler,
                                      jitter=jitter) as position:
            if not position.done:
                feats = self._encode_all(train, context)
                batch_size = min(int(s.train_batch_size), len(feats))
                start, losses, epoch_losses = time.perf_counter(), [], []
                net.train()

                def epoch_batches(epoch: int, first: int):
                    order = torch.from_numpy(np.random.default_rng([int(context.seed), epoch]).permutation(len(feats)))
                    return ((index, order[begin:begin + batch_size])
                            for index, begin in enumerate(range(0, len(feats), batch_size)))

                def epoch_end(epoch: int) -> None:
                    scheduler.step()
                    if epoch_losses:
                        losses.append(float(np.mean(epoch_losses)))
                    epoch_losses.clear()

                for step in train_batches(context, position, epochs, epoch_batches, desc="uniad reconstruction",
                                          on_epoch_end=epoch_end):
                    target = feats[step.data].to(self.device)
                    with autocast(self.device, s.precision):
                        rec = net.reconstruct(target, jitter)
                    loss = F.mse_loss(rec.float(), target)
                    optimiser_step(loss, [optimiser], scaler, clip=(net.parameters(), s.grad_clip_norm))
                    epoch_losses.append(float(loss.detach()))
                position.extra["info"] = {
                    "epochs": epochs, "train_batch_size": batch_size, "steps": position.steps,
                    "feature_shape": list(feats.shape[1:]),
                    "first_epoch_loss": round(losses[0], 6) if losses else None,
                    "final_epoch_loss": round(losses[-1], 6) if losses else None,
                    "train_seconds": round(time.perf_counter() - start, 2),
                    "checkpoint_selection": "last epoch (the authors keep the epoch with the best test-set mean "
                                            "pixel AUROC, evaluated every 10 epochs; the harness shows no test data)"}
        net.eval()
        context.info["training"] = position.extra.get("info", {})

    # ------------------------------------------------------------------ inference

    @torch.no_grad()
    def predict(self, images: torch.Tensor, categories: Sequence[str]) -> Prediction:
        """Reconstruct the features and score the reconstruction error.

        Parameters
        ----------
        images : torch.Tensor
            (B, 3, H, W) in [0, 1], H = W = ``image_size``.
        categories : sequence of str
            Unused: one model serves every category.

        Returns
        -------
        Prediction
            Maps (B, H, W) and image scores (B,), float32.
        """
        feats = self.encode(images)
        with autocast(self.device, self.settings.precision):
            _, pred = self.reconstruction(feats)
        maps = pred[:, 0].float()
        if tuple(maps.shape[-2:]) != tuple(images.shape[-2:]):
            # Only when the runner's size is not a multiple of the stride (it always is for image_size).
            maps = F.interpolate(maps[:, None], size=tuple(images.shape[-2:]), mode="bilinear",
                                 align_corners=True)[:, 0]
        return Prediction(maps, pooled_max(maps, self.settings.score_pool_size).float())
