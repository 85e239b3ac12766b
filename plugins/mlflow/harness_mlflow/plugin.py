"""The reporter hooks (entry-point module: cheap to import, no MLflow import here).

Switch it on for a run with either environment variable:

``HARNESS_MLFLOW_TRACKING_URI=URI``
    Report to this tracking URI (``file:///path/mlruns``, ``sqlite:///mlflow.db``,
    ``http://host:5000``, ``databricks``...).
``HARNESS_TRACKER=mlflow``
    Report to MLflow's own default (``$MLFLOW_TRACKING_URI``, else MLflow's local default);
    the variable takes a comma-separated list, so other tracker plugins can share it.

``HARNESS_MLFLOW_EXPERIMENT`` names the experiment (default ``harness``). Without any of these
the hooks return at once, so an installed but unused plugin costs nothing. The reporter holds
no state between runs of the ``harness`` command; a job skipped because it already finished is
not logged again.

MLflow 3.x refuses a plain-folder (``file:``) store unless ``MLFLOW_ALLOW_FILE_STORE=true`` is
set: that is MLflow's rule, left as it is.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

from harness import hookimpl

#: Environment variables the plugin reads.
URI_VARIABLE, TRACKER_VARIABLE, EXPERIMENT_VARIABLE = ("HARNESS_MLFLOW_TRACKING_URI", "HARNESS_TRACKER",
                                                       "HARNESS_MLFLOW_EXPERIMENT")
DEFAULT_EXPERIMENT = "harness"

_state: dict[str, Any] = {"reporter": None, "results_dir": None}


def requested() -> bool:
    """Whether the user asked for MLflow reporting (see the module docstring)."""
    trackers = {t.strip().lower() for t in os.environ.get(TRACKER_VARIABLE, "").split(",") if t.strip()}
    return bool(os.environ.get(URI_VARIABLE)) or "mlflow" in trackers


def _reporter():
    """The run's reporter, built on first use (imports MLflow); None when not requested.

    When it cannot be built (MLflow missing, store unreachable) the error is raised once, so the
    registry reports it naming this plugin, and the remaining hooks of the run stay silent.
    """
    if not requested() or _state.get("broken"):
        return None
    if _state["reporter"] is None:
        from harness_mlflow.reporter import MlflowReporter

        try:
            _state["reporter"] = MlflowReporter(tracking_uri=os.environ.get(URI_VARIABLE) or None,
                                                experiment=os.environ.get(EXPERIMENT_VARIABLE) or DEFAULT_EXPERIMENT)
        except Exception:
            _state["broken"] = True
            raise
    return _state["reporter"]


@hookimpl
def harness_run_started(jobs: Sequence[Any], options: Mapping[str, Any]) -> None:
    """Remember the results folder (saved maps are read from it) and check that MLflow is there."""
    _state.update(results_dir=options.get("results_dir"), reporter=None, broken=False)
    reporter = _reporter()
    if reporter is not None:
        reporter.results_dir = _state["results_dir"]


@hookimpl
def harness_job_started(job: Any) -> None:
    """Open the job's MLflow run (status RUNNING) with its settings as parameters."""
    reporter = _reporter()
    if reporter is not None:
        reporter.results_dir = reporter.results_dir or _state["results_dir"]
        reporter.job_started(job)


@hookimpl
def harness_job_finished(job: Any, record: Any) -> None:
    """Log the record's metrics, efficiency figures, the record and its overlays; close the run."""
    reporter = _reporter()
    if reporter is not None:
        reporter.results_dir = reporter.results_dir or _state["results_dir"]
        reporter.job_finished(job, record)


@hookimpl
def harness_run_finished(records: Sequence[Any], interrupted: bool) -> None:
    """Close the runs of jobs that never finished (interrupted): status KILLED."""
    reporter = _state["reporter"]
    if reporter is not None:
        reporter.run_finished(interrupted)
    _state["reporter"] = None
