"""Sorted runs of defect-free scores: sorting in parts, counting over runs, spilling to disk, walking.

The building blocks of :class:`harness.metrics.engine.MetricAccumulator` (see that module for why
one sort gives every metric exactly): scores as order-preserving integers, a run sorted by
several threads, the counts ``>= t`` and ``> t`` over runs, a run moved to disk and memory-mapped
back, and the walk down the packed (score, region) keys of the defect pixels.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REGION_BITS = 32
REGION_MASK = (1 << REGION_BITS) - 1
# Sorting threads, and the smallest part worth a thread of its own.
_SORT_THREADS = min(4, os.cpu_count() or 1)
_MIN_PART = 1 << 21


def orderable_bits(scores: np.ndarray) -> np.ndarray:
    """Map float32 scores to int64 values in [-2**31, 2**31) with the same order.

    Non-negative floats already order like their bits read as int32; negative ones order
    backwards, so their magnitude bits are flipped. ``-0.0`` must be turned into ``+0.0`` first.
    """
    s = scores.view(np.int32).astype(np.int64)
    s ^= (s >> 31) & 0x7FFFFFFF
    return s


def scores_from_bits(bits: np.ndarray) -> np.ndarray:
    """Inverse of :func:`orderable_bits` (the map is its own inverse)."""
    s = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return s.astype(np.int32).view(np.float32)


@dataclass(frozen=True)
class SpilledRun:
    """A sorted run of defect-free scores moved to disk (see :meth:`MetricAccumulator._spill`)."""

    path: Path
    dtype: np.dtype
    size: int

    @property
    def nbytes(self) -> int:
        """Bytes on disk."""
        return self.size * self.dtype.itemsize

    @classmethod
    def write(cls, run: np.ndarray, path: Path) -> "SpilledRun":
        """Write ``run`` to ``path`` (raw, native byte order)."""
        try:
            run.tofile(path)
        except OSError as exc:
            raise OSError(f"cannot spill metric data to {path}: {exc}. Point $HARNESS_METRIC_SPILL_DIR at a folder "
                          "with free space, or raise $HARNESS_METRIC_MEMORY_MB") from exc
        return cls(Path(path), np.dtype(run.dtype), int(run.size))

    def open(self) -> np.ndarray:
        """The run as a read-only memory map (unmapped when the last reference goes)."""
        if self.size == 0:
            return np.zeros(0, dtype=self.dtype)
        return np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.size,))

    def read(self) -> np.ndarray:
        """The run in memory."""
        return np.fromfile(self.path, dtype=self.dtype, count=self.size)


def sorted_in_parts(run: np.ndarray) -> list[np.ndarray]:
    """Sort ``run`` in place as a few independently sorted parts, in parallel threads.

    Counts over sorted parts add up, so the parts never need merging; NumPy's sort releases the
    GIL, so on a machine with idle cores the sort (the engine's main cost) takes a fraction of
    the time.
    """
    workers = min(_SORT_THREADS, max(1, run.size // _MIN_PART))
    if workers <= 1:
        run.sort()
        return [run]
    parts = np.array_split(run, workers)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(np.ndarray.sort, parts))
    return parts


def count_at_least_and_above(run: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """How many values of the ascending ``run`` are ``>=`` / ``>`` each of the decreasing ``thresholds``."""
    ascending = thresholds[::-1]  # increasing queries let the binary search start where the last one ended
    left = np.searchsorted(run, ascending, side="left")
    right = left.copy()
    # Only thresholds that some value equals need the second search (few, unless scores are coarse).
    tied = np.flatnonzero(run[np.minimum(left, run.size - 1)] == ascending) if run.size else np.zeros(0, int)
    if tied.size:
        right[tied] = np.searchsorted(run, ascending[tied], side="right")
    np.subtract(run.size, left, out=left)
    np.subtract(run.size, right, out=right)
    return left[::-1], right[::-1]


def joined(chunks: list[np.ndarray], dtype) -> np.ndarray:
    if not chunks:
        return np.zeros(0, dtype=dtype)
    if len(chunks) == 1:
        return chunks[0].astype(dtype, copy=False)
    out = np.empty(sum(c.size for c in chunks), dtype=dtype)
    at = 0
    while chunks:
        # Free each chunk as soon as it is copied, so the peak stays near one copy.
        chunk = chunks.pop(0)
        out[at:at + chunk.size] = chunk
        at += chunk.size
    return out


def walk_descending(key: np.ndarray, weight: np.ndarray, block: int = 1 << 18):
    """Thresholds, TP counts and PRO of sorted packed keys, walked from the top in blocks.

    Working in blocks keeps the temporaries at a block's size, however many defect pixels there are.

    Returns
    -------
    thresholds : float32 array, decreasing
    tps : int64 array
    pro : float64 array
    """
    thresholds, tps, pro = [], [], []
    carry = 0.0
    done = 0
    end = key.size
    while end > 0:
        start = max(0, end - block)
        part = key[start:end][::-1]
        bits = part >> REGION_BITS
        gained = np.cumsum(weight[part & REGION_MASK])
        gained += carry
        carry = float(gained[-1])
        # A pixel closes its tie group when the next one (in decreasing order) scores lower.
        next_bits = key[start - 1] >> REGION_BITS if start > 0 else None
        ends = np.flatnonzero(bits[1:] != bits[:-1])
        if next_bits is None or next_bits != bits[-1]:
            ends = np.r_[ends, bits.size - 1]
        thresholds.append(scores_from_bits(bits[ends]))
        tps.append(ends + done + 1)
        pro.append(gained[ends])
        done += part.size
        end = start
    return np.concatenate(thresholds), np.concatenate(tps).astype(np.int64), np.concatenate(pro)
