"""Jobs as Ray tasks: on a local Ray instance (one machine, several GPUs) or on a cluster.

``harness run ... --executor ray`` starts a local Ray instance; ``--address auto|HOST:PORT|ray://...``
(or ``$RAY_ADDRESS``) joins a running cluster instead. A script that called ``ray.init`` itself
keeps its connection: the executor uses it and leaves it open.

How a run goes
--------------
The driver (the process that runs ``harness run``) plans every job as for any executor, then for
each job in plan order:

1. skips it when its ``ok`` record exists (a damaged record is moved aside and the job redone);
2. takes the job's lock in ``<results>/locks`` (:mod:`harness.engine.support.locks`), so that two drivers, or a
   driver and an in-process run sharing the results folder, never run one job twice; a job locked
   by another run waits for that run, and is skipped if it finished the job;
3. submits it as one Ray task asking for the job's resources (:func:`task_options`);
4. shows one progress bar with the jobs queued, running, finished, failed and retried;
5. writes the record, atomically, when the task returns it.

Who writes the records: the driver
----------------------------------
A worker runs its job with a :class:`harness.engine.runner.JobRunner` whose results folder is a scratch
folder of its own, and returns the record; the driver adds where the job ran (``run.ray``, below)
and writes it into the one results folder, with the files the job left beside its record (the
saved maps of ``--save-maps``, sent back with the record and swapped into place before the record
is written). So the results folder needs to exist only where the driver runs: nodes need no
shared results storage, a dying node can never leave a half-written or stray record, and every
record of a run has one writer. (``--save-maps all`` sends every test map back this way: hundreds
of MB per job on a real dataset.) What the workers share is the cache
folder (``--cache-dir``): finished fits and mid-fit checkpoints live there, so a retried job
resumes where its lost worker stopped when the cache is on storage every node sees (on one machine
it always is); with a node-local cache a retry on another node fits from the start (same record,
more time).

The job on the worker
---------------------
The task receives the :class:`harness.engine.jobs.Job` and the run's :class:`harness.engine.options.RunOptions`
(a planned job holds callables that need not pickle) and plans that one job again on the worker
with the plugins installed there, found through the ``harness`` entry points, as ``harness run``
finds them: install the harness and the plugins on every node (a local instance's workers share
the driver's environment). The worker loads only the entry points that provide the job's method,
its dataset and the metrics computed on it (:func:`plugins_for`; the built-in ones always), so it
starts sooner and its record has the metrics the driver's registry has. A plugin registered in the
driver's process only (``load_registry(extra_plugins=...)``) cannot reach a worker: a usage error.
A job that cannot be planned on its worker (a plugin missing on that node, a dataset folder it
cannot see) is recorded as failed in phase ``plan``, naming the host. Paths in the options are made absolute on
the driver, so the dataset, weights and cache folders must have the same path on every node.
Plugins' reporter hooks run on the driver (job started, job finished with its record), never on
the workers. A job uses as many torch threads as the CPUs it asked for (at least one).

Resources and devices
---------------------
Each job asks Ray for the resources its method's profile declares (:class:`harness.specs.Resources`),
or ``--job-gpus`` / ``--job-cpus``; fractions are allowed (Ray takes GPU fractions below 1 and
whole numbers above). ``--device cpu`` asks for no GPU. A job that asked for GPUs runs on the
first GPU Ray assigned it (``CUDA_VISIBLE_DEVICES`` lists only the assigned ones, so ``cuda:N``
on the command line does not pick one); a job that asked for none runs on the CPU under ``auto``,
and ``--device cuda`` without a GPU request is a usage error. GPU tasks get a fresh worker process
each (CUDA never stays initialised for another job's assignment). On a local instance a request no
node can meet is a usage error (exit 2) before anything runs; a memory request larger than the
machine's memory is dropped with a warning. On a joined cluster such a job waits for a node that
fits (an autoscaler may add one), with a warning.

Retries and failures
--------------------
A job whose worker dies (killed, out of memory, its node lost, preempted: a SIGTERM makes the
worker save its checkpoint and exit) is submitted again, up to ``--retries`` times; it resumes from
its latest mid-fit checkpoint when the cache is shared. The driver resubmits (Ray's own
``max_retries`` is 0 for these tasks) so that it can say why each attempt ended and count the
attempts in the record. With ``--force`` every attempt starts afresh (``--force`` ignores
checkpoints). After the last retry the job is recorded as failed in phase ``worker``. A job that
fails by itself (an error in fit or predict, NaN maps) is recorded as failed by the worker's
JobRunner, as in process, and is not retried; the other jobs go on.

Ctrl-C and SIGTERM
------------------
The first signal stops submitting and cancels every task: queued ones are dropped, running ones
get an interrupt and, inside a checkpointed training loop, save their checkpoint at the next step
(:mod:`harness.engine.support.signals`). The driver waits up to ``stop_grace`` seconds for them (a second signal
stops at once), writes the record of every job that finished meanwhile, and the summary exits 130
(SIGINT) or 143 (SIGTERM). Rerunning the same command skips the finished jobs and resumes the
others from their checkpoints.

``run.ray`` in the record
-------------------------
``attempts`` (1 when no worker was lost), ``retried_after`` (why each lost attempt ended),
``resources`` (what the task asked Ray for), ``host``, ``node_ip``, ``node_id``, ``pid``,
``gpu_ids`` (Ray's assignment) and ``device`` of the worker that ran the last attempt.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import ray

from harness.engine.support import signals
from harness.errors import UsageError
from harness.engine.jobs import Job
from harness.engine.options import RunOptions
from harness.specs import Resources

#: Seconds between two looks at the tasks and at the job status board.
POLL_SECONDS = 0.5
#: Seconds the driver waits, after Ctrl-C, for running jobs to save their checkpoints.
STOP_GRACE_SECONDS = 60.0
#: Object store of a local instance: tasks exchange only jobs and records, a few kB each.
LOCAL_OBJECT_STORE_BYTES = 512 * 2**20
#: Seconds to wait for the job status board to answer before going on without it.
BOARD_TIMEOUT_SECONDS = 10.0
#: The executor's name, as it appears in records (``run.executor``).
NAME = "ray"


# -- pure helpers (tested without a cluster) ----------------------------------------------------------
def task_options(resources: Resources, device: str) -> dict[str, Any]:
    """The Ray task options (``num_cpus``, ``num_gpus``, ``memory`` in bytes) for a job's request.

    ``device="cpu"`` asks for no GPU: a job that will run on the CPU holds none.

    Raises
    ------
    UsageError
        For a negative request or a GPU count above 1 that is not whole (Ray's rule).
    """
    gpus = 0.0 if device == "cpu" else float(resources.gpus)
    cpus = float(resources.cpus)
    if gpus < 0 or cpus < 0 or resources.memory_gb < 0:
        raise UsageError(f"a job cannot ask for negative resources ({resources.as_dict()})")
    if gpus > 1 and not gpus.is_integer():
        raise UsageError(f"--job-gpus {gpus:g}: Ray shares a GPU only in fractions below 1 (e.g. 0.5); above 1 give a "
                         "whole number")
    options: dict[str, Any] = {"num_cpus": cpus, "num_gpus": gpus}
    if resources.memory_gb > 0:
        options["memory"] = int(resources.memory_gb * 2**30)
    return options


def torch_threads(request: Mapping[str, Any]) -> int:
    """Torch threads of a job: the CPUs it asked for, at least one."""
    return max(1, int(math.floor(float(request.get("num_cpus", 1)))))


def check_requests(requests: Mapping[Any, tuple[str, Mapping[str, Any]]], nodes: Sequence[Mapping[str, Any]]
                   ) -> tuple[dict[Any, str], dict[Any, str]]:
    """Compare each job's request with the cluster's alive nodes.

    Parameters
    ----------
    requests : mapping of key to (label, task options)
    nodes : sequence of mapping
        ``ray.nodes()``: ``Alive`` and ``Resources`` (``CPU``, ``GPU``, ``memory`` in bytes).

    Returns
    -------
    (too_big, memory) : dicts of key to str
        The jobs whose CPU or GPU request no node meets, and the jobs whose memory request no node
        meets (among the nodes with enough CPUs and GPUs); each line names the job, its request,
        the largest node and, for CPUs and GPUs, the option that changes the request.
    """
    alive = [dict(n.get("Resources", {})) for n in nodes if n.get("Alive", True)]
    most = {key: max([float(r.get(key, 0.0)) for r in alive] or [0.0]) for key in ("CPU", "GPU", "memory")}
    biggest = (f"the largest node has {most['GPU']:g} GPU(s), {most['CPU']:g} CPU(s), "
               f"{most['memory'] / 2**30:.1f} GB of memory")
    too_big, memory = {}, {}
    for key, (label, request) in requests.items():
        cpus, gpus = float(request.get("num_cpus", 0)), float(request.get("num_gpus", 0))
        fits = [r for r in alive if float(r.get("CPU", 0)) >= cpus and float(r.get("GPU", 0)) >= gpus]
        if not fits:
            fix = []
            if gpus > most["GPU"]:
                fix.append(f"--job-gpus {most['GPU']:g} or less" if most["GPU"] else "--job-gpus 0 (or --device cpu)")
            if cpus > most["CPU"]:
                fix.append(f"--job-cpus {most['CPU']:g} or less")
            too_big[key] = (f"{label} asks Ray for {gpus:g} GPU(s) and {cpus:g} CPU(s); {biggest}; pass "
                            + " and ".join(fix or ["a smaller --job-gpus / --job-cpus"]))
            continue
        wanted = float(request.get("memory", 0))
        if wanted and not any(float(r.get("memory", 0)) >= wanted for r in fits):
            memory[key] = f"{label} asks Ray for {wanted / 2**30:.1f} GB of memory; {biggest}"
    return too_big, memory


def worker_device(requested: str, gpu_ids: Sequence[Any], visible: str | None) -> str:
    """The torch device of a job on a worker, from Ray's GPU assignment.

    Parameters
    ----------
    requested : str
        ``--device``: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
    gpu_ids : sequence
        The GPUs Ray assigned to the task (empty for a CPU task).
    visible : str or None
        The worker's ``CUDA_VISIBLE_DEVICES``. Ray sets it to the assigned GPUs, so the first of
        them is ``cuda:0``; where it does not (``RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES``),
        the assigned GPU is addressed by its id.

    Raises
    ------
    UsageError
        For a CUDA device when Ray assigned no GPU.
    """
    if requested == "cpu":
        return "cpu"
    ids = [str(g).strip() for g in gpu_ids]
    if not ids:
        if requested == "auto":
            return "cpu"
        raise UsageError(f"--device {requested}, but Ray assigned this job no GPU; ask for one with --job-gpus 1")
    shown = [v.strip() for v in visible.split(",")] if visible else None
    if shown is not None and shown[:len(ids)] == ids:
        return "cuda:0"
    return f"cuda:{int(ids[0])}" if ids[0].isdigit() else "cuda:0"


def shipped_options(options: RunOptions) -> RunOptions:
    """The options a worker gets: paths absolute (as the driver sees them), no progress bars."""
    def absolute(path: Any) -> Path:
        return Path(os.path.abspath(os.path.expanduser(str(path))))

    return dataclasses.replace(
        options, results_dir=absolute(options.results_dir), cache_dir=absolute(options.cache_dir),
        weights_dir=absolute(options.weights_dir) if options.weights_dir is not None else None,
        data_roots={name: absolute(root) for name, root in dict(options.data_roots).items()},
        progress=False, executor=NAME)


def plugins_for(registry: Any, job: Job) -> tuple[tuple[str, str], ...]:
    """The entry points (name, value) a worker loads for ``job``: the providers of its method, its
    dataset and every metric computed on that dataset (built-in plugins are always loaded).

    A worker loads no other plugin: it starts faster and needs less memory, and its records equal
    the driver's because the method, dataset and metrics come from the same providers.

    Raises
    ------
    UsageError
        When one of them was registered in the driver's process only (not an installed entry
        point), which no worker can load.
    """
    providers = [registry.methods[job.method].plugin, registry.datasets[job.dataset].plugin]
    providers += [p.plugin for p in registry.metrics.values() if p.spec.applies_to(job.dataset)]
    needed: dict[tuple[str, str], None] = {}
    for info in providers:
        if info.distribution == "harness (built-in)":
            continue
        if info.distribution == "registered in-process":
            raise UsageError(f"{job.label}: plugin {info.name!r} is registered in this process only, and a Ray worker "
                             "loads plugins from the installed entry points (group 'harness'): install it as a "
                             "distribution on every node, or use --executor inprocess")
        needed[(info.name, info.module)] = None
    return tuple(needed)


def _reason(exc: BaseException) -> str:
    """One line saying why a task ended: the exception's type and the first line of its message."""
    cause = getattr(exc, "cause", None)
    shown = cause if isinstance(cause, BaseException) else exc
    lines = [line.strip() for line in str(shown).splitlines() if line.strip()]
    return f"{type(shown).__name__}: {lines[0] if lines else 'no message'}"


# -- the worker side -----------------------------------------------------------------------------------
def _board_class() -> type:
    """The status board actor's class, made here so that Ray ships it by value.

    Its process then imports nothing of the harness (or torch) and starts in a moment.
    """

    class JobBoard:
        """Collects the workers' ``started`` / ``ended`` events until the driver drains them."""

        def __init__(self) -> None:
            self.events: list[dict] = []

        def post(self, event: dict) -> None:
            """Keep one event."""
            self.events.append(event)

        def drain(self) -> list:
            """Hand every event kept so far to the driver and forget them."""
            out, self.events = self.events, []
            return out

    return JobBoard


def _post(board: Any, event: dict) -> None:
    if board is None:
        return
    try:
        board.post.remote(event)
    except Exception:  # noqa: BLE001 - the board is for display; a lost board must not fail the job
        pass


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
    _post(board, {"index": index, "attempt": attempt, "event": "started", "worker": worker})
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
        _post(board, {"index": index, "attempt": attempt, "event": "ended", "worker": worker})
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
    return {"record": outcome.record, "status": outcome.status, "message": outcome.message, "problems": problems,
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


def _cpu_job(*args: Any) -> dict[str, Any]:
    """A job without GPUs (worker processes are reused)."""
    return run_on_worker(*args)


def _gpu_job(*args: Any) -> dict[str, Any]:
    """A job with GPUs (a fresh worker process each time)."""
    return run_on_worker(*args)


# -- the driver side -----------------------------------------------------------------------------------
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


class RayExecutor:
    """Runs planned jobs as Ray tasks (see the module docstring).

    Parameters
    ----------
    options : RunOptions
        ``ray_address`` (None: ``$RAY_ADDRESS`` or a new local instance), ``retries``,
        ``device``, ``force``, ``lock_timeout`` are read here.
    init_kwargs : mapping, optional
        Extra ``ray.init`` arguments (``num_cpus``, ``runtime_env``, ...), for scripts.
    stop_grace : float
        Seconds to wait after Ctrl-C for running jobs to save their checkpoints.
    """

    name = NAME

    def __init__(self, options: RunOptions, init_kwargs: Mapping[str, Any] | None = None,
                 stop_grace: float = STOP_GRACE_SECONDS) -> None:
        self.options = options
        self.init_kwargs = dict(init_kwargs or {})
        self.stop_grace = float(stop_grace)
        self.local = False

    def run(self, plan: Any, runner: Any) -> Any:
        """Run ``plan``'s jobs on Ray; ``runner`` is the driver's JobRunner (skips, progress, messages).

        When every job already has its ``ok`` record, Ray is not even started.
        """
        driver = _Driver(self, plan, runner)
        driver.skip_finished()
        if not driver.todo:
            return driver.summary
        owned = self._connect(runner)
        try:
            return driver.go()
        finally:
            if owned:
                ray.shutdown()

    def _connect(self, runner: Any) -> bool:
        """Join or start Ray; True when this executor opened the connection (and closes it)."""
        if ray.is_initialized():
            self.local = False
            return False
        address = self.options.ray_address or os.environ.get("RAY_ADDRESS") or None
        common: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
        main = threading.current_thread() is threading.main_thread()
        # ray.init installs its own SIGTERM handler (exit at once); the run's handler, which stops
        # cleanly, must stay in charge.
        sigterm = signal.getsignal(signal.SIGTERM) if main else None
        try:
            if address:
                unreachable = _unreachable(address)
                if unreachable:
                    raise UsageError(f"--address {address}: {unreachable}. Start the cluster with 'ray start --head' "
                                     "on its head node (it prints the address), or leave out --address to start a "
                                     "local instance")
                try:
                    ray.init(address=address, **{**common, **self.init_kwargs})
                except (ConnectionError, RuntimeError, ValueError) as exc:
                    raise UsageError(f"--address {address}: cannot join that Ray cluster ({_reason(exc)}). "
                                     "Start one with 'ray start --head' (then --address auto on that machine, or "
                                     "HOST:6379 elsewhere), or leave out --address to start a local instance") from None
                self.local = False
                runner.notify(f"ray: joined the cluster at {address} "
                              f"({_describe(ray.cluster_resources())})")
            else:
                ray.init(address="local", include_dashboard=False, object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                         **{**common, **self.init_kwargs})
                self.local = True
                runner.notify(f"ray: started a local instance ({_describe(ray.cluster_resources())})")
        finally:
            if main and sigterm is not None:
                signal.signal(signal.SIGTERM, sigterm)
        return True


def _unreachable(address: str, timeout: float = 5.0) -> str | None:
    """Why nothing can answer at a ``HOST:PORT`` address, or None (also for ``auto`` and ``ray://``).

    Ray itself retries an unreachable address for minutes; a plain TCP connection says it at once.
    """
    host, sep, port = address.rpartition(":")
    if not sep or "://" in address or not port.isdigit():
        return None
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout):
            return None
    except OSError as exc:
        return f"nothing answers at {host}:{port} ({exc.strerror or type(exc).__name__})"


def _describe(resources: Mapping[str, Any]) -> str:
    return (f"{float(resources.get('CPU', 0)):g} CPU(s), {float(resources.get('GPU', 0)):g} GPU(s), "
            f"{float(resources.get('memory', 0)) / 2**30:.1f} GB")


class _Driver:
    """One run of :class:`RayExecutor`: admit, submit, collect, retry, stop."""

    def __init__(self, executor: RayExecutor, plan: Any, runner: Any) -> None:
        from harness.engine.outcomes import RunSummary

        self.executor = executor
        self.plan = plan
        self.runner = runner
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
        self.cpu_task = ray.remote(max_retries=0)(_cpu_job)
        self.gpu_task = ray.remote(max_retries=0, max_calls=1)(_gpu_job)

    # -- the run ---------------------------------------------------------------------------------
    def go(self) -> Any:
        self._check()
        self._start_board()
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
            self._stop_board()
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
        from harness.engine.support.locks import JobLock

        if self._skip_finished(planned):
            return
        lock = JobLock(planned.job.lock_path(self.options.results_dir))
        if not lock.try_acquire():
            owner = lock.owner() or {}
            self.runner.notify(f"{planned.job.label} is running in another run ({owner.get('host', '?')}, pid "
                               f"{owner.get('pid', '?')}); waiting for it")
            self.waiting.append(_Waiting(index, planned, lock, time.monotonic()))
            return
        self._submit(_Flight(index, planned, lock, self.requests[index]))

    def _skip_finished(self, planned: Any) -> bool:
        from harness.engine.outcomes import JobOutcome

        if self.options.force:
            return False
        done = self.runner.existing(planned)
        if done is None:
            return False
        self._outcome(JobOutcome(planned.job, "skipped", planned.record_path, done.to_dict()))
        return True

    def _retry_waiting(self) -> None:
        from harness.engine.outcomes import JobOutcome

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
                job = waiting.planned.job
                self._outcome(JobOutcome(job, "failed", waiting.planned.record_path, None,
                                         f"still locked by another run after {timeout:g} s ({waiting.lock.path}); "
                                         "remove the lock file if that run is gone"))
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
            self._failed(flight, ref, "worker", _reason(exc), traceback_text=str(exc))
            return
        except errors.RayError as exc:  # e.g. the runtime environment could not be set up
            self._failed(flight, ref, "worker", _reason(exc), traceback_text=str(exc))
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
        reason = _reason(exc)
        flight.retried_after.append(reason)
        self.flights.pop(ref, None)
        if flight.attempt <= self.options.retries:
            flight.attempt += 1
            self.retried += 1
            resume = "" if self.options.force else "; it resumes from its latest checkpoint where the cache is shared"
            self._note(f"{flight.planned.job.label}: its worker was lost ({reason}); retrying, attempt "
                       f"{flight.attempt} of {self.options.retries + 1}{resume}")
            self._submit(flight)
            return
        self._failed(flight, ref, "worker", f"its worker was lost {len(flight.retried_after)} time(s), more than "
                     f"--retries {self.options.retries}; last: {reason}", error_type=reason.split(":", 1)[0])

    def _failed(self, flight: _Flight, ref: Any, phase: str, message: str, *, error_type: str = "RayError",
                traceback_text: str = "", environment: Mapping[str, Any] | None = None,
                worker: Mapping[str, Any] | None = None) -> None:
        """Record a job that ended without a record of its own (lost worker, task error, not plannable)."""
        from harness.engine.recording import finish_record, start_record

        if flight.cancelled:
            self._drop(flight, ref)
            return
        record = start_record(flight.planned, self.record_options, dict(environment or {}))
        record.status = "failed"
        record.error = {"phase": phase, "type": error_type, "message": message, "traceback": traceback_text}
        finish_record(record, [], None)
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
        from harness.results.records import write_record
        from harness.engine.outcomes import JobOutcome

        record.run["ray"] = {"attempts": flight.attempt, "retried_after": list(flight.retried_after),
                             "resources": dict(flight.request), **dict(worker)}
        write_record(flight.planned.record_path, record)
        data = record.to_dict()
        self.flights.pop(ref, None)
        flight.lock.release()
        job = flight.planned.job
        self.runner.registry.call_reporters("harness_job_finished", job=job, record=data)
        if record.status != "ok":
            self.runner.notify(f"FAILED {job.label}: {message}")
        self._outcome(JobOutcome(job, record.status, flight.planned.record_path, data, message if record.status != "ok"
                                 else ""))

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
    def _start_board(self) -> None:
        board = ray.remote(num_cpus=0, max_restarts=0)(_board_class())
        try:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=True)
            self.board = board.options(scheduling_strategy=here).remote()
        except Exception:  # noqa: BLE001 - e.g. a Ray Client driver, which is on no node
            self.board = board.remote()

    def _stop_board(self) -> None:
        if self.board is not None:
            try:
                ray.kill(self.board)
            except Exception:  # noqa: BLE001 - already gone
                pass
            self.board = None

    def _read_board(self) -> None:
        if self.board is None:
            return
        try:
            events = ray.get(self.board.drain.remote(), timeout=BOARD_TIMEOUT_SECONDS)
        except Exception as exc:  # noqa: BLE001 - the board only feeds the display and the stop
            self.board = None
            self._note(f"warning: the job status board stopped answering ({_reason(exc)}); the progress bar no "
                       "longer tells running from queued jobs")
            return
        for event in events:
            flight = self.known.get(int(event.get("index", -1)))
            if flight is None or int(event.get("attempt", 0)) != flight.attempt:
                continue
            if event.get("event") == "started" and not flight.started:
                flight.started = True
                if flight.attempt == 1:
                    self.runner.registry.call_reporters("harness_job_started", job=flight.planned.job)
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
