"""AnomalySD as a harness method: few-shot fine-tuning of SD inpainting, mask-proposal inference.

Fine-tuning (Sec. 4.1), on the k shots of every category at once (one model)
    1. The autoencoder's decoder with ``MSE + β·LPIPS`` (Eq. 9, β = 0.1, AlexNet LPIPS) on
       reconstructions ``D(E(x))`` of augmented shots (``decoder_epochs``). The ``tiny`` profile,
       whose autoencoder is random, also trains the encoder (``train_encoder``).
    2. The UNet with the inpainting loss (Eq. 8): a foreground-aware random rectangle ``m``
       (``IoU(m, m_f) > γ``, ``γ ∈ {0, 0.2, 0.5}``), ``z = E(x)``, ``z° = E((1 − m) ⊙ x)``, the mask
       downsampled to the latent grid, ``t ~ U[0, T)``, and the text embedding of one prompt of
       the image's category drawn at random (``unet_epochs``). The text encoder is frozen.
    Adam, learning rate 1e-4, batch 8, 4000 UNet epochs and 200 decoder epochs in ``paper``.
    Then the prototype banks (Eq. 13): EfficientNet-b6 stage-2 features concatenated with the
    upsampled stage-3 features of every shot rotated by 0/90/180/270 degrees, one bank per category.

Inference (Secs. 4.2–4.3)
    Each test image is encoded once; its latent is noised to the step ``λ·T`` of a 50-step DDIM
    schedule (``noise_strength`` λ, per-category values allowed) and denoised under every mask
    with the category's averaged prompt embedding (Avg over ``T_c``) as condition:
    the ``k × k`` grid masks for ``k ∈ scales`` (all masks of one scale, for every image of the
    batch, go through the UNet together, ``inpaint_batch`` at a time) and the prototype-guided
    mask (Eq. 15, variance threshold). Distances ``D(x, x̂)`` are LPIPS feature distances (Eq. 17);
    per-scale maps (Eq. 18), their harmonic mean (Eq. 19), the fusion with the prototype map at
    α = 0.1 (Eq. 21), a Gaussian of σ = 4; image score = maximum of the map.

Choices where the paper is silent (all settings):
    - the UNet input order is the checkpoint's, ``[z_t; m̃; z°]`` (diffusers' inpainting
      pipeline), which the paper writes as ``[z_t; z°; m̃]``; the masked image is
      ``(1 − m) ⊙ x`` with ``x`` in [-1, 1] (masked pixels grey), as that pipeline does;
    - DDIM (η = 0) sampling; no classifier-free guidance (``guidance_scale = 1``): the averaged
      prompt embedding is the condition, as Sec. 4.2 says; every mask of an image starts from the
      same noise (seeded by ``inference_seed``);
    - latents are the posterior means ``E(x).mode()`` (deterministic inference);
    - the foreground ``m_f`` is an Otsu split of the colour distance to the border's median colour
      (whole image for ``texture_categories``); rectangles have sides of 10–100 % of the image's;
    - the prototype error is the squared Euclidean distance to the nearest bank feature (Eq. 14);
      EfficientNet "layers 2 and 3" are timm's feature stages 2 and 3 (strides 8 and 16);
    - zero-shot (no training image): no fine-tuning and no prototype mask (there is nothing to
      build prototypes from), ``S_map = S_ms``, as the paper's 0-shot row uses multi-scale masks;
    - the image score is the maximum of the smoothed map.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler

from harness import FitContext, Method, Prediction, TrainSet
from harness.backbones import create_features, load_pretrained, recalibrate_batchnorm
from harness.ops import gaussian_blur, imagenet_normalize, nearest_neighbour_distance
from harness_anomalysd.augment import augment
from harness_anomalysd.masks import foreground_mask, grid_masks, prototype_mask, random_training_mask
from harness_anomalysd.prompts import load_prompt_sets
from harness_anomalysd.scoring import (ALEXNET_FILES, build_lpips, feature_distance, fuse, harmonic_mean,
                                       load_alexnet_trunk, lpips_features, scale_map)
from harness_anomalysd.weights import (SDComponents, build_components, character_tokenizer, find_sd_folder,
                                      load_components, load_tokenizer)

#: Tokenizer source recorded in the state when the tokenizer is generated, not read from a folder.
CHARACTER_TOKENIZER = "character"


class AnomalySD(Method):
    """AnomalySD (Yan et al.): Stable Diffusion inpainting for few-shot multi-class anomaly detection.

    See the module docstring; settings are documented in
    :data:`harness_anomalysd.plugin.SETTINGS_HELP`.

    Parameters
    ----------
    settings : mapping
        A resolved profile. Building reads no file, so it works under ``torch.device("meta")``.
    """

    def __init__(self, settings: Mapping[str, Any]) -> None:
        super().__init__(settings)
        s = self.settings
        for k in s["scales"]:
            if self.input_size[0] % int(k) or self.input_size[1] % int(k):
                raise ValueError(f"image_size {self.input_size} is not divisible by grid scale {k} (setting 'scales')")
        sd = build_components(s["architecture"])
        self.unet, self.vae, self.text_encoder = sd.unet, sd.vae, sd.text_encoder
        self.lpips = build_lpips()
        self.backbone = create_features(s["backbone"], tuple(s["backbone_layers"]))
        schedule = dict(num_train_timesteps=int(s["T"]), beta_start=float(s["beta_start"]),
                        beta_end=float(s["beta_end"]), beta_schedule=s["beta_schedule"])
        self.train_scheduler = DDPMScheduler(**schedule)
        self.sampler = DDIMScheduler(**schedule, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
        self.latent_scale = float(self.vae.config.scaling_factor)
        self.banks: dict[str, torch.Tensor] = {}
        self.tokenizer_source = CHARACTER_TOKENIZER
        self._tokenizer = None
        self._prompt_cache: dict[str, torch.Tensor] = {}

    def networks(self) -> Mapping[str, torch.nn.Module]:
        """UNet, autoencoder, text encoder, LPIPS (AlexNet) and the prototype feature extractor."""
        return {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder, "lpips": self.lpips,
                "backbone": self.backbone}

    def to(self, device: torch.device | str) -> "AnomalySD":
        """Move the networks and the prototype banks."""
        super().to(device)
        self.banks = {c: b.to(self.device) for c, b in self.banks.items()}
        self._prompt_cache = {}
        return self

    # ------------------------------------------------------------------ weights and prompts

    def _load_weights(self, context: FitContext) -> None:
        """Pretrained SD, AlexNet and EfficientNet from disk (``pretrained``), or random networks."""
        s = self.settings
        if s["pretrained"]:
            folder = find_sd_folder(context.weights, s["sd_model"], s.get("sd_path") or None)
            load_components(folder, SDComponents(self.unet, self.vae, self.text_encoder))
            self.latent_scale = float(self.vae.config.scaling_factor)
            self.tokenizer_source = str(folder)
            alexnet = context.weights.find_file(ALEXNET_FILES, "ImageNet AlexNet weights (LPIPS trunk)",
                                                extra=[s["alexnet_file"]] if s.get("alexnet_file") else [])
            load_alexnet_trunk(self.lpips, alexnet)
            backbone = load_pretrained(self.backbone, s["backbone"], context.weights, s.get("backbone_file") or None)
            context.info.update({"sd_init": "pretrained", "sd_weights": str(folder), "lpips_trunk": str(alexnet),
                                 "backbone_init": "imagenet", "backbone_weights": str(backbone)})
        else:
            context.info.update({"sd_init": "random", "lpips_trunk": "random (lpips pnet_rand=True, package linear "
                                 "weights)", "backbone_init": "random", "tokenizer": "character vocabulary (514)"})
        self._tokenizer = None
        self._prompt_cache = {}

    def tokenizer(self):
        """The CLIP tokenizer: the pipeline's (from the folder recorded at fit) or the character one."""
        if self._tokenizer is None:
            if self.tokenizer_source == CHARACTER_TOKENIZER:
                self._tokenizer = character_tokenizer(self.text_encoder.config.max_position_embeddings)
            else:
                self._tokenizer = load_tokenizer(Path(self.tokenizer_source))
        return self._tokenizer

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text-encoder hidden states ``τ(y)`` of each prompt, (n, 77, width)."""
        tok = self.tokenizer()
        ids = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(self.device)
        return self.text_encoder(ids)[0]

    def prompt_embedding(self, category: str) -> torch.Tensor:
        """``Avg({τ(y) | y ∈ T_c})``: the averaged embedding of the category's prompts, (77, width)."""
        if category not in self._prompt_cache:
            s = self.settings
            sets, _ = load_prompt_sets([category], s.get("prompts_file") or None, s["prompt_mode"])
            self._prompt_cache[category] = self.encode_prompts(sets[category]).mean(0)
        return self._prompt_cache[category]

    # ------------------------------------------------------------------ latents

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Scaled latents ``E(x)`` (posterior mean) of images in [0, 1]."""
        return self.vae.encode(images * 2 - 1).latent_dist.mode() * self.latent_scale

    def encode_masked(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """``z° = E((1 − m) ⊙ x)`` with ``x`` in [-1, 1] (masked pixels become grey)."""
        return self.vae.encode((images * 2 - 1) * (1 - masks[:, None])).latent_dist.mode() * self.latent_scale

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] from scaled latents."""
        return ((self.vae.decode(latents / self.latent_scale).sample + 1) / 2).clamp(0, 1)

    def unet_input(self, z_t: torch.Tensor, masks: torch.Tensor, z_masked: torch.Tensor) -> torch.Tensor:
        """The 9-channel UNet input in the checkpoint's order ``[z_t; m̃; z°]``."""
        small = F.interpolate(masks[:, None], size=z_t.shape[-2:], mode="nearest")
        return torch.cat([z_t, small, z_masked], dim=1)

    # ------------------------------------------------------------------ fine-tuning

    def _shots(self, train: TrainSet) -> tuple[torch.Tensor, list[str]]:
        images, cats = [], []
        for x, c in train.images():
            images.append(x)
            cats.append(c)
        return torch.stack(images).to(self.device), cats

    def _batches(self, n: int, batch_size: int, rng: np.random.Generator):
        order = rng.permutation(n)
        for start in range(0, n, batch_size):
            yield order[start:start + batch_size]

    def _augment(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        s = self.settings
        return augment(images, generator, s["aug_brightness"], s["aug_contrast"], tuple(s["aug_scale"]),
                       float(s["aug_rotation"]))

    def train_decoder(self, images: torch.Tensor, epochs: int, rng, generator, progress) -> float:
        """Fine-tune the decoder (and, with ``train_encoder``, the encoder) with Eq. 9; last loss."""
        s = self.settings
        params = list(self.vae.decoder.parameters()) + list(self.vae.post_quant_conv.parameters())
        if s["train_encoder"]:
            params += list(self.vae.encoder.parameters()) + list(self.vae.quant_conv.parameters())
        opt = torch.optim.Adam(params, lr=float(s["lr_decoder"]))
        beta = float(s["decoder_lpips_weight"])
        self.vae.train()
        loss = torch.zeros(())
        for _ in progress.epochs(epochs, desc="anomalysd decoder"):
            for idx in self._batches(images.shape[0], int(s["batch_size"]), rng):
                x = self._augment(images[idx], generator)
                with torch.set_grad_enabled(bool(s["train_encoder"])):
                    z = self.vae.encode(x * 2 - 1).latent_dist.mode()
                recon = self.vae.decode(z).sample
                loss = F.mse_loss(recon, x * 2 - 1) + beta * self.lpips(recon, x * 2 - 1).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        self.vae.eval()
        return float(loss.item())

    def _training_masks(self, images: torch.Tensor, cats: Sequence[str], rng: np.random.Generator) -> torch.Tensor:
        s = self.settings
        textures = set(s["texture_categories"])
        out = []
        for x, c in zip(images.detach().cpu().numpy(), cats):
            fg = foreground_mask(x, whole=c in textures)
            mask, _ = random_training_mask(fg, rng, tuple(s["mask_gammas"]), tuple(s["mask_side_range"]))
            out.append(torch.from_numpy(mask))
        return torch.stack(out).float().to(self.device)

    def train_unet(self, images: torch.Tensor, cats: Sequence[str], epochs: int, rng, generator, progress) -> float:
        """Fine-tune the UNet with the inpainting loss (Eq. 8); returns the last loss."""
        s = self.settings
        sets, _ = load_prompt_sets(sorted(set(cats)), s.get("prompts_file") or None, s["prompt_mode"])
        embeddings = {c: self.encode_prompts(p) for c, p in sets.items()}
        opt = torch.optim.Adam(self.unet.parameters(), lr=float(s["lr_unet"]))
        T = int(s["T"])
        self.unet.train()
        loss = torch.zeros(())
        for _ in progress.epochs(epochs, desc="anomalysd unet"):
            for idx in self._batches(images.shape[0], int(s["batch_size"]), rng):
                x = self._augment(images[idx], generator)
                batch_cats = [cats[i] for i in idx]
                masks = self._training_masks(x, batch_cats, rng)
                cond = torch.stack([embeddings[c][int(rng.integers(len(embeddings[c])))] for c in batch_cats])
                with torch.no_grad():
                    z = self.encode(x)
                    z_masked = self.encode_masked(x, masks)
                noise = torch.randn(z.shape, generator=generator).to(z.device)
                t = torch.from_numpy(rng.integers(0, T, size=z.shape[0])).to(z.device)
                z_t = self.train_scheduler.add_noise(z, noise, t)
                pred = self.unet(self.unet_input(z_t, masks, z_masked), t, encoder_hidden_states=cond).sample
                loss = F.mse_loss(pred, noise)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        self.unet.eval()
        return float(loss.item())

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Eq. 12: ``ψ(x) = [φ2(x); Upsample(φ3(x))]``, (B, D, h, w) on stage 2's grid."""
        f2, f3 = self.backbone(imagenet_normalize(images))[:2]
        return torch.cat([f2, F.interpolate(f3, size=f2.shape[-2:], mode="bilinear", align_corners=False)], 1)

    @torch.no_grad()
    def build_banks(self, images: torch.Tensor, cats: Sequence[str]) -> None:
        """Eq. 13: per category, every feature of every rotated shot."""
        banks: dict[str, list[torch.Tensor]] = {}
        for x, c in zip(images, cats):
            for angle in self.settings["prototype_rotations"]:
                rotated = torch.rot90(x, k=int(angle) // 90 % 4, dims=(1, 2))[None]
                f = self.features(rotated)
                banks.setdefault(c, []).append(f[0].flatten(1).T)
        self.banks = {c: torch.cat(v).contiguous() for c, v in banks.items()}

    def fit(self, train: TrainSet, context: FitContext) -> None:
        """Load (or randomly keep) the networks, fine-tune on the shots, build the prototype banks.

        With no training image (``--shots 0``) nothing is fine-tuned and no bank is built.
        """
        s = self.settings
        start = time.perf_counter()
        self._load_weights(context)
        rng = np.random.default_rng(context.seed)
        generator = torch.Generator().manual_seed(int(context.seed))
        info: dict[str, Any] = {"shots_total": len(train), "zero_shot": len(train) == 0}
        if len(train):
            images, cats = self._shots(train)
            if not s["pretrained"]:
                recalibrate_batchnorm(self.backbone, (imagenet_normalize(images[i:i + 16])
                                                      for i in range(0, len(images), 16)))
            self.backbone.eval()
            info["decoder_loss"] = round(self.train_decoder(images, int(s["decoder_epochs"]), rng, generator,
                                                            context.progress), 5)
            if s["latent_scale"] == "auto":
                with torch.no_grad():
                    std = float(self.vae.encode(images * 2 - 1).latent_dist.mode().std())
                self.latent_scale = 1.0 / max(std, 1e-6)
            info["unet_loss"] = round(self.train_unet(images, cats, int(s["unet_epochs"]), rng, generator,
                                                      context.progress), 5)
            if s["prototype_masks"]:
                self.build_banks(images, cats)
            _, fallback = load_prompt_sets(sorted(set(cats)), s.get("prompts_file") or None, s["prompt_mode"])
            info["prompt_fallback_categories"] = fallback
        self.eval()
        info.update({"latent_scale": round(self.latent_scale, 6), "prototype_banks": {c: int(b.shape[0]) for c, b in
                                                                                      self.banks.items()},
                     "fit_seconds": round(time.perf_counter() - start, 2)})
        context.info.update(info)
        self._prompt_cache = {}

    # ------------------------------------------------------------------ inference

    def noise_strength(self, category: str) -> float:
        """λ of ``category`` (``noise_strength_per_category`` overrides ``noise_strength``)."""
        return float(dict(self.settings["noise_strength_per_category"]).get(category, self.settings["noise_strength"]))

    @torch.no_grad()
    def inpaint(self, images: torch.Tensor, masks: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor,
                cond: torch.Tensor, strength: float) -> torch.Tensor:
        """Inpaint ``images`` under ``masks`` starting from step ``λ·T`` (Eq. 11); one batch.

        Parameters
        ----------
        images : (N, 3, H, W) in [0, 1]
        masks : (N, H, W), 1 = inpaint
        latents : (N, 4, h, w) scaled clean latents ``E(x)``
        noise : (N, 4, h, w) the starting noise
        cond : (N, L, width) prompt embeddings
        strength : float
            λ in [0, 1].

        Returns
        -------
        torch.Tensor
            (N, 3, H, W) inpainted images in [0, 1].
        """
        steps = int(self.settings["num_inference_steps"])
        self.sampler.set_timesteps(steps, device=latents.device)
        n_run = min(int(round(steps * strength)), steps)
        timesteps = self.sampler.timesteps[steps - n_run:]
        if n_run == 0:
            return self.decode(latents)
        z_masked = self.encode_masked(images, masks)
        z = self.sampler.add_noise(latents, noise, timesteps[:1].repeat(latents.shape[0]))
        guidance = float(self.settings["guidance_scale"])
        uncond = None
        if guidance > 1:
            uncond = self.encode_prompts([""]).expand(cond.shape[0], -1, -1)
        for t in timesteps:
            inp = self.unet_input(self.sampler.scale_model_input(z, t), masks, z_masked)
            if uncond is None:
                eps = self.unet(inp, t, encoder_hidden_states=cond).sample
            else:
                both = self.unet(torch.cat([inp, inp]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
                eps_u, eps_c = both.chunk(2)
                eps = eps_u + guidance * (eps_c - eps_u)
            z = self.sampler.step(eps, t, z).prev_sample
        return self.decode(z)

    def _distances(self, images, feats, masks, latents, noise, cond, strength, owner) -> torch.Tensor:
        """``D(x, x̂)`` for pairs (image ``owner[i]``, mask ``i``), ``inpaint_batch`` at a time; (N, H, W).

        ``feats`` are the images' LPIPS features, computed once and shared by all their masks.
        """
        chunk = int(self.settings["inpaint_batch"])
        out = []
        for a in range(0, masks.shape[0], chunk):
            idx = owner[a:a + chunk]
            x_hat = self.inpaint(images[idx], masks[a:a + chunk], latents[idx], noise[idx], cond[idx], strength)
            out.append(feature_distance(self.lpips, [f[idx] for f in feats], lpips_features(self.lpips, x_hat),
                                        images.shape[-2:]))
        return torch.cat(out)

    @torch.no_grad()
    def score_maps(self, images: torch.Tensor, categories: Sequence[str], strength: float) -> dict[str, Any]:
        """Unsmoothed maps of images that share one noise strength.

        Returns
        -------
        dict
            ``scales`` (list of (B, H, W) ``S^(k)``), ``multi_scale`` (Eq. 19), ``prototype``
            (Eq. 20 or None), ``prototype_masks`` (or None), ``map`` (Eq. 21).
        """
        s = self.settings
        b, _, height, width = images.shape
        latents = self.encode(images)
        generator = torch.Generator().manual_seed(int(s["inference_seed"]))
        noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
        cond = torch.stack([self.prompt_embedding(c) for c in categories])
        feats = lpips_features(self.lpips, images)
        per_scale = []
        for k in s["scales"]:
            masks = grid_masks(height, width, int(k), device=images.device)
            n = masks.shape[0]
            # Every (image, patch) pair of the scale in one flat batch, image-major.
            owner = torch.arange(b, device=images.device).repeat_interleave(n)
            flat_masks = masks.repeat(b, 1, 1)
            dist = self._distances(images, feats, flat_masks, latents, noise, cond, strength, owner)
            per_scale.append(scale_map(masks, dist.view(b, n, height, width)))
        multi = harmonic_mean(per_scale)
        proto, proto_masks = None, None
        with_bank = [i for i, c in enumerate(categories) if c in self.banks]
        if s["prototype_masks"] and with_bank and len(with_bank) == b:
            psi = self.features(images)
            errors = []
            for i, c in enumerate(categories):
                f = psi[i].flatten(1).T
                d, _ = nearest_neighbour_distance(f, self.banks[c], k=1)
                errors.append((d[:, 0] ** 2).view(psi.shape[-2:]))
            proto_masks = prototype_mask(torch.stack(errors), (height, width))
            owner = torch.arange(b, device=images.device)
            dist = self._distances(images, feats, proto_masks, latents, noise, cond, strength, owner)
            proto = proto_masks * dist
        return {"scales": per_scale, "multi_scale": multi, "prototype": proto, "prototype_masks": proto_masks,
                "map": fuse(multi, proto, float(s["alpha"]))}

    @torch.no_grad()
    def predict(self, images: torch.Tensor, categories: Sequence[str]) -> Prediction:
        """Anomaly maps (Eq. 21, Gaussian-smoothed) and image scores (their maxima).

        Images are grouped by their category's noise strength λ; all masks of one scale are
        inpainted together for every image of the group.
        """
        images = images.to(self.device).float()
        maps = torch.zeros(images.shape[0], *images.shape[-2:], device=self.device)
        strengths = [self.noise_strength(c) for c in categories]
        for lam in sorted(set(strengths)):
            idx = [i for i, v in enumerate(strengths) if v == lam]
            out = self.score_maps(images[idx], [categories[i] for i in idx], lam)
            maps[idx] = out["map"]
        maps = gaussian_blur(maps, float(self.settings["smoothing_sigma"]))
        return Prediction(maps, maps.flatten(1).amax(1))

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Networks plus banks, latent scale and where the tokenizer comes from."""
        state = super().state_dict()
        state.update({"banks": {c: b.cpu() for c, b in self.banks.items()}, "latent_scale": self.latent_scale,
                      "tokenizer_source": self.tokenizer_source})
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        super().load_state_dict(state)
        self.banks = {c: b.to(self.device) for c, b in state["banks"].items()}
        self.latent_scale = float(state["latent_scale"])
        self.tokenizer_source = str(state["tokenizer_source"])
        self._tokenizer = None
        self._prompt_cache = {}


__all__ = ["AnomalySD", "CHARACTER_TOKENIZER"]
