"""Efficiency measurement: one timing protocol for every method, as DESIGN.md defines it.

The protocol (:class:`PredictTimer`):

- The clock runs only around ``predict`` calls (images are already decoded, resized and on the
  device; metrics come after), and the device is synchronised before each clock read.
- **Warm-up at every timed shape.** The first call at each input shape (a batch of 30, the last
  partial batch of 7, a single image) pays one-time costs: allocator growth, cuDNN plans,
  compilation. That call is a real test batch (its predictions are scored) but its time goes to
  the warm-up figures, never to FPS. The very first call of a method is reported apart as the
  *cold call*.
- **Warm calls.** FPS is the images of warm calls over their seconds; the spread is the median
  and interquartile range of per-image milliseconds over warm calls. When the test set leaves
  fewer than ``min_calls`` warm calls, the evaluator repeats its largest batch until it has them
  (outputs discarded), so a small test set still yields a stated number of timed calls.
- **Latency** is the median (and IQR) of warm batch-1 calls, after an untimed batch-1 call.
- FLOPs per image: torch's :class:`~torch.utils.flop_counter.FlopCounterMode` around the untimed
  batch-1 call (:mod:`harness.engine.inference.flops` adds cdist/k-NN and CPU attention, which the counter misses).
- Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` during prediction; on the CPU, the
  process's peak resident set size (``ru_maxrss``), which includes everything the process held.
- Training time: wall time of ``fit``.

Timing is two ``perf_counter`` reads per call, nothing else, so it adds no measurable overhead.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Sequence

import torch


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels on ``device`` (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":  # pragma: no cover - not on our machines
        torch.mps.synchronize()


def count_flops(fn: Callable[[], Any]) -> tuple[Any, int | None]:
    """Run ``fn`` under torch's flop counter, with the harness's extra formulas (:mod:`harness.engine.inference.flops`).

    Returns
    -------
    result : object
        What ``fn`` returned.
    flops : int or None
        Total floating-point operations counted (None when the counter failed, in which case
        ``fn`` is run again without it).
    """
    from harness.engine.inference.flops import flop_counter

    try:
        counter = flop_counter()
        with counter:
            result = fn()
        return result, int(counter.get_total_flops())
    except Exception:  # noqa: BLE001 - some ops are not supported by the counter
        return fn(), None


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def median_iqr(values: Sequence[float]) -> tuple[float | None, float | None, float | None]:
    """(median, first quartile, third quartile) of ``values`` (Nones when empty)."""
    if not values:
        return None, None, None
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, med, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return statistics.median(values), q1, q3


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(float(value), digits)


@dataclass
class PredictTimer:
    """The timing protocol of the module docstring: warm-up per shape, warm calls, cold call, latency.

    Parameters
    ----------
    device : torch.device
        Synchronised before each clock read.
    """

    device: torch.device
    seconds: float = 0.0
    images: int = 0
    warm_seconds: float = 0.0
    warm_images: int = 0
    per_image_ms: list[float] = field(default_factory=list)
    warmup_ms: list[float] = field(default_factory=list)
    cold_call_ms: float | None = None
    cold_call_batch: int | None = None
    latencies_ms: list[float] = field(default_factory=list)
    extra_calls: int = 0
    _seen: set = field(default_factory=set)

    def __post_init__(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def new_method(self) -> None:
        """Forget the warmed shapes: a newly built method pays its one-time costs again."""
        self._seen = set()

    def _clock(self, fn: Callable[[], Any]) -> tuple[Any, float]:
        synchronize(self.device)
        start = time.perf_counter()
        result = fn()
        synchronize(self.device)
        return result, time.perf_counter() - start

    def time(self, fn: Callable[[], Any], n_images: int, shape: Hashable = None, scored: bool = True) -> Any:
        """Call ``fn`` on a batch of ``n_images`` of input ``shape`` and file its duration.

        The first call at a ``shape`` is a warm-up (the first of all: the cold call); later ones
        are warm calls, the ones FPS and the spread come from. ``scored=False`` marks a repeated
        batch whose output is not scored (it still counts as a timed call).
        """
        result, seconds = self._clock(fn)
        key = shape if shape is not None else n_images
        if scored:
            self.seconds += seconds
            self.images += n_images
        else:
            self.extra_calls += 1
        if key not in self._seen:
            self._seen.add(key)
            self.warmup_ms.append(seconds * 1000.0)
            if self.cold_call_ms is None:
                self.cold_call_ms, self.cold_call_batch = seconds * 1000.0, n_images
        else:
            self.warm_seconds += seconds
            self.warm_images += n_images
            self.per_image_ms.append(seconds * 1000.0 / n_images)
        return result

    @property
    def warm_calls(self) -> int:
        """Timed calls after their shape's warm-up."""
        return len(self.per_image_ms)

    def latency(self, fn: Callable[[], Any]) -> Any:
        """Call ``fn`` on one image (already warmed at batch 1) and keep its duration as a latency sample."""
        result, seconds = self._clock(fn)
        self.latencies_ms.append(seconds * 1000.0)
        return result

    @property
    def fps(self) -> float | None:
        """Images per second over the warm calls (over every call when none was warm)."""
        if self.warm_seconds > 0:
            return self.warm_images / self.warm_seconds
        return self.images / self.seconds if self.seconds > 0 else None

    @property
    def latency_ms(self) -> float | None:
        """Median single-image latency in milliseconds."""
        return statistics.median(self.latencies_ms) if self.latencies_ms else None

    def summary(self) -> dict[str, Any]:
        """The protocol's figures, as the record's efficiency block holds them."""
        med, q1, q3 = median_iqr(self.per_image_ms)
        lat, lq1, lq3 = median_iqr(self.latencies_ms)
        return {
            "fps": self.fps, "fps_over": "warm calls" if self.warm_seconds > 0 else "all calls (none warm)",
            "per_image_ms_median": _round(med), "per_image_ms_iqr": [_round(q1), _round(q3)] if med is not None else None,
            "timed_calls": self.warm_calls, "timed_images": self.warm_images, "repeated_calls": self.extra_calls,
            "warmup_calls": len(self.warmup_ms), "warmup_ms": [_round(v, 2) for v in self.warmup_ms],
            "cold_call_ms": _round(self.cold_call_ms, 2), "cold_call_batch": self.cold_call_batch,
            "latency_ms": lat, "latency_ms_iqr": [_round(lq1), _round(lq3)] if lat is not None else None,
            "latency_calls": len(self.latencies_ms),
            "predict_seconds": self.seconds, "n_test_images": self.images,
        }

    def peak_memory(self) -> tuple[float, str]:
        """Peak memory in MiB and what it measures."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20, "cuda max allocated"
        return peak_rss_mb(), "process peak RSS"
