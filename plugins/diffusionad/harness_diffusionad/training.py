"""DiffusionAD's fit (:class:`~harness_diffusionad.model.DiffusionAD`): the joint training of the
denoiser and the segmentation network on synthetic anomalies, on the toolkit's training loop, or a
checkpoint in the authors' format loaded instead (see :mod:`harness_diffusionad.model`)."""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from harness import FitContext, TrainSet
from harness.errors import HarnessError, HarnessWarning, WeightsNotFoundError
from harness.toolkit.precision import grad_scaler
from harness.toolkit.training import optimiser_step, train_batches
from harness_diffusionad.synthesis import (DTD_URL, AnomalyTrainingSet, EpochBatches, ForegroundMasks,
                                           SynthesisConfig, SynthesisSourceError, TextureSource)

#: Training images per batch in a fast dev run: the paper's batch of 16 at 256 px needs tens of
#: GB for the backward pass on a CPU; the GPU check measures the full batch.
FAST_DEV_TRAIN_BATCH = 2


def binary_focal_loss(pred: torch.Tensor, target: torch.Tensor, alpha: float = 0.5, gamma: float = 4.0) -> torch.Tensor:
    """Focal loss on probabilities (not logits), averaged over pixels (the authors' ``BinaryFocalLoss``).

    Parameters
    ----------
    pred : torch.Tensor
        Probabilities in (0, 1).
    target : torch.Tensor
        Same shape, in [0, 1].
    alpha, gamma : float
        Constant weight and focusing exponent (the code uses 0.5 and 4).

    Returns
    -------
    torch.Tensor
        Scalar.
    """
    # binary_cross_entropy clamps its log terms at -100, so exact 0 / 1 predictions stay finite.
    bce = F.binary_cross_entropy(pred, target, reduction="none")
    p_true = torch.exp(-bce)
    return (alpha * (1 - p_true) ** gamma * bce).mean()


class DiffusionADTraining:
    """The fit of :class:`~harness_diffusionad.model.DiffusionAD` (a mixin: the networks and settings are its)."""

    def train_step(self, images: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor,
                   optimisers: Sequence[torch.optim.Optimizer], scaler: torch.amp.GradScaler,
                   generator: torch.Generator) -> dict[str, float]:
        """One joint optimisation step on a batch from :class:`~harness_diffusionad.synthesis.AnomalyTrainingSet`.

        Parameters
        ----------
        images : torch.Tensor
            (B, 3, H, W) in [0, 1] (some with synthetic anomalies), on :attr:`device`.
        masks : torch.Tensor
            (B, 1, H, W) synthetic anomaly masks.
        labels : torch.Tensor
            (B,) 1 for images with an anomaly.
        optimisers : sequence of torch.optim.Optimizer
        scaler : torch.amp.GradScaler
            Enabled for fp16 only.
        generator : torch.Generator
            Source of the timesteps and the forward-process noise.

        Returns
        -------
        dict
            The loss terms as floats.
        """
        s = self.settings
        x0 = self.to_model_range(images)
        b, dev = x0.shape[0], x0.device
        if s.training == "norm_guided":
            t_low = torch.randint(0, s.normal_t_range, (b,), generator=generator, device=dev)
            t_high = torch.randint(s.normal_t_range, s.T, (b,), generator=generator, device=dev)
            est = self.estimates(x0, t_low, t_high, generator=generator)
            reconstruction, mse = est["guided"], est["mse_low"] + est["mse_high"]
        else:
            t = torch.randint(1, s.T, (b,), generator=generator, device=dev)
            noise = torch.randn(x0.shape, generator=generator, device=dev, dtype=x0.dtype)
            x_t = self.schedule.q_sample(x0, t, noise)
            eps = self.predict_noise(x_t, t)
            reconstruction = self.schedule.x0_from_eps(x_t, t, eps)
            mse = (eps - noise).square().flatten(1).mean(1)
        counted = labels == 0 if s.noise_loss_on == "normal" else torch.ones_like(labels, dtype=torch.bool)
        # Only the counted images' noise is learnt; a batch without any contributes no noise loss.
        noise_loss = mse[counted].mean() if counted.any() else mse.sum() * 0
        pred = self.segment_pair(x0, reconstruction)
        focal = binary_focal_loss(pred, masks, s.focal_alpha, s.focal_gamma)
        smooth = F.smooth_l1_loss(pred, masks)
        loss = noise_loss + s.focal_weight * focal + s.smooth_l1_weight * smooth
        optimiser_step(loss, optimisers, scaler)
        return {"loss": loss.item(), "noise": noise_loss.item(), "focal": focal.item(), "smooth_l1": smooth.item()}

    def _texture_source(self, context: FitContext) -> tuple[TextureSource, str]:
        """The anomaly texture source and how it was chosen (for the record)."""
        s = self.settings
        if s.texture_source == "procedural":
            return TextureSource(None, self.input_size), "procedural (texture_source=procedural)"
        if s.dtd_root:
            source = TextureSource(s.dtd_root, self.input_size, antialias=self.antialias)
            return source, f"dtd ({len(source.paths)} images under {source.root})"
        if context.random_weights:
            warnings.warn("diffusionad: no dtd_root with --weights random; procedural textures stand in for DTD "
                          "(the record says so)", HarnessWarning, stacklevel=2)
            return TextureSource(None, self.input_size), "procedural (--weights random run without dtd_root)"
        raise SynthesisSourceError(
            "diffusionad: the anomaly synthesis of this profile needs the Describable Textures Dataset. Download it "
            f"from {DTD_URL} (dtd-r1.0.1.tar.gz), unpack it and pass --set diffusionad.dtd_root=/path/to/dtd, or opt "
            "out explicitly with --set diffusionad.texture_source=procedural (procedural textures, not the paper's)")

    def _training_images(self, train: TrainSet) -> np.ndarray:
        """Every training image decoded once, as (N, H, W, 3) uint8 (cheap to share with workers)."""
        out = np.empty((len(train), *self.input_size, 3), dtype=np.uint8)
        for i in range(len(train)):
            # The training set gives uint8 / 255, so this recovers the stored bytes exactly.
            out[i] = (train[i][0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        return out

    def fit(self, train: TrainSet, context: FitContext) -> None:
        """Train both networks jointly on the normal training images (or load the authors' checkpoint).

        Parameters
        ----------
        train : TrainSet
        context : FitContext
        """
        s = self.settings
        start = time.perf_counter()
        if s.official_checkpoints and not context.random_weights:
            self._load_official(train, context)
            return
        textures, texture_note = self._texture_source(context)
        foregrounds = ForegroundMasks(s.foreground_root or None, self.input_size, antialias=self.antialias)
        texture_set = frozenset(context.textures) | frozenset(s.extra_texture_categories)
        foregrounds.check([(smp.category, smp.key) for smp in train.samples], texture_set)
        config = SynthesisConfig(
            textures=texture_set, foreground=s.foreground, scale_exp=tuple(s.perlin_scale_exp),
            threshold=s.perlin_threshold, beta_range=tuple(s.beta_range), augmentations=s.augmentations,
            augmentation_pool=s.augmentation_pool, grid_shuffle=s.grid_shuffle,
            self_augment_probability=s.self_augment_probability, anomaly_probability=s.anomaly_probability)
        data = AnomalyTrainingSet(self._training_images(train), [smp.category for smp in train.samples],
                                  [smp.key for smp in train.samples], context.seed, textures, foregrounds, config)
        batch_size = min(s.train_batch_size, FAST_DEV_TRAIN_BATCH) if context.fast_dev_run else s.train_batch_size
        batches = EpochBatches(len(data), batch_size, context.seed, s.train_sampling, s.anomaly_sampling)
        workers = s.synthesis_workers
        loader = torch.utils.data.DataLoader(
            data, batch_sampler=batches, num_workers=workers, persistent_workers=workers > 0,
            # The loader's own seed draw must not consume the global generator (the runner seeded it).
            generator=torch.Generator().manual_seed(context.seed), pin_memory=self.device.type == "cuda")
        opt_unet = torch.optim.Adam(self.denoiser.parameters(), lr=s.denoiser_lr, weight_decay=s.weight_decay)
        opt_seg = torch.optim.Adam(self.segmenter.parameters(), lr=s.seg_lr, weight_decay=s.weight_decay)
        # T_max = 0 means a constant learning rate; the scheduler is kept so the checkpoint has one shape.
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt_seg, T_max=max(s.seg_cosine_tmax, 1))
        scaler = grad_scaler(self.device, s.precision)
        noise = torch.Generator(device=self.device).manual_seed(context.seed)
        epochs = context.epochs(s.epochs)
        self.denoiser.train()
        self.segmenter.train()
        last: dict[str, float] = {}
        with context.checkpoint.stage("joint", denoiser=self.denoiser, segmenter=self.segmenter, opt_denoiser=opt_unet,
                                      opt_segmenter=opt_seg, scheduler=sched, scaler=scaler, noise=noise) as position:
            def epoch_batches(epoch: int, first: int, loader=loader):
                # The batch sampler starts the epoch at the first batch not yet consumed.
                batches.epoch, batches.start = epoch, first
                return enumerate(loader, start=first)

            try:
                for step in train_batches(context, position, epochs, epoch_batches):
                    images, masks, labels = step.data
                    last = self.train_step(images.to(self.device), masks.to(self.device), labels.to(self.device),
                                           (opt_unet, opt_seg), scaler, noise)
                    if s.seg_cosine_tmax > 0:
                        sched.step()
            finally:
                del epoch_batches, loader  # the last references: shuts persistent workers down
            if last:
                position.extra["final_losses"] = {k: round(v, 5) for k, v in last.items()}
        self.eval()
        context.info.update({
            "trained": True, "steps": position.steps, "epochs_run": epochs, "train_batch_size": batches.size,
            "texture_source": texture_note,
            "foreground_source": (f"the authors' masks under {foregrounds.root}" if foregrounds.enabled
                                  and s.foreground != "whole" else
                                  f"foreground={s.foreground}: whole image for textures "
                                  f"({', '.join(sorted(texture_set)) or 'none'}), harness.toolkit.foreground "
                                  "Otsu for objects" if s.foreground != "whole" else "whole image"),
            "synthesis_workers": workers, "pixel_range": s.pixel_range, "training": s.training,
            "levels": list(s.levels), "combination": s.combination,
            "final_losses": position.extra.get("final_losses", {}),
            "train_seconds": round(time.perf_counter() - start, 2),
        })
        if context.fast_dev_run and batches.size < s.train_batch_size:
            context.info["note"] = (f"fast dev run: training batch {batches.size} instead of {s.train_batch_size} "
                                    "to fit CPU memory")

    def _load_official(self, train: TrainSet, context: FitContext) -> None:
        """Load a checkpoint in the authors' format (``params-best.pt``) for the job's category instead of training."""
        from harness_diffusionad.convert import load_official, read_official_checkpoint

        s = self.settings
        root = Path(s.official_checkpoints).expanduser()
        if root.is_file():
            path = root
        else:
            if len(train.categories) != 1:
                raise HarnessError(f"diffusionad: the authors trained one model per category; official_checkpoints "
                                   f"needs --protocol oneclass (this fit has {len(train.categories)} categories)")
            path = root / train.categories[0] / s.official_checkpoint_name
        if not path.is_file():
            raise WeightsNotFoundError(f"diffusionad: no authors' checkpoint at {path}; official_checkpoints expects "
                                       f"<folder>/<category>/{s.official_checkpoint_name} (the layout of the authors' "
                                       "train.py outputs) or the path of one checkpoint file")
        digest = context.weights.note_used(path, "the authors' DiffusionAD checkpoint", "official_checkpoint")
        data = read_official_checkpoint(path)
        load_official(self.denoiser, self.segmenter, data["unet_model_state_dict"], data["seg_model_state_dict"],
                      s.num_heads)
        self.to(self.device)
        self.eval()
        context.info.update({
            "trained": False, "official_checkpoint": str(path), "official_checkpoint_sha256": digest,
            "official_checkpoint_epoch": data.get("n_epoch"),
            "note": "a checkpoint in the authors' format, scored as is; their train.py keeps the checkpoint with the "
                    "best test-set AUROC (params-best.pt), i.e. it was selected on the test set",
        })


__all__ = ["DiffusionADTraining", "binary_focal_loss", "FAST_DEV_TRAIN_BATCH"]
