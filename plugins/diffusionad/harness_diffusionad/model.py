"""DiffusionAD as a harness method: joint training on synthetic anomalies, one-step denoising inference.

Diffusion arithmetic (the authors' ``models/DDPM.py``)
    Images are diffused in [0, 1], as the authors' data loaders give them (``pixel_range="unit"``;
    ``"symmetric"`` maps them to [-1, 1] first, the DDPM convention). The schedule has ``T`` linear
    betas from ``beta_start`` to ``beta_end`` (scaled by 1000 / T as the authors'
    ``get_beta_schedule``), computed in float64 and cast to float32 when used.
    ``q(x_t | x_0) = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` and the one-step estimate
    ``x0_hat = clamp(sqrt(1 / abar_t) x_t - sqrt(1 / abar_t - 1) eps_theta, -1, 1)``; the clamp to
    [-1, 1] (not [0, 1]) is the authors', kept in both ranges (``x0_clamp="symmetric"``); the
    paper's Algorithms 1 and 2 do not clamp (``x0_clamp="none"``, the ``paper_text`` profile).

Training (``training="norm_guided"``: the authors' ``train.py`` and ``norm_guided_one_step_denoising``)
    Batches come from DataLoader workers (:mod:`harness_diffusionad.synthesis`): each image is
    replaced by a synthetic anomaly with probability 1/2 (``anomaly_sampling="coin"``; ``"half"``
    makes exactly half of every batch synthetic, as the paper's text: 3 normal and 3 synthetic).
    Every image is noised at ``t_n ~ U[0, normal_t_range)`` and ``t_h ~ U[normal_t_range, T)``; the
    noise loss is the per-image MSE at both levels, summed, averaged over the *normal* images only
    (``noise_loss_on="normal"``; zero when a batch has none). The estimate from ``t_h`` is
    re-noised to ``t_n`` with ``t_n``'s predicted noise and the difference to the actual noisy
    input corrects that noise (the norm guidance, below); the segmentation network gets
    (image, norm-guided estimate) and is trained with ``focal_weight * focal + smooth_l1_weight
    * smooth L1`` against the synthetic mask. Both networks are trained jointly on the sum, each
    with its own Adam (1e-4 UNet, 1e-5 segmentation), the segmentation learning rate following
    ``CosineAnnealingLR(T_max=10)`` stepped every batch, as the authors' code.
    ``training="single_level"`` is Algorithm 1 of the paper's text instead: one level
    ``t ~ U[1, T)``, segmentation on the plain one-step estimate (with ``noise_loss_on="all"``,
    Eq. 6's noise loss on every image).

Inference (``eval.py``, ``norm_guided_one_step_denoising_eval``)
    The query is noised to the two ``levels`` with fresh Gaussian noise (each image's own stream,
    its runner seed mixed with ``inference_seed``; the lower level's noise is drawn first) and the
    UNet predicts both noises. ``combination="norm_guided"`` (code, levels 200 / 400):
    ``eps_hat = eps_n - sqrt(1 - abar_n) w (q(x0_hat_h, t_n, eps_n) - x_n)`` and one segmentation
    of (query, x0_hat(eps_hat)); ``combination="average"`` (the paper's text, levels 100 / 200):
    the segmentations of (query, x0_hat) at both levels, averaged. The map is the segmentation
    output at the input size; the image score the mean of its ``top_k`` (50) largest values.

The ``paper`` profile follows the authors' code (``args/args1.json``) where it and the paper's
text disagree; the ``paper_text`` profile follows the text (500 epochs, batch 6 = 3 + 3,
one learning rate 1e-4, Algorithm 1 training, two of the paper's seven augmentations, the uniform
8 x 8 shuffle, no clamp, levels 100 / 200 averaged).
The authors' ``train.py`` selects its checkpoint on the *test set* (``train.py`` evaluates every 50
epochs and keeps the best image + pixel AUROC); a reproduction here keeps the final epoch. Their
checkpoints can be scored as they are with ``official_checkpoints`` (training is skipped).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch

from harness import Method, Prediction
from harness.toolkit.noise import ImageNoise
from harness.toolkit.precision import autocast
from harness_diffusionad.networks import SegmentationSubNetwork, build_denoiser
from harness_diffusionad.training import FAST_DEV_TRAIN_BATCH, DiffusionADTraining, binary_focal_loss

def linear_betas(steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """The authors' linear schedule: ``linspace(s * beta_start, s * beta_end, steps)`` in float64, ``s = 1000 / steps``."""
    scale = 1000 / steps
    return np.linspace(scale * beta_start, scale * beta_end, steps, dtype=np.float64)


class Schedule:
    """Coefficients of the forward process, in float64, cast to float32 where used (as the authors').

    Parameters
    ----------
    betas : numpy.ndarray
        (T,) float64.
    clamp : bool
        Clamp one-step estimates to [-1, 1] (the authors' code) or not (the paper's text).
    """

    def __init__(self, betas: np.ndarray, clamp: bool = True) -> None:
        self.betas = np.asarray(betas, dtype=np.float64)
        self.clamp = bool(clamp)
        abar = np.cumprod(1.0 - self.betas)
        self.alphas_cumprod = abar
        self._coef = {
            "sqrt_abar": np.sqrt(abar), "sqrt_one_minus_abar": np.sqrt(1.0 - abar),
            "sqrt_recip_abar": np.sqrt(1.0 / abar), "sqrt_recipm1_abar": np.sqrt(1.0 / abar - 1),
        }
        self._tensors = {k: torch.from_numpy(v) for k, v in self._coef.items()}

    @property
    def steps(self) -> int:
        """T."""
        return len(self.betas)

    def coef(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Coefficient ``name`` at timesteps ``t`` (B,), float32, shaped to broadcast against ``like``.

        The tables are copied to a device once and kept there: indexing them is then a device
        gather, with no host copy per call.
        """
        values = self._on(t.device)[name][t].float()
        return values.view(-1, *([1] * (like.dim() - 1))).to(like.device)

    def _on(self, device: torch.device) -> dict[str, torch.Tensor]:
        cache = self.__dict__.setdefault("_device_tensors", {})
        if device not in cache:
            cache[device] = {k: v.to(device) for k, v in self._tensors.items()}
        return cache[device]

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``."""
        return self.coef("sqrt_abar", t, x0) * x0 + self.coef("sqrt_one_minus_abar", t, x0) * noise

    def x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """One-step estimate of the clean image, clamped to [-1, 1] as the authors' (unless ``clamp`` is off)."""
        x0 = self.coef("sqrt_recip_abar", t, x_t) * x_t - self.coef("sqrt_recipm1_abar", t, x_t) * eps
        return x0.clamp(-1, 1) if self.clamp else x0


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


class DiffusionAD(DiffusionADTraining, Method):
    """DiffusionAD (Zhang et al.): a denoising UNet and a segmentation U-Net trained jointly.

    See the module docstring for training and inference and :mod:`harness_diffusionad.plugin`
    for the settings.

    Parameters
    ----------
    settings : Settings
        Resolved settings. Building reads no file, so it works under ``torch.device("meta")``.
    """

    def __init__(self, settings: Mapping[str, Any]) -> None:
        super().__init__(settings)
        s = self.settings
        if len(s.levels) != 2 or s.levels[0] >= s.levels[1]:
            raise ValueError(f"levels must be two increasing noise levels, got {s.levels!r}")
        if not 0 < s.normal_t_range < s.T or s.levels[1] >= s.T:
            raise ValueError(f"need 0 < normal_t_range < T and levels below T (T={s.T}, normal_t_range="
                             f"{s.normal_t_range}, levels={s.levels})")
        self.denoiser = build_denoiser(
            self.input_size[0], base_channels=s.base_channels, channel_mults=s.channel_mults,
            layers_per_block=s.layers_per_block, attention_resolutions=s.attention_resolutions,
            num_heads=s.num_heads, time_conditioning=s.time_conditioning, resample=s.resample,
            norm_groups=s.norm_groups, dropout=s.dropout, init=s.denoiser_init)
        if s.gradient_checkpointing:
            self.denoiser.enable_gradient_checkpointing()
        self.segmenter = SegmentationSubNetwork(6, 1, base_channels=s.seg_base_channels, depth=s.seg_depth)
        self.schedule = Schedule(linear_betas(s.T, s.beta_start, s.beta_end), clamp=s.x0_clamp == "symmetric")

    def networks(self) -> Mapping[str, torch.nn.Module]:
        """The denoising UNet and the segmentation U-Net."""
        return {"denoiser": self.denoiser, "segmenter": self.segmenter}

    # ------------------------------------------------------------------ the one-step estimates

    def to_model_range(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> the range they are diffused in (``pixel_range``)."""
        return images if self.settings.pixel_range == "unit" else images * 2 - 1

    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The UNet's noise prediction, float32 whatever the precision."""
        with autocast(x_t.device, self.settings.precision):
            return self.denoiser(x_t, t).sample.float()

    def estimates(self, x0: torch.Tensor, t_low: torch.Tensor, t_high: torch.Tensor,
                  noise_low: torch.Tensor | None = None, noise_high: torch.Tensor | None = None,
                  generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """The authors' norm-guided one-step denoising of ``x0`` from two noise levels.

        Parameters
        ----------
        x0 : torch.Tensor
            (B, 3, H, W) in the diffusion range.
        t_low, t_high : torch.Tensor
            (B,) long noise levels (the authors' ``normal_t`` and ``noisier_t``).
        noise_low, noise_high : torch.Tensor, optional
            The forward-process noise at each level; drawn from ``generator`` (low first) when
            omitted.
        generator : torch.Generator, optional

        Returns
        -------
        dict
            ``x_low``, ``x_high`` (noisy inputs), ``eps_low``, ``eps_high`` (UNet outputs),
            ``x0_high``, ``x0_low`` (plain estimates), ``x_high_to_low`` (the high estimate
            re-noised to ``t_low`` with ``eps_low``), ``guided`` (the norm-guided estimate),
            ``mse_low``, ``mse_high`` (B,) noise-prediction MSEs.
        """
        sched = self.schedule
        if noise_low is None:
            noise_low = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        if noise_high is None:
            noise_high = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_low, x_high = sched.q_sample(x0, t_low, noise_low), sched.q_sample(x0, t_high, noise_high)
        # Both levels go through the UNet as one batch: GroupNorm works per sample, so this equals
        # the authors' two calls, and one call halves the per-call overhead of small models.
        eps_low, eps_high = self.predict_noise(torch.cat([x_low, x_high]), torch.cat([t_low, t_high])).chunk(2)
        x0_high = sched.x0_from_eps(x_high, t_high, eps_high)
        x_high_to_low = sched.q_sample(x0_high, t_low, eps_low)
        w = self.settings.guidance_weight
        eps_hat = eps_low - sched.coef("sqrt_one_minus_abar", t_low, x0) * w * (x_high_to_low - x_low)
        return {
            "x_low": x_low, "x_high": x_high, "eps_low": eps_low, "eps_high": eps_high, "x0_high": x0_high,
            "x0_low": sched.x0_from_eps(x_low, t_low, eps_low), "x_high_to_low": x_high_to_low,
            "guided": sched.x0_from_eps(x_low, t_low, eps_hat),
            "mse_low": (eps_low - noise_low).square().flatten(1).mean(1),
            "mse_high": (eps_high - noise_high).square().flatten(1).mean(1),
        }

    def segment_pair(self, x0: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        """The segmentation network on (image, reconstruction): (B, 1, H, W) float32 in (0, 1)."""
        with autocast(x0.device, self.settings.precision):
            return self.segmenter(torch.cat([x0, reconstruction], dim=1)).float()

    def segment(self, x0: torch.Tensor, est: Mapping[str, torch.Tensor], combination: str) -> torch.Tensor:
        """Anomaly maps (B, 1, H, W) from the query and its estimates, by ``combination``."""
        if combination == "norm_guided":
            return self.segment_pair(x0, est["guided"])
        return 0.5 * (self.segment_pair(x0, est["x0_low"]) + self.segment_pair(x0, est["x0_high"]))

    # ------------------------------------------------------------------ inference

    @torch.no_grad()
    def predict(self, images: torch.Tensor, categories: Sequence[str],
                seeds: Sequence[int] | None = None) -> Prediction:
        """Segment each query against its one-step reconstructions.

        Parameters
        ----------
        images : torch.Tensor
            (B, 3, H, W) in [0, 1].
        categories : sequence of str
            Unused: one model serves every category of the fit.
        seeds : sequence of int, optional
            One per image (the runner's): each image's forward-diffusion noise is drawn from its
            own seed mixed with ``inference_seed``, so predictions do not depend on the batch.

        Returns
        -------
        Prediction
            Maps (B, H, W) in [0, 1] and top-``k`` mean scores, float32.
        """
        s = self.settings
        x0 = self.to_model_range(images.to(self.device).float())
        b = x0.shape[0]
        noise = ImageNoise(seeds, b, x0.device, base=s.inference_seed)
        t_low = torch.full((b,), s.levels[0], device=x0.device, dtype=torch.long)
        t_high = torch.full((b,), s.levels[1], device=x0.device, dtype=torch.long)
        est = self.estimates(x0, t_low, t_high, noise_low=noise.randn_like(x0), noise_high=noise.randn_like(x0))
        maps = self.segment(x0, est, s.combination)[:, 0]
        return Prediction(maps.float(), top_k_mean(maps, s.top_k).float())


def param_millions(method: DiffusionAD) -> dict[str, float]:
    """Parameters of each network in millions (for reports and tests)."""
    return {k: v / 1e6 for k, v in method.parameter_count().items()}


__all__ = ["DiffusionAD", "Schedule", "linear_betas", "top_k_mean", "binary_focal_loss", "param_millions",
           "FAST_DEV_TRAIN_BATCH"]
