"""DiAD's noise schedule, forward noising and DDIM sampler, computed as the authors' LDM code does.

Schedule (``ldm.models.diffusion.ddpm.register_schedule``)
    ``betas = linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2`` in float64 (LDM calls this
    ``linear``; diffusers ``scaled_linear``), ``alphas_cumprod = cumprod(1 - betas)`` in float64,
    stored as float32. Forward noising ``q_sample``: ``sqrt(abar_t) z + sqrt(1 - abar_t) eps`` with
    both square roots taken in float64 and stored as float32.
DDIM (``ldm.models.diffusion.ddim``, eta = 0)
    The ``n``-step schedule is ``t_i = i * (T // n) + 1`` (``uniform`` discretisation; 1, 101, ...,
    901 for 10 of 1000), run from the top. A step at ``t_i`` uses ``abar_{t_i}`` and, as the
    previous value, ``abar_{t_{i-1}}`` (``abar_0`` for the last step):
    ``x0 = (x - sqrt(1 - abar_t) eps) / sqrt(abar_t)``, ``x <- sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps``,
    in float32 as the authors' sampler. For ``n`` not dividing ``T`` the authors' formula would
    give ``n + 1`` steps ending past ``T``; we keep ``n`` steps (diffusers' ``leading`` spacing).

Where the latent is noised to and where DDIM starts: see :meth:`NoiseSchedule.plan`.

No tensor is created at construction, so the schedule can be built under ``torch.device("meta")``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

BETA_SCHEDULES = ("scaled_linear", "linear")


@dataclass(frozen=True)
class DDIMPlan:
    """Where the input latent is noised to and the DDIM steps that follow.

    Attributes
    ----------
    noise_step : int
        Diffusion step ``q_sample`` noises the latent to.
    steps : tuple of (int, int)
        ``(t, t_prev)`` per DDIM step, from the top; ``t_prev = -1`` means ``abar_0`` is used as
        the previous value (the authors' last step).
    """

    noise_step: int
    steps: tuple[tuple[int, int], ...]

    @property
    def timesteps(self) -> tuple[int, ...]:
        """The DDIM timesteps run, from the top."""
        return tuple(t for t, _ in self.steps)


class NoiseSchedule:
    """The LDM beta schedule of DiAD with ``q_sample`` and deterministic DDIM steps.

    Parameters
    ----------
    timesteps : int
        T (1000).
    beta_start, beta_end : float
        0.00085 and 0.012 (SD v1.x, the authors' ``linear_start`` / ``linear_end``).
    kind : str
        ``scaled_linear`` (LDM's ``linear``: linear in sqrt(beta)) or ``linear`` (linear in beta).
    """

    def __init__(self, timesteps: int, beta_start: float, beta_end: float, kind: str = "scaled_linear") -> None:
        if kind not in BETA_SCHEDULES:
            raise ValueError(f"setting 'beta_schedule' must be one of {BETA_SCHEDULES}, not {kind!r}")
        self.timesteps = int(timesteps)
        if kind == "scaled_linear":
            betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, self.timesteps, dtype=torch.float64,
                                   device="cpu") ** 2
        else:
            betas = torch.linspace(beta_start, beta_end, self.timesteps, dtype=torch.float64, device="cpu")
        self.betas = betas.numpy()
        #: float64, as LDM computes it before storing float32 buffers.
        self.alphas_cumprod64 = np.cumprod(1.0 - self.betas, axis=0)
        self._sqrt = np.sqrt(self.alphas_cumprod64).astype(np.float32)
        self._sqrt_one_minus = np.sqrt(1.0 - self.alphas_cumprod64).astype(np.float32)
        #: The float32 buffer LDM keeps (and its DDIM sampler reads).
        self.alphas_cumprod = self.alphas_cumprod64.astype(np.float32)

    # ---------------------------------------------------------------------------------- tables
    def tables(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The float32 tables (``sqrt``, ``sqrt_one_minus``, ``abar``) on ``device``, copied there once.

        Sampling reads them by indexing on the device, so a denoising step makes no host copy
        and no host read.
        """
        cache = self.__dict__.setdefault("_device_tables", {})
        device = torch.device(device)
        if device not in cache:
            cache[device] = {"sqrt": torch.from_numpy(self._sqrt).to(device),
                             "sqrt_one_minus": torch.from_numpy(self._sqrt_one_minus).to(device),
                             "abar": torch.from_numpy(self.alphas_cumprod).to(device)}
        return cache[device]

    # ---------------------------------------------------------------------------------- noising
    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """``q_sample``: the latent noised to step ``t`` (an int or one step per sample)."""
        tables = self.tables(latents.device)
        index = t.to(latents.device).long().reshape(-1) if isinstance(t, torch.Tensor) else int(t)
        shape = (-1,) + (1,) * (latents.ndim - 1)
        a = tables["sqrt"][index].to(latents.dtype).reshape(shape)
        b = tables["sqrt_one_minus"][index].to(latents.dtype).reshape(shape)
        return a * latents + b * noise

    # ---------------------------------------------------------------------------------- DDIM
    def ddim_timesteps(self, n: int) -> np.ndarray:
        """The ``n``-step DDIM schedule, ascending: ``i * (T // n) + 1``."""
        n = int(n)
        if not 1 <= n <= self.timesteps:
            raise ValueError(f"setting 'ddim_steps' must be in [1, {self.timesteps}], not {n}")
        return np.arange(n) * (self.timesteps // n) + 1

    def plan(self, n: int, start_step: int, noise_to_first_step: bool) -> DDIMPlan:
        """Noising step and DDIM steps for a run starting at ``start_step``.

        The DDIM steps are those of the ``n``-step schedule at or below ``start_step``. The latent
        is noised to ``start_step`` itself (the authors' code: noised to 999, first DDIM step
        901), or, with ``noise_to_first_step``, to the first DDIM step run, so that the noising
        step and the first denoising step agree (one consistent truncated schedule, as
        diffusers' img2img ``strength`` does).
        """
        if not 0 <= int(start_step) < self.timesteps:
            raise ValueError(f"setting 'start_step' must be in [0, {self.timesteps - 1}], not {start_step}")
        ascending = [int(t) for t in self.ddim_timesteps(n)]
        pairs = [(t, ascending[i - 1] if i > 0 else -1) for i, t in enumerate(ascending)]
        steps = tuple(p for p in reversed(pairs) if p[0] <= int(start_step))
        noise_step = steps[0][0] if (noise_to_first_step and steps) else int(start_step)
        return DDIMPlan(noise_step, steps)

    def ddim_step(self, x: torch.Tensor, eps: torch.Tensor, t: int, t_prev: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One DDIM step (eta = 0): ``(x_prev, pred_x0)``, in float32 as the authors' sampler."""
        abar = self.tables(x.device)["abar"]
        a_t = abar[int(t)]
        a_prev = abar[int(t_prev) if t_prev >= 0 else 0]
        sqrt_one_minus = torch.sqrt(1.0 - a_t)
        x32, e32 = x.float(), eps.float()
        pred_x0 = (x32 - sqrt_one_minus * e32) / a_t.sqrt()
        x_prev = a_prev.sqrt() * pred_x0 + (1.0 - a_prev).sqrt() * e32
        return x_prev.to(x.dtype), pred_x0.to(x.dtype)


__all__ = ["NoiseSchedule", "DDIMPlan", "BETA_SCHEDULES"]
