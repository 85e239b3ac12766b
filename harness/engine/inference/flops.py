"""FLOPs per image, counted completely, and the device's limit they are measured against.

:func:`flop_counter` is torch's :class:`~torch.utils.flop_counter.FlopCounterMode` with formulas
for the operators it leaves out, so that every method's figure is complete on the CPU too:

- ``aten._euclidean_dist`` (what ``torch.cdist`` runs for large inputs: the matmul form,
  ``2·M·N·D`` plus the row norms) and ``aten._cdist_forward`` (the direct form, ``3·M·N·D``:
  difference, square, accumulate) — PatchCore's and LafitE's k-NN, AnomalySD's prototypes;
- ``aten._scaled_dot_product_flash_attention_for_cpu`` (attention on the CPU: ``4·B·H·Sq·Sk·D``,
  the same count torch uses for the CUDA kernels).

The top-k selection of a k-NN search is comparisons, not floating-point arithmetic, and is not
counted. Elementwise operations (activations, norms, additions) are not counted either, as in
every FLOP figure the papers report: the count is of multiply-adds in matmuls, convolutions and
attention, which is also what the tensor cores' peak measures.

:data:`PEAK_TFLOPS` holds dense (no sparsity) peaks from NVIDIA's datasheets and architecture
whitepapers, per precision: ``bf16`` (bf16/fp16 tensor cores with fp32 accumulation), ``tf32``
and ``fp32`` (CUDA cores). :func:`limit_share` is achieved FLOP/s over the peak of the mode a run
used: bf16/fp16 runs against ``bf16``; fp32 runs against ``tf32`` when TF32 matmuls were on, else
``fp32``.
"""

from __future__ import annotations

import math
from typing import Any

#: Dense peak TFLOP/s by GPU (matched case-insensitively against the device name, first match
#: wins, so the more specific names come first) and precision. None: no such tensor-core mode.
PEAK_TFLOPS: dict[str, dict[str, float | None]] = {
    "H200 NVL": {"bf16": 835.0, "tf32": 417.5, "fp32": 60.0},
    "H200": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H100 PCIe": {"bf16": 756.0, "tf32": 378.0, "fp32": 51.2},
    "H100 NVL": {"bf16": 835.0, "tf32": 417.5, "fp32": 60.0},
    "H100": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "A100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "L40S": {"bf16": 362.1, "tf32": 183.0, "fp32": 91.6},
    "RTX 4090": {"bf16": 165.2, "tf32": 82.6, "fp32": 82.6},
    "RTX 3090": {"bf16": 71.0, "tf32": 35.6, "fp32": 35.6},
    "V100": {"bf16": None, "fp16": 125.0, "tf32": None, "fp32": 15.7},
}


def _prod(shape: Any) -> int:
    return math.prod(int(s) for s in shape)


def _euclidean_dist_flop(x_shape, y_shape, *args, out_shape=None, **kwargs) -> int:
    """``torch.cdist``'s matmul form: ``x·yᵀ`` (2·M·N·D) and the squared row norms (2·(M+N)·D)."""
    *batch, m, d = x_shape
    n = y_shape[-2]
    b = _prod(batch) if batch else 1
    return b * (2 * m * n * d + 2 * (m + n) * d)


def _cdist_forward_flop(x_shape, y_shape, *args, out_shape=None, **kwargs) -> int:
    """``torch.cdist``'s direct form: per pair and dimension a difference, a power and a sum."""
    *batch, m, d = x_shape
    n = y_shape[-2]
    b = _prod(batch) if batch else 1
    return 3 * b * m * n * d


def _sdpa_cpu_flop(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    """Attention on the CPU: ``Q·Kᵀ`` and ``P·V``, 2·B·H·Sq·Sk·D each (torch's CUDA count)."""
    *bh, sq, d = q_shape
    sk, dv = k_shape[-2], v_shape[-1]
    b = _prod(bh) if bh else 1
    return 2 * b * sq * sk * d + 2 * b * sq * sk * dv


def extra_formulas() -> dict[Any, Any]:
    """The formulas :func:`flop_counter` adds, keyed by aten operator (those this torch has)."""
    import torch

    aten = torch.ops.aten
    out = {}
    for name, fn in (("_euclidean_dist", _euclidean_dist_flop), ("_cdist_forward", _cdist_forward_flop),
                     ("_scaled_dot_product_flash_attention_for_cpu", _sdpa_cpu_flop)):
        op = getattr(aten, name, None)
        if op is not None:
            out[op] = fn
    return out


def flop_counter():
    """A :class:`~torch.utils.flop_counter.FlopCounterMode` (silent) with :func:`extra_formulas`."""
    from torch.utils.flop_counter import FlopCounterMode

    return FlopCounterMode(display=False, custom_mapping=extra_formulas())


def peak_tflops(device_name: str | None, mode: str) -> float | None:
    """The dense peak of ``device_name`` for ``mode`` (``bf16``, ``fp16``, ``tf32``, ``fp32``), or None."""
    if not device_name:
        return None
    lowered = device_name.lower()
    for gpu, peaks in PEAK_TFLOPS.items():
        if gpu.lower() in lowered:
            value = peaks.get(mode)
            if value is None and mode == "fp16":
                value = peaks.get("bf16")
            return value
    return None


def limit_mode(precision: str, tf32: bool) -> str:
    """Which peak a run is measured against: its low precision, or TF32/fp32 for fp32 runs."""
    if precision in ("bf16", "fp16"):
        return precision
    return "tf32" if tf32 else "fp32"


def limit_share(flops_per_image: float | None, fps: float | None, device_name: str | None,
                precision: str, tf32: bool) -> dict[str, Any]:
    """Achieved TFLOP/s and their share of the device's limit (Nones where unknown).

    Returns
    -------
    dict
        ``achieved_tflops``, ``peak_tflops``, ``limit_mode`` and ``limit_share`` (a fraction).
    """
    mode = limit_mode(precision, tf32)
    peak = peak_tflops(device_name, mode)
    achieved = flops_per_image * fps / 1e12 if flops_per_image and fps else None
    share = achieved / peak if achieved is not None and peak else None
    return {"achieved_tflops": None if achieved is None else round(achieved, 4), "peak_tflops": peak,
            "limit_mode": mode, "limit_share": None if share is None else round(share, 5)}


__all__ = ["PEAK_TFLOPS", "flop_counter", "extra_formulas", "peak_tflops", "limit_mode", "limit_share"]
