"""AnomalySD as a harness method: few-shot fine-tuning of SD inpainting, mask-proposal inference.

No official code is public: the paper's text is the specification; every value it leaves open
is a setting whose ``choice`` note says what was chosen and why (:mod:`harness_anomalysd.plugin`).

Fine-tuning (Sec. 4.1), on the k shots of every category at once (one model)
    1. The autoencoder's decoder with ``MSE + β·LPIPS`` (Eq. 9, β = 0.1, AlexNet LPIPS) on
       reconstructions ``D(E(x))`` of augmented shots (``decoder_epochs``). The ``tiny``
       profile, whose autoencoder is random, also trains the encoder (``train_encoder``).
    2. The UNet with the inpainting loss (Eq. 8): a foreground-aware random rectangle ``m``
       (``IoU(m, m_f) > γ``, ``γ ∈ {0, 0.2, 0.5}``; textures, from the dataset's spec, are all
       foreground), ``z = E(x)``, ``z° = E((1 − m) ⊙ x)``, the mask downsampled to the latent
       grid, ``t`` uniform over the T steps, and the text embedding of one prompt of the image's
       category drawn at random (``unet_epochs``). The text encoder is frozen.
    Adam at 1e-4, batch 8, 4000 UNet and 200 decoder epochs in ``paper``. Each stage runs in
    ``context.checkpoint.stage`` and draws its batch order, augmentations, masks, noise and
    timesteps from generators seeded by (job seed, stage, epoch, batch) only, so a fit killed
    and resumed ends exactly where an uninterrupted one does.
    3. The prototype banks (Eq. 13): EfficientNet-B6 stage-2 features concatenated with the
       upsampled stage-3 features of every shot rotated by 0/90/180/270 degrees, per category.
    4. λ per category on held-out pseudo-validation images (:mod:`harness_anomalysd.selection`;
       with a held-out split the fine-tuning runs twice: on the rest to choose, on all k shots
       to keep).

Inference (Secs. 4.2–4.3)
    Each test image is encoded once; its latent is noised to exactly the step ``λ·T`` of its
    category and denoised by DDIM under every mask (:mod:`harness_anomalysd.sampling`), with
    the category's averaged prompt embedding (Avg over ``T_c``) as condition: the ``k × k``
    grid masks for ``k ∈ scales`` and the prototype-guided mask (Eq. 15, variance threshold).
    ``D(x, x̂)`` are LPIPS feature distances (Eq. 17); per-scale maps (Eq. 18), their harmonic
    mean ``S_ms`` (Eq. 19), the prototype map ``S_pg`` (Eq. 20) and the fusion at α = 0.1
    (Eq. 21), a Gaussian of σ = 4; image score = maximum of the map. ``anomaly_map`` selects
    ``S_ms`` or ``S_pg`` alone (the paper's Table 5 ablation).

A fast dev run (``--fast-dev-run``) runs the same code with each stage's steps cut to
:data:`harness.method.FAST_DEV_STEPS`; ``predict`` (and the λ selection, on one category, one
candidate and two images) uses the first grid scale only and at most that many denoising steps
per inpainting, so a test image costs 2 inpaintings of 2 UNet steps instead of 86 of 20.
"""

from __future__ import annotations

import time
import zlib
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from harness import FitContext, Method, Prediction, TrainSet
from harness.method import FAST_DEV_STEPS
from harness.toolkit.backbones import create_features, load_weights, recalibrate_batchnorm
from harness.toolkit.ops import gaussian_blur, imagenet_normalize, nearest_neighbour_distance
from harness.toolkit.noise import ImageNoise
from harness.toolkit.precision import autocast, grad_scaler
from harness.toolkit.pseudo_validation import split_holdout
from harness.toolkit.weightfiles import sha256_file
from harness_anomalysd import sampling, selection
from harness_anomalysd.augment import augment
from harness_anomalysd.masks import foreground_mask, grid_masks, prototype_mask, random_training_mask
from harness_anomalysd.prompts import load_prompt_sets
from harness_anomalysd.scoring import (ALEXNET_SHA256_PREFIX, build_lpips, feature_distance, fuse, harmonic_mean,
                                       load_alexnet_trunk, lpips_features, lpips_linear_weights, scale_map)
from harness_anomalysd.networks import build_components, character_tokenizer, load_components, load_tokenizer
from harness_anomalysd.weightfiles import ALEXNET, backbone_file, sd_file

#: Tokenizer source recorded in the state when the tokenizer is generated, not read from a folder.
CHARACTER_TOKENIZER = "character"


def _optimizer_step(opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler, loss: torch.Tensor) -> float:
    """One (scaled) optimiser step on ``loss``; returns the loss value."""
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    return float(loss.detach())


def _stage_seed(seed: int, stage: str, *parts: int) -> list[int]:
    """Entropy for a NumPy / torch generator that depends only on the job seed, the stage and ``parts``."""
    return [int(seed) & 0xFFFFFFFF, zlib.crc32(stage.encode("utf-8")), *[int(p) for p in parts]]


def _torch_generator(entropy: Sequence[int]) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.default_rng(list(entropy)).integers(2**62)))


class AnomalySD(Method):
    """AnomalySD (Yan et al.): Stable Diffusion inpainting for few-shot multi-class anomaly detection.

    See the module docstring; the settings are :data:`harness_anomalysd.plugin.SETTINGS`.

    Parameters
    ----------
    settings : Settings
        Resolved settings. Building reads no file, so it works under ``torch.device("meta")``.
    """

    def __init__(self, settings: Mapping[str, Any]) -> None:
        super().__init__(settings)
        s = self.settings
        for k in s.scales:
            if self.input_size[0] % k or self.input_size[1] % k:
                raise ValueError(f"image_size {self.input_size} is not divisible by grid scale {k} (setting 'scales')")
        sd = build_components(s.architecture)
        self.unet, self.vae, self.text_encoder = sd.unet, sd.vae, sd.text_encoder
        self.text_encoder.requires_grad_(False)
        if s.gradient_checkpointing:
            # diffusers recomputes each block's activations in the backward pass (UNet stage and,
            # for the decoder stage, the autoencoder's blocks).
            self.unet.enable_gradient_checkpointing()
            self.vae.enable_gradient_checkpointing()
        self.lpips = build_lpips()
        self.uses_prototypes = s.anomaly_map in ("fused", "prototype")
        self.backbone = create_features(s.backbone, s.backbone_layers) if self.uses_prototypes else None
        self.abar = sampling.alphas_cumprod()
        self.latent_scale = float(self.vae.config.scaling_factor)
        self.banks: dict[str, torch.Tensor] = {}
        #: λ chosen per category at fit (overridden by ``noise_strength_per_category``).
        self.strengths: dict[str, float] = {}
        self.tokenizer_source = CHARACTER_TOKENIZER
        #: Set by a fast dev run's fit: predict then runs few scales and denoising steps.
        self.dev_run = False
        self._tokenizer = None
        self._prompt_cache: dict[str, torch.Tensor] = {}

    def networks(self) -> Mapping[str, torch.nn.Module]:
        """UNet, autoencoder, text encoder, LPIPS (AlexNet) and, with prototypes, the feature extractor."""
        nets = {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder, "lpips": self.lpips}
        if self.backbone is not None:
            nets["backbone"] = self.backbone
        return nets

    def to(self, device: torch.device | str) -> "AnomalySD":
        """Move the networks and the prototype banks."""
        super().to(device)
        self.banks = {c: b.to(self.device) for c, b in self.banks.items()}
        self._prompt_cache = {}
        return self

    def _autocast(self):
        return autocast(self.device, self.settings.precision)

    # ------------------------------------------------------------------ weights and prompts

    def _load_weights(self, context: FitContext) -> dict[str, Any]:
        """Pretrained SD, AlexNet and EfficientNet from the declared files, or the random networks.

        ``--weights random`` (``context.random_weights``) and the ``*_pretrained`` settings keep
        the seeded random initialisation the factory made.
        """
        s = self.settings
        random = context.random_weights
        info: dict[str, Any] = {}
        if s.sd_pretrained and not random:
            folder = context.weights.resolve(sd_file(s), s)
            load_components(folder, self)  # type: ignore[arg-type]  # has .unet/.vae/.text_encoder
            self.latent_scale = float(self.vae.config.scaling_factor)
            self.tokenizer_source = str(folder)
            info.update(sd_init="pretrained", sd_weights=str(folder))
        else:
            info.update(sd_init="random", tokenizer="character vocabulary (514)")
        linear = lpips_linear_weights()
        if linear.is_file():
            context.weights.note_used(linear, "LPIPS v0.1 AlexNet linear weights (lpips package)", "lpips_linear")
        if s.lpips_pretrained and not random:
            path = context.weights.resolve(ALEXNET, s)
            digest = sha256_file(path)
            # A file under torchvision's name claims torchvision's hash prefix (as torch.hub checks);
            # an explicitly named file of another name is taken as given (its sha256 is recorded).
            if ALEXNET_SHA256_PREFIX in Path(path).name and not digest.startswith(ALEXNET_SHA256_PREFIX):
                from harness.errors import WeightsVerifyError

                raise WeightsVerifyError(f"{path} has sha256 {digest}; torchvision's ImageNet AlexNet file starts "
                                         f"with {ALEXNET_SHA256_PREFIX}. Fetch it with 'harness weights pull "
                                         "--methods anomalysd'.")
            load_alexnet_trunk(self.lpips, path)
            info.update(lpips_trunk=str(path))
        else:
            info.update(lpips_trunk="random (lpips pnet_rand=True; the package's linear weights)")
        if self.backbone is not None:
            if s.backbone_pretrained and not random:
                path = load_weights(self.backbone, backbone_file(s), context.weights, s)
                info.update(backbone_init="imagenet", backbone_weights=str(path))
            else:
                info.update(backbone_init="random (BatchNorm statistics re-estimated on the shots)")
        self._tokenizer = None
        self._prompt_cache = {}
        return info

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
        """Text-encoder hidden states ``τ(y)`` of each prompt, (n, 77, width), float32."""
        tok = self.tokenizer()
        ids = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(self.device)
        return self.text_encoder(ids)[0].float()

    def prompt_sets(self, categories: Sequence[str]) -> tuple[dict[str, list[str]], list[str]]:
        """The prompt sets ``T_c`` of ``categories`` and those without a prompt entry."""
        return load_prompt_sets(sorted(set(categories)), self.settings.prompts_file or None, self.settings.prompt_mode)

    def prompt_embedding(self, category: str) -> torch.Tensor:
        """``Avg({τ(y) | y ∈ T_c})``: the averaged embedding of the category's prompts, (77, width)."""
        if category not in self._prompt_cache:
            sets, _ = self.prompt_sets([category])
            self._prompt_cache[category] = self.encode_prompts(sets[category]).mean(0)
        return self._prompt_cache[category]

    # ------------------------------------------------------------------ latents

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Scaled latents ``E(x)`` (posterior mean) of images in [0, 1]."""
        return self.vae.encode(images * 2 - 1).latent_dist.mode() * self.latent_scale

    def encode_masked(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """``z° = E((1 − m) ⊙ x)`` with ``x`` in [-1, 1] (masked pixels become grey, as diffusers does)."""
        return self.vae.encode((images * 2 - 1) * (1 - masks[:, None])).latent_dist.mode() * self.latent_scale

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] from scaled latents (float32)."""
        return ((self.vae.decode(latents / self.latent_scale).sample.float() + 1) / 2).clamp(0, 1)

    @staticmethod
    def unet_input(z_t: torch.Tensor, masks: torch.Tensor, z_masked: torch.Tensor) -> torch.Tensor:
        """The 9-channel UNet input in the checkpoint's order ``[z_t; m̃; z°]``."""
        small = F.interpolate(masks[:, None].to(z_t.dtype), size=z_t.shape[-2:], mode="nearest")
        return torch.cat([z_t, small, z_masked.to(z_t.dtype)], dim=1)

    # ------------------------------------------------------------------ fine-tuning

    def _augment(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        s = self.settings
        return augment(images, generator, s.aug_brightness, s.aug_contrast, s.aug_scale, s.aug_rotation)

    def _batches(self, n: int, seed: int, stage: str, epoch: int) -> list[np.ndarray]:
        """The batches of one epoch: a permutation that depends only on (seed, stage, epoch)."""
        order = np.random.default_rng(_stage_seed(seed, stage, epoch)).permutation(n)
        size = self.settings.train_batch_size
        return [order[i:i + size] for i in range(0, n, size)]

    def _steps(self, n: int, epochs: int, seed: int, stage: str, position, context: FitContext
               ) -> Iterator[tuple[int, np.ndarray, np.random.Generator, torch.Generator]]:
        """``(epoch, batch indices, numpy rng, torch generator)`` of the batches still to run.

        Batches consumed before an interruption are skipped; every generator is seeded by (job
        seed, stage, epoch, batch), so the data a step sees does not depend on where a run resumed.
        """
        for epoch in range(position.epoch, context.epochs(epochs)):
            for index, idx in enumerate(self._batches(n, seed, stage, epoch)):
                if position.skip(epoch, index):
                    continue
                entropy = _stage_seed(seed, stage, epoch, index)
                yield epoch, idx, np.random.default_rng(entropy), _torch_generator(entropy)
                position.step(epoch=epoch, batch=index + 1)
                if context.stop_early(position.steps):
                    return

    def train_decoder(self, images: torch.Tensor, context: FitContext, stage: str, carry: Mapping[str, Any]) -> float:
        """Fine-tune the decoder (and, with ``train_encoder``, the encoder) with Eq. 9; last loss."""
        s = self.settings
        params = list(self.vae.decoder.parameters()) + list(self.vae.post_quant_conv.parameters())
        if s.train_encoder:
            params += list(self.vae.encoder.parameters()) + list(self.vae.quant_conv.parameters())
        opt = torch.optim.Adam(params, lr=s.decoder_lr)
        scaler = grad_scaler(self.device, s.precision)
        loss_value = float("nan")
        self.vae.train()
        with context.checkpoint.stage(stage, vae=self.vae, decoder_optimiser=opt, decoder_scaler=scaler,
                                      **carry) as position:
            for _epoch, idx, _rng, generator in self._steps(images.shape[0], s.decoder_epochs, context.seed, stage,
                                                           position, context):
                x = self._augment(images[idx], generator) * 2 - 1
                with self._autocast():
                    with torch.set_grad_enabled(s.train_encoder):
                        z = self.vae.encode(x).latent_dist.mode()
                    recon = self.vae.decode(z).sample
                    loss = F.mse_loss(recon.float(), x) + s.decoder_lpips_weight * self.lpips(recon, x).float().mean()
                loss_value = _optimizer_step(opt, scaler, loss)
            if not position.done:
                position.extra["loss"] = loss_value
            loss_value = float(position.extra.get("loss", loss_value))
        self.vae.eval()
        return loss_value

    def _training_masks(self, images: torch.Tensor, cats: Sequence[str], textures: frozenset[str],
                        rng: np.random.Generator) -> torch.Tensor:
        s = self.settings
        out = []
        for x, c in zip(images.detach().float().cpu().numpy(), cats):
            fg = foreground_mask(x, whole=c in textures)
            mask, _ = random_training_mask(fg, rng, s.mask_gammas, s.mask_side_range)
            out.append(torch.from_numpy(mask))
        return torch.stack(out).float().to(self.device)

    def train_unet(self, images: torch.Tensor, cats: Sequence[str], context: FitContext, stage: str,
                   carry: Mapping[str, Any]) -> float:
        """Fine-tune the UNet with the inpainting loss (Eq. 8); returns the last loss."""
        s = self.settings
        sets, _ = self.prompt_sets(cats)
        embeddings = {c: self.encode_prompts(p) for c, p in sets.items()}
        opt = torch.optim.Adam(self.unet.parameters(), lr=s.unet_lr)
        scaler = grad_scaler(self.device, s.precision)
        T = len(self.abar)
        loss_value = float("nan")
        self.unet.train()
        with context.checkpoint.stage(stage, unet=self.unet, unet_optimiser=opt, unet_scaler=scaler,
                                      **carry) as position:
            for _epoch, idx, rng, generator in self._steps(images.shape[0], s.unet_epochs, context.seed, stage,
                                                          position, context):
                x = self._augment(images[idx], generator)
                batch_cats = [cats[i] for i in idx]
                masks = self._training_masks(x, batch_cats, context.textures, rng)
                cond = torch.stack([embeddings[c][int(rng.integers(len(embeddings[c])))] for c in batch_cats])
                t = rng.integers(0, T, size=x.shape[0])
                with self._autocast():
                    with torch.no_grad():
                        z = self.encode(x).float()
                        z_masked = self.encode_masked(x, masks)
                    noise = torch.randn(z.shape, generator=generator).to(self.device)
                    z_t = sampling.add_noise(z, noise, t, self.abar)
                    timesteps = torch.from_numpy(t).to(self.device)
                    pred = self.unet(self.unet_input(z_t, masks, z_masked), timesteps, encoder_hidden_states=cond).sample
                    loss = F.mse_loss(pred.float(), noise)
                loss_value = _optimizer_step(opt, scaler, loss)
            if not position.done:
                position.extra["loss"] = loss_value
            loss_value = float(position.extra.get("loss", loss_value))
        self.unet.eval()
        return loss_value

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Eq. 12: ``ψ(x) = [φ2(x); Upsample(φ3(x))]``, (B, D, h, w) on stage 2's grid (float32)."""
        with self._autocast():
            f2, f3 = self.backbone(imagenet_normalize(images))[:2]
        f2, f3 = f2.float(), f3.float()
        return torch.cat([f2, F.interpolate(f3, size=f2.shape[-2:], mode="bilinear", align_corners=False)], 1)

    @torch.no_grad()
    def build_banks(self, images: torch.Tensor, cats: Sequence[str], recalibrate: bool) -> None:
        """Eq. 13: per category, every feature of every rotated shot.

        A random backbone first gets its BatchNorm statistics from these same rotated shots.
        """
        angles = self.settings.prototype_rotations
        rotated = torch.stack([torch.rot90(x, k=angle // 90 % 4, dims=(1, 2)) for x in images for angle in angles])
        owners = [c for c in cats for _ in angles]
        if recalibrate:
            # Nearly equal chunks of at most 16: never a lone image, whose 1 x 1 late stages
            # BatchNorm cannot normalise.
            chunks = torch.tensor_split(rotated, max(1, -(-len(rotated) // 16)))
            recalibrate_batchnorm(self.backbone, (imagenet_normalize(chunk) for chunk in chunks))
        self.backbone.eval()
        banks: dict[str, list[torch.Tensor]] = {}
        for i in range(0, len(rotated), 16):
            feats = self.features(rotated[i:i + 16])
            for f, c in zip(feats, owners[i:i + 16]):
                banks.setdefault(c, []).append(f.flatten(1).T)
        self.banks = {c: torch.cat(v).contiguous() for c, v in banks.items()}

    def _fine_tune(self, images: torch.Tensor, cats: Sequence[str], context: FitContext, prefix: str,
                   recalibrate: bool) -> dict[str, Any]:
        """Decoder stage, UNet stage and prototype banks on ``images``; the stages' last losses."""
        s = self.settings
        out: dict[str, Any] = {}
        out["decoder_loss"] = round(self.train_decoder(images, context, prefix + "decoder", {}), 5)
        if s.latent_scale == "auto":
            with torch.no_grad(), self._autocast():
                std = float(self.vae.encode(images * 2 - 1).latent_dist.mode().float().std())
            self.latent_scale = 1.0 / max(std, 1e-6)
        # The UNet stage's checkpoints carry the fine-tuned autoencoder, so a resume inside it
        # finds the decoder it was trained with.
        out["unet_loss"] = round(self.train_unet(images, cats, context, prefix + "unet", {"vae": self.vae}), 5)
        if self.uses_prototypes:
            self.build_banks(images, cats, recalibrate)
        return out

    def fit(self, train: TrainSet, context: FitContext) -> None:
        """Load (or randomly keep) the networks, fine-tune on the shots, build the banks, choose λ.

        With no training image (``--shots 0``) nothing is fine-tuned, no bank is built and λ is
        ``noise_strength`` (zero-shot, the paper's first row of Table 1).
        """
        s = self.settings
        start = time.perf_counter()
        self.dev_run = bool(context.fast_dev_run)
        info: dict[str, Any] = self._load_weights(context)
        info.update(shots_total=len(train), zero_shot=len(train) == 0, precision=s.precision,
                    gradient_checkpointing=s.gradient_checkpointing, anomaly_map=s.anomaly_map)
        random_backbone = self.backbone is not None and (context.random_weights or not s.backbone_pretrained)
        self.strengths = {}
        if len(train) == 0:
            if s.anomaly_map == "prototype":
                raise ValueError("anomaly_map='prototype' needs shots to build prototype banks (--shots >= 1)")
            self.eval()
            info.update(self._denoising_info(train.categories), fit_seconds=round(time.perf_counter() - start, 2))
            context.info.update(info)
            return
        mode = s.lambda_selection
        fit_part, holdout = (split_holdout(train, s.lambda_holdout_fraction, context.seed, min_fit=1, min_holdout=1)
                             if mode == "holdout" else (train, train.subset([])))
        refit = mode == "holdout" and len(holdout) > 0 and s.lambda_refit
        initial = None
        if refit:
            # The final model starts again from the same weights; kept on the host.
            initial = {name: {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()}
                       for name, net in (("unet", self.unet), ("vae", self.vae))}
        images, cats = self._images(fit_part)
        prefix = "select/" if refit else ""
        info["fine_tuning"] = self._fine_tune(images, cats, context, prefix, random_backbone)
        if mode != "fixed":
            info["noise_strength"] = self._select_strengths(fit_part, holdout, context, prefix)
        else:
            info["noise_strength"] = {"selection": "fixed"}
        if refit:
            self.unet.load_state_dict(initial["unet"])
            self.vae.load_state_dict(initial["vae"])
            self.latent_scale = float(self.vae.config.scaling_factor)
            del initial
            all_images, all_cats = self._images(train)
            info["fine_tuning_selection_model"] = info.pop("fine_tuning")
            info["fine_tuning"] = self._fine_tune(all_images, all_cats, context, "", random_backbone)
        info["noise_strength"]["refit_on_all_shots"] = refit
        _, fallback = self.prompt_sets(train.categories)
        info["prompt_fallback_categories"] = fallback
        self.eval()
        info.update(self._denoising_info(train.categories))
        info.update(latent_scale=round(self.latent_scale, 6),
                    prototype_banks={c: int(b.shape[0]) for c, b in self.banks.items()},
                    fit_seconds=round(time.perf_counter() - start, 2))
        context.info.update(info)
        self._prompt_cache = {}

    def _images(self, train: TrainSet) -> tuple[torch.Tensor, list[str]]:
        images, cats = [], []
        for x, c in train.images():
            images.append(x)
            cats.append(c)
        if not images:
            return torch.zeros(0, 3, *self.input_size, device=self.device), []
        return torch.stack(images).to(self.device), cats

    # ------------------------------------------------------------------ λ selection

    def _select_strengths(self, fit_part: TrainSet, holdout: TrainSet, context: FitContext, prefix: str
                          ) -> dict[str, Any]:
        """Choose λ per category on pseudo-validation images (:mod:`harness_anomalysd.selection`)."""
        s = self.settings
        fixed = dict(s.noise_strength_per_category)
        candidates = list(s.lambda_candidates)
        per_category = s.lambda_val_per_category
        held = holdout.by_category()
        fitted = fit_part.by_category()
        categories = [c for c in fit_part.categories if c not in fixed]
        if self.dev_run:
            # The real selection code on one category, one candidate and two images (an
            # inpainting of the paper's networks costs minutes on a CPU).
            categories, candidates, per_category = categories[:1], candidates[:1], 2
        with context.checkpoint.stage(prefix + "lambda", unet=self.unet, vae=self.vae) as position:
            if not position.done:
                sources, images, cats = {}, [], []
                for c in categories:
                    source, indices = (holdout, held[c]) if held.get(c) else (fit_part, fitted[c])
                    sources[c] = "held out (unseen by the model)" if source is holdout else "augmented copies of " \
                        "the shots the model was fine-tuned on (seen: nothing to hold out)"
                    for i in indices:
                        images.append(source[i][0])
                        cats.append(c)
                per_cat: dict[str, Any] = {}
                if images:
                    val = selection.pseudo_validation(torch.stack(images), cats, per_category,
                                                      int(context.seed) + 7919, self._augment)
                    labels = val.labels
                    results: dict[str, dict[float, dict[str, float]]] = {c: {} for c in categories}
                    for lam in candidates:
                        maps = self.anomaly_maps(val.images.to(self.device), val.categories,
                                                 {c: lam for c in categories})
                        scores = maps.flatten(1).amax(1)
                        for c in categories:
                            idx = torch.tensor([i for i, v in enumerate(val.categories) if v == c])
                            results[c][lam] = selection.criterion(maps[idx], scores[idx], labels[idx],
                                                                  val.masks[idx])
                    for c in categories:
                        chosen = selection.choose(results[c], s.noise_strength)
                        per_cat[c] = {"lambda": chosen, "source": sources[c],
                                      "images": int(sum(v == c for v in val.categories)),
                                      "candidates": {str(lam): {k: round(v, 4) for k, v in r.items()}
                                                     for lam, r in results[c].items()}}
                position.extra["per_category"] = per_cat
            per_cat = dict(position.extra.get("per_category", {}))
        self.strengths = {c: float(v["lambda"]) for c, v in per_cat.items()}
        return {"selection": s.lambda_selection, "criterion": "mean of image and pixel AUROC on pseudo-validation "
                "images (augmented copies, half with a pasted fragment)", "candidates": candidates,
                "per_category": per_cat, "held_out": {c: [holdout.samples[i].key for i in v] for c, v in held.items()},
                "explicit": fixed}

    # ------------------------------------------------------------------ inference

    def noise_strength(self, category: str) -> float:
        """λ of ``category``: ``noise_strength_per_category``, else the chosen one, else ``noise_strength``."""
        explicit = dict(self.settings.noise_strength_per_category)
        if category in explicit:
            return float(explicit[category])
        return float(self.strengths.get(category, self.settings.noise_strength))

    def timesteps(self, strength: float) -> list[int]:
        """The timesteps one inpainting visits at ``strength`` (few in a fast dev run)."""
        s = self.settings
        steps = sampling.inference_timesteps(strength, s.denoising_steps, s.step_schedule, len(self.abar))
        return steps[:FAST_DEV_STEPS] if self.dev_run else steps

    def scales(self) -> tuple[int, ...]:
        """Grid scales used by predict (only the first in a fast dev run)."""
        return tuple(self.settings.scales[:1]) if self.dev_run else tuple(self.settings.scales)

    def _denoising_info(self, categories: Sequence[str]) -> dict[str, Any]:
        s = self.settings
        per_cat = {}
        for c in categories:
            lam = self.noise_strength(c)
            steps = self.timesteps(lam)
            per_cat[c] = {"lambda": lam, "start_timestep": steps[0] if steps else None,
                          "start_step_paper": int(round(lam * len(self.abar))), "steps_run": len(steps)}
        return {"denoising": {"step_schedule": s.step_schedule, "denoising_steps": s.denoising_steps,
                              "sampler": "DDIM (eta = 0)", "per_category": per_cat, "dev_run_limits": self.dev_run}}

    @torch.no_grad()
    def inpaint(self, images: torch.Tensor, masks: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor,
                cond: torch.Tensor, strength: float) -> torch.Tensor:
        """Inpaint ``images`` under ``masks`` starting from exactly the step ``λ·T`` (Eq. 11); one batch.

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
            (N, 3, H, W) inpainted images in [0, 1], float32.
        """
        steps = self.timesteps(strength)
        with self._autocast():
            if not steps:
                return self.decode(latents)
            z_masked = self.encode_masked(images, masks)
            z = sampling.add_noise(latents.float(), noise, steps[0], self.abar)
            guidance = self.settings.guidance_scale
            uncond = self.encode_prompts([""]).expand(cond.shape[0], -1, -1) if guidance > 1 else None
            # The timesteps go to the device once: an int would be copied there at every UNet call.
            on_device = torch.tensor(steps, device=z.device, dtype=torch.long)
            for i, t in enumerate(steps):
                inp = self.unet_input(z, masks, z_masked)
                if uncond is None:
                    eps = self.unet(inp, on_device[i], encoder_hidden_states=cond).sample
                else:
                    both = self.unet(torch.cat([inp, inp]), on_device[i],
                                     encoder_hidden_states=torch.cat([uncond, cond])).sample
                    eps_u, eps_c = both.float().chunk(2)
                    eps = eps_u + guidance * (eps_c - eps_u)
                z = sampling.ddim_step(z.float(), eps.float(), t, steps[i + 1] if i + 1 < len(steps) else None,
                                       self.abar)
            return self.decode(z)

    def _distances(self, images, feats, masks, latents, noise, cond, strength, owner) -> torch.Tensor:
        """``D(x, x̂)`` for pairs (image ``owner[i]``, mask ``i``), ``inpaint_batch`` at a time; (N, H, W).

        ``feats`` are the images' LPIPS features, computed once and shared by all their masks; the
        distance is computed in float32.
        """
        chunk = self.settings.inpaint_batch
        out = []
        for a in range(0, masks.shape[0], chunk):
            idx = owner[a:a + chunk]
            x_hat = self.inpaint(images[idx], masks[a:a + chunk], latents[idx], noise[idx], cond[idx], strength)
            out.append(feature_distance(self.lpips, [f[idx] for f in feats], lpips_features(self.lpips, x_hat),
                                        images.shape[-2:]))
        return torch.cat(out)

    @torch.no_grad()
    def score_maps(self, images: torch.Tensor, categories: Sequence[str], strength: float,
                   seeds: Sequence[int] | None = None) -> dict[str, Any]:
        """Unsmoothed maps of images that share one noise strength.

        ``seeds``: one per image (else by position); each image's starting noise comes from its
        own seed mixed with ``inference_seed`` (shared by all its masks), so maps do not depend
        on the batch.

        Returns
        -------
        dict
            ``scales`` (list of (B, H, W) ``S^(k)``, empty when only the prototype branch runs),
            ``multi_scale`` (Eq. 19 or None), ``prototype`` (Eq. 20 or None), ``prototype_masks``
            (or None), ``map`` (Eq. 21, or the one branch ``anomaly_map`` asks for).
        """
        s = self.settings
        b, _, height, width = images.shape
        with self._autocast():
            latents = self.encode(images).float()
        noise = ImageNoise(seeds, b, latents.device, base=s.inference_seed).randn_like(latents)
        cond = torch.stack([self.prompt_embedding(c) for c in categories])
        feats = lpips_features(self.lpips, images)
        per_scale, multi = [], None
        with_banks = self.uses_prototypes and all(c in self.banks for c in categories)
        if s.anomaly_map != "prototype" or not with_banks:
            for k in self.scales():
                masks = grid_masks(height, width, k, device=images.device)
                n = masks.shape[0]
                # Every (image, patch) pair of the scale in one flat batch, image-major.
                owner = torch.arange(b, device=images.device).repeat_interleave(n)
                dist = self._distances(images, feats, masks.repeat(b, 1, 1), latents, noise, cond, strength, owner)
                per_scale.append(scale_map(masks, dist.view(b, n, height, width)))
            multi = harmonic_mean(per_scale)
        proto, proto_masks = None, None
        if with_banks and s.anomaly_map != "multi_scale":
            psi = self.features(images)
            errors = []
            for i, c in enumerate(categories):
                d, _ = nearest_neighbour_distance(psi[i].flatten(1).T, self.banks[c], k=1)
                errors.append((d[:, 0] ** 2).view(psi.shape[-2:]))
            proto_masks = prototype_mask(torch.stack(errors), (height, width))
            owner = torch.arange(b, device=images.device)
            proto = proto_masks * self._distances(images, feats, proto_masks, latents, noise, cond, strength, owner)
        if s.anomaly_map == "prototype" and proto is not None:
            final = proto
        elif s.anomaly_map == "multi_scale" or proto is None:
            final = multi
        else:
            final = fuse(multi, proto, s.alpha)
        return {"scales": per_scale, "multi_scale": multi, "prototype": proto, "prototype_masks": proto_masks,
                "map": final}

    @torch.no_grad()
    def anomaly_maps(self, images: torch.Tensor, categories: Sequence[str],
                     strengths: Mapping[str, float] | None = None, seeds: Sequence[int] | None = None) -> torch.Tensor:
        """Smoothed final maps (B, H, W), float32; images grouped by their category's λ.

        ``seeds``: one per image (else by position in ``images``)."""
        seeds = list(range(images.shape[0])) if seeds is None else list(seeds)
        maps = torch.zeros(images.shape[0], *images.shape[-2:], device=images.device)
        lams = [float(strengths[c]) if strengths and c in strengths else self.noise_strength(c) for c in categories]
        for lam in sorted(set(lams)):
            idx = [i for i, v in enumerate(lams) if v == lam]
            maps[idx] = self.score_maps(images[idx], [categories[i] for i in idx], lam,
                                        [seeds[i] for i in idx])["map"].float()
        return gaussian_blur(maps, self.settings.smoothing_sigma)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, categories: Sequence[str],
                seeds: Sequence[int] | None = None) -> Prediction:
        """Anomaly maps (Eq. 21, Gaussian-smoothed) and image scores (their maxima), float32.

        ``seeds``: one per image (the runner's), so predictions do not depend on the batch."""
        maps = self.anomaly_maps(images.to(self.device).float(), categories, seeds=seeds)
        return Prediction(maps, maps.flatten(1).amax(1))

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Networks plus banks, chosen λ, latent scale, tokenizer source and the dev-run flag."""
        state = super().state_dict()
        state.update({"banks": {c: b.cpu() for c, b in self.banks.items()}, "latent_scale": self.latent_scale,
                      "tokenizer_source": self.tokenizer_source, "strengths": dict(self.strengths),
                      "dev_run": bool(self.dev_run)})
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        super().load_state_dict(state)
        self.banks = {c: b.to(self.device) for c, b in state["banks"].items()}
        self.latent_scale = float(state["latent_scale"])
        self.tokenizer_source = str(state["tokenizer_source"])
        self.strengths = {str(c): float(v) for c, v in dict(state.get("strengths", {})).items()}
        self.dev_run = bool(state.get("dev_run", False))
        self._tokenizer = None
        self._prompt_cache = {}


__all__ = ["AnomalySD", "CHARACTER_TOKENIZER"]
