"""What an MLflow run of a harness job holds (imported only when reporting is switched on).

One job, one run, in the experiment ``$HARNESS_MLFLOW_EXPERIMENT`` (default ``harness``), named
by the job's label (``method/profile on dataset protocol seed N``). The run opens when the job
starts (status RUNNING) and closes when its record is written (FINISHED or FAILED; KILLED when
the harness run is interrupted first).

- **Parameters**: the job's key (``job.method``, ``job.dataset``, ``job.protocol``, ``job.shots``,
  ``job.seed``, ``job.profile``), how it ran (``run.dev_run``, ``run.weights``, ``run.precision``,
  ``run.eval_size``, ``run.executor``) and every resolved setting (``setting.<name>``, JSON text).
- **Metrics**: ``mean/<metric>`` (the papers' ``m`` values and ``mad``), ``<category>/<metric>``
  for every category, and ``efficiency/<figure>`` (``fps``, ``latency_ms``, ``params``,
  ``flops_per_image``, ``peak_memory_mb``, ``train_seconds``, ...). Fractions stay fractions.
- **Tags**: ``harness.status``, ``harness.record`` (the record's path), the error's phase and type
  for a failed job, and the environment's harness version, git revision and device.
- **Artifacts**: ``record.json`` (the record as written), ``error.txt`` (the traceback of a failed
  job) and ``overlays/<category>/*.png``: the saved maps of the fixed sample and the method's
  worst false positive / negative, as heat overlays with the ground-truth outline (when the run
  saved maps, i.e. ``--save-maps sample`` or ``all``).

MLflow's limits are respected: parameter values are cut at 500 characters (the oldest servers'
limit), metric names keep only the characters MLflow accepts, batches stay under its sizes.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

from harness import Record

#: Longest parameter value logged (MLflow 1.x servers reject longer ones).
MAX_PARAM_CHARS = 500
_BATCH = 100


class MlflowMissingError(ImportError):
    """MLflow reporting was asked for but MLflow is not installed."""


def _metric_key(text: str) -> str:
    """A metric or parameter name MLflow accepts (letters, digits, ``_ - . / space``)."""
    return re.sub(r"[^\w./\- ]", "_", str(text))


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))


def _param_text(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= MAX_PARAM_CHARS else text[:MAX_PARAM_CHARS - 1] + "…"


class MlflowReporter:
    """Logs jobs to MLflow through :class:`mlflow.tracking.MlflowClient` (no global active run).

    Parameters
    ----------
    tracking_uri : str or None
        None: MLflow's default (``$MLFLOW_TRACKING_URI``...).
    experiment : str
    """

    def __init__(self, tracking_uri: str | None, experiment: str) -> None:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            raise MlflowMissingError("MLflow reporting was asked for (HARNESS_MLFLOW_TRACKING_URI or "
                                     "HARNESS_TRACKER=mlflow) but mlflow is not installed: "
                                     "pip install 'harness-ad[mlflow]'") from exc
        self.client = MlflowClient(tracking_uri=tracking_uri)
        found = self.client.get_experiment_by_name(experiment)
        self.experiment_id = found.experiment_id if found is not None else self.client.create_experiment(experiment)
        self.results_dir: Any = None
        self.runs: dict[Any, str] = {}

    # -- the hooks' work ----------------------------------------------------------------------
    def job_started(self, job: Any) -> str:
        """Create the job's run (RUNNING) with its key as parameters; returns the run id."""
        tags = {"harness.method": job.method, "harness.dataset": job.dataset, "harness.protocol": job.protocol_label,
                "harness.status": "running"}
        run = self.client.create_run(self.experiment_id, run_name=job.label, tags=tags)
        run_id = run.info.run_id
        self.runs[job] = run_id
        params = {"job.method": job.method, "job.dataset": job.dataset, "job.protocol": job.protocol,
                  "job.shots": job.shots, "job.seed": job.seed, "job.profile": job.profile}
        params.update({f"override.{k}": v for k, v in job.overrides})
        self._params(run_id, params)
        return run_id

    def job_finished(self, job: Any, record: Record) -> str:
        """Log everything the record holds and close the run; returns the run id."""
        record = Record.from_dict(record)  # a dict from a caller of the 0.3 API
        run_id = self.runs.pop(job, None) or self.job_started(job)
        self.runs.pop(job, None)
        run = record.run
        params: dict[str, Any] = {"run.dev_run": run.dev_run, "run.weights": run.weights}
        params.update({f"run.{name}": value for name, value in
                       (("precision", run.precision), ("eval_size", run.eval_size), ("executor", run.executor))
                       if value is not None})
        params.update({f"setting.{k}": v for k, v in record.settings.items()})
        self._params(run_id, params)
        self._metrics(run_id, record)
        self._tags(run_id, job, record)
        self.client.log_text(run_id, json.dumps(record.to_dict(), indent=2, allow_nan=False), "record.json")
        error = record.error
        if error is not None:
            text = f"{error.phase}: {error.type}: {error.message}\n\n{error.traceback or ''}"
            self.client.log_text(run_id, text, "error.txt")
        self._overlays(run_id, job, record)
        self.client.set_terminated(run_id, "FINISHED" if record.ok else "FAILED")
        return run_id

    def run_finished(self, interrupted: bool) -> None:
        """Close the runs of jobs that started but never finished."""
        for run_id in self.runs.values():
            self.client.set_terminated(run_id, "KILLED")
        self.runs.clear()

    # -- pieces -------------------------------------------------------------------------------
    def _params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(_metric_key(k), _param_text(v)) for k, v in params.items()]
        for start in range(0, len(items), _BATCH):
            self.client.log_batch(run_id, params=items[start:start + _BATCH])

    def _metrics(self, run_id: str, record: Record) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        values: dict[str, float] = {}
        for name, value in record.mean.items():
            if _finite(value):
                values[f"mean/{name}"] = float(value)
        for category, per in record.metrics.items():
            for name, value in (per or {}).items():
                if _finite(value):
                    values[f"{category}/{name}"] = float(value)
        for name, value in record.efficiency.figures():
            if _finite(value):
                values[f"efficiency/{name}"] = float(value)
        items = [Metric(_metric_key(k), v, now, 0) for k, v in values.items()]
        for start in range(0, len(items), 10 * _BATCH):
            self.client.log_batch(run_id, metrics=items[start:start + 10 * _BATCH])

    def _tags(self, run_id: str, job: Any, record: Record) -> None:
        from mlflow.entities import RunTag

        environment = record.environment
        tags = {"harness.status": record.status, "harness.version": environment.harness,
                # ``git`` is the name records of harness 0.1 used.
                "harness.git_revision": environment.git_revision or environment.get("git"),
                "harness.device": record.efficiency.device or environment.device}
        if self.results_dir is not None:
            tags["harness.record"] = str(job.record_path(Path(self.results_dir)))
        if record.error is not None:
            tags.update({"harness.error_phase": record.error.phase, "harness.error_type": record.error.type})
        items = [RunTag(k, _param_text(v)) for k, v in tags.items() if v is not None]
        self.client.log_batch(run_id, tags=items)

    def _overlays(self, run_id: str, job: Any, record: Record) -> None:
        """The saved sample maps as overlay PNGs under ``overlays/<category>/``."""
        if self.results_dir is None or not record.ok:
            return
        from harness.results.report.maps import SavedMapsError, read_sample
        from harness.results.report.overlay import overlay, save_png

        record_path = job.record_path(Path(self.results_dir))
        try:
            saved = read_sample(record_path, record)
        except SavedMapsError:
            return  # the record says what is missing; the run still has its numbers
        if not saved:
            return
        ranges: dict[str, tuple[float, float]] = {}
        for m in saved:
            low, high = ranges.get(m.category, (math.inf, -math.inf))
            ranges[m.category] = (min(low, float(m.amap.min())), max(high, float(m.amap.max())))
        with tempfile.TemporaryDirectory(prefix="harness-mlflow-") as tmp:
            for m in saved:
                name = re.sub(r"[^\w.-]+", "_", m.key.partition("/")[2]) + "-" + "+".join(m.roles) + ".png"
                save_png(overlay(m.image, m.amap, m.mask, *ranges[m.category]),
                         Path(tmp) / re.sub(r"[^\w.-]+", "_", m.category) / name)
            self.client.log_artifacts(run_id, tmp, "overlays")
