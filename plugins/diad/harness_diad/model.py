"""DiAD as a harness method: autoencoder fine-tuning, SG-guided latent diffusion, feature scoring.

Fit (two stages, as the paper and the authors' scripts)
    1. Autoencoder (``finetune_autoencoder.py``): SD's KL autoencoder is fine-tuned on the
       training images with the LDM loss ``sum(|x - x_hat| + w_p LPIPS(x, x_hat)) / B + w_kl KL``
       (KL weight 1e-6, LPIPS-VGG weight 1), Adam (betas 0.5, 0.9) at ``4.5e-5 x batch`` with
       batch 4 and gradient accumulation 8. The authors' adversarial term starts only after
       50 001 steps and is left out; their script sets no epoch count, so Lightning's default of
       1000 applies (``ae_epochs``).
    2. Denoiser (``train.py``, Eq. 6): with the autoencoder frozen, ``z = s E(x)`` (a sample of
       the posterior, s = 0.18215), ``t ~ U{0, T-1}``, ``z_t = sqrt(abar_t) z + sqrt(1-abar_t) eps``
       and the loss is ``|| eps - eps_theta(z_t, t, x) ||^2`` where ``eps_theta`` is the SD UNet
       receiving the SG network's residuals. AdamW at 1e-5 (the code's optimiser; the paper says
       Adam and cites AdamW), batch 12, gradient accumulation 4, 1000 epochs. Trained parameters:
       see :mod:`harness_diad.networks` (SG network + SFF, SD decoder and output layers; the SD
       encoder, middle block and time embedding stay frozen).
Predict
    ``z = s E(x)``, noised to ``start_step`` (999, i.e. T = 1000), then DDIM with 10 steps
    (901, 801, ..., 1, eta 0; the authors' sampler schedule) guided by the SG network on the
    input image; ``x_hat = D(z_0 / s)``. The anomaly map and image score follow
    :mod:`harness_diad.scoring`. The authors' classifier-free guidance (scale 9) pairs the
    empty prompt with the same empty prompt and the same image, so both halves are equal and the
    guided output is the conditional one: it is left out, which halves the cost and changes no
    number.
Pixel space
    The authors feed the autoencoder, the SG hint and ResNet-50 ImageNet-normalised images (their
    data loader normalises ``jpg`` and ``hint`` alike) and compare the decoded output with the
    input in that space; ``pixel_normalization="imagenet"`` does this, ``"symmetric"`` uses SD's
    own [-1, 1] range.
"""

from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel

from harness import FitContext, Method, Prediction, TrainSet
from harness.backbones import create_features, load_pretrained, recalibrate_batchnorm
from harness.ops import gaussian_blur, imagenet_normalize
from harness_diad.architectures import CLIP_LENGTH, architecture
from harness_diad.networks import PromptContext, SemanticGuidedNetwork, freeze_unet_encoder
from harness_diad.scoring import feature_distance_map, pooled_max_score
from harness_diad.weights import copy_into, empty_prompt_context, find_sd, random_text_encoder, read_sd

NORMALIZATIONS = ("imagenet", "symmetric")
#: torchvision's VGG-16 ImageNet weights (the LPIPS trunk of the autoencoder loss).
VGG16_FILES = ("vgg16-397923af.pth", "vgg16.pth")


def _accumulated_step(loss: torch.Tensor, opt: torch.optim.Optimizer, step: int, accumulate: int) -> int:
    """Back-propagate one batch and step ``opt`` every ``accumulate`` batches; the new batch count."""
    (loss / accumulate).backward()
    step += 1
    if step % accumulate == 0:
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


class DiAD(Method):
    """DiAD (He et al., AAAI 2024): SD v1.5 with a Semantic-Guided network for multi-class AD.

    See the module docstring; settings are documented in :data:`harness_diad.plugin.SETTINGS_HELP`.

    Parameters
    ----------
    settings : mapping
        A resolved profile. Building reads no file (works under ``torch.device("meta")``).
    """

    def __init__(self, settings: Mapping[str, Any]) -> None:
        super().__init__(settings)
        s = self.settings
        if s["pixel_normalization"] not in NORMALIZATIONS:
            raise ValueError(f"setting 'pixel_normalization' must be one of {NORMALIZATIONS}, "
                             f"not {s['pixel_normalization']!r}")
        self.arch = architecture(s["architecture"])
        self.unet = UNet2DConditionModel(**self.arch["unet"])
        self.sg = SemanticGuidedNetwork(self.arch["unet"], self.arch["hint_channels"], s["sg_skip_connections"])
        self.vae = AutoencoderKL(**self.arch["vae"])
        self.context = PromptContext(CLIP_LENGTH, self.arch["unet"]["cross_attention_dim"])
        self.backbone = create_features(s["backbone"], tuple(s["feature_layers"]))
        sched = dict(num_train_timesteps=int(s["T"]), beta_start=float(s["beta_start"]),
                     beta_end=float(s["beta_end"]), beta_schedule=s["beta_schedule"])
        self.train_scheduler = DDPMScheduler(**sched)
        self.sampler = DDIMScheduler(**sched, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                     timestep_spacing="leading")

    def networks(self) -> Mapping[str, torch.nn.Module]:
        """SD UNet, SG network (with SFF), autoencoder, feature extractor, prompt context."""
        return {"unet": self.unet, "sg": self.sg, "vae": self.vae, "backbone": self.backbone,
                "context": self.context}

    # ------------------------------------------------------------------ pixel and latent spaces

    def to_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] to the autoencoder's input space (see ``pixel_normalization``)."""
        if self.settings["pixel_normalization"] == "imagenet":
            return imagenet_normalize(images)
        return images * 2 - 1

    def to_backbone(self, pixels: torch.Tensor) -> torch.Tensor:
        """Autoencoder-space images to the backbone's (ImageNet-normalised) input."""
        if self.settings["pixel_normalization"] == "imagenet":
            return pixels
        return imagenet_normalize((pixels + 1) / 2)

    def encode(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled latent: a sample of the autoencoder's posterior times the scaling factor."""
        posterior = self.vae.encode(pixels).latent_dist
        return posterior.sample(generator) * self.vae.config.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Pixels from scaled latents."""
        return self.vae.decode(latents / self.vae.config.scaling_factor).sample

    def predict_noise(self, latents: torch.Tensor, t: torch.Tensor, hint: torch.Tensor) -> torch.Tensor:
        """``eps_theta(z_t, t, x)``: the SD UNet with the SG network's residuals."""
        ctx = self.context(latents.shape[0])
        down, mid = self.sg(latents, hint, t, ctx)
        return self.unet(latents, t, encoder_hidden_states=ctx, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid).sample

    # ------------------------------------------------------------------ fit

    def fit(self, train: TrainSet, context: FitContext) -> None:
        """Load or initialise the networks, fine-tune the autoencoder, then train the denoiser."""
        s = self.settings
        start = time.perf_counter()
        self._initialise(train, context)
        ae_info = self.finetune_autoencoder(train, context)
        dn_info = self.train_denoiser(train, context)
        self.eval()
        context.info.update({**ae_info, **dn_info, "train_seconds": round(time.perf_counter() - start, 2),
                             "ddim_steps": int(s["ddim_steps"]), "start_step": int(s["start_step"]),
                             "classifier_free_guidance": "omitted (empty prompt on both sides: a no-op)"})

    def _initialise(self, train: TrainSet, context: FitContext) -> None:
        """Pretrained SD v1.5 and ResNet weights (``pretrained``) or seeded random ones; the SG copy."""
        s = self.settings
        if s["pretrained"]:
            path, layout = find_sd(context.weights, s.get("sd_path") or None)
            weights = read_sd(path, layout, self.arch)
            copy_into(weights, self.unet, self.vae)
            text_encoder = weights.text_encoder
            context.info.update({"sd_init": "pretrained", "sd_weights": str(path), "sd_layout": layout})
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(context.seed))
                self.unet.load_state_dict(UNet2DConditionModel(**self.arch["unet"]).state_dict())
                self.vae.load_state_dict(AutoencoderKL(**self.arch["vae"]).state_dict())
            text_encoder = random_text_encoder(self.arch, context.seed)
            context.info["sd_init"] = "random"
        self.sg.copy_unet_encoder(self.unet)
        self.context.embedding.copy_(empty_prompt_context(text_encoder).to(self.context.embedding))
        if s["backbone_pretrained"]:
            source = load_pretrained(self.backbone, s["backbone"], context.weights, s.get("backbone_file") or None)
            context.info.update({"backbone_init": "imagenet", "backbone_weights": str(source)})
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(context.seed))
                self.backbone.load_state_dict(create_features(s["backbone"], tuple(s["feature_layers"])).state_dict())
            self.backbone.to(self.device)
            recalibrate_batchnorm(self.backbone, (imagenet_normalize(x.to(self.device))
                                                  for x, _ in train.batches(int(s["batch_size"]))))
            context.info["backbone_init"] = "random"
        self.to(self.device)

    def _batches(self, train: TrainSet, batch_size: int, rng: np.random.Generator):
        """Shuffled (indices, images) batches of the training set."""
        order = rng.permutation(len(train))
        for begin in range(0, len(order), batch_size):
            idx = order[begin:begin + batch_size]
            yield idx, torch.stack([train[int(i)][0] for i in idx]).to(self.device)

    def _lpips(self, context: FitContext) -> torch.nn.Module | None:
        """LPIPS-VGG for the autoencoder loss, its VGG-16 trunk read from disk (None if unused)."""
        if float(self.settings["ae_perceptual_weight"]) <= 0:
            return None
        import lpips

        model = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
        path = context.weights.find_file(VGG16_FILES, "ImageNet VGG-16 weights (LPIPS trunk of the autoencoder loss)",
                                         extra=[p for p in [self.settings.get("vgg16_file")] if p])
        state = torch.load(path, map_location="cpu", weights_only=True)
        # LPIPS splits torchvision's vgg16.features into slices that keep the layer indices as names.
        mapped = {}
        for name, module in model.net.named_children():
            for index, _ in module.named_children():
                for suffix in ("weight", "bias"):
                    key = f"features.{index}.{suffix}"
                    if key in state:
                        mapped[f"{name}.{index}.{suffix}"] = state[key]
        model.net.load_state_dict(mapped, strict=True)
        return model.to(self.device).eval().requires_grad_(False)

    def finetune_autoencoder(self, train: TrainSet, context: FitContext) -> dict[str, Any]:
        """Stage 1: fine-tune the autoencoder on the training images (see the module docstring)."""
        s = self.settings
        epochs, accumulate = int(s["ae_epochs"]), max(1, int(s["ae_grad_accumulation"]))
        if epochs <= 0:
            return {"ae_epochs": 0}
        perceptual = self._lpips(context)
        w_p, w_kl = float(s["ae_perceptual_weight"]), float(s["ae_kl_weight"])
        self.vae.train().requires_grad_(True)
        opt = torch.optim.Adam(self.vae.parameters(), lr=float(s["ae_lr"]), betas=(0.5, 0.9))
        rng = np.random.default_rng(context.seed + 1)
        step, last = 0, float("nan")
        for _ in context.progress.epochs(epochs, desc="diad autoencoder"):
            for _, images in self._batches(train, int(s["ae_batch_size"]), rng):
                x = self.to_pixels(images)
                posterior = self.vae.encode(x).latent_dist
                x_hat = self.vae.decode(posterior.sample()).sample
                rec = (x - x_hat).abs()
                if perceptual is not None:
                    rec = rec + w_p * perceptual(x, x_hat)
                loss = rec.sum() / x.shape[0] + w_kl * posterior.kl().mean()
                step = _accumulated_step(loss, opt, step, accumulate)
                last = loss.item()
        opt.zero_grad(set_to_none=True)
        self.vae.eval().requires_grad_(False)
        return {"ae_epochs": epochs, "ae_steps": step, "ae_final_loss": round(last, 4)}

    def train_denoiser(self, train: TrainSet, context: FitContext) -> dict[str, Any]:
        """Stage 2: train the SG network and the SD decoder on Eq. 6 with the autoencoder frozen."""
        s = self.settings
        self.vae.eval().requires_grad_(False)
        self.backbone.eval().requires_grad_(False)
        params = list(self.sg.parameters()) + freeze_unet_encoder(self.unet)
        self.sg.train().requires_grad_(True)
        self.unet.train()
        opt = torch.optim.AdamW(params, lr=float(s["lr"]))
        accumulate = max(1, int(s["grad_accumulation"]))
        # The autoencoder is frozen, so its posterior is computed once; a fresh sample is drawn per step.
        with torch.no_grad():
            moments = []
            for begin in range(0, len(train), int(s["batch_size"])):
                idx = range(begin, min(begin + int(s["batch_size"]), len(train)))
                x = self.to_pixels(torch.stack([train[i][0] for i in idx]).to(self.device))
                dist = self.vae.encode(x).latent_dist
                moments.append(torch.stack([dist.mean, dist.std]))
            moments = torch.cat(moments, dim=1)
        scale = self.vae.config.scaling_factor
        rng = np.random.default_rng(context.seed + 2)
        step, last = 0, float("nan")
        for _ in context.progress.epochs(int(s["epochs"]), desc="diad denoiser"):
            for idx, images in self._batches(train, int(s["batch_size"]), rng):
                sel = torch.as_tensor(idx, device=self.device)
                mean, std = moments[0, sel], moments[1, sel]
                z = (mean + std * torch.randn_like(mean)) * scale
                noise = torch.randn_like(z)
                t = torch.randint(0, int(s["T"]), (z.shape[0],), device=self.device)
                z_t = self.train_scheduler.add_noise(z, noise, t)
                loss = F.mse_loss(self.predict_noise(z_t, t, self.to_pixels(images)), noise)
                step = _accumulated_step(loss, opt, step, accumulate)
                last = loss.item()
        opt.zero_grad(set_to_none=True)
        self.unet.requires_grad_(False)
        self.sg.requires_grad_(False)
        return {"epochs": int(s["epochs"]), "steps": step, "batch_size": int(s["batch_size"]),
                "grad_accumulation": accumulate, "final_loss": round(last, 5)}

    # ------------------------------------------------------------------ inference

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reconstruction of ``images`` (in [0, 1]) in the autoencoder's pixel space."""
        s = self.settings
        pixels = self.to_pixels(images)
        z = self.encode(pixels, generator)
        noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        start = torch.full((z.shape[0],), int(s["start_step"]), device=z.device, dtype=torch.long)
        z = self.train_scheduler.add_noise(z, noise, start)
        self.sampler.set_timesteps(int(s["ddim_steps"]), device=z.device)
        for t in self.sampler.timesteps:
            if int(t) > int(s["start_step"]):
                continue
            eps = self.predict_noise(z, t.expand(z.shape[0]).to(z.device), pixels)
            z = self.sampler.step(eps, t, z, eta=0.0).prev_sample
        return self.decode(z)

    @torch.no_grad()
    def anomaly_maps(self, images: torch.Tensor, recon_pixels: torch.Tensor) -> torch.Tensor:
        """Smoothed feature-distance maps (B, H, W) between images and reconstructions."""
        f_in = self.backbone(self.to_backbone(self.to_pixels(images)))
        f_out = self.backbone(self.to_backbone(recon_pixels))
        maps = feature_distance_map(f_in, f_out, tuple(images.shape[-2:]))
        return gaussian_blur(maps, float(self.settings["smoothing_sigma"]))

    @torch.no_grad()
    def predict(self, images: torch.Tensor, categories: Sequence[str]) -> Prediction:
        """Reconstruct, compare features, smooth; image score = max after repeated average pooling.

        Parameters
        ----------
        images : torch.Tensor
            (B, 3, H, W) in [0, 1].
        categories : sequence of str
            Unused: one model serves every category (the prompt is empty).
        """
        s = self.settings
        images = images.to(self.device).float()
        generator = torch.Generator(device=images.device).manual_seed(int(s["inference_seed"]))
        maps = self.anomaly_maps(images, self.reconstruct(images, generator))
        scores = pooled_max_score(maps, int(s["pool_kernel"]), int(s["pool_rounds"]))
        return Prediction(maps.float(), scores.float())


def param_millions(method: DiAD) -> dict[str, float]:
    """Parameters of each network in millions."""
    return {k: v / 1e6 for k, v in method.parameter_count().items()}


__all__ = ["DiAD", "param_millions", "NORMALIZATIONS", "VGG16_FILES"]
