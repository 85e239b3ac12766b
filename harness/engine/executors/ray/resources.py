"""What each Ray task asks for and gets: resources, threads, device, options, plugins (pure functions,
tested without a cluster)."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from harness.engine.jobs import Job
from harness.engine.options import RunOptions
from harness.errors import UsageError
from harness.specs import Resources

#: The executor's name, as it appears in records (``run.executor``).
NAME = "ray"


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


def reason(exc: BaseException) -> str:
    """One line saying why a task ended: the exception's type and the first line of its message."""
    cause = getattr(exc, "cause", None)
    shown = cause if isinstance(cause, BaseException) else exc
    lines = [line.strip() for line in str(shown).splitlines() if line.strip()]
    return f"{type(shown).__name__}: {lines[0] if lines else 'no message'}"
