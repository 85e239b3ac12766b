"""The driver side of a Ray run: admit each job through the shared lifecycle, submit it, collect its
record, retry a lost worker, stop on Ctrl-C (see the package docstring)."""

from __future__ import annotations

import dataclasses
import signal
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

import ray

from harness.engine.executors.ray.resources import (NAME, check_requests, plugins_for, reason, shipped_options,
                                                    task_options, torch_threads)
from harness.engine.executors.ray.board import drain_board, start_board, stop_board
from harness.engine.executors.ray.worker import cpu_job, gpu_job, place_artifacts
from harness.engine.support import signals
from harness.errors import UsageError

if TYPE_CHECKING:  # pragma: no cover
    from harness.engine.executors.ray.executor import RayExecutor

#: Seconds between two looks at the tasks and at the job status board.
POLL_SECONDS = 0.5
#: Seconds the driver waits, after Ctrl-C, for running jobs to save their checkpoints.
STOP_GRACE_SECONDS = 60.0
#: Seconds to wait for the job status board to answer before going on without it.
BOARD_TIMEOUT_SECONDS = 10.0


@dataclass
class _Flight:
    """One job between its submission and its record."""

    index: int
    planned: Any
    lock: Any
    request: dict[str, Any]
    attempt: int = 1
    ref: Any = None
    started: bool = False
    ended: bool = False
    cancelled: bool = False
    retried_after: list[str] = field(default_factory=list)


@dataclass
class _Waiting:
    """A job whose lock another run holds."""

    index: int
    planned: Any
    lock: Any
    since: float


class Driver:
    """One run of :class:`RayExecutor`: admit, submit, collect, retry, stop."""

    def __init__(self, executor: "RayExecutor", plan: Any, runner: Any) -> None:
        from harness.engine.outcomes import RunSummary

        self.executor = executor
        self.plan = plan
        self.runner = runner
        self.lifecycle = runner.lifecycle
        self.options = plan.options
        self.record_options = dataclasses.replace(plan.options, executor=NAME)
        self.worker_options = shipped_options(plan.options)
        self.summary = RunSummary()
        self.flights: dict[Any, _Flight] = {}
        self.known: dict[int, _Flight] = {}
        self.stopping: list[_Flight] = []
        self.waiting: list[_Waiting] = []
        self.requests: dict[int, dict[str, Any]] = {}
        self.plugins: dict[int, tuple[tuple[str, str], ...]] = {}
        self.todo: list[tuple[int, Any]] = []
        self.board: Any = None
        self.bar: Any = None
        self.counts = {"ok": 0, "failed": 0, "skipped": 0}
        self.retried = 0
        self.notes_seen: set[str] = set()
        self.cpu_task = ray.remote(max_retries=0)(cpu_job)
        self.gpu_task = ray.remote(max_retries=0, max_calls=1)(gpu_job)

    # -- the run ---------------------------------------------------------------------------------
    def go(self) -> Any:
        self._check()
        self.board = start_board()
        try:
            with self.runner.progress.bar(total=len(self.plan.jobs), desc="jobs", unit="job", leave=True) as bar:
                self.bar = bar
                bar.update(len(self.summary.outcomes))  # the jobs skipped before Ray started
                try:
                    with signals.deferred():
                        stop = self._loop()
                        if stop is not None:
                            self._stop(stop, graceful=True)
                except KeyboardInterrupt as exc:  # a second signal, or Ctrl-C without the run's handlers
                    self._stop(exc.signum if isinstance(exc, signals.RunInterrupted) else signal.SIGINT, graceful=False)
                except BaseException:  # e.g. a full disk on the driver: the run stops, no task is left running
                    for flight in list(self.flights.values()):
                        self._cancel(flight, force=True)
                    raise
        finally:
            for flight in list(self.flights.values()):
                flight.lock.release()
            stop_board(self.board)
            self.board = None
        return self.summary

    def skip_finished(self) -> None:
        """Skip every job whose ``ok`` record exists; the others are left in :attr:`todo`."""
        for index, planned in enumerate(self.plan.jobs):
            if not self._skip_finished(planned):
                self.todo.append((index, planned))

    def _check(self) -> None:
        """Each job's request and plugins, checked against ``--device`` and the cluster's nodes."""
        device = self.options.device
        for index, planned in self.todo:
            request = task_options(planned.resources, device)
            if device.startswith("cuda") and request["num_gpus"] == 0:
                raise UsageError(f"--device {device}, but {planned.job.label} asks Ray for no GPU, and Ray gives a "
                                 "GPU only to a task that asks for one: pass --job-gpus 1 (or a fraction)")
            self.requests[index] = request
            self.plugins[index] = plugins_for(self.runner.registry, planned.job)
        if device.startswith("cuda:"):
            self.runner.notify(f"note: --device {device}: on Ray each job runs on the GPU Ray assigns it")
        checked = {index: (planned.job.label, self.requests[index]) for index, planned in self.todo}
        too_big, memory = check_requests(checked, ray.nodes())
        if too_big and self.executor.local:
            raise UsageError("no node of the local Ray instance can run these jobs:\n"
                             + "\n".join(f"  - {line}" for line in too_big.values()))
        for line in too_big.values():
            self._note(f"warning: {line}; it waits until a node that fits joins the cluster")
        for index, line in memory.items():
            if self.executor.local:
                # There is no option to lower a memory request; the estimate must not stop the run.
                self.requests[index].pop("memory", None)
                self._note(f"warning: {line}; running it without a memory reservation (it may run out of memory)")
            else:
                self._note(f"warning: {line}; it waits until a node that fits joins the cluster")

    def _loop(self) -> int | None:
        """Admit every job, then collect until none is left; the signal number when asked to stop."""
        for index, planned in self.todo:
            if signals.stop_requested() is not None:
                return signals.stop_requested()
            self._admit(index, planned)
        while self.flights or self.waiting:
            if signals.stop_requested() is not None:
                return signals.stop_requested()
            self._retry_waiting()
            self._collect(POLL_SECONDS)
            self._read_board()
            self._show()
        return None

    # -- admission ---------------------------------------------------------------------------------
    def _admit(self, index: int, planned: Any) -> None:
        if self._skip_finished(planned):
            return
        lock = self.lifecycle.try_lock(planned)
        if not lock.held:
            self.waiting.append(_Waiting(index, planned, lock, time.monotonic()))
            return
        self._submit(_Flight(index, planned, lock, self.requests[index]))

    def _skip_finished(self, planned: Any) -> bool:
        skipped = self.lifecycle.skip(planned)
        if skipped is not None:
            self._outcome(skipped)
        return skipped is not None

    def _retry_waiting(self) -> None:
        timeout = self.options.lock_timeout
        for waiting in list(self.waiting):
            if waiting.lock.try_acquire():
                self.waiting.remove(waiting)
                if self._skip_finished(waiting.planned):
                    waiting.lock.release()
                else:
                    self._submit(_Flight(waiting.index, waiting.planned, waiting.lock, self.requests[waiting.index]))
            elif timeout is not None and time.monotonic() - waiting.since > timeout:
                self.waiting.remove(waiting)
                self._outcome(self.lifecycle.lock_timed_out(waiting.planned, waiting.lock))
        if self.waiting and not self.flights:
            time.sleep(POLL_SECONDS)

    def _submit(self, flight: _Flight) -> None:
        task = self.gpu_task if flight.request["num_gpus"] > 0 else self.cpu_task
        name = f"harness {flight.planned.job.label}"
        flight.ref = task.options(name=name, **flight.request).remote(
            flight.planned.job, self.worker_options, self.plugins[flight.index], flight.index, flight.attempt,
            torch_threads(flight.request), self.board)
        flight.started = flight.ended = False
        self.flights[flight.ref] = flight
        self.known[flight.index] = flight

    # -- results -----------------------------------------------------------------------------------
    def _collect(self, timeout: float) -> None:
        if not self.flights:
            return
        refs = list(self.flights)
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        for ref in ready:
            self._finish(self.flights[ref], ref)

    def _finish(self, flight: _Flight, ref: Any) -> None:
        errors = ray.exceptions
        lost = (errors.WorkerCrashedError, errors.NodeDiedError, errors.OutOfMemoryError, errors.ObjectLostError)
        try:
            payload = ray.get(ref)
        except errors.TaskCancelledError:
            self._drop(flight, ref)
            return
        except lost as exc:
            self._lost(flight, ref, exc)
            return
        except errors.RayTaskError as exc:
            if isinstance(getattr(exc, "cause", None), KeyboardInterrupt):
                # The worker was interrupted without our asking (a signal on that node): like a lost worker.
                self._lost(flight, ref, exc)
                return
            self._failed(flight, ref, "worker", reason(exc), traceback_text=str(exc))
            return
        except errors.RayError as exc:  # e.g. the runtime environment could not be set up
            self._failed(flight, ref, "worker", reason(exc), traceback_text=str(exc))
            return
        self._record(flight, ref, payload)

    def _drop(self, flight: _Flight, ref: Any) -> None:
        """A cancelled task: no record (the rerun resumes it)."""
        self.flights.pop(ref, None)
        flight.lock.release()

    def _lost(self, flight: _Flight, ref: Any, exc: BaseException) -> None:
        if flight.cancelled:
            self._drop(flight, ref)
            return
        why = reason(exc)
        flight.retried_after.append(why)
        self.flights.pop(ref, None)
        if flight.attempt <= self.options.retries:
            flight.attempt += 1
            self.retried += 1
            resume = "" if self.options.force else "; it resumes from its latest checkpoint where the cache is shared"
            self._note(f"{flight.planned.job.label}: its worker was lost ({why}); retrying, attempt "
                       f"{flight.attempt} of {self.options.retries + 1}{resume}")
            self._submit(flight)
            return
        self._failed(flight, ref, "worker", f"its worker was lost {len(flight.retried_after)} time(s), more than "
                     f"--retries {self.options.retries}; last: {why}", error_type=why.split(":", 1)[0])

    def _failed(self, flight: _Flight, ref: Any, phase: str, message: str, *, error_type: str = "RayError",
                traceback_text: str = "", environment: Mapping[str, Any] | None = None,
                worker: Mapping[str, Any] | None = None) -> None:
        """Record a job that ended without a record of its own (lost worker, task error, not plannable)."""
        if flight.cancelled:
            self._drop(flight, ref)
            return
        record = self.lifecycle.failure_record(flight.planned, self.record_options, phase, error_type, message,
                                               traceback_text, environment)
        self._write(flight, ref, record, f"{phase}: {message}", worker or {})

    def _record(self, flight: _Flight, ref: Any, payload: Mapping[str, Any]) -> None:
        from harness.results.records import Record

        for problem in payload.get("problems", []):
            self._note(f"worker {payload.get('worker', {}).get('host', '?')}: {problem}")
        if payload.get("record") is None:
            error = payload.get("error", {})
            self._failed(flight, ref, error.get("phase", "plan"), error.get("message", "?"),
                         error_type=error.get("type", "Error"), traceback_text=error.get("traceback", ""),
                         environment=payload.get("environment"), worker=payload.get("worker"))
            return
        place_artifacts(flight.planned.record_path, payload.get("artifacts") or {})
        self._write(flight, ref, Record.from_dict(payload["record"]), payload.get("message", ""),
                    payload.get("worker", {}))

    def _write(self, flight: _Flight, ref: Any, record: Any, message: str, worker: Mapping[str, Any]) -> None:
        record.run.extra["ray"] = {"attempts": flight.attempt, "retried_after": list(flight.retried_after),
                             "resources": dict(flight.request), **dict(worker)}
        self.flights.pop(ref, None)
        try:
            outcome = self.lifecycle.finish(flight.planned, record, message)
        finally:
            flight.lock.release()
        if outcome.status != "ok":
            self.runner.notify(f"FAILED {flight.planned.job.label}: {message}")
        self._outcome(outcome)

    def _outcome(self, outcome: Any) -> None:
        self.summary.outcomes.append(outcome)
        self.counts[outcome.status] = self.counts.get(outcome.status, 0) + 1
        if self.bar is not None:
            self.bar.update(1)
            self._show()

    def _note(self, line: str) -> None:
        if line in self.notes_seen:
            return
        self.notes_seen.add(line)
        self.summary.notes.append(line)
        self.runner.notify(line)

    # -- the status board ----------------------------------------------------------------------------
    def _read_board(self) -> None:
        if self.board is None:
            return
        events, problem = drain_board(self.board, BOARD_TIMEOUT_SECONDS)
        if problem:
            self.board = None
            self._note(f"warning: the job status board stopped answering ({problem}); the progress bar no "
                       "longer tells running from queued jobs")
            return
        for event in events:
            flight = self.known.get(int(event.get("index", -1)))
            if flight is None or int(event.get("attempt", 0)) != flight.attempt:
                continue
            if event.get("event") == "started" and not flight.started:
                flight.started = True
                if flight.attempt == 1:
                    self.lifecycle.started(flight.planned)
            elif event.get("event") == "ended":
                flight.ended = True

    def _show(self) -> None:
        if self.bar is None:
            return
        running = sum(f.started and not f.ended for f in self.flights.values())
        queued = len(self.flights) - running + len(self.waiting)
        parts = [f"running {running}", f"queued {queued}", f"ok {self.counts.get('ok', 0)}",
                 f"failed {self.counts.get('failed', 0)}"]
        if self.counts.get("skipped"):
            parts.append(f"skipped {self.counts['skipped']}")
        if self.retried:
            parts.append(f"retried {self.retried}")
        self.bar.set_postfix_str(" · ".join(parts))

    # -- stopping --------------------------------------------------------------------------------------
    def _stop(self, signum: int, graceful: bool) -> None:
        """Cancel every task; when graceful, wait for the running jobs to save their checkpoints."""
        if not self.summary.interrupted:
            self.summary.interrupted, self.summary.signal_exit = True, 128 + int(signum)
        self.waiting.clear()
        if graceful:
            self._read_board()
        for flight in list(self.flights.values()):
            if not flight.cancelled:
                flight.cancelled = True
                self.stopping.append(flight)
                self._cancel(flight, force=not graceful)
        if not graceful:
            # A second signal: end at once the jobs still saving after the first one.
            for flight in self.stopping:
                if not flight.ended:
                    self._cancel(flight, force=True)
        running = [f for f in self.stopping if f.started and not f.ended]
        grace = self.executor.stop_grace
        if graceful and running and grace > 0:
            self.runner.notify(f"stopping: cancelled {len(self.stopping)} job(s); waiting up to {grace:.0f} s for "
                               f"{len(running)} running job(s) to save their checkpoints (press Ctrl-C again to stop "
                               "at once)")
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                if self.flights:
                    self._collect(POLL_SECONDS)  # writes the records of jobs that finished meanwhile
                else:
                    time.sleep(POLL_SECONDS)
                self._read_board()
                if self.board is None or all(f.ended for f in running):
                    break
            for flight in running:
                if not flight.ended:
                    self._cancel(flight, force=True)
        elif self.flights and graceful:
            self._collect(0)
        for ref, flight in list(self.flights.items()):
            self._drop(flight, ref)
        written = {o.record_path for o in self.summary.outcomes}
        stopped = sum(f.planned.record_path not in written for f in self.stopping)
        note = (f"{stopped} job(s) were stopped before they finished; rerun the same command to resume them"
                if stopped else "")
        if note and note not in self.summary.notes:
            self.summary.notes = [n for n in self.summary.notes if "were stopped before they finished" not in n]
            self.summary.notes.append(note)

    @staticmethod
    def _cancel(flight: _Flight, force: bool) -> None:
        try:
            ray.cancel(flight.ref, force=force)
        except Exception:  # noqa: BLE001 - the task finished meanwhile
            pass
