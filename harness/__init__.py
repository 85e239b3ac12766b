"""A benchmarking harness for visual anomaly detection.

The public API that plugins use is re-exported here; a plugin imports from ``harness`` (and
``harness.ops``, ``harness.coreset``, ``harness.metrics``) only.
"""

from __future__ import annotations

__version__ = "0.1.0"

from harness.data import CategoryData, DatasetIndex, Sample, TrainSet, read_image, read_mask  # noqa: E402
from harness.errors import DatasetError, HarnessError, MethodOutputError, WeightsNotFoundError  # noqa: E402
from harness.hookspecs import hookimpl  # noqa: E402
from harness.method import FitContext, Method, Prediction  # noqa: E402
from harness.specs import DatasetSpec, MethodSpec, MetricSpec, PaperRef  # noqa: E402

__all__ = [
    "__version__", "hookimpl", "Method", "Prediction", "FitContext", "MethodSpec", "DatasetSpec", "MetricSpec",
    "PaperRef", "Sample", "CategoryData", "DatasetIndex", "TrainSet", "read_image", "read_mask", "DatasetError",
    "HarnessError", "MethodOutputError", "WeightsNotFoundError",
]
