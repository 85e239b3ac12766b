"""DiffusionAD as a harness method: training on synthetic anomalies, one-step denoising inference.

Training (per batch, following the authors' ``train.py``)
    Half of the batch gets a synthetic anomaly (:mod:`harness_diffusionad.synthesis`). Every image
    ``x`` (in [-1, 1]) is noised at a low level ``t_n ~ U[0, normal_t_range)`` and a high level
    ``t_h ~ U[normal_t_range, T)``; the UNet predicts the noise at both. The noise loss is the MSE
    at both levels over the *normal* images only (zero if there are none). The norm-guided
    estimate of the clean image (below) and the input are fed to the segmentation network, whose
    output is compared with the synthetic mask by ``focal_weight * focal + smooth_l1_weight *
    smooth L1``. Both networks are trained jointly on the sum, each with its own Adam optimiser
    (code: 1e-4 for the UNet, 1e-5 for the segmentation net, whose learning rate follows a cosine
    schedule restarted every ``2 * seg_cosine_tmax`` steps, as the code's ``CosineAnnealingLR``
    stepped per batch does).

Inference
    The query is noised to the two ``levels`` (fresh Gaussian noise, seeded) and the UNet gives a
    one-step estimate of the clean image at each. ``combination`` selects how they are combined:

    - ``"norm_guided"`` (authors' code, the ``paper`` profile, levels (200, 400)): the estimate
      from the higher level is re-noised to the lower level with the lower level's predicted
      noise; the difference to the actual noisy image at the lower level corrects the predicted
      noise, ``eps_hat = eps_n - sqrt(1 - abar_n) * w * (x_h->n - x_n)``, and one segmentation is
      run on (query, x0(eps_hat)).
    - ``"average"`` (the paper's text, levels (100, 200)): the segmentation is run on (query,
      x0 estimate) at each level and the two maps are averaged.

    The anomaly map is the segmentation output at the input size; the image score is the mean of
    its ``top_k`` (50) largest values.

The paper says levels 100 and 200 with averaging, the code uses 200 and 400 with the norm-guided
combination; ``paper`` follows the code, and both choices are settings. The noise schedule (T =
1000, linear betas 1e-4 to 0.02) comes from diffusers' ``DDPMScheduler``.
"""

from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from harness import FitContext, Method, Prediction, TrainSet
from harness_diffusionad.networks import SegmentationSubNetwork, build_denoiser
from harness_diffusionad.synthesis import TextureSource, synthesize_batch

COMBINATIONS = ("norm_guided", "average")


def top_k_mean(maps: torch.Tensor, k: int = 50) -> torch.Tensor:
    """Image scores: the mean of the ``k`` largest values of each map.

    Parameters
    ----------
    maps : torch.Tensor
        (B, H, W) or (B, 1, H, W).
    k : int
        Values averaged; all values when a map has fewer.

    Returns
    -------
    torch.Tensor
        (B,).
    """
    flat = maps.reshape(maps.shape[0], -1)
    return flat.topk(min(int(k), flat.shape[1]), dim=1).values.mean(dim=1)


def binary_focal_loss(pred: torch.Tensor, target: torch.Tensor, alpha: float = 0.5, gamma: float = 4.0) -> torch.Tensor:
    """Focal loss on probabilities (not logits), averaged over pixels.

    Parameters
    ----------
    pred : torch.Tensor
        Probabilities in (0, 1).
    target : torch.Tensor
        Same shape, in {0, 1}.
    alpha, gamma : float
        Constant weight and focusing exponent (the code uses 0.5 and 4).

    Returns
    -------
    torch.Tensor
        Scalar.
    """
    bce = F.binary_cross_entropy(pred.clamp(1e-6, 1 - 1e-6), target, reduction="none")
    p_true = torch.exp(-bce)
    return (alpha * (1 - p_true) ** gamma * bce).mean()


class DiffusionAD(Method):
    """DiffusionAD (Zhang et al.): a denoising UNet and a segmentation U-Net trained jointly.

    See the module docstring for training and inference; ``settings`` are documented in
    :data:`harness_diffusionad.plugin.SETTINGS_HELP`.

    Parameters
    ----------
    settings : mapping
        A resolved profile. Building reads no file, so it works under ``torch.device("meta")``.
    """

    def __init__(self, settings: Mapping[str, Any]) -> None:
        super().__init__(settings)
        s = self.settings
        if s["combination"] not in COMBINATIONS:
            raise ValueError(f"combination must be one of {COMBINATIONS}, not {s['combination']!r}")
        if len(s["levels"]) != 2:
            raise ValueError(f"levels must hold two noise levels, got {s['levels']!r}")
        self.denoiser = build_denoiser(
            self.input_size[0], base_channels=s["base_channels"], channel_mults=s["channel_mults"],
            layers_per_block=s["layers_per_block"], attention_resolutions=s["attention_resolutions"],
            num_heads=s["num_heads"], time_conditioning=s["time_conditioning"], resample=s["resample"],
            norm_groups=s["norm_groups"])
        self.segmenter = SegmentationSubNetwork(6, 1, base_channels=s["seg_base_channels"], depth=s["seg_depth"])
        self.scheduler = DDPMScheduler(num_train_timesteps=s["T"], beta_start=s["beta_start"], beta_end=s["beta_end"],
                                       beta_schedule="linear")

    def networks(self) -> Mapping[str, torch.nn.Module]:
        """The denoising UNet and the segmentation U-Net."""
        return {"denoiser": self.denoiser, "segmenter": self.segmenter}

    # ------------------------------------------------------------------ diffusion arithmetic

    def _abar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Cumulative alpha at ``t``, shaped to broadcast against ``like``."""
        abar = self.scheduler.alphas_cumprod.to(device=like.device, dtype=like.dtype)[t]
        return abar.view(-1, *([1] * (like.dim() - 1)))

    def _noised(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Sample q(x_t | x_0) with the given noise."""
        return self.scheduler.add_noise(x0, noise, t)

    def _x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """One-step estimate of the clean image from the noise prediction, clipped to [-1, 1]."""
        abar = self._abar(t, x_t)
        return ((x_t - (1 - abar).sqrt() * eps) / abar.sqrt()).clamp(-1, 1)

    def _predict_noise(self, x0: torch.Tensor, t: torch.Tensor, generator: torch.Generator | None = None):
        """Noise ``x0`` to level ``t`` and predict the noise: (x_t, true noise, predicted noise)."""
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = self._noised(x0, t, noise)
        return x_t, noise, self.denoiser(x_t, t).sample

    def estimates(self, x0: torch.Tensor, t_low: torch.Tensor, t_high: torch.Tensor,
                  generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """One-step clean-image estimates of ``x0`` from two noise levels.

        Parameters
        ----------
        x0 : torch.Tensor
            (B, 3, H, W) in [-1, 1].
        t_low, t_high : torch.Tensor
            (B,) long noise levels, ``t_low < t_high``.
        generator : torch.Generator, optional
            Source of the forward-diffusion noise.

        Returns
        -------
        dict
            ``low`` and ``high`` (plain estimates), ``guided`` (norm-guided estimate at ``t_low``),
            ``noise_mse`` (B,): the noise-prediction MSE at both levels, summed.
        """
        # Both levels go through the UNet as one batch: GroupNorm makes this exact, and one call
        # instead of two halves the per-call overhead that dominates small models.
        x_both, n_both, eps_both = self._predict_noise(torch.cat([x0, x0]), torch.cat([t_low, t_high]), generator)
        (x_low, x_high), (n_low, n_high), (eps_low, eps_high) = (v.chunk(2) for v in (x_both, n_both, eps_both))
        x0_high = self._x0_from_eps(x_high, t_high, eps_high)
        # Bring the high-level estimate down to the low level with the low level's predicted noise;
        # its deviation from the actual low-level input pulls the noise estimate towards "normal".
        x_high_to_low = self._noised(x0_high, t_low, eps_low)
        w = float(self.settings["guidance_weight"])
        eps_hat = eps_low - (1 - self._abar(t_low, x0)).sqrt() * w * (x_high_to_low - x_low)
        mse = ((eps_low - n_low) ** 2).flatten(1).mean(1) + ((eps_high - n_high) ** 2).flatten(1).mean(1)
        return {"low": self._x0_from_eps(x_low, t_low, eps_low), "high": x0_high,
                "guided": self._x0_from_eps(x_low, t_low, eps_hat), "noise_mse": mse}

    def segment(self, x0: torch.Tensor, est: Mapping[str, torch.Tensor], combination: str) -> torch.Tensor:
        """Anomaly maps (B, 1, H, W) from the query and its estimates, by ``combination``."""
        if combination == "norm_guided":
            return self.segmenter(torch.cat([x0, est["guided"]], dim=1))
        return 0.5 * (self.segmenter(torch.cat([x0, est["low"]], dim=1))
                      + self.segmenter(torch.cat([x0, est["high"]], dim=1)))

    # ------------------------------------------------------------------ training

    def _synthesis_kwargs(self) -> dict[str, Any]:
        s = self.settings
        return {"foreground": s["foreground"], "texture_categories": tuple(s["texture_categories"]),
                "scale_exp": tuple(s["perlin_scale_exp"]), "threshold": float(s["perlin_threshold"]),
                "beta_range": tuple(s["beta_range"])}

    def train_step(self, images: torch.Tensor, categories: Sequence[str], rng: np.random.Generator,
                   textures: TextureSource, optimisers: Sequence[torch.optim.Optimizer]) -> dict[str, float]:
        """One joint optimisation step on a batch of normal images.

        Parameters
        ----------
        images : torch.Tensor
            (B, 3, H, W) in [0, 1], on :attr:`device`.
        categories : sequence of str
        rng : numpy.random.Generator
            Drives the anomaly synthesis.
        textures : TextureSource
        optimisers : sequence of torch.optim.Optimizer

        Returns
        -------
        dict
            The loss terms as floats.
        """
        s = self.settings
        aug, masks, labels = synthesize_batch(images, categories, rng, textures, **self._synthesis_kwargs())
        x0 = aug * 2 - 1
        b = x0.shape[0]
        split = int(s["normal_t_range"])
        t_low = torch.randint(0, split, (b,), device=x0.device)
        t_high = torch.randint(split, int(s["T"]), (b,), device=x0.device)
        est = self.estimates(x0, t_low, t_high)
        normal = labels == 0
        # The noise loss is taken on normal images only, so the UNet learns to reconstruct normality.
        noise_loss = est["noise_mse"][normal].mean() if normal.any() else x0.new_zeros(())
        pred = self.segmenter(torch.cat([x0, est["guided"]], dim=1))
        focal = binary_focal_loss(pred, masks, s["focal_alpha"], s["focal_gamma"])
        smooth = F.smooth_l1_loss(pred, masks)
        loss = noise_loss + s["focal_weight"] * focal + s["smooth_l1_weight"] * smooth
        for opt in optimisers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in optimisers:
            opt.step()
        return {"loss": loss.item(), "noise": noise_loss.item(), "focal": focal.item(), "smooth_l1": smooth.item()}

    def fit(self, train: TrainSet, context: FitContext) -> None:
        """Train both networks jointly on the normal training images (all categories at once).

        Parameters
        ----------
        train : TrainSet
        context : FitContext
        """
        s = self.settings
        textures = TextureSource(s.get("dtd_root") or None, self.input_size)
        opt_unet = torch.optim.Adam(self.denoiser.parameters(), lr=s["lr_denoiser"], weight_decay=s["weight_decay"])
        opt_seg = torch.optim.Adam(self.segmenter.parameters(), lr=s["lr_segmenter"], weight_decay=s["weight_decay"])
        tmax = int(s["seg_cosine_tmax"])
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt_seg, T_max=tmax) if tmax > 0 else None
        rng = np.random.default_rng(context.seed)
        self.denoiser.train()
        self.segmenter.train()
        batch_size = min(int(s["batch_size"]), len(train))
        steps, start, last = 0, time.perf_counter(), {}
        for epoch in context.progress.epochs(int(s["epochs"])):
            for images, cats in train.batches(batch_size, shuffle=True, seed=context.seed * 100003 + epoch):
                if images.shape[0] < 2 and len(train) >= 2:
                    continue  # a lone leftover image cannot be split into normal and synthetic halves
                last = self.train_step(images.to(self.device), cats, rng, textures, (opt_unet, opt_seg))
                if sched is not None:
                    sched.step()
                steps += 1
        self.eval()
        context.info.update({
            "levels": [int(v) for v in s["levels"]], "combination": s["combination"],
            "guidance_weight": float(s["guidance_weight"]), "epochs": int(s["epochs"]), "steps": steps,
            "batch_size": batch_size, "synthesis_source": textures.kind, "foreground_rule": s["foreground"],
            "train_seconds": round(time.perf_counter() - start, 2), "pretrained": False,
            "final_losses": {k: round(v, 5) for k, v in last.items()},
        })

    # ------------------------------------------------------------------ inference

    @torch.no_grad()
    def predict(self, images: torch.Tensor, categories: Sequence[str]) -> Prediction:
        """Segment each query against its one-step reconstructions.

        Parameters
        ----------
        images : torch.Tensor
            (B, 3, H, W) in [0, 1].
        categories : sequence of str
            Unused: one model serves every category.

        Returns
        -------
        Prediction
            Maps (B, H, W) in [0, 1] and top-``k`` mean scores.
        """
        s = self.settings
        x0 = images.to(self.device).float() * 2 - 1
        b = x0.shape[0]
        low, high = sorted(int(v) for v in s["levels"])
        generator = torch.Generator(device=x0.device).manual_seed(int(s["inference_seed"]))
        t_low = torch.full((b,), low, device=x0.device, dtype=torch.long)
        t_high = torch.full((b,), high, device=x0.device, dtype=torch.long)
        est = self.estimates(x0, t_low, t_high, generator)
        maps = self.segment(x0, est, s["combination"])[:, 0]
        return Prediction(maps.float(), top_k_mean(maps, s["top_k"]).float())


def param_millions(method: DiffusionAD) -> dict[str, float]:
    """Parameters of each network in millions (for reports and tests)."""
    return {k: v / 1e6 for k, v in method.parameter_count().items()}


__all__ = ["DiffusionAD", "top_k_mean", "binary_focal_loss", "param_millions", "COMBINATIONS"]
