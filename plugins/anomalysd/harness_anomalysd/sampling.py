"""The noise schedule and the truncated DDIM sampler of AnomalySD's inference (Sec. 4.2).

Denoising starts at ``T̃ = λ·T`` (Eq. 11): the clean latent is noised to that step by Eq. 1 and
denoised from there. Steps are counted as in DDPM, ``t ∈ {1, …, T}`` with
``ᾱ_t = ∏_{i=1..t} α_i``; diffusers indexes the same schedule from 0 (its
``alphas_cumprod[k]`` is ``ᾱ_{k+1}``), so the paper's step ``λ·T`` is diffusers' timestep
``λ·T − 1`` (399 for λ = 0.4, T = 1000), which is what the UNet is conditioned on.

"The denoising step is set to 50" has two readings, both a setting (``step_schedule``):

``pipeline`` (the ``paper`` value)
    The paper's two inference parameters are the two of diffusers' Stable Diffusion inpainting
    pipeline, ``num_inference_steps`` ("the number of denoising steps", default 50) and
    ``strength`` (its "noise strength"): a 50-step schedule over the whole of ``[1, T]`` of
    which the steps at or below the start are run, about ``λ·50`` of them (20 for λ = 0.4).
    The grid is diffusers' ``trailing`` spacing (``T, T − T/N, …``), on which ``λ·T`` lies
    exactly whenever ``λ·N`` is an integer; otherwise the start is still exactly ``λ·T`` and
    the next steps follow the grid.
``span``
    ``N`` steps evenly spaced from ``λ·T`` down to 0 (50 UNet evaluations per inpainting
    whatever λ): 2.5x the cost of ``pipeline`` at λ = 0.4.

The update is deterministic DDIM (η = 0) on ε-prediction; the last step goes to
``ᾱ = ᾱ_1`` (SD v1.5's ``set_alpha_to_one = False``), as the SD pipelines do.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from harness.toolkit.sd15 import SCHEDULE

STEP_SCHEDULES = ("pipeline", "span")


def alphas_cumprod(schedule: dict | None = None) -> np.ndarray:
    """``ᾱ`` of every diffusers timestep ``0 … T−1`` (float64) of SD's ``scaled_linear`` schedule.

    NumPy, so that it exists on the host even when the networks are built on the meta device.
    """
    s = dict(SCHEDULE if schedule is None else schedule)
    if s["beta_schedule"] != "scaled_linear":
        raise ValueError(f"only SD's scaled_linear schedule is implemented, not {s['beta_schedule']!r}")
    betas = np.linspace(math.sqrt(s["beta_start"]), math.sqrt(s["beta_end"]), int(s["num_train_timesteps"]),
                        dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


def start_timestep(strength: float, T: int = 1000) -> int:
    """The diffusers timestep of the paper's step ``λ·T`` (-1 for λ = 0: nothing to denoise)."""
    return int(round(float(strength) * T)) - 1


def inference_timesteps(strength: float, steps: int, reading: str = "pipeline", T: int = 1000) -> list[int]:
    """Diffusers timesteps visited by the sampler, strictly decreasing, starting at ``λ·T − 1``.

    Parameters
    ----------
    strength : float
        λ in [0, 1].
    steps : int
        The "denoising step" N (50 in the paper).
    reading : str
        ``pipeline`` or ``span`` (module docstring).
    T : int
        Training steps of the schedule.

    Returns
    -------
    list of int
        Empty for λ = 0 (the latent is decoded as it is).
    """
    if reading not in STEP_SCHEDULES:
        raise ValueError(f"step_schedule must be one of {', '.join(STEP_SCHEDULES)}, not {reading!r}")
    start = start_timestep(strength, T)
    if start < 0 or steps < 1:
        return []
    if reading == "pipeline":
        grid = np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1
        return [start] + [int(t) for t in grid if t < start]
    out: list[int] = []
    for i in range(steps):
        t = int(round(start * (steps - i) / steps))
        if not out or t < out[-1]:
            out.append(t)
    return out


def add_noise(latents: torch.Tensor, noise: torch.Tensor, timesteps, abar: np.ndarray) -> torch.Tensor:
    """Eq. 1: ``sqrt(ᾱ_t) z + sqrt(1 − ᾱ_t) ε`` at one timestep (int) or one per sample (sequence)."""
    a = torch.as_tensor(np.asarray(abar[np.asarray(timesteps)], dtype=np.float64), dtype=torch.float32)
    a = a.to(latents.device).reshape(-1, *([1] * (latents.ndim - 1))) if a.ndim else a.to(latents.device)
    return a.sqrt() * latents + (1.0 - a).sqrt() * noise


def ddim_step(sample: torch.Tensor, eps: torch.Tensor, timestep: int, previous: int | None,
              abar: np.ndarray) -> torch.Tensor:
    """One deterministic DDIM update from ``timestep`` to ``previous`` (None: the final step).

    ``x̂_0 = (x_t − sqrt(1 − ᾱ_t) ε) / sqrt(ᾱ_t)``, then
    ``x_prev = sqrt(ᾱ_prev) x̂_0 + sqrt(1 − ᾱ_prev) ε``.
    """
    a_t = float(abar[timestep])
    a_prev = float(abar[previous]) if previous is not None else float(abar[0])
    x0 = (sample - math.sqrt(1.0 - a_t) * eps) / math.sqrt(a_t)
    return math.sqrt(a_prev) * x0 + math.sqrt(1.0 - a_prev) * eps


__all__ = ["STEP_SCHEDULES", "add_noise", "alphas_cumprod", "ddim_step", "inference_timesteps", "start_timestep"]
