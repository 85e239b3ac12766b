"""A benchmarking harness for visual anomaly detection.

The public API that plugins use is re-exported here: the contract (hook marker, specs, the
method interface, data shapes, typed settings, errors, and the job key and typed record that
reporters receive). Building blocks that several methods
share live apart, in :mod:`harness.toolkit`, which plugins import by choice; metrics in
:mod:`harness.metrics`; the conformance checks a third party runs in its own tests in
:mod:`harness.testing`.

The package's folders follow a job: the contract is this folder's modules (``specs``, ``method``,
``settings``, ``hookspecs``, ``data``, ``errors``, ``testing``); :mod:`harness.engine` plans and
runs jobs and writes their records; :mod:`harness.results` reads records (leaderboard, report,
export); :mod:`harness.metrics` is the metric engine. Paths that moved keep working
(:mod:`harness._compat`).
"""

from __future__ import annotations

__version__ = "0.4.1"

from harness import _compat  # noqa: E402

_compat.install()

from harness.data import CategoryData, DatasetIndex, MaskChannel, Sample, TrainSet, read_image, read_mask  # noqa: E402
from harness.errors import (DatasetError, HarnessError, MethodOutputError, WeightsNotFoundError,  # noqa: E402
                            WeightsVerifyError)
from harness.hookspecs import hookimpl  # noqa: E402
from harness.method import (Checkpointing, FitContext, Method, Prediction, ProgressReporter,  # noqa: E402
                            StagePosition, WeightFinder)
from harness.settings import Setting, Settings, SettingsSchema  # noqa: E402
from harness.engine.jobs import Job  # noqa: E402
from harness.results.record_parts import Efficiency, Environment, ErrorInfo, RunInfo, WeightUse  # noqa: E402
from harness.results.records import Record  # noqa: E402
from harness.specs import (DataNeed, DatasetSpec, EvalGrid, ExecutorSpec, MethodSpec, MetricSpec, PaperRef,  # noqa: E402
                           Resources, WeightFile)

__all__ = [
    "__version__", "hookimpl", "Method", "Prediction", "FitContext", "WeightFinder", "Checkpointing", "StagePosition",
    "ProgressReporter", "MethodSpec", "DatasetSpec", "MetricSpec",
    "ExecutorSpec", "DataNeed", "EvalGrid", "PaperRef", "Resources", "WeightFile", "Setting", "Settings", "SettingsSchema", "Sample",
    "MaskChannel",
    "CategoryData", "DatasetIndex", "TrainSet", "read_image", "read_mask", "DatasetError", "HarnessError",
    "MethodOutputError", "WeightsNotFoundError", "WeightsVerifyError",
    # What reporters receive: the job's key and its typed record.
    "Job", "Record", "RunInfo", "Efficiency", "Environment", "ErrorInfo", "WeightUse",
]
