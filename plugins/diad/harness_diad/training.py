"""DiAD's fit (:class:`~harness_diad.model.DiAD`): the autoencoder fine-tuning and the denoiser's
training as checkpointed stages on the toolkit's training loop (see :mod:`harness_diad.model` for
what each stage does and where it follows the authors' scripts)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from harness import FitContext, TrainSet, WeightsNotFoundError
from harness.toolkit.backbones import read_state
from harness.toolkit.precision import autocast, grad_scaler
from harness.toolkit.training import optimiser_step, train_batches
from harness.toolkit.weightfiles import sha256_file
from harness_diad import weightfiles
from harness_diad.convert import load_strict
from harness_diad.losses import PatchDiscriminator, adaptive_weight, fast_forward_adam, hinge_d_loss
from harness_diad.networks import freeze_unet_encoder, trained_unet_parts
from harness_diad.weights import lpips_vgg


def epoch_order(n: int, seed: int, stage: int, epoch: int) -> np.ndarray:
    """The shuffled order of ``n`` images in ``epoch`` of ``stage``: a function of (seed, stage, epoch) only."""
    return np.random.default_rng([int(seed), int(stage), int(epoch)]).permutation(n)


class DiADTraining:
    """The fit of :class:`~harness_diad.model.DiAD` (a mixin: the networks and settings are DiAD's)."""

    def fit(self, train: TrainSet, context: FitContext) -> None:
        """Load or initialise the networks, fine-tune the autoencoder, then train the denoiser."""
        s = self.settings
        start = time.perf_counter()
        self._initialise(train, context)
        info: dict[str, Any] = {}
        if s.get("authors_checkpoint") and not context.random_weights:
            info["trained"] = "no: the authors' checkpoint is scored as it is"
        else:
            info.update(self.finetune_autoencoder(train, context))
            info.update(self.train_denoiser(train, context))
        self.eval()
        info.update({"train_seconds": round(time.perf_counter() - start, 2), "ddim_steps": s.ddim_steps,
                     "noise_step": self.ddim.noise_step, "ddim_timesteps": list(self.ddim.timesteps),
                     "classifier_free_guidance": "omitted (empty prompt on both sides: a no-op)",
                     "checkpoint_selection": "final epoch (the authors select on the test set every 25 epochs)"})
        context.info.update(info)

    def _batch(self, train: TrainSet, idx: np.ndarray) -> torch.Tensor:
        return torch.stack([train[int(i)][0] for i in idx]).to(self.device)

    def _lpips(self, context: FitContext) -> torch.nn.Module | None:
        """LPIPS-VGG for the autoencoder loss (None if unused); VGG-16 read from disk unless random."""
        s = self.settings
        if s.ae_perceptual_weight <= 0:
            return None
        if context.random_weights:
            return lpips_vgg(None, pretrained_heads=False).to(self.device)
        path = context.weights.resolve(weightfiles.VGG16, s)
        digest = sha256_file(path)
        if not digest.startswith(weightfiles.VGG16_SHA256_PREFIX):
            raise WeightsNotFoundError(f"{path} has sha256 {digest}, not torchvision's VGG-16 "
                                       f"({weightfiles.VGG16_SHA256_PREFIX}...)")
        return lpips_vgg(read_state(path)).to(self.device)

    def finetune_autoencoder(self, train: TrainSet, context: FitContext) -> dict[str, Any]:
        """Stage 1: fine-tune the autoencoder on the training images (see :mod:`harness_diad.losses`)."""
        s = self.settings
        epochs, accumulate = context.epochs(s.ae_epochs), s.ae_grad_accumulation
        if epochs <= 0:
            return {"ae_epochs": 0}
        perceptual = self._lpips(context)
        if perceptual is not None and s.ae_lpips_mode == "train":
            # Lightning's train mode reaches the loss module: LPIPS's dropout is active (parameters stay frozen).
            perceptual.train()
        disc = PatchDiscriminator(3, 64, s.ae_disc_layers)
        disc.initialise(context.seed + 11)
        disc_start = "fresh (taming's initialisation)"
        stored = {k.removeprefix("discriminator."): v for k, v in getattr(self, "_ae_loss_state", {}).items()
                  if k.startswith("discriminator.")}
        if s.ae_disc_init == "checkpoint" and stored:
            load_strict(disc, stored, "the starting autoencoder file's loss.discriminator.* tensors")
            disc_start = "the starting autoencoder file's trained discriminator (loss.discriminator.*)"
        disc.to(self.device).train()
        self.vae.train().requires_grad_(True)
        opt = torch.optim.Adam(self.vae.parameters(), lr=s.ae_lr, betas=(0.5, 0.9))
        opt_d = torch.optim.Adam(disc.parameters(), lr=s.ae_lr, betas=(0.5, 0.9))
        scaler = grad_scaler(self.device, s.precision)
        gen = torch.Generator(device=self.device).manual_seed(int(context.seed) + 1)
        last_layer = self.vae.decoder.conv_out.weight
        n_batches = -(-len(train) // s.ae_train_batch_size)
        last, adversarial_steps = float("nan"), 0
        with context.checkpoint.stage("autoencoder", vae=self.vae, discriminator=disc, ae_optimiser=opt,
                                      disc_optimiser=opt_d, ae_scaler=scaler, ae_generator=gen) as position:
            adversarial_steps = int(position.extra.get("adversarial_steps", 0))

            def epoch_batches(epoch: int, first: int):
                order = epoch_order(len(train), context.seed, 1, epoch)
                size = s.ae_train_batch_size
                return ((index, order[index * size:(index + 1) * size]) for index in range(n_batches))

            for step in train_batches(context, position, epochs, epoch_batches, accumulate=accumulate,
                                      n_batches=lambda epoch: n_batches, desc="diad autoencoder"):
                # position.steps counts the optimiser steps before this one (taming's global_step).
                adversarial = s.ae_disc_factor > 0 and position.steps >= s.ae_disc_start
                x = self.to_pixels(self._batch(train, step.data))
                with autocast(self.device, s.precision):
                    posterior = self.vae.encode(x).latent_dist
                    noise = torch.randn(posterior.mean.shape, generator=gen, device=self.device)
                    x_hat = self.vae.decode(posterior.mean + posterior.std * noise).sample
                    rec = (x - x_hat).abs()
                    if perceptual is not None:
                        rec = rec + s.ae_perceptual_weight * perceptual(x, x_hat)
                    nll = rec.sum() / x.shape[0]
                    loss = nll + s.ae_kl_weight * posterior.kl().sum() / x.shape[0]
                    if adversarial:
                        disc.requires_grad_(False)
                        g_loss = -disc(x_hat).mean()
                        loss = loss + adaptive_weight(nll, g_loss, last_layer, s.ae_disc_weight) \
                            * s.ae_disc_factor * g_loss
                last = float(loss.detach())
                if not adversarial:
                    optimiser_step(loss, [opt], scaler, accumulate=accumulate, boundary=step.boundary)
                else:
                    # The generator's loss first, then the discriminator's; one scaler update steps both.
                    scaler.scale(loss / accumulate).backward()
                    disc.requires_grad_(True)
                    with autocast(self.device, s.precision):
                        d_loss = s.ae_disc_factor * hinge_d_loss(disc(x.detach()), disc(x_hat.detach()))
                    if step.boundary and not opt_d.state:
                        # The authors' discriminator Adam has stepped (with zero gradients) every step so far.
                        fast_forward_adam(opt_d, position.steps)
                    optimiser_step(d_loss, [opt, opt_d], scaler, accumulate=accumulate, boundary=step.boundary)
                    adversarial_steps += int(step.boundary)
                if step.boundary:
                    position.extra.update(adversarial_steps=adversarial_steps, final_loss=last)
            position.extra.update(steps=position.steps, adversarial_steps=adversarial_steps,
                                  final_loss=position.extra.get("final_loss", last))
        self.vae.eval().requires_grad_(False)
        extra = position.extra
        return {"ae_epochs": epochs, "ae_discriminator_start": disc_start, "ae_lpips_mode": s.ae_lpips_mode,
                "ae_steps": int(extra.get("steps", position.steps)),
                "ae_adversarial_steps": int(extra.get("adversarial_steps", 0)), "ae_disc_start": s.ae_disc_start,
                "ae_final_loss": round(float(extra.get("final_loss", float("nan"))), 4)}

    def train_denoiser(self, train: TrainSet, context: FitContext) -> dict[str, Any]:
        """Stage 2: train the SG network and the SD decoder on Eq. 6 with the autoencoder frozen."""
        s = self.settings
        epochs, accumulate, batch = context.epochs(s.epochs), s.grad_accumulation, s.train_batch_size
        self.vae.eval().requires_grad_(False)
        self.backbone.eval().requires_grad_(False)
        params = self._denoiser_parameters()
        opt = torch.optim.AdamW(params, lr=s.lr)
        scaler = grad_scaler(self.device, s.precision)
        gen = torch.Generator(device=self.device).manual_seed(int(context.seed) + 2)
        n_batches = -(-len(train) // batch)
        last = float("nan")
        # The UNet's frozen parts are rebuilt identically by _initialise; the checkpoint keeps what changes.
        with context.checkpoint.stage("denoiser", **self._denoiser_state(), vae=self.vae, dn_optimiser=opt,
                                      dn_scaler=scaler, dn_generator=gen) as position:
            moments = self._posterior_moments(train) if position.epoch < epochs and not position.done else None

            def epoch_batches(epoch: int, first: int):
                order = epoch_order(len(train), context.seed, 2, epoch)
                return ((index, order[index * batch:(index + 1) * batch]) for index in range(n_batches))

            for step in train_batches(context, position, epochs, epoch_batches, accumulate=accumulate,
                                      n_batches=lambda epoch: n_batches, desc="diad denoiser"):
                idx = step.data
                sel = torch.as_tensor(idx, device=self.device)
                mean, std = moments[0, sel], moments[1, sel]
                z = (mean + std * torch.randn(mean.shape, generator=gen, device=self.device)) * self.scaling_factor
                noise = torch.randn(z.shape, generator=gen, device=self.device)
                t = torch.randint(0, self.schedule.timesteps, (z.shape[0],), generator=gen, device=self.device)
                z_t = self.schedule.add_noise(z, noise, t)
                hint = self.to_pixels(self._batch(train, idx))
                with autocast(self.device, s.precision):
                    loss = F.mse_loss(self.predict_noise(z_t, t, hint).float(), noise)
                optimiser_step(loss, [opt], scaler, accumulate=accumulate, boundary=step.boundary)
                last = float(loss.detach())
                if step.boundary:
                    position.extra["final_loss"] = last
            position.extra.update(steps=position.steps, final_loss=position.extra.get("final_loss", last))
        self.unet.requires_grad_(False)
        if self.sg is not None:
            self.sg.requires_grad_(False)
        extra = position.extra
        return {"epochs": epochs, "steps": int(extra.get("steps", position.steps)), "train_batch_size": batch,
                "grad_accumulation": accumulate, "final_loss": round(float(extra.get("final_loss", float("nan"))), 5)}

    def _denoiser_parameters(self) -> list[torch.nn.Parameter]:
        """Put the denoiser in train mode and return what stage 2 trains: the SG network and the SD decoder."""
        params = list(self.sg.parameters()) + freeze_unet_encoder(self.unet)
        self.sg.train().requires_grad_(True)
        self.unet.train()
        return params

    def _denoiser_state(self) -> dict[str, torch.nn.Module]:
        """The modules stage 2 changes, for its checkpoint (the UNet's frozen parts are rebuilt by ``_initialise``)."""
        return {"sg": self.sg, "unet_trained": trained_unet_parts(self.unet)}

    @torch.no_grad()
    def _posterior_moments(self, train: TrainSet) -> torch.Tensor:
        """(2, N, 4, h, w): posterior mean and std of every training image (the autoencoder is frozen)."""
        out = []
        batch = self.settings.train_batch_size
        for begin in range(0, len(train), batch):
            x = self.to_pixels(self._batch(train, np.arange(begin, min(begin + batch, len(train)))))
            with autocast(self.device, self.settings.precision):
                dist = self.vae.encode(x).latent_dist
            out.append(torch.stack([dist.mean.float(), dist.std.float()]))
        return torch.cat(out, dim=1)


__all__ = ["DiADTraining"]
