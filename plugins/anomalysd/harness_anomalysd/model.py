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

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from harness import FitContext, Method
from harness.toolkit.backbones import create_features, load_weights
from harness.toolkit.ops import imagenet_normalize
from harness.toolkit.precision import autocast
from harness.toolkit.weightfiles import sha256_file
from harness_anomalysd import sampling
from harness_anomalysd.prompts import load_prompt_sets
from harness_anomalysd.scoring import (ALEXNET_SHA256_PREFIX, build_lpips, load_alexnet_trunk, lpips_linear_weights)
from harness_anomalysd.networks import build_components, character_tokenizer, load_components, load_tokenizer
from harness_anomalysd.inference import AnomalySDInference
from harness_anomalysd.training import AnomalySDTraining
from harness_anomalysd.weightfiles import ALEXNET, backbone_file, sd_file

#: Tokenizer source recorded in the state when the tokenizer is generated, not read from a folder.
CHARACTER_TOKENIZER = "character"


class AnomalySD(AnomalySDTraining, AnomalySDInference, Method):
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

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Eq. 12: ``ψ(x) = [φ2(x); Upsample(φ3(x))]``, (B, D, h, w) on stage 2's grid (float32)."""
        with self._autocast():
            f2, f3 = self.backbone(imagenet_normalize(images))[:2]
        f2, f3 = f2.float(), f3.float()
        return torch.cat([f2, F.interpolate(f3, size=f2.shape[-2:], mode="bilinear", align_corners=False)], 1)

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
