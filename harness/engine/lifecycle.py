"""One job's lifecycle, the same under every executor: skip, lock or wait, start, write, report.

An executor decides only where and when a job's work runs (here, as a Ray task, on whatever a
third party registers); what happens around that work is written once, here:

1. **skip** (:meth:`JobLifecycle.skip`): a job whose ``ok`` record exists is not run again unless
   ``--force``; a damaged record is moved aside (``.corrupt``) and the job redone;
2. **lock** (:meth:`~JobLifecycle.wait_for_lock`, or :meth:`~JobLifecycle.try_lock` for an
   executor that polls): two runs sharing a results folder never run one job twice; a job another
   run holds waits for it and is skipped if that run finished it; after ``lock_timeout`` seconds it
   ends as failed (:meth:`~JobLifecycle.lock_timed_out`), without a record, and the run goes on;
3. **start** (:meth:`~JobLifecycle.started`): the reporters hear ``harness_job_started``;
4. **write** (:meth:`~JobLifecycle.finish`): the record, atomically, then the reporters'
   ``harness_job_finished`` and the job's :class:`~harness.engine.outcomes.JobOutcome`. A job that
   ended without a record of its own (a lost worker, a task the executor could not run) gets one
   from :meth:`~JobLifecycle.failure_record`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from harness.engine.options import RunOptions
from harness.engine.outcomes import JobOutcome
from harness.engine.planning import PlannedJob
from harness.engine.recording import finish_record, start_record
from harness.engine.registry import Registry
from harness.engine.support.fsutil import move_aside
from harness.engine.support.locks import JobLock
from harness.results.record_parts import ErrorInfo
from harness.results.records import DamagedRecordError, Record, load_record, write_record

__all__ = ["JobLifecycle"]


class JobLifecycle:
    """What every executor does around a job's work (see the module docstring).

    Parameters
    ----------
    registry : Registry
        Its reporters hear each job start and finish.
    options : RunOptions
        ``results_dir`` (records and locks), ``force``, ``lock_timeout``.
    notify : callable
        ``notify(line)`` shows a line to the user (without breaking progress bars).
    """

    def __init__(self, registry: Registry, options: RunOptions, notify: Callable[[str], None]) -> None:
        self.registry = registry
        self.options = options
        self.notify = notify

    # -- before the work -----------------------------------------------------------------------------
    def finished_record(self, planned: PlannedJob) -> Record | None:
        """The job's ``ok`` record, if one exists (a damaged one is moved aside, and None returned)."""
        path = planned.record_path
        if not path.exists():
            return None
        try:
            record = load_record(path)
        except DamagedRecordError as exc:
            moved = move_aside(path)
            self.notify(f"warning: {exc}; moved it to {moved} and redoing the job")
            return None
        return record if record.ok else None

    def skip(self, planned: PlannedJob) -> JobOutcome | None:
        """The ``skipped`` outcome of a job that finished before (never with ``--force``), else None."""
        if self.options.force:
            return None
        done = self.finished_record(planned)
        return None if done is None else JobOutcome(planned.job, "skipped", planned.record_path, done.to_dict())

    def _lock(self, planned: PlannedJob) -> JobLock:
        return JobLock(planned.job.lock_path(self.options.results_dir))

    def _waiting(self, planned: PlannedJob, owner: Mapping[str, Any] | None) -> None:
        owner = owner or {}
        self.notify(f"{planned.job.label} is running in another process ({owner.get('host', '?')}, pid "
                    f"{owner.get('pid', '?')}); waiting for it")

    def try_lock(self, planned: PlannedJob) -> JobLock:
        """The job's lock, taken now if it is free (``lock.held``); else the user is told it waits."""
        lock = self._lock(planned)
        if not lock.try_acquire():
            self._waiting(planned, lock.owner())
        return lock

    def wait_for_lock(self, planned: PlannedJob) -> JobLock:
        """The job's lock, waiting up to ``lock_timeout`` for another run to release it (``lock.held``
        is False when that time ran out)."""
        lock = self._lock(planned)
        lock.acquire(on_wait=lambda owner: self._waiting(planned, owner), timeout=self.options.lock_timeout)
        return lock

    def lock_timed_out(self, planned: PlannedJob, lock: JobLock) -> JobOutcome:
        """The outcome of a job another run kept locked past ``lock_timeout``: failed, no record."""
        message = (f"still locked by another run after {self.options.lock_timeout:g} s ({lock.path}); remove the "
                   "lock file if that run is gone")
        self.notify(f"FAILED {planned.job.label}: {message}")
        return JobOutcome(planned.job, "failed", planned.record_path, None, message)

    def started(self, planned: PlannedJob) -> None:
        """The job's work began (the reporters' ``harness_job_started``)."""
        self.registry.call_reporters("harness_job_started", job=planned.job)

    # -- after the work ------------------------------------------------------------------------------
    def failure_record(self, planned: PlannedJob, options: RunOptions, phase: str, error_type: str, message: str,
                       traceback: str = "", environment: Mapping[str, Any] | None = None) -> Record:
        """The record of a job that ended without one of its own (a lost worker, a task error)."""
        record = start_record(planned, options, dict(environment or {}))
        record.status = "failed"
        record.error = ErrorInfo(phase=phase, type=error_type, message=message, traceback=traceback)
        finish_record(record, [], None)
        return record

    def finish(self, planned: PlannedJob, record: Record, message: str = "") -> JobOutcome:
        """Write ``record`` atomically, tell the reporters, and return the job's outcome."""
        write_record(planned.record_path, record)
        self.registry.call_reporters("harness_job_finished", job=planned.job, record=record)
        return JobOutcome(planned.job, record.status, planned.record_path, record, message if not record.ok else "")
