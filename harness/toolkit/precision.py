"""``--precision fp32|bf16|fp16``: autocast and gradient scaling, the same way for every method.

Methods read their ``precision`` setting and wrap forward passes in :func:`autocast`; a training
loop in fp16 scales its loss with the scaler from :func:`grad_scaler` (a no-op scaler for fp32
and bf16, so the loop has one shape). Weights stay in fp32 (mixed precision), as the papers'
fp16 runs do with autocast.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device | str, precision: str) -> ContextManager:
    """An autocast context for ``precision`` on ``device`` (nothing for fp32).

    fp16 autocast is CUDA-only in practice; on a CPU it falls back to bf16, which the CPU
    supports, and the record keeps the precision that was asked for.
    """
    device = torch.device(device)
    if precision not in DTYPES:
        raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(DTYPES)}")
    if precision == "fp32" or device.type == "meta":
        return contextlib.nullcontext()
    dtype = DTYPES[precision]
    if device.type == "cpu" and dtype is torch.float16:
        dtype = torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device | str, precision: str) -> torch.amp.GradScaler:
    """A gradient scaler, enabled only for fp16 on CUDA (where fp16 gradients underflow)."""
    device = torch.device(device)
    enabled = precision == "fp16" and device.type == "cuda"
    return torch.amp.GradScaler(device.type if device.type in ("cuda", "cpu") else "cpu", enabled=enabled)


__all__ = ["DTYPES", "autocast", "grad_scaler"]
