"""DiAD's two diffusion baselines, DDPM and LDM, built from DiAD's own parts.

DiAD (AAAI 2024, Tables 1-4; arXiv Tables 5, 12, 13) compares against "DDPM" and "LDM" run
for multi-class anomaly detection, as reconstruction methods scored like DiAD itself; its
introduction and Fig. 1 describe them: DDPM (Ho et al. 2020) noises the input *image* and
denoises it in pixel space, so at T the image has lost its class and the reconstruction may
change category; LDM (Rombach et al. 2022) diffuses in the autoencoder's latent space with the
SD denoiser alone, which keeps the class but loses the input's semantics (orientation,
texture). The ablation (arXiv Table 7) names "SD" alone, without the SG network, "the LDM's
architecture". The paper gives no separate hyperparameters for either baseline, so both use
DiAD's pipeline and its implementation details (256 x 256, batch 12 with 4-fold accumulation,
1000 epochs, learning rate 1e-5, DDIM with 10 steps from T = 1000, ResNet-50 f2-f4 feature
cosine maps, Gaussian sigma 5, image score = max after 8 rounds of 8 x 8 average pooling):

:class:`LDMBaseline`
    :class:`harness_diad.model.DiAD` without the SG network: the KL autoencoder fine-tuned as
    DiAD's stage 1, then SD v1.5's UNet trained on Eq. 6 with the empty prompt and no image
    guidance. At inference the latent is noised and denoised by the UNet alone. Choices (in
    the record): the whole UNet is trained (``trained_unet="all"``; ``"decoder"`` trains only
    what DiAD trains of it); the condition is the empty prompt, as DiAD's. The paper's Fig. 1
    draws a class embedder, but conditioning on the class would hand the model each test
    image's category, which no multi-class method here uses (UniAD and DiAD use none).
:class:`DDPMBaseline`
    Ho et al.'s pixel-space DDPM: their 256 x 256 U-Net (128 channels, multipliers 1, 1, 2, 2,
    4, 4, two residual blocks per level, self-attention at 16 x 16: diffusers' ``UNet2DModel``,
    113.7 M parameters, Ho et al.'s "114 million"), their linear betas 1e-4 ... 0.02 over
    T = 1000, trained from scratch on the normal images in [-1, 1] with the epsilon loss;
    reconstruction by DDIM from the noised image, scored by DiAD's feature maps.

Both train with :meth:`DiAD.train_denoiser`'s loop semantics (Lightning-style accumulation,
resumable stage checkpoints, data order a function of seed, stage and epoch only).
"""

from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import UNet2DModel

from harness import FitContext, Method, Prediction, TrainSet
from harness.toolkit.backbones import create_features
from harness.toolkit.ops import gaussian_blur, imagenet_normalize
from harness.toolkit.precision import autocast, grad_scaler
from harness.toolkit.training import optimiser_step, train_batches
from harness.toolkit.scoring import pooled_max
from harness_diad.initialisation import initialise_backbone, seeded_build
from harness_diad.model import DiAD
from harness_diad.training import epoch_order
from harness_diad.networks import freeze_unet_encoder, trained_unet_parts
from harness_diad.schedule import NoiseSchedule
from harness_diad.scoring import feature_distance_map

#: What the LDM baseline trains of the SD UNet.
TRAINED_UNET = ("all", "decoder")
#: Pixel-space U-Nets of the DDPM baseline (``UNet2DModel`` arguments).
DDPM_ARCHITECTURES: dict[str, dict[str, Any]] = {
    # Ho et al. (2020), Appendix B, the 256 x 256 models (LSUN, CelebA-HQ); diffusers' ddpm-*-256 layout.
    "ddpm256": dict(sample_size=256, in_channels=3, out_channels=3, layers_per_block=2,
                    block_out_channels=(128, 128, 256, 256, 512, 512),
                    down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4),
    # The same classes at toy width for CPU runs.
    "tiny": dict(sample_size=32, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
                 down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                 attention_head_dim=8, norm_num_groups=8),
}


class LDMBaseline(DiAD):
    """DiAD's LDM baseline: SD's latent denoiser alone, no SG network (see the module docstring)."""

    def _build_guidance(self) -> None:
        return None

    def networks(self) -> Mapping[str, torch.nn.Module]:
        """SD UNet, autoencoder, feature extractor, prompt context."""
        return {"unet": self.unet, "vae": self.vae, "backbone": self.backbone, "context": self.context}

    def predict_noise(self, latents: torch.Tensor, t: torch.Tensor, hint: torch.Tensor,
                      context: torch.Tensor | None = None, only_mid_control: bool | None = None) -> torch.Tensor:
        """``eps_theta(z_t, t)`` of the SD UNet with the empty prompt; ``hint`` is ignored (no guidance)."""
        ctx = self.context(latents.shape[0]) if context is None else context
        t = t.expand(latents.shape[0]) if t.ndim == 0 else t
        return self.unet(latents, t, encoder_hidden_states=ctx).sample

    def _denoiser_parameters(self) -> list[torch.nn.Parameter]:
        self.unet.train()
        if self.settings.trained_unet == "decoder":
            return freeze_unet_encoder(self.unet)
        self.unet.requires_grad_(True)
        return list(self.unet.parameters())

    def _denoiser_state(self) -> dict[str, torch.nn.Module]:
        if self.settings.trained_unet == "decoder":
            return {"unet_trained": trained_unet_parts(self.unet)}
        return {"unet": self.unet}

    def fit(self, train: TrainSet, context: FitContext) -> None:
        """DiAD's two stages without the SG network (autoencoder fine-tuning, then the UNet alone)."""
        super().fit(train, context)
        context.info.update({"guidance": "none: the LDM baseline has no SG network",
                             "trained_unet": self.settings.trained_unet, "condition": "the empty prompt"})


class DDPMBaseline(Method):
    """DiAD's DDPM baseline: pixel-space DDPM reconstruction scored by DiAD's feature maps.

    Parameters
    ----------
    settings : Settings
        A resolved profile (:data:`harness_diad.ddpm_plugin.SETTINGS`). Building reads no file.
    """

    def __init__(self, settings: Mapping[str, Any]) -> None:
        super().__init__(settings)
        s = self.settings
        if s.architecture not in DDPM_ARCHITECTURES:
            raise ValueError(f"setting 'architecture' must be one of {tuple(DDPM_ARCHITECTURES)}, "
                             f"not {s.architecture!r}")
        self.config = dict(DDPM_ARCHITECTURES[s.architecture], sample_size=int(s.image_size))
        self.unet = UNet2DModel(**self.config)
        self.backbone = create_features(s.backbone, s.backbone_layers)
        self.schedule = NoiseSchedule(s.T, s.beta_start, s.beta_end, s.beta_schedule)
        self.ddim = self.schedule.plan(s.ddim_steps, s.start_step, s.noise_to_first_ddim_step)
        if s.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()

    def networks(self) -> Mapping[str, torch.nn.Module]:
        """Pixel-space U-Net and feature extractor."""
        return {"unet": self.unet, "backbone": self.backbone}

    # ------------------------------------------------------------------ fit

    def fit(self, train: TrainSet, context: FitContext) -> None:
        """Seeded random U-Net (DDPM trains from scratch), the scoring backbone, then the epsilon loss."""
        s = self.settings
        start = time.perf_counter()
        self.unet.load_state_dict(seeded_build(context.seed, lambda: UNet2DModel(**self.config)).state_dict())
        self._initialise_backbone(train, context)
        self.to(self.device)
        info = self.train_denoiser(train, context)
        self.eval()
        info.update({"train_seconds": round(time.perf_counter() - start, 2), "unet_init": "random (from scratch)",
                     "ddim_steps": s.ddim_steps, "noise_step": self.ddim.noise_step,
                     "ddim_timesteps": list(self.ddim.timesteps)})
        context.info.update(info)

    def _initialise_backbone(self, train: TrainSet, context: FitContext) -> None:
        initialise_backbone(self.backbone, self.settings, train, context, self.device)

    def _batch(self, train: TrainSet, idx: np.ndarray) -> torch.Tensor:
        return torch.stack([train[int(i)][0] for i in idx]).to(self.device)

    def train_denoiser(self, train: TrainSet, context: FitContext) -> dict[str, Any]:
        """``|| eps - eps_theta(x_t, t) ||^2`` on the training images in [-1, 1], t ~ U{0, T-1}."""
        s = self.settings
        epochs, accumulate, batch = context.epochs(s.epochs), s.grad_accumulation, s.train_batch_size
        self.backbone.eval().requires_grad_(False)
        self.unet.train().requires_grad_(True)
        opt = torch.optim.AdamW(self.unet.parameters(), lr=s.lr)
        scaler = grad_scaler(self.device, s.precision)
        gen = torch.Generator(device=self.device).manual_seed(int(context.seed) + 2)
        n_batches = -(-len(train) // batch)
        last = float("nan")
        with context.checkpoint.stage("denoiser", unet=self.unet, dn_optimiser=opt, dn_scaler=scaler,
                                      dn_generator=gen) as position:
            def epoch_batches(epoch: int, first: int):
                order = epoch_order(len(train), context.seed, 2, epoch)
                return ((index, order[index * batch:(index + 1) * batch]) for index in range(n_batches))

            for step in train_batches(context, position, epochs, epoch_batches, accumulate=accumulate,
                                      n_batches=lambda epoch: n_batches, desc="ddpm"):
                x0 = self._batch(train, step.data) * 2 - 1
                noise = torch.randn(x0.shape, generator=gen, device=self.device)
                t = torch.randint(0, self.schedule.timesteps, (x0.shape[0],), generator=gen, device=self.device)
                with autocast(self.device, s.precision):
                    eps = self.unet(self.schedule.add_noise(x0, noise, t), t).sample
                    loss = F.mse_loss(eps.float(), noise)
                optimiser_step(loss, [opt], scaler, accumulate=accumulate, boundary=step.boundary)
                last = float(loss.detach())
                if step.boundary:
                    position.extra["final_loss"] = last
            position.extra.update(steps=position.steps, final_loss=position.extra.get("final_loss", last))
        self.unet.requires_grad_(False)
        extra = position.extra
        return {"epochs": epochs, "steps": int(extra.get("steps", position.steps)), "train_batch_size": batch,
                "grad_accumulation": accumulate, "final_loss": round(float(extra.get("final_loss", float("nan"))), 5)}

    # ------------------------------------------------------------------ inference

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Noise the images (in [0, 1]) to the plan's step and denoise them by DDIM; returns [0, 1]."""
        x = images * 2 - 1
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = self.schedule.add_noise(x, noise, self.ddim.noise_step)
        for t, t_prev in self.ddim.steps:
            steps = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
            x, _ = self.schedule.ddim_step(x, self.unet(x, steps).sample, t, t_prev)
        return ((x.float() + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def anomaly_maps(self, images: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        """DiAD's smoothed feature-distance maps (B, H, W) between images and reconstructions (float32)."""
        with autocast(self.device, self.settings.precision):
            f_in = self.backbone(imagenet_normalize(images))
            f_out = self.backbone(imagenet_normalize(recon))
        maps = feature_distance_map([f.float() for f in f_in], [f.float() for f in f_out], tuple(images.shape[-2:]))
        return gaussian_blur(maps, self.settings.smoothing_sigma)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, categories: Sequence[str]) -> Prediction:
        """Reconstruct, compare features, smooth; image score = max after repeated average pooling.

        Parameters
        ----------
        images : torch.Tensor
            (B, 3, H, W) in [0, 1].
        categories : sequence of str
            Unused: one unconditional model serves every category.
        """
        s = self.settings
        images = images.to(self.device).float()
        generator = torch.Generator(device=images.device).manual_seed(s.inference_seed)
        with autocast(self.device, s.precision):
            recon = self.reconstruct(images, generator)
        maps = self.anomaly_maps(images, recon.float()).float()
        return Prediction(maps, pooled_max(maps, s.pool_kernel, s.pool_rounds))


__all__ = ["DDPM_ARCHITECTURES", "DDPMBaseline", "LDMBaseline", "TRAINED_UNET"]
