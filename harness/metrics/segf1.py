"""MVTec AD 2's threshold-dependent metric, SegF1, with a threshold chosen on normal images only.

Definition
----------
- Threshold (chosen without any test anomaly, as the MVTec AD 2 paper prescribes: on the
  validation split, which holds defect-free images only): ``t = mean + 3 * std`` of every pixel
  score of every validation anomaly map of the category, on the evaluation grid (population
  standard deviation). This is the statistical rule the dataset paper's baselines use for their
  thresholded maps (also restated by later MVTec AD 2 papers, e.g. RoBiS: "mean+3std").
- SegF1: a pixel is predicted defective when its score is ``>= t``; over all pixels of all test
  images of the category (normal images included), ``SegF1 = 2 TP / (2 TP + FP + FN)``.

The private test sets are scored by MVTec's server from the thresholded maps the harness writes
with the same ``t`` (see :mod:`harness.engine.inference.unscored`); locally only ``test_public`` is scored.
"""

from __future__ import annotations

import numpy as np

#: Metrics that read ``CategoryScores.validation_threshold`` (the runner predicts validation images for them).
THRESHOLD_METRICS = ("pixel_segf1",)

#: How many standard deviations above the mean the threshold sits.
N_STD = 3.0


class RunningMoments:
    """Mean and population standard deviation of many arrays, merged exactly (Chan et al.'s update)."""

    def __init__(self) -> None:
        self.n = 0
        self.mean = 0.0
        self.m2 = 0.0

    def update(self, values: np.ndarray) -> None:
        """Add every value of ``values``."""
        values = np.asarray(values, dtype=np.float64).ravel()
        if values.size == 0:
            return
        n_b, mean_b = values.size, float(values.mean())
        m2_b = float(np.square(values - mean_b).sum())
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / n
        self.m2 += m2_b + delta * delta * self.n * n_b / n
        self.n = n

    @property
    def std(self) -> float:
        """Population standard deviation (NaN when empty)."""
        return float(np.sqrt(self.m2 / self.n)) if self.n else float("nan")

    def threshold(self, n_std: float = N_STD) -> float | None:
        """``mean + n_std * std``; None without values."""
        return self.mean + n_std * self.std if self.n else None


class SegF1Counter:
    """TP, FP and FN of ``score >= threshold`` against the masks, batch by batch."""

    def __init__(self, threshold: float) -> None:
        self.threshold = float(threshold)
        self.tp = self.fp = self.fn = 0

    def update(self, amap: np.ndarray, mask: np.ndarray) -> None:
        """Add one map and its boolean mask (same shape)."""
        predicted = np.asarray(amap) >= self.threshold
        mask = np.asarray(mask, dtype=bool)
        tp = int(np.count_nonzero(predicted & mask))
        self.tp += tp
        self.fp += int(np.count_nonzero(predicted)) - tp
        self.fn += int(np.count_nonzero(mask)) - tp

    def value(self) -> float:
        """SegF1; NaN when neither a prediction nor a defect pixel exists."""
        denominator = 2 * self.tp + self.fp + self.fn
        return 2.0 * self.tp / denominator if denominator else float("nan")


def segf1(maps, masks, threshold: float) -> float:
    """SegF1 of ``maps >= threshold`` against ``masks`` over all their pixels (see the module docstring)."""
    counter = SegF1Counter(threshold)
    for amap, mask in zip(maps, masks):
        counter.update(amap, mask)
    return counter.value()


__all__ = ["N_STD", "THRESHOLD_METRICS", "RunningMoments", "SegF1Counter", "segf1"]
