"""How a fitted method is run for inference: precision mode, TF32 policy, compilation.

The same for every method, applied by the runner between ``fit`` and the evaluation, and
recorded (the record's ``efficiency`` block and the numerics environment).

Precision (``--precision bf16|fp16`` with ``--precision-mode``)
    ``cast`` (the default): the frozen networks are cast to the low precision once, before the
    first ``predict``, so no weight is re-cast at each denoising step (autocast caches casts
    only of weights that require grad). Floating inputs of each network are cast to its dtype
    on the way in (a forward pre-hook), so method code that feeds float32 tensors still works.
    Methods run their forward passes under autocast (their ``precision`` setting), which keeps
    the norms and softmax autocast lists in float32 on CUDA: norms stay where numerics need
    them. Networks whose parameters are mostly convolution kernels are put in channels_last.
    ``autocast``: the weights stay float32 and only autocast lowers precision (the papers'
    mixed-precision inference). A method without a ``precision`` setting runs in fp32.
TF32 (``--tf32 on|off``, default ``off``)
    Sets both ``torch.backends.cuda.matmul.allow_tf32`` and ``torch.backends.cudnn.allow_tf32``:
    ``off`` means fp32 is fp32 (torch's own default lets cuDNN convolutions use TF32 while
    matmuls do not; we do not mix). Recorded; it changes results on Ampere and later GPUs.
Compile (``--compile none|default|reduce-overhead``)
    Each network is compiled in place (:meth:`torch.nn.Module.compile`); ``reduce-overhead``
    uses CUDA graphs for the fixed-shape calls of the denoising loops. Dynamo errors fall back
    to eager per frame (``suppress_errors``) and a ``predict`` that fails compiled is retried
    eagerly with every network uncompiled, with a warning: compilation never fails a job.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

PRECISION_MODES = ("cast", "autocast")
TF32_MODES = ("on", "off")
COMPILE_MODES = ("none", "default", "reduce-overhead")
#: ``--tf32``'s default, stated here and in the record.
DEFAULT_TF32 = "off"

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def apply_tf32(mode: str) -> dict[str, bool]:
    """Set the TF32 policy for matmuls and cuDNN; return the flags now in force."""
    if mode not in TF32_MODES:
        raise ValueError(f"--tf32 {mode!r}: use on or off")
    on = mode == "on"
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on
    return tf32_flags()


def tf32_flags() -> dict[str, bool]:
    """The TF32 flags in force (matmul, cuDNN)."""
    return {"matmul": bool(torch.backends.cuda.matmul.allow_tf32), "cudnn": bool(torch.backends.cudnn.allow_tf32)}


def precision_mode(precision: str, mode: str) -> str:
    """The record's name of a run's numerics: ``fp32``, ``bf16-cast``, ``bf16-autocast``, ..."""
    return "fp32" if precision == "fp32" else f"{precision}-{mode}"


def _conv_dominated(net: torch.nn.Module) -> bool:
    conv = sum(p.numel() for m in net.modules() if isinstance(m, torch.nn.Conv2d) for p in m.parameters(recurse=False))
    total = sum(p.numel() for p in net.parameters())
    return total > 0 and conv * 2 > total


def _cast_inputs(dtype: torch.dtype):
    def hook(module, args, kwargs):
        def cast(x):
            return x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != dtype else x
        return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}
    return hook


@dataclass
class InferenceSetup:
    """What was done to a method's networks for inference, and the compile fallback."""

    precision: str = "fp32"
    mode: str = "cast"
    compile: str = "none"
    cast_networks: list[str] = field(default_factory=list)
    channels_last: list[str] = field(default_factory=list)
    compiled: list[str] = field(default_factory=list)
    fallback: str | None = None
    _nets: Mapping[str, torch.nn.Module] = field(default_factory=dict, repr=False)

    def record(self) -> dict[str, Any]:
        """The record's fields for this setup."""
        return {"precision": self.precision, "precision_mode": precision_mode(self.precision, self.mode),
                "cast_networks": self.cast_networks, "channels_last": self.channels_last,
                "compile": self.compile, "compiled_networks": self.compiled,
                "compile_fallback": self.fallback}

    def fall_back(self, error: BaseException) -> bool:
        """Uncompile every network after ``error`` in a compiled call; False when nothing was compiled."""
        if not self.compiled or self.fallback is not None:
            return False
        for name in self.compiled:
            self._nets[name]._compiled_call_impl = None  # what Module.compile set
        self.fallback = f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"
        warnings.warn(f"--compile {self.compile} failed ({self.fallback}); running eagerly", RuntimeWarning,
                      stacklevel=2)
        return True


def prepare_inference(method: Any, precision: str = "fp32", mode: str = "cast", compile_mode: str = "none"
                      ) -> InferenceSetup:
    """Cast, lay out and compile ``method``'s networks for inference as the options ask.

    Parameters
    ----------
    method : harness.Method
        Fitted, on its device, in eval mode.
    precision : str
        The method's ``precision`` setting (``fp32`` leaves the weights alone).
    mode : str
        ``cast`` or ``autocast``.
    compile_mode : str
        ``none``, ``default`` or ``reduce-overhead``.
    """
    if mode not in PRECISION_MODES:
        raise ValueError(f"--precision-mode {mode!r}: use {' or '.join(PRECISION_MODES)}")
    if compile_mode not in COMPILE_MODES:
        raise ValueError(f"--compile {compile_mode!r}: use {', '.join(COMPILE_MODES)}")
    nets = dict(method.networks())
    setup = InferenceSetup(precision=precision, mode=mode, compile=compile_mode, _nets=nets)
    if precision in _DTYPES and mode == "cast":
        dtype = _DTYPES[precision]
        if method.device.type == "cpu" and dtype is torch.float16:
            dtype = torch.bfloat16  # as autocast does on the CPU (harness.toolkit.precision)
        for name, net in nets.items():
            if not any(p.is_floating_point() for p in net.parameters()):
                continue
            net.to(dtype)
            net.register_forward_pre_hook(_cast_inputs(dtype), with_kwargs=True)
            setup.cast_networks.append(name)
            if _conv_dominated(net):
                net.to(memory_format=torch.channels_last)
                setup.channels_last.append(name)
    if compile_mode != "none":
        from torch import _dynamo

        _dynamo.config.suppress_errors = True
        for name, net in nets.items():
            net.compile(mode=compile_mode)
            setup.compiled.append(name)
    return setup


def library_versions() -> dict[str, Any]:
    """cuDNN and diffusers versions (they change kernels and so speed and numerics)."""
    out: dict[str, Any] = {"cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    try:
        from importlib.metadata import version

        out["diffusers"] = version("diffusers")
    except Exception:  # noqa: BLE001 - not installed
        out["diffusers"] = None
    return out


__all__ = ["PRECISION_MODES", "TF32_MODES", "COMPILE_MODES", "DEFAULT_TF32", "apply_tf32", "tf32_flags",
           "precision_mode", "prepare_inference", "InferenceSetup", "library_versions"]
