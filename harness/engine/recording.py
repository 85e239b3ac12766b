"""Recording: the one record of a job, assembled from the stages' results and written atomically."""

from __future__ import annotations

import traceback
from typing import Any

from harness.engine.support.environment import now
from harness.engine.fitting import FitResult
from harness.metrics import mean_over_categories
from harness.engine.options import RunOptions
from harness.engine.planning import PlannedJob
from harness.results.record_parts import Environment, ErrorInfo, WeightUse
from harness.results.records import Record


def start_record(planned: PlannedJob, options: RunOptions, environment: dict[str, Any]) -> Record:
    """A ``running`` record for ``planned``, with everything known before it runs."""
    return Record(job=planned.job, status="running", settings=planned.settings.as_json(),
                  method_info={"choices": planned.choices()} if planned.choices() else {},
                  run=planned.run_info(options), environment=Environment.from_dict(environment), started=now())


def add_fit(record: Record, unit: str, result: FitResult, n_units: int) -> None:
    """Fold one unit's fit into the record (one-class jobs fit once per category)."""
    info = dict(result.info)
    if result.restored_from:
        info["fit_restored_from"] = result.restored_from
    if n_units > 1:
        record.method_info.setdefault("fits", {})[unit] = info
        # The last unit's facts also stand at the top level, as they did before per-unit facts.
    record.method_info.update(info)
    record.efficiency.train_seconds = (record.efficiency.train_seconds or 0.0) + result.train_seconds
    if result.resumed_from:
        record.run.resumed_from = {**(record.run.resumed_from or {}), unit: result.resumed_from}


def add_failure(record: Record, phase: str, error: BaseException) -> str:
    """Mark the record failed in ``phase``; return the one-line message for the summary."""
    record.status = "failed"
    record.error = ErrorInfo(phase=phase, type=type(error).__name__, message=str(error),
                             traceback="".join(traceback.format_exception(type(error), error, error.__traceback__)))
    return f"{phase}: {type(error).__name__}: {error}"


def finish_record(record: Record, weights_used: list[dict[str, Any]], mad_metrics: tuple[str, ...] | None = None
                  ) -> Record:
    """Close the record: status ``ok`` unless failed, means over categories (and mAD over
    ``mad_metrics``), the weight files used, the end time."""
    if record.status == "running":
        record.status = "ok"
    record.mean = mean_over_categories(record.metrics, mad_metrics) if record.metrics else {}
    record.weights = [WeightUse.from_dict(w) for w in weights_used]
    record.finished = now()
    return record
