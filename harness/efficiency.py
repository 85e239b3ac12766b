"""Efficiency measurement, as DESIGN.md defines it.

- FPS of ``predict`` over the test set: the clock runs only around ``predict`` calls (images are
  already decoded, resized and on the device; metrics come after), the device is synchronised
  before the clock is read, and a warm-up call on one image precedes the timed calls.
- Latency: the median of a few ``predict`` calls on a single image, after the warm-up.
- FLOPs per image: torch's :class:`~torch.utils.flop_counter.FlopCounterMode` around the warm-up
  call, so counting costs no extra call.
- Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` during prediction; on the CPU, the
  process's peak resident set size (``ru_maxrss``), which includes everything the process held.
- Training time: wall time of ``fit``.

Timing is two ``perf_counter`` reads per batch, nothing else, so it adds no measurable overhead.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels on ``device`` (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":  # pragma: no cover - not on our machines
        torch.mps.synchronize()


def count_flops(fn: Callable[[], Any]) -> tuple[Any, int | None]:
    """Run ``fn`` under torch's flop counter.

    Returns
    -------
    result : object
        What ``fn`` returned.
    flops : int or None
        Total floating-point operations counted (None when the counter failed, in which case
        ``fn`` is run again without it).
    """
    from torch.utils.flop_counter import FlopCounterMode

    try:
        counter = FlopCounterMode(display=False)
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


@dataclass
class PredictTimer:
    """Accumulates the time spent inside ``predict`` and the number of images scored.

    Parameters
    ----------
    device : torch.device
        Synchronised before each clock read.
    """

    device: torch.device
    seconds: float = 0.0
    images: int = 0
    latencies_ms: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def time(self, fn: Callable[[], Any], n_images: int) -> Any:
        """Call ``fn`` and add its duration to the FPS total."""
        synchronize(self.device)
        start = time.perf_counter()
        result = fn()
        synchronize(self.device)
        self.seconds += time.perf_counter() - start
        self.images += n_images
        return result

    def latency(self, fn: Callable[[], Any]) -> Any:
        """Call ``fn`` on one image and keep its duration as a latency sample."""
        synchronize(self.device)
        start = time.perf_counter()
        result = fn()
        synchronize(self.device)
        self.latencies_ms.append((time.perf_counter() - start) * 1000.0)
        return result

    @property
    def fps(self) -> float | None:
        """Images per second over the timed calls."""
        return self.images / self.seconds if self.seconds > 0 else None

    @property
    def latency_ms(self) -> float | None:
        """Median single-image latency in milliseconds."""
        return statistics.median(self.latencies_ms) if self.latencies_ms else None

    def peak_memory(self) -> tuple[float, str]:
        """Peak memory in MiB and what it measures."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20, "cuda max allocated"
        return peak_rss_mb(), "process peak RSS"
