"""The worker side: one Ray task plans its job again on its node and runs it with a JobRunner.

The record comes back to the driver, with the files the job left beside it (:func:`collect_artifacts`),
and the driver writes both (:func:`place_artifacts`); see the package docstring.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import tempfile
import traceback
import uuid
from pathlib import Path
from typing import Any, Mapping, Sequence

import ray

from harness.engine.executors.ray.board import post_event
from harness.engine.executors.ray.resources import NAME, worker_device
from harness.engine.jobs import Job
from harness.engine.options import RunOptions
from harness.engine.support import signals


def _worker_facts() -> dict[str, Any]:
    context = ray.get_runtime_context()
    try:
        gpu_ids = list(context.get_accelerator_ids().get("GPU", []))
    except AttributeError:  # older Ray
        gpu_ids = [str(g) for g in ray.get_gpu_ids()]
    return {"host": socket.gethostname(), "node_ip": ray.util.get_node_ip_address(), "node_id": context.get_node_id(),
            "pid": os.getpid(), "gpu_ids": [str(g) for g in gpu_ids]}


def run_on_worker(job: Job, options: RunOptions, plugins: Sequence[tuple[str, str]], index: int, attempt: int,
                  threads: int, board: Any) -> dict[str, Any]:
    """The body of one Ray task: plan ``job`` again on this worker and run it with a JobRunner.

    ``plugins`` are the entry points (name, value) that provide the job's method, its dataset and
    the metrics computed on it (:func:`plugins_for`); only those are loaded here.

    Returns
    -------
    dict
        ``record`` (the record as a dict, None when the job could not be planned here),
        ``status``, ``message``, ``error`` (for a job that could not be planned), ``environment``,
        ``problems`` (plugins that failed to load on this worker), ``worker`` (host, node, pid,
        GPU ids, device) and ``artifacts`` (:func:`collect_artifacts`).
    """
    worker = _worker_facts()
    post_event(board, {"index": index, "attempt": attempt, "event": "started", "worker": worker})
    scratch = Path(tempfile.mkdtemp(prefix="harness-ray-"))
    stopped_by: int | None = None
    try:
        with signals.handle_stop_signals():
            try:
                return _run_here(job, options, plugins, scratch, worker, threads)
            except signals.RunInterrupted as stop:
                stopped_by = stop.signum
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        post_event(board, {"index": index, "attempt": attempt, "event": "ended", "worker": worker})
        if stopped_by == signal.SIGTERM:
            # Someone (a scheduler preempting the node, `ray stop`) asked this worker to end. The
            # checkpoint is saved; end the worker with Ray's own handler, restored by now, so that
            # the driver sees a lost worker and retries the job, which resumes from that checkpoint.
            os.kill(os.getpid(), signal.SIGTERM)


def _run_here(job: Job, options: RunOptions, plugins: Sequence[tuple[str, str]], scratch: Path,
              worker: dict[str, Any], threads: int) -> dict[str, Any]:
    from importlib import metadata

    import torch

    from harness.engine.support.environment import environment
    from harness.engine.planning import Planner
    from harness.engine.registry import ENTRY_POINT_GROUP, load_registry
    from harness.engine.runner import JobRunner

    wanted = {tuple(p) for p in plugins}
    found = [ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP) if (ep.name, ep.value) in wanted]
    registry = load_registry(entry_points=found)
    problems = [str(p) for p in registry.problems]
    problems += [f"plugin {name!r} ({value}) is not installed on this worker; install the distribution that "
                 "provides it on every node" for name, value in sorted(wanted - {(ep.name, ep.value) for ep in found})]
    # Reporter hooks run on the driver, once per job, never on the workers.
    quiet = dataclasses.replace(registry, manager=None)
    torch.set_num_threads(threads)
    device = worker_device(options.device, worker["gpu_ids"], os.environ.get("CUDA_VISIBLE_DEVICES"))
    here = dataclasses.replace(options, results_dir=scratch, device=device, progress=False, executor=NAME)
    facts = {**worker, "device": device}
    try:
        planned = Planner(quiet, here).plan_job(job)
    except Exception as exc:  # noqa: BLE001 - e.g. a plugin this node lacks: the driver records it as failed
        return {"record": None, "status": "failed", "problems": problems, "worker": facts,
                "environment": environment(torch.device(device)),
                "error": {"phase": "plan", "type": type(exc).__name__,
                          "message": f"on worker {worker['host']}: {exc}", "traceback": traceback.format_exc()},
                "message": f"plan on worker {worker['host']}: {type(exc).__name__}: {exc}"}
    outcome = JobRunner(quiet, here).run_job(planned)
    record = outcome.record.to_dict() if outcome.record is not None else None
    return {"record": record, "status": outcome.status, "message": outcome.message, "problems": problems,
            "worker": facts, "artifacts": collect_artifacts(planned.record_path)}


def collect_artifacts(record_path: Path) -> dict[str, bytes]:
    """Every file the job left beside its (scratch) record, by path relative to the record's folder.

    These are the record's artifacts (the saved maps folder ``<stem>.maps/`` and the like); the
    scratch folder holds one job only. Hidden files and temporary folders (``*.tmp-*``,
    ``*.old-*``) of an interrupted write are left out.
    """
    folder = Path(record_path).parent
    files: dict[str, bytes] = {}
    if not folder.is_dir():
        return files
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        top = relative.parts[0]
        if path == Path(record_path) or not path.is_file() or top.startswith(".") or ".tmp-" in top or ".old-" in top:
            continue
        files[relative.as_posix()] = path.read_bytes()
    return files


def place_artifacts(record_path: Path, files: Mapping[str, bytes]) -> None:
    """Put a worker's artifacts beside ``record_path`` (before the record is written).

    Each top-level entry (a folder such as ``<stem>.maps``) is written complete into a temporary
    folder first and then swapped in, so a reader sees the old set or the new one, never a mix.

    Raises
    ------
    harness.engine.support.fsutil.StorageError
        Naming the folder when it cannot be written.
    """
    from harness.engine.support.fsutil import StorageError, ensure_dir

    parent = ensure_dir(Path(record_path).parent)
    token = uuid.uuid4().hex[:8]
    staged: dict[str, Path] = {}
    try:
        for relative, data in files.items():
            parts = Path(relative).parts
            if not parts or Path(relative).is_absolute() or ".." in parts or parts[0] == Path(record_path).name:
                raise StorageError(f"a worker sent an artifact {relative!r} that does not belong beside {record_path}")
            stage = staged.setdefault(parts[0], parent / f"{parts[0]}.tmp-ray-{token}")
            target = stage.joinpath(*parts[1:]) if len(parts) > 1 else stage
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        for top, stage in staged.items():
            final, old = parent / top, parent / f"{top}.old-{token}"
            if final.exists():
                os.replace(final, old)
            os.replace(stage, final)
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            elif old.exists():
                old.unlink()
    except OSError as exc:
        raise StorageError(f"cannot write the artifacts of {record_path} into {parent}: {exc}") from exc
    finally:
        for stage in staged.values():
            if stage.is_dir():
                shutil.rmtree(stage, ignore_errors=True)
            elif stage.exists():
                stage.unlink()


def cpu_job(*args: Any) -> dict[str, Any]:
    """A job without GPUs (worker processes are reused)."""
    return run_on_worker(*args)


def gpu_job(*args: Any) -> dict[str, Any]:
    """A job with GPUs (a fresh worker process each time)."""
    return run_on_worker(*args)
