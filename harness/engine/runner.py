"""Running a planned job: a straight line from plan to record.

    plan (harness.engine.planning) -> lock -> build -> fit (harness.engine.fitting) -> evaluate
    (harness.engine.inference.evaluation) -> record (harness.engine.recording)

Guarantees
----------
- A job's fit sees only the training samples its protocol allows (:mod:`harness.engine.protocols`);
  test images reach the method only through ``predict``.
- Each job ends with one record written atomically (:mod:`harness.results.records`). A job that raises,
  or whose method returns NaN/inf or wrongly shaped maps, is recorded as failed with the phase,
  the error and the metrics of the categories finished before; the run goes on.
- A rerun skips jobs whose record says ``ok`` (``force`` redoes them); failed jobs are retried;
  a damaged record is moved aside (``.corrupt``) and its job redone. A finished fit is cached,
  so a job interrupted during prediction resumes without training again; a fit interrupted
  mid-way resumes from its latest checkpoint.
- Two runs of the same job never train it twice: the job is locked (:mod:`harness.engine.support.locks`); the
  second run waits and then finds the record.
- Ctrl-C and SIGTERM stop the run (:mod:`harness.engine.support.signals`); every record already written stays
  valid, the fit in progress is checkpointed.

:class:`JobRunner` runs one job; executors (:mod:`harness.engine.executors`) decide where and in which
order jobs run. :class:`Runner` is the in-process shortcut that plans and runs a list of jobs.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from harness.engine.inference.acceleration import apply_tf32, library_versions, precision_mode, prepare_inference, tf32_flags
from harness.data import ImageCache
from harness.engine.support.environment import environment, seed_everything
from harness.engine.inference.evaluation import Evaluator, MapSink, check_prediction, native_size, resize_map
from harness.engine.fitting import fit_unit
from harness.engine.inference.flops import limit_share
from harness.engine.support.fsutil import StorageError
from harness.engine.jobs import Job
from harness.engine.lifecycle import JobLifecycle
from harness.engine.options import RunOptions
from harness.engine.outcomes import JobOutcome, RunSummary
from harness.engine.planning import Plan, PlannedJob, Planner, resolve_settings
from harness.engine.support.progress import Progress
from harness.engine.recording import add_failure, add_fit, finish_record, start_record
from harness.results.records import Record
from harness.engine.registry import Registry
from harness.engine.support.signals import RunInterrupted, handle_stop_signals
from harness.engine.weights import WeightsResolver

__all__ = ["RunOptions", "JobOutcome", "RunSummary", "JobRunner", "Runner", "run_plan", "resolve_settings",
           "check_prediction", "native_size", "resize_map"]


class _JobFailure(Exception):
    """Carries the phase in which a job failed."""

    def __init__(self, phase: str, error: BaseException) -> None:
        super().__init__(str(error))
        self.phase = phase
        self.error = error


class JobRunner:
    """Runs planned jobs one at a time in this process.

    Parameters
    ----------
    registry : Registry
    options : RunOptions
    sinks : callable, optional
        ``sinks(planned) -> list of MapSink``: where each job's maps go besides the metrics; a
        sink's ``close()`` returns what goes into the record's ``artifacts``. Default: the saved
        maps ``options.save_maps`` asks for (:func:`harness.results.report.maps.saved_maps_sinks`).
    """

    def __init__(self, registry: Registry, options: RunOptions, sinks: Any = None) -> None:
        self.registry = registry
        self.options = options
        self._device = None
        self.progress = Progress(options.progress)
        self.images = ImageCache()
        if sinks is None:
            # --save-maps sample|all: the saved maps of the report and export-maps (harness.results.report.maps).
            from harness.results.report.maps import saved_maps_sinks

            sinks = saved_maps_sinks(options)
        self.sinks = sinks
        self._env: dict[str, Any] | None = None
        self.lifecycle = JobLifecycle(registry, options, self.notify)

    @property
    def device(self):
        """The torch device jobs run on here (resolved on first use: a Ray driver never needs it)."""
        if self._device is None:
            self._device = self.options.torch_device()
        return self._device

    def notify(self, message: str) -> None:
        """Print a line without breaking the progress bars."""
        self.progress.write(message)

    def existing(self, planned: PlannedJob) -> Record | None:
        """The job's ``ok`` record, if one exists (:meth:`JobLifecycle.finished_record`)."""
        return self.lifecycle.finished_record(planned)

    def run_job(self, planned: PlannedJob) -> JobOutcome:
        """Run one job here through its lifecycle (:mod:`harness.engine.lifecycle`): skip, lock, run, write."""
        if (skipped := self.lifecycle.skip(planned)) is not None:
            return skipped
        lock = self.lifecycle.wait_for_lock(planned)
        try:
            if not lock.held:
                return self.lifecycle.lock_timed_out(planned, lock)
            # Another run may have finished the job while this one waited for the lock.
            if (skipped := self.lifecycle.skip(planned)) is not None:
                return skipped
            self.lifecycle.started(planned)
            record, message = self.run_locked(planned)
            return self.lifecycle.finish(planned, record, message)
        finally:
            lock.release()

    def run_locked(self, planned: PlannedJob) -> tuple[Record, str]:
        """The job's work, under its lock: its record (not yet written) and the failure message, if any."""
        job = planned.job
        if self._env is None:
            self._env = environment(self.device)
        apply_tf32(self.options.tf32)
        # The numerics environment of this job: the machine's, plus how inference ran
        # (harness.engine.support.environment.NUMERICS_KEYS).
        env = {**self._env, "tf32": self.options.tf32, "compile": self.options.compile,
               "precision": precision_mode(str(planned.settings.get("precision", "fp32")), self.options.precision_mode)}
        record = start_record(planned, self.options, env)
        weights = WeightsResolver(self.options.weights_dir, pull_hint=f"harness weights pull --methods {job.method}")
        seed_everything(job.seed)
        message = ""
        try:
            self._execute(planned, record, weights)
        except _JobFailure as failure:
            message = add_failure(record, failure.phase, failure.error)
        mad = tuple(m.name for m in self.registry.metric_specs(job.dataset) if m.in_mad)
        finish_record(record, weights.used, mad or None)
        return record, message

    def _batch_size(self, evaluator: Evaluator, method: Any, tests: dict[str, Any]) -> dict[str, Any]:
        """Apply ``--eval-batch-size`` to ``method``; the record's ``eval_batch_size`` and its source."""
        choice = self.options.eval_batch_size
        if choice is None:
            return {"eval_batch_size": method.eval_batch_size, "eval_batch_size_source": "method setting"}
        if choice == "auto":
            largest = max((len(s) for s in tests.values()), default=1)
            first = next((s[0] for s in tests.values() if s), None)
            if first is not None:
                method.eval_batch_size = evaluator.auto_batch_size(method, first, largest)
            return {"eval_batch_size": method.eval_batch_size,
                    "eval_batch_size_source": "auto (largest that fits the device)" if self.device.type == "cuda"
                    else "auto (CPU: the method's own)"}
        method.eval_batch_size = int(choice)
        return {"eval_batch_size": method.eval_batch_size, "eval_batch_size_source": "--eval-batch-size"}

    def _execute(self, planned: PlannedJob, record: Record, weights: WeightsResolver) -> None:
        from harness.metrics.segf1 import THRESHOLD_METRICS

        phase = "build"
        metrics = self.registry.metric_specs(planned.job.dataset)
        sinks: list[MapSink] = list(self.sinks(planned)) if self.sinks is not None else []
        evaluator = Evaluator(planned.job.dataset, metrics, planned.eval_size, self.device, self.images, self.progress,
                              self.options.latency_repeats, sinks, grid=planned.grid, seed=planned.job.seed,
                              min_calls=self.options.min_timed_calls)
        if planned.unscored:
            from harness.engine.inference.unscored import reset_unscored

            reset_unscored(planned.record_path)
        try:
            for unit in planned.units:
                phase = "build"
                method = planned.spec.factory(planned.settings)
                method.to(self.device)
                counts = method.parameter_count()
                record.efficiency.update(params_by_network=counts, params=sum(counts.values()),
                                         eval_batch_size=method.eval_batch_size, input_size=list(method.input_size))
                phase = "fit"
                result = fit_unit(planned, unit, method, options=self.options, device=self.device,
                                  progress=self.progress, images=self.images, weights=weights, notify=self.notify)
                add_fit(record, unit.name, result, len(planned.units))
                phase = "predict"
                method.eval()
                tests = {c: planned.tests[c] for c in unit.test_categories}
                setup = prepare_inference(method, str(planned.settings.get("precision", "fp32")),
                                          self.options.precision_mode, self.options.compile)
                evaluator.fallback = setup.fall_back
                record.efficiency.update(setup.record())
                record.efficiency.update(self._batch_size(evaluator, method, tests))
                # Thresholds from validation normals only (MVTec AD 2's SegF1), before any test image.
                wanted = planned.unscored or any(m.name in THRESHOLD_METRICS for m in metrics)
                thresholds = {c: evaluator.validation_threshold(method, planned.validation[c])
                              for c in unit.test_categories if c in planned.validation and wanted}
                record.metrics.update(evaluator.evaluate(method, tests, planned.job.method, thresholds))
                unscored = {c: planned.unscored[c] for c in unit.test_categories if c in planned.unscored}
                if unscored:
                    from harness.engine.inference.unscored import add_unscored, write_unscored

                    add_unscored(record.artifacts, write_unscored(evaluator, method, unscored, thresholds,
                                                                  planned.record_path))
                record.efficiency.compile_fallback = setup.fallback
                del method
            record.efficiency.update(evaluator.efficiency())
            record.efficiency.update(tf32=tf32_flags(), cudnn_benchmark=bool(torch.backends.cudnn.benchmark),
                                     **library_versions())
            record.efficiency.update(limit_share(record.efficiency.flops_per_image, record.efficiency.fps,
                                                 self._env.get("device_name") if self._env else None,
                                                 str(planned.settings.get("precision", "fp32")),
                                                 tf32_flags()["matmul"]))
            for sink in sinks:
                close = getattr(sink, "close", None)
                if close is not None:
                    record.artifacts.update(close() or {})
        except (KeyboardInterrupt, StorageError):
            # A full disk or an unwritable folder is not the method's failure: the run stops, and
            # what was written stays valid.
            raise
        except Exception as exc:  # noqa: BLE001 - every failure of a job is recorded, the run goes on
            raise _JobFailure(phase, exc) from exc


def run_plan(registry: Registry, plan: Plan, executor: Any = None, runner: JobRunner | None = None) -> RunSummary:
    """Run a plan with an executor (in process by default), calling the reporters around it.

    Ctrl-C and SIGTERM end the run cleanly: ``summary.interrupted`` is set and
    ``summary.exit_code`` is 130 or 143.
    """
    from harness.engine.executors.inprocess import InProcessExecutor

    executor = executor or InProcessExecutor()
    runner = runner or JobRunner(registry, plan.options)
    registry.call_reporters("harness_run_started", jobs=[p.job for p in plan.jobs], options=vars(plan.options))
    summary = RunSummary()
    try:
        with handle_stop_signals():
            summary = executor.run(plan, runner)
    except RunInterrupted as stop:
        summary.interrupted, summary.signal_exit = True, stop.exit_code
    finally:
        records = [o.record for o in summary.outcomes if o.record is not None]
        registry.call_reporters("harness_run_finished", records=records, interrupted=summary.interrupted)
    return summary


class Runner:
    """Plans and runs jobs in this process (the shortcut used by tests and scripts).

    Parameters
    ----------
    registry : Registry
    options : RunOptions
    """

    def __init__(self, registry: Registry, options: RunOptions) -> None:
        self.registry = registry
        self.options = options
        self.job_runner = JobRunner(registry, options)
        self.device = self.job_runner.device

    def plan(self, jobs: Sequence[Job]) -> Plan:
        """Plan ``jobs`` (usage errors raise here, before anything runs)."""
        return Planner(self.registry, self.options).plan(jobs)

    def run(self, jobs: Sequence[Job] | Plan) -> RunSummary:
        """Plan (unless given a plan) and run ``jobs`` in order."""
        plan = jobs if isinstance(jobs, Plan) else self.plan(jobs)
        return run_plan(self.registry, plan, runner=self.job_runner)
