"""The typed parts of a job record: how it ran, its efficiency figures, its environment, its error,
the weight files it read.

Each part is a dataclass whose fields are the keys the harness writes and its readers need. A key
a part does not declare (a figure a newer harness adds, an executor's own note such as Ray's
``run.ray``) is kept in :attr:`RecordPart.extra` and written back unchanged, so reading and
writing a record never loses anything. A field that was never given is left out of the JSON; one
set to ``None`` is written as null (``limit_share: null``: the device's limit is unknown).

A part is also a mapping of its JSON form (``part["fps"]``, ``part.get("fps")``,
``part.update(...)``), because the records of harness 0.3 and earlier were plain dicts and plugins written
against them (a ``harness_job_finished`` hook reading ``record["run"]["dev_run"]``) keep working.
Code in this project reads the attributes.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass, field, fields
from typing import Any, Iterator, Mapping, TypeVar

__all__ = ["RecordPart", "RunInfo", "Efficiency", "Environment", "ErrorInfo", "WeightUse"]

PartT = TypeVar("PartT", bound="RecordPart")


class RecordPart(MutableMapping):
    """Base of the typed parts: declared fields as attributes, other keys in :attr:`extra`."""

    extra: dict[str, Any]

    @classmethod
    def declared(cls) -> tuple[str, ...]:
        """The keys this part types, in the order they are written."""
        cached = cls.__dict__.get("_declared")
        if cached is None:
            cached = tuple(f.name for f in fields(cls) if f.name != "extra")
            cls._declared = cached  # type: ignore[attr-defined]
        return cached

    @classmethod
    def from_dict(cls: type[PartT], data: Mapping[str, Any] | None) -> PartT:
        """The part of ``data`` (a record's JSON block; ``None`` gives an empty part)."""
        if isinstance(data, cls):
            return data
        rest = dict(data or {})
        known = {name: rest.pop(name) for name in cls.declared() if name in rest}
        part = cls(**known, extra=rest)
        part._given().update(known)
        return part

    def __post_init__(self) -> None:
        # From here on, setting a field to None is a value (written as null), not an absence.
        object.__setattr__(self, "_built", True)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.declared() and (value is not None or self.__dict__.get("_built")):
            self._given().add(name)
        object.__setattr__(self, name, value)

    def _given(self) -> set[str]:
        """The declared fields that were given a value (None included once built)."""
        return self.__dict__.setdefault("_given_fields", set())

    def _has(self, name: str) -> bool:
        return name in self._given() or getattr(self, name) is not None

    def to_dict(self) -> dict[str, Any]:
        """The JSON block: declared fields that were given, in order, then the extra keys."""
        out = {name: getattr(self, name) for name in self.declared() if self._has(name)}
        out.update(self.extra)
        return out

    # -- the mapping of the JSON form (for code written against dict records) ---------------------
    def __getitem__(self, key: str) -> Any:
        if key in self.declared():
            if not self._has(key):
                raise KeyError(key)
            return getattr(self, key)
        return self.extra[key]

    def __setitem__(self, key: str, value: Any) -> None:
        if key in self.declared():
            setattr(self, key, value)
        else:
            self.extra[key] = value

    def __delitem__(self, key: str) -> None:
        if key in self.declared():
            if not self._has(key):
                raise KeyError(key)
            self._given().discard(key)
            object.__setattr__(self, key, None)
        else:
            del self.extra[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())


@dataclass(eq=False)
class RunInfo(RecordPart):
    """How the job ran (the record's ``run``).

    Attributes
    ----------
    dev_run : bool
        ``--fast-dev-run``: a smoke test of the real code, never shown as a result.
    weights : str
        ``pretrained`` or ``random`` (``--weights random``: never shown as a result).
    precision : str or None
        The method's training/inference precision setting (``fp32``, ``bf16``, ...).
    eval_size : int or str or None
        The side the maps and masks are scored at, ``"native"`` for the images' own size.
    eval_size_source : str or None
        Where :attr:`eval_size` came from (``default``, ``--eval-size``, the dataset).
    eval_grid : dict or None
        The evaluation grid (``harness`` or ``paper``) and how masks and maps were put on it.
    executor : str or None
        ``inprocess``, ``ray`` or a third party's.
    paper_protocol : str or None
        The protocol the method's paper used, when it differs from the job's.
    resources : dict or None
        What the job asked its executor for (``gpus``, ``cpus``, ``memory_gb``).
    notes : list of str or None
        Lines the planner attached to the job.
    resumed_from : dict or None
        Per fitted unit, the checkpoint a killed fit resumed from.
    """

    dev_run: bool = False
    weights: str = "pretrained"
    precision: str | None = None
    eval_size: int | str | None = None
    eval_size_source: str | None = None
    eval_grid: dict[str, Any] | None = None
    executor: str | None = None
    paper_protocol: str | None = None
    resources: dict[str, Any] | None = None
    notes: list[str] | None = None
    resumed_from: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def shows_result(self) -> bool:
        """Neither a dev run nor random weights: the job's numbers may be shown."""
        return not self.dev_run and self.weights != "random"


@dataclass(eq=False)
class Efficiency(RecordPart):
    """Speed, size and memory (the record's ``efficiency``; the timing protocol is described in
    :mod:`harness.engine.inference.efficiency`).

    Attributes
    ----------
    fps : float or None
        Images per second over the warm calls.
    latency_ms : float or None
        Median of the warm batch-1 calls.
    eval_batch_size : int or None
        The batch the images were predicted in; :attr:`eval_batch_size_source` says why.
    params : int or None
        Parameters of every network; :attr:`params_by_network` per network.
    flops_per_image : float or None
        Counted with ``FlopCounterMode`` on one image.
    peak_memory_mb : float or None
        Peak memory; :attr:`peak_memory_kind` says what was measured (CUDA allocator or RSS).
    train_seconds, predict_seconds : float or None
        Wall time of the fit (every unit) and of predicting the test set.
    n_test_images : int or None
    device : str or None
        The torch device the job ran on.
    precision_mode : str or None
        ``fp32``, ``bf16-cast``, ``bf16-autocast``, ...
    compile : str or None
        ``--compile`` (``none``, ``default``, ``reduce-overhead``); :attr:`compile_fallback` the
        error that sent it back to eager, if any.
    tf32 : dict or None
        The TF32 flags in force (``matmul``, ``cudnn``).
    limit_share : float or None
        Achieved FLOP/s as a share of the device's limit (None where the limit is unknown).
    """

    fps: float | None = None
    fps_over: str | None = None
    per_image_ms_median: float | None = None
    per_image_ms_iqr: list[float] | None = None
    timed_calls: int | None = None
    timed_images: int | None = None
    repeated_calls: int | None = None
    warmup_calls: int | None = None
    warmup_ms: list[float] | None = None
    cold_call_ms: float | None = None
    cold_call_batch: int | None = None
    latency_ms: float | None = None
    latency_ms_iqr: list[float] | None = None
    latency_calls: int | None = None
    min_timed_calls: int | None = None
    eval_batch_size: int | None = None
    eval_batch_size_source: str | None = None
    input_size: list[int] | None = None
    params: int | None = None
    params_by_network: dict[str, int] | None = None
    flops_per_image: float | None = None
    peak_memory_mb: float | None = None
    peak_memory_kind: str | None = None
    train_seconds: float | None = None
    predict_seconds: float | None = None
    n_test_images: int | None = None
    device: str | None = None
    precision: str | None = None
    precision_mode: str | None = None
    cast_networks: list[str] | None = None
    channels_last: list[str] | None = None
    compile: str | None = None
    compiled_networks: list[str] | None = None
    compile_fallback: str | None = None
    tf32: dict[str, bool] | None = None
    cudnn_benchmark: bool | None = None
    cudnn: int | None = None
    diffusers: str | None = None
    achieved_tflops: float | None = None
    peak_tflops: float | None = None
    limit_mode: str | None = None
    limit_share: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def figures(self) -> Iterator[tuple[str, float | int | None]]:
        """``(name, value)`` of every figure that is a number (or null): what tables average."""
        for name, value in self.to_dict().items():
            if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
                yield name, value


@dataclass(eq=False)
class Environment(RecordPart):
    """Where the job ran (the record's ``environment``). The fields that change numerics are
    :data:`harness.engine.support.environment.NUMERICS_KEYS`.

    Attributes
    ----------
    harness, python, torch, numpy : str or None
        Versions.
    platform, processor, hostname : str or None
    cpu_count, torch_threads : int or None
    cpu_model, cpu_signature, cpu_capability : str or None
        The CPU, as far as it changes floating-point results.
    device, device_name : str or None
        The torch device and, on CUDA, the card's name.
    git_revision : str or None
        The harness's checkout, when it is one.
    """

    harness: str | None = None
    python: str | None = None
    torch: str | None = None
    numpy: str | None = None
    platform: str | None = None
    processor: str | None = None
    hostname: str | None = None
    cpu_count: int | None = None
    torch_threads: int | None = None
    cpu_model: str | None = None
    cpu_signature: str | None = None
    cpu_capability: str | None = None
    device: str | None = None
    device_name: str | None = None
    git_revision: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def subset(self, keys: tuple[str, ...]) -> dict[str, Any]:
        """``{key: value}`` for ``keys`` (None where a key is absent), declared or extra."""
        return {key: self.get(key) for key in keys}


@dataclass(eq=False)
class ErrorInfo(RecordPart):
    """Why a job failed (the record's ``error``).

    Attributes
    ----------
    phase : str or None
        ``plan``, ``build``, ``fit``, ``predict`` or ``evaluate``.
    type : str or None
        The exception's class name.
    message : str or None
    traceback : str or None
    """

    phase: str | None = None
    type: str | None = None
    message: str | None = None
    traceback: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(eq=False)
class WeightUse(RecordPart):
    """One pretrained file a job read (an entry of the record's ``weights``).

    Attributes
    ----------
    key : str or None
        The method's name for the file.
    what : str or None
        What the file is (``SD v1.5 checkpoint``, ...).
    path : str or None
        Where it was found.
    sha256 : str or None
    """

    key: str | None = None
    what: str | None = None
    path: str | None = None
    sha256: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
