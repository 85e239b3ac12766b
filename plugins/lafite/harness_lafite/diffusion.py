"""The diffusion model over the aggregated feature tensor (LafitE, Sections 3.2 and 3.3).

- :func:`build_unet`: the noise predictor ``eps_theta``, a diffusers ``UNet2DModel`` whose input
  and output have the feature tensor's channels (272 for EfficientNet-b4 stages 1-4).
- :func:`build_noise_schedule`: diffusers' ``DDPMScheduler`` with T = 1000 and the cosine
  schedule of Nichol & Dhariwal (``squaredcos_cap_v2``); it gives the forward process
  q(x_t | x_0) (Eqs. 3, 8, 11) through ``add_noise`` and the cumulative alphas.
- :func:`diffusion_loss`: the epsilon-prediction objective (Eq. 6).
- :func:`reconstruct`: noise a tensor to step tau, then denoise it with DDIM (Eq. 7).

Why the DDIM update is written out here rather than taken from ``DDIMScheduler.step``: LafitE
starts the reverse process at an arbitrary corruption step tau (chosen on the pseudo-validation
set) and descends with a chosen number of steps. diffusers' ``DDIMScheduler`` only steps
between the timesteps of an evenly spaced schedule that spans the whole range [0, T), with a
stride of ``T // num_inference_steps``, so a schedule starting exactly at, e.g., tau = 300 in 4
steps cannot be expressed. :func:`ddim_update` is Eq. 7 verbatim (with the square root the
paper's print drops), and the tests check it against ``DDIMScheduler.step`` on the transitions
diffusers can express.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel

from harness.toolkit.noise import ImageNoise


def build_unet(channels: int, grid: int, base_channels: int = 256, channel_mults: Sequence[int] = (1, 2, 3, 4),
               layers_per_block: int = 2, attention_resolutions: Sequence[int] = (16, 8, 4),
               attention_head_dim: int = 32, norm_groups: int = 32, dropout: float = 0.0) -> UNet2DModel:
    """The noise-prediction U-Net over a (channels, grid, grid) feature tensor.

    Parameters
    ----------
    channels : int
        Channels of the aggregated feature tensor (input and output).
    grid : int
        Side of the feature tensor; level ``i`` works at ``grid / 2**i``.
    base_channels : int
        Width of the first level (256 in the paper).
    channel_mults : sequence of int
        Width multiplier per level ((1, 2, 3, 4) in the paper).
    layers_per_block : int
        Residual blocks per level (the paper is silent; 2, as in the latent-diffusion U-Nets with
        multipliers (1, 2, 3, 4) that the paper's sizes mirror).
    attention_resolutions : sequence of int
        Feature-map sides with self-attention after each residual block (paper silent; the
        latent-diffusion configs put it at down-sampling factors 2, 4 and 8, i.e. 16, 8, 4 for a
        32 x 32 tensor). Empty: no attention except the bottleneck's when ``add_attention``.
    attention_head_dim : int
        Width of one attention head (32 in those configs).
    norm_groups : int
        GroupNorm groups; must divide every level's width.
    dropout : float

    Returns
    -------
    diffusers.UNet2DModel
        ``unet(x_t, t).sample`` is the predicted noise.
    """
    widths = tuple(int(base_channels * m) for m in channel_mults)
    for width in widths:
        if width % int(norm_groups):
            raise ValueError(f"norm_groups={norm_groups} must divide every U-Net width {widths}; "
                             "change base_channels or norm_groups")
    if grid % (2 ** (len(widths) - 1)):
        raise ValueError(f"feature_size={grid} must be divisible by 2**{len(widths) - 1} for "
                         f"{len(widths)} U-Net levels; change feature_size or channel_mults")
    attn = {int(r) for r in attention_resolutions}
    sides = [grid // (2 ** level) for level in range(len(widths))]
    down = tuple("AttnDownBlock2D" if side in attn else "DownBlock2D" for side in sides)
    up = tuple("AttnUpBlock2D" if side in attn else "UpBlock2D" for side in reversed(sides))
    return UNet2DModel(
        sample_size=grid, in_channels=channels, out_channels=channels, block_out_channels=widths,
        layers_per_block=int(layers_per_block), down_block_types=down, up_block_types=up,
        attention_head_dim=int(attention_head_dim), norm_num_groups=int(norm_groups), dropout=float(dropout),
        add_attention=bool(attn), time_embedding_type="positional", flip_sin_to_cos=True, freq_shift=0,
    )


def build_noise_schedule(num_train_timesteps: int = 1000, beta_schedule: str = "squaredcos_cap_v2") -> DDPMScheduler:
    """The forward process: T steps of the cosine schedule (features are not clipped).

    Parameters
    ----------
    num_train_timesteps : int
        T (1000 in the paper).
    beta_schedule : str
        A diffusers beta schedule; ``squaredcos_cap_v2`` is the cosine schedule of [27].
    """
    return DDPMScheduler(num_train_timesteps=int(num_train_timesteps), beta_schedule=beta_schedule,
                         clip_sample=False, prediction_type="epsilon")


def diffusion_loss(unet: UNet2DModel, schedule: DDPMScheduler, x0: torch.Tensor,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Eq. 6: MSE between the noise and its prediction at a uniformly drawn step.

    Parameters
    ----------
    unet : UNet2DModel
    schedule : DDPMScheduler
    x0 : torch.Tensor
        (B, C, h, w) clean feature tensors.
    generator : torch.Generator, optional
        Draws the steps and the noise (on ``x0``'s device).

    Returns
    -------
    torch.Tensor
        Scalar loss.
    """
    t = torch.randint(0, schedule.config.num_train_timesteps, (x0.shape[0],), device=x0.device, generator=generator)
    noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    x_t = schedule.add_noise(x0, noise, t)
    return F.mse_loss(unet(x_t, t).sample, noise)


def ddim_update(x_t: torch.Tensor, eps: torch.Tensor, abar_t: float, abar_prev: float, eta: float = 0.0,
                noise: torch.Tensor | None = None) -> torch.Tensor:
    """One DDIM transition x_t -> x_{t - dt} (Eq. 7).

    Parameters
    ----------
    x_t : torch.Tensor
    eps : torch.Tensor
        Predicted noise at step t.
    abar_t, abar_prev : float
        Cumulative alphas at t and at the target step (1.0 for the clean tensor).
    eta : float
        0 gives the deterministic DDIM sampler.
    noise : torch.Tensor, optional
        z_t, required when ``eta > 0``.

    Returns
    -------
    torch.Tensor
    """
    x0_pred = (x_t - (1.0 - abar_t) ** 0.5 * eps) / abar_t ** 0.5
    sigma = eta * ((1.0 - abar_prev) / (1.0 - abar_t)) ** 0.5 * (1.0 - abar_t / abar_prev) ** 0.5
    out = abar_prev ** 0.5 * x0_pred + max(1.0 - abar_prev - sigma ** 2, 0.0) ** 0.5 * eps
    if sigma > 0:
        if noise is None:
            raise ValueError("ddim_update with eta > 0 needs noise")
        out = out + sigma * noise
    return out


def reverse_timesteps(tau: int, steps: int) -> list[int]:
    """The steps at which the U-Net is evaluated: ``steps`` values evenly spaced from tau down.

    The last evaluation jumps to the clean tensor (cumulative alpha 1, like DDIM's
    ``set_alpha_to_one``). Duplicate values (``steps > tau``) are dropped.
    """
    tau, steps = int(tau), max(1, int(steps))
    ts = [int(round(tau * (steps - i) / steps)) for i in range(steps)]
    return sorted(set(ts), reverse=True)


def cumulative_alphas(schedule: DDPMScheduler) -> np.ndarray:
    """The schedule's cumulative alphas as a float64 NumPy array, read from the tensor once.

    DDIM's coefficients are computed from it on the host before the loop, so a denoising step
    reads no tensor (no device sync) and the arithmetic stays in double precision.
    """
    cached = getattr(schedule, "_harness_abar64", None)
    if cached is None:
        cached = schedule.alphas_cumprod.detach().cpu().double().numpy()
        schedule._harness_abar64 = cached
    return cached


def _randn_like(x: torch.Tensor, generator: torch.Generator | ImageNoise | None) -> torch.Tensor:
    if isinstance(generator, ImageNoise):
        return generator.randn_like(x)
    return torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)


@torch.no_grad()
def reconstruct(unet: UNet2DModel, schedule: DDPMScheduler, start: torch.Tensor, tau: int, steps: int,
                eta: float = 0.0, generator: torch.Generator | ImageNoise | None = None) -> torch.Tensor:
    """Corrupt ``start`` to step tau (Eq. 8 / 11) and denoise it with DDIM (Eq. 7).

    Parameters
    ----------
    unet : UNet2DModel
    schedule : DDPMScheduler
        Gives the cumulative alphas and ``add_noise``.
    start : torch.Tensor
        (B, C, h, w): the feature tensor x_0, or the edited tensor e.
    tau : int
        Maximum corruption step, 1 <= tau < T.
    steps : int
        U-Net evaluations on the way back (the DDIM sub-sequence).
    eta : float
        DDIM stochasticity (0: deterministic).
    generator : torch.Generator or ImageNoise, optional
        Draws the forward noise (and z_t when ``eta > 0``); per-image streams make the result
        independent of the batch.

    Returns
    -------
    torch.Tensor
        The reconstruction x_0^rec, same shape as ``start``.
    """
    total = int(schedule.config.num_train_timesteps)
    if not 1 <= int(tau) < total:
        raise ValueError(f"tau must be in [1, {total - 1}] (T = {total}), got {tau}")
    abar = cumulative_alphas(schedule)
    ts = reverse_timesteps(tau, steps)
    # Python floats, computed once: no tensor is read on the host inside the loop.
    pairs = [(float(abar[t]), float(abar[ts[i + 1]]) if i + 1 < len(ts) else 1.0) for i, t in enumerate(ts)]
    noise = _randn_like(start, generator)
    x = schedule.add_noise(start, noise, torch.full((start.shape[0],), ts[0], device=start.device, dtype=torch.long))
    for t, (abar_t, prev) in zip(ts, pairs):
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        # float32 even under autocast: the DDIM update itself stays in full precision.
        eps = unet(x, t_batch).sample.float()
        z = _randn_like(x, generator) if eta > 0 else None
        x = ddim_update(x, eps, abar_t, prev, eta, z)
    return x
