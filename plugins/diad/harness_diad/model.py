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

from typing import Any, Callable, Mapping, Sequence

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from harness import Method, Prediction
from harness.toolkit.backbones import create_features
from harness.toolkit.ops import gaussian_blur, imagenet_normalize
from harness.toolkit.noise import ImageNoise
from harness.toolkit.precision import autocast
from harness.toolkit.scoring import pooled_max
from harness_diad.architectures import CLIP_LENGTH, Architecture, architecture
from harness_diad.initialisation import DiADInitialisation
from harness_diad.networks import PromptContext, SemanticGuidedNetwork
from harness_diad.schedule import DDIMPlan, NoiseSchedule
from harness_diad.scoring import feature_distance_map
from harness_diad.training import DiADTraining

NORMALIZATIONS = ("imagenet", "symmetric")


class DiAD(DiADInitialisation, DiADTraining, Method):
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
