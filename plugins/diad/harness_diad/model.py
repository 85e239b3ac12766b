"""DiAD as a harness method: autoencoder fine-tuning, SG-guided latent diffusion, feature scoring.

Fit (two stages, as the paper and the authors' scripts)
    1. Autoencoder (``finetune_autoencoder.py``): the KL autoencoder starts from LDM's ``kl-f8``
       file (``ae_init``; the discriminator from its ``loss.discriminator.*`` tensors when it has
       them, ``ae_disc_init``) and is fine-tuned on the
       training images with LDM's ``LPIPSWithDiscriminator`` loss (LPIPS in train mode, its
       dropout active, as Lightning leaves it: ``ae_lpips_mode``) (:mod:`harness_diad.losses`:
       L1 + LPIPS-VGG, KL weight 1e-6, and from optimiser step 50 001 on the hinge-loss patch
       discriminator with the adaptive weight, disc_weight 0.5), Adam (betas 0.5, 0.9) at
       ``4.5e-5 x batch`` with batch 4 and gradient accumulation 8, in fp32 (Lightning
       ``precision=32``). Their script sets no epoch count, so Lightning's default of 1000
       applies; on MVTec-AD (3629 images, 114 optimiser steps per epoch) the discriminator starts
       in epoch 439.
    2. Denoiser (``train.py``, Eq. 6): with the autoencoder frozen, ``z = s E(x)`` (a sample of
       the posterior, s = 0.18215), ``t ~ U{0, T-1}``, ``z_t = sqrt(abar_t) z + sqrt(1-abar_t) eps``
       and the loss is ``|| eps - eps_theta(z_t, t, x) ||^2`` where ``eps_theta`` is the SD UNet
       receiving the SG network's residuals. AdamW at 1e-5 (the code's optimiser; the paper says
       Adam and cites AdamW), batch 12, gradient accumulation 4, 1000 epochs, fp32. Trained
       parameters: see :mod:`harness_diad.networks`.
    Gradient accumulation follows Lightning: each batch's loss is divided by the accumulation
    count, the optimiser steps after that many batches and on the last batch of every epoch (the
    leftover is stepped, nothing carries into the next epoch). Both stages run inside
    ``context.checkpoint.stage`` with every network, optimiser, gradient scaler and generator
    they change; the data order depends only on (seed, stage, epoch), so a killed fit resumes
    to the same state.
Checkpoint selection
    The authors' ``train.py`` validates on the *test set* every 25 epochs and keeps the checkpoint
    with the best ``val_acc`` (``ModelCheckpoint(monitor='val_acc')``). Choosing on test labels is
    not a protocol the harness allows: the final epoch is kept (setting
    ``checkpoint_selection``, recorded in ``method_info.choices``).
Predict
    ``z = s E(x)``, noised by ``q_sample`` and denoised by DDIM with 10 steps (eta 0) guided by
    the SG network on the input image; ``x_hat = D(z_0 / s)`` (:mod:`harness_diad.schedule`).
    The authors noise to step 999 and then run their 10-step schedule from 901 (901, 801, ...,
    1), so the first update treats the latent as less noisy than it is; ``start_step=999`` with
    ``noise_to_first_ddim_step=False`` reproduces that, ``True`` noises to the first DDIM step
    instead (the paper's text: "the denoising process is repeated for the same timesteps as the
    diffusion process"). The anomaly map and image score follow :mod:`harness_diad.scoring`.
    The authors' classifier-free guidance (scale 9) pairs the empty prompt with the same empty
    prompt and the same image, so both halves are equal and the guided output is the
    conditional one: it is left out, which halves the cost and changes no number (the golden
    test compares with their guided sampler).
Pixel space
    The authors feed the autoencoder, the SG hint and ResNet-50 ImageNet-normalised images (their
    data loader normalises ``jpg`` and ``hint`` alike) and compare the decoded output with the
    input in that space; ``pixel_normalization="imagenet"`` does this, ``"symmetric"`` uses SD's
    own [-1, 1] range.
Files in the authors' formats
    ``authors_checkpoint`` names a checkpoint written by their code (``train.py``'s
    ``epoch=...ckpt`` or ``build_model.py``'s ``diad.ckpt``; the authors publish no trained DiAD,
    only fine-tuned autoencoders): it is converted by :mod:`harness_diad.convert` and used as it
    is, without training, so such a model is scored by the harness's metrics. ``ae_init_path``
    reads an autoencoder in the LDM layout, e.g. their published ``mvtecad_fs.ckpt`` (a Lightning
    checkpoint, read without running pickled code).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel

from harness import FitContext, Method, Prediction, TrainSet, WeightsNotFoundError
from harness.toolkit.backbones import create_features, load_weights, read_state, recalibrate_batchnorm
from harness.toolkit.ops import gaussian_blur, imagenet_normalize
from harness.toolkit.noise import ImageNoise
from harness.toolkit.precision import autocast, grad_scaler
from harness.toolkit.training import cycle_ends, optimiser_step, train_batches
from harness.toolkit.scoring import pooled_max
from harness.toolkit.weightfiles import sha256_file
from harness_diad import weightfiles
from harness_diad.architectures import CLIP_LENGTH, Architecture, architecture
from harness_diad.convert import check_schedule, convert_authors_state, load_strict, read_checkpoint
from harness_diad.losses import PatchDiscriminator, adaptive_weight, fast_forward_adam, hinge_d_loss
from harness_diad.networks import PromptContext, SemanticGuidedNetwork, freeze_unet_encoder, trained_unet_parts
from harness_diad.schedule import DDIMPlan, NoiseSchedule
from harness_diad.scoring import feature_distance_map
from harness_diad.weights import empty_prompt_context, lpips_vgg, random_text_encoder, read_sd, text_encoder

NORMALIZATIONS = ("imagenet", "symmetric")


def _seeded(seed: int, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return build()


def _order(n: int, seed: int, stage: int, epoch: int) -> np.ndarray:
    """The shuffled order of ``n`` images in ``epoch`` of ``stage``: a function of (seed, stage, epoch) only."""
    return np.random.default_rng([int(seed), int(stage), int(epoch)]).permutation(n)


class DiAD(Method):
    """DiAD (He et al., AAAI 2024): SD v1.5 with a Semantic-Guided network for multi-class AD.

    See the module docstring; settings are declared in :data:`harness_diad.plugin.SETTINGS`.

    Parameters
    ----------
    settings : Settings
        A resolved profile. Building reads no file (works under ``torch.device("meta")``).
    arch : Architecture, optional
        Explicit network configuration instead of the ``architecture`` setting (the golden tests
        build the authors' tiny configuration with it).
    """

    def __init__(self, settings: Mapping[str, Any], arch: Architecture | None = None) -> None:
        super().__init__(settings)
        s = self.settings
        if s.pixel_normalization not in NORMALIZATIONS:
            raise ValueError(f"setting 'pixel_normalization' must be one of {NORMALIZATIONS}, "
                             f"not {s.pixel_normalization!r}")
        self.arch = arch if arch is not None else architecture(s.architecture)
        self.unet = UNet2DConditionModel(**self.arch.unet)
        self.sg = self._build_guidance()
        self.vae = AutoencoderKL(**self.arch.vae)
        self.context = PromptContext(CLIP_LENGTH, self.arch.context_dim)
        self.backbone = create_features(s.backbone, s.backbone_layers)
        self.schedule = NoiseSchedule(s.T, s.beta_start, s.beta_end, s.beta_schedule)
        self.ddim = self.schedule.plan(s.ddim_steps, s.start_step, s.noise_to_first_ddim_step)
        if s.gradient_checkpointing:
            # The authors' diad.yaml sets use_checkpoint: True for both UNets (recomputation: same numbers).
            self.unet.enable_gradient_checkpointing()
            if self.sg is not None:
                self.sg.controlnet.enable_gradient_checkpointing()

    def _build_guidance(self) -> SemanticGuidedNetwork | None:
        """The SG network (with SFF); the LDM baseline, which has none, returns None."""
        return SemanticGuidedNetwork(self.arch.unet, self.arch.hint_channels, self.settings.only_mid_control)

    def networks(self) -> Mapping[str, torch.nn.Module]:
        """SD UNet, SG network (with SFF), autoencoder, feature extractor, prompt context."""
        return {"unet": self.unet, "sg": self.sg, "vae": self.vae, "backbone": self.backbone,
                "context": self.context}

    # ------------------------------------------------------------------ pixel and latent spaces

    def to_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] to the autoencoder's input space (see ``pixel_normalization``)."""
        if self.settings.pixel_normalization == "imagenet":
            return imagenet_normalize(images)
        return images * 2 - 1

    def to_backbone(self, pixels: torch.Tensor) -> torch.Tensor:
        """Autoencoder-space images to the backbone's (ImageNet-normalised) input."""
        if self.settings.pixel_normalization == "imagenet":
            return pixels
        return imagenet_normalize((pixels + 1) / 2)

    @property
    def scaling_factor(self) -> float:
        """The latent scale s (0.18215 for SD)."""
        return float(self.vae.config.scaling_factor)

    def encode(self, pixels: torch.Tensor, generator: torch.Generator | None = None,
               noise: torch.Tensor | None = None, posterior: Any = None) -> torch.Tensor:
        """Scaled latent ``s (mu + sigma n)``: a sample of the posterior (``noise`` = n, else drawn;
        ``posterior``: the autoencoder's output for ``pixels`` when already computed)."""
        posterior = self.vae.encode(pixels).latent_dist if posterior is None else posterior
        if noise is None:
            noise = torch.randn(posterior.mean.shape, generator=generator, device=pixels.device,
                                dtype=posterior.mean.dtype)
        return (posterior.mean + posterior.std * noise) * self.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Pixels from scaled latents."""
        return self.vae.decode(latents / self.scaling_factor).sample

    def predict_noise(self, latents: torch.Tensor, t: torch.Tensor, hint: torch.Tensor,
                      context: torch.Tensor | None = None, only_mid_control: bool | None = None) -> torch.Tensor:
        """``eps_theta(z_t, t, x)``: the SD UNet with the SG network's residuals.

        ``context`` defaults to the empty prompt's; ``only_mid_control`` to the setting.
        """
        ctx = self.context(latents.shape[0]) if context is None else context
        t = t.expand(latents.shape[0]) if t.ndim == 0 else t
        down, mid = self.sg(latents, hint, t, ctx, only_mid_control)
        return self.unet(latents, t, encoder_hidden_states=ctx, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid).sample

    # ------------------------------------------------------------------ fit

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

    def _initialise(self, train: TrainSet, context: FitContext) -> None:
        """The networks' starting weights: the authors' checkpoint, SD v1.5 or seeded random ones."""
        s = self.settings
        info = context.info
        random = context.random_weights
        seed = int(context.seed)
        if s.get("authors_checkpoint") and not random:
            path = context.weights.resolve(weightfiles.authors_file(s), s)
            self.load_authors_checkpoint(path)
            info.update({"init": "authors_checkpoint", "authors_checkpoint": str(path)})
        else:
            if s.sd_pretrained and not random:
                path = context.weights.resolve(weightfiles.sd_file(s), s)
                weights = read_sd(path, self.arch)
                if weights.schedule:
                    check_schedule(weights.schedule, self.schedule.alphas_cumprod64, str(path))
                load_strict(self.unet, weights.unet, f"{path} (UNet)")
                load_strict(self.vae, weights.vae, f"{path} (autoencoder)")
                text = weights.text_encoder
                info.update({"sd_init": "pretrained", "sd_weights": str(path), "sd_layout": weights.layout,
                             "sd_unet_weights": "non-EMA (as the authors' build_model.py)"
                             if weights.layout == "single_file" else "the diffusers folder's (EMA)"})
            else:
                self.unet.load_state_dict(_seeded(seed, lambda: UNet2DConditionModel(**self.arch.unet)).state_dict())
                self.vae.load_state_dict(_seeded(seed, lambda: AutoencoderKL(**self.arch.vae)).state_dict())
                text = random_text_encoder(self.arch, seed)
                info["sd_init"] = "random"
            self._ae_loss_state = {}
            ae_file = weightfiles.ae_init_file(s)
            if ae_file is not None and not random and (s.ae_init_path or s.sd_pretrained):
                path = context.weights.resolve(ae_file, s)
                converted = convert_authors_state(read_checkpoint(path), self.arch)
                load_strict(self.vae, converted.vae, f"{path} (autoencoder)")
                # The authors' strict=False load also fills their loss module (discriminator, LPIPS, logvar).
                self._ae_loss_state = converted.loss
                info.update({"ae_init": str(path), "ae_init_loss_tensors": len(converted.loss)})
            else:
                info["ae_init"] = "the SD autoencoder above" if not random else "random"
            if self.sg is not None:  # the LDM baseline (harness_diad.baselines) has none
                # The authors' build_model.py: the SG copy starts from SD's encoder; the rest is new.
                self.sg.reset_new_parts(seed)
                self.sg.copy_unet_encoder(self.unet)
            self.context.embedding.copy_(empty_prompt_context(text).to(self.context.embedding))
            del text
        self._initialise_backbone(train, context)
        self.to(self.device)

    def load_authors_checkpoint(self, path: Path | str, state: Mapping[str, torch.Tensor] | None = None) -> None:
        """Load a checkpoint of the authors' code (UNet, SG network, autoencoder, text encoder) strictly.

        ``state`` may be given already read (the golden tests); the prompt context is computed
        from the checkpoint's CLIP text encoder when it has one.
        """
        converted = convert_authors_state(read_checkpoint(path) if state is None else state, self.arch)
        check_schedule(converted.schedule, self.schedule.alphas_cumprod64, str(path))
        load_strict(self.unet, converted.unet, f"{path} (model.diffusion_model: UNet)")
        load_strict(self.sg.controlnet, converted.controlnet, f"{path} (control_model: SG network)")
        load_strict(self.sg.sff, converted.sff, f"{path} (control_model.down*: SFF block)")
        load_strict(self.vae, converted.vae, f"{path} (first_stage_model: autoencoder)")
        if converted.text_encoder is not None:
            self.context.embedding.copy_(empty_prompt_context(text_encoder(self.arch, converted)))
        elif self.arch.text_encoder is not None:
            raise WeightsNotFoundError(f"{path} holds no CLIP text encoder (cond_stage_model.transformer.*), which "
                                       "gives the empty prompt's context")

    def _initialise_backbone(self, train: TrainSet, context: FitContext) -> None:
        s = self.settings
        if s.backbone_pretrained and not context.random_weights:
            path = load_weights(self.backbone, weightfiles.backbone_file(s), context.weights, s)
            context.info.update({"backbone_init": "imagenet", "backbone_weights": str(path)})
            return
        self.backbone.load_state_dict(_seeded(context.seed, lambda: create_features(s.backbone, s.backbone_layers))
                                      .state_dict())
        self.backbone.to(self.device)
        recalibrate_batchnorm(self.backbone, (imagenet_normalize(x.to(self.device))
                                              for x, _ in train.batches(s.train_batch_size)))
        context.info["backbone_init"] = "random (BatchNorm statistics re-estimated on the training images)"

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
            stop = False
            for epoch in context.progress.epochs(epochs, desc="diad autoencoder"):
                if epoch < position.epoch or stop:
                    continue
                order = _order(len(train), context.seed, 1, epoch)
                for index in range(n_batches):
                    if position.skip(epoch, index):
                        continue
                    adversarial = s.ae_disc_factor > 0 and position.steps >= s.ae_disc_start
                    x = self.to_pixels(self._batch(train, order[index * s.ae_train_batch_size:
                                                              (index + 1) * s.ae_train_batch_size]))
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
                    scaler.scale(loss / accumulate).backward()
                    if adversarial:
                        disc.requires_grad_(True)
                        with autocast(self.device, s.precision):
                            d_loss = s.ae_disc_factor * hinge_d_loss(disc(x.detach()), disc(x_hat.detach()))
                        scaler.scale(d_loss / accumulate).backward()
                    last = float(loss.detach())
                    if cycle_ends(n_batches, accumulate, index):
                        scaler.step(opt)
                        if adversarial:
                            if not opt_d.state:
                                # The authors' discriminator Adam has stepped (with zero gradients) every step so far.
                                fast_forward_adam(opt_d, position.steps)
                            scaler.step(opt_d)
                            adversarial_steps += 1
                        scaler.update()
                        opt.zero_grad(set_to_none=True)
                        opt_d.zero_grad(set_to_none=True)
                        position.extra.update(adversarial_steps=adversarial_steps, final_loss=last)
                        position.step(epoch=epoch, batch=index + 1)
                        if context.stop_early(position.steps):
                            stop = True
                            break
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
                order = _order(len(train), context.seed, 2, epoch)
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

    # ------------------------------------------------------------------ inference

    @torch.no_grad()
    def sample(self, latents: torch.Tensor, hint: torch.Tensor, plan: DDIMPlan | None = None,
               context: torch.Tensor | None = None,
               callback: Callable[[int, int, torch.Tensor, torch.Tensor], None] | None = None) -> torch.Tensor:
        """DDIM from noisy ``latents`` guided by ``hint``; ``callback(i, t, x_prev, pred_x0)`` per step."""
        plan = plan or self.ddim
        x = latents
        for i, (t, t_prev) in enumerate(plan.steps):
            steps = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
            eps = self.predict_noise(x, steps, hint, context)
            x, x0 = self.schedule.ddim_step(x, eps, t, t_prev)
            if callback is not None:
                callback(i, t, x, x0)
        return x

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, generator: torch.Generator | ImageNoise | None = None) -> torch.Tensor:
        """Reconstruction of ``images`` (in [0, 1]) in the autoencoder's pixel space.

        ``generator``: one generator for the batch, or per-image streams (:class:`ImageNoise`:
        each image's posterior sample, then its forward noise, from its own seed).
        """
        pixels = self.to_pixels(images)
        if isinstance(generator, ImageNoise):
            posterior = self.vae.encode(pixels).latent_dist
            z = self.encode(pixels, noise=generator.randn_like(posterior.mean), posterior=posterior)
            noise = generator.randn_like(z)
        else:
            z = self.encode(pixels, generator)
            noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        x_t = self.schedule.add_noise(z, noise, self.ddim.noise_step)
        return self.decode(self.sample(x_t, pixels))

    @torch.no_grad()
    def anomaly_maps(self, images: torch.Tensor, recon_pixels: torch.Tensor) -> torch.Tensor:
        """Smoothed feature-distance maps (B, H, W) between images and reconstructions (float32)."""
        with autocast(self.device, self.settings.precision):
            f_in = self.backbone(self.to_backbone(self.to_pixels(images)))
            f_out = self.backbone(self.to_backbone(recon_pixels))
        # Distances and smoothing in float32, outside autocast.
        maps = feature_distance_map([f.float() for f in f_in], [f.float() for f in f_out], tuple(images.shape[-2:]))
        return gaussian_blur(maps, self.settings.smoothing_sigma)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, categories: Sequence[str],
                seeds: Sequence[int] | None = None) -> Prediction:
        """Reconstruct, compare features, smooth; image score = max after repeated average pooling.

        Parameters
        ----------
        images : torch.Tensor
            (B, 3, H, W) in [0, 1].
        categories : sequence of str
            Unused: one model serves every category (the prompt is empty).
        seeds : sequence of int, optional
            One per image (the runner's): each image's posterior sample and forward noise come
            from its own seed mixed with ``inference_seed``, so predictions do not depend on the batch.
        """
        s = self.settings
        images = images.to(self.device).float()
        noise = ImageNoise(seeds, images.shape[0], images.device, base=s.inference_seed)
        with autocast(self.device, s.precision):
            recon = self.reconstruct(images, noise)
        maps = self.anomaly_maps(images, recon.float()).float()
        return Prediction(maps, pooled_max(maps, s.pool_kernel, s.pool_rounds))


def param_millions(method: DiAD) -> dict[str, float]:
    """Parameters of each network in millions."""
    return {k: v / 1e6 for k, v in method.parameter_count().items()}


__all__ = ["DiAD", "param_millions", "NORMALIZATIONS"]
