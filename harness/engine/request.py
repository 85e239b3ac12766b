"""A run as the user asked for it (:class:`RunRequest`), turned into a checked plan.

The command line fills a :class:`RunRequest` with its options' values as given and calls
:func:`plan_request`; everything else happens here and in the :class:`~harness.engine.planning.Planner`:
which methods run (``all``: those that support the protocol), the shots and seeds, each job's
profile, ``--set`` and ``--precision`` as typed overrides per method, the data roots and data
options, the run's :class:`~harness.engine.options.RunOptions`, and every usage check. A usage
error raises :class:`harness.errors.UsageError` naming the option and what to give instead; nothing
has run yet.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from harness.engine.jobs import DEFAULT_DATASET, Job, expand_jobs
from harness.engine.options import RunOptions
from harness.engine.planning import Plan, Planner, check_protocol, resolve_profile
from harness.engine.registry import Registry
from harness.errors import UsageError

__all__ = ["DEFAULT_DATASET", "RunRequest", "PlannedRun", "plan_request", "split_list", "positive_int"]

@dataclass
class RunRequest:
    """``harness run``'s options, as given (texts where the command line has texts).

    Each field is the option of the same name (``set`` is ``--set``, ``address`` ``--address``),
    with the command line's default; a script can fill one and call :func:`plan_request` exactly
    as the command line does.
    """

    methods: str = "all"
    datasets: str = ""
    protocol: str = "multiclass"
    shots: str = "1,2,4"
    seeds: str = "0"
    profile: str = "auto"
    set: Sequence[str] = ()
    precision: str | None = None
    fast_dev_run: bool = False
    weights: str = "pretrained"
    eval_grid: str = "harness"
    eval_size: str | None = None
    eval_batch_size: str | None = None
    results_dir: str | Path = "results"
    cache_dir: str | Path = ".harness-cache"
    weights_dir: str | Path | None = None
    device: str = "auto"
    data_root: Sequence[str] = ()
    data_option: Sequence[str] = ()
    force: bool = False
    no_fit_cache: bool = False
    no_progress: bool = False
    checkpoint_interval: float = 600.0
    executor: str = "inprocess"
    save_maps: str = "sample"
    job_gpus: float | None = None
    job_cpus: float | None = None
    address: str | None = None
    retries: int = 2
    precision_mode: str = "cast"
    tf32: str = "off"
    compile: str = "none"

    @classmethod
    def from_namespace(cls, args: Any) -> "RunRequest":
        """The request of parsed command-line arguments (attributes named as the fields)."""
        names = [f for f in cls.__dataclass_fields__ if hasattr(args, f)]
        return cls(**{name: getattr(args, name) for name in names})


@dataclass
class PlannedRun:
    """What :func:`plan_request` decided: the jobs, their plan, the run's options, notes to show."""

    jobs: list[Job]
    plan: Plan
    options: RunOptions
    notes: list[str] = field(default_factory=list)


def split_list(value: str | None) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``."""
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def _ints(value: str | None, option: str) -> list[int]:
    try:
        return [int(v) for v in split_list(value)]
    except ValueError:
        raise UsageError(f"{option} takes comma-separated integers, e.g. {option} 0,1,2; got {value!r}") from None


def positive_int(text: str, option: str) -> int:
    """``text`` as an integer of at least 1, else a usage error naming ``option``."""
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"{option} takes a positive integer or 'native', got {text!r}") from None
    if value < 1:
        raise UsageError(f"{option} takes a positive integer or 'native', got {text!r}")
    return value


def _parse_sets(items: Sequence[str]) -> dict[str, str]:
    """``--set KEY=VALUE`` items as ``{KEY: text}``; parsed later by each method's declared types."""
    out = {}
    for item in items:
        if "=" not in item:
            raise UsageError(f"--set {item!r}: expected KEY=VALUE, e.g. --set epochs=5 (or METHOD.KEY=VALUE)")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def _eval_batch_size(text: str | None) -> str | None:
    """``--eval-batch-size``: None, ``auto`` or a positive integer (as text)."""
    if text is None or text == "auto":
        return text
    return str(positive_int(text, "--eval-batch-size"))


def _methods(registry: Registry, request: RunRequest, notes: list[str]) -> list[str]:
    """The run's methods: the named ones, or every installed one that supports the protocol."""
    if request.methods.strip() != "all":
        names = split_list(request.methods)
        for name in names:
            check_protocol(registry.method(name), request.protocol)
        return names
    names = [n for n, p in registry.methods.items() if request.protocol in p.spec.protocols]
    notes += [f"note: {n} does not support the {request.protocol} protocol; skipped"
              for n, p in registry.methods.items() if request.protocol not in p.spec.protocols]
    if not names:
        raise UsageError("no method to run: none of the installed methods supports this protocol")
    return names


def _method_overrides(registry: Registry, methods: Sequence[str], texts: Mapping[str, str], precision: str | None,
                      explicit: bool, notes: list[str]) -> dict[str, dict[str, Any]]:
    """Typed overrides per method from ``--set`` (``KEY`` or ``METHOD.KEY``) and ``--precision``.

    A ``KEY`` applies to every method that declares it and must be declared by at least one; with
    methods named explicitly, by each of them.
    """
    per_method: dict[str, dict[str, str]] = {m: {} for m in methods}
    for key, text in texts.items():
        target, _, name = key.rpartition(".")
        if target:
            if target not in per_method:
                raise UsageError(f"--set {key}={text}: {target!r} is not one of the methods of this run "
                                 f"({', '.join(methods)})")
            per_method[target][name] = text
            continue
        having = [m for m in methods if key in registry.method(m).schema]
        if not having or (explicit and len(having) < len(methods)):
            lacking = [m for m in methods if m not in having]
            schema = registry.method(lacking[0]).schema
            raise UsageError(f"--set {key}: not a setting of {', '.join(lacking)}; settings of {lacking[0]}: "
                             f"{', '.join(schema.names)} (use METHOD.KEY=VALUE for one method)")
        for m in having:
            per_method[m][key] = text
        if len(having) < len(methods):
            notes.append(f"note: --set {key} applies to {', '.join(having)} only (the others have no such setting)")
    if precision:
        for m in methods:
            if "precision" in registry.method(m).schema:
                per_method[m].setdefault("precision", precision)
            else:
                notes.append(f"note: {m} declares no precision setting; it runs as it is (fp32)")
    typed = {}
    for m, values in per_method.items():
        try:
            typed[m] = registry.method(m).schema.parse_overrides(values)
        except UsageError as exc:
            raise UsageError(f"method {m!r}: {exc}") from None
    return typed


def _data_options(registry: Registry, items: Sequence[str], datasets: Sequence[str]) -> dict[str, str]:
    """``--data-option KEY=VALUE`` pairs of a run; each key must be an option of one of its datasets."""
    from harness.data import parse_data_options

    options = parse_data_options(items)
    declared = {k for d in datasets for k in registry.dataset(d).options}
    unknown = [k for k in options if k not in declared]
    if unknown:
        raise UsageError(f"--data-option {', '.join(unknown)}: no dataset of this run takes it "
                         f"(their options: {', '.join(sorted(declared)) or 'none'})")
    return options


def _data_roots(items: Sequence[str], datasets: Sequence[str]) -> dict[str, Path]:
    roots: dict[str, Path] = {}
    for item in items:
        if "=" in item and not Path(item).exists():
            name, path = item.split("=", 1)
            roots[name] = Path(path)
        elif len(datasets) == 1:
            roots[datasets[0]] = Path(item)
        else:
            raise UsageError(f"--data-root {item}: with several datasets, give NAME=PATH for each, "
                             f"e.g. --data-root mvtec=/data/mvtec --data-root visa=/data/visa")
    return roots


def run_options(request: RunRequest, datasets: Sequence[str], data_options: Mapping[str, str]) -> RunOptions:
    """The run's options from the request (sizes and batch sizes checked)."""
    eval_size = None if request.eval_size == "native" else positive_int(request.eval_size or "256", "--eval-size")
    return RunOptions(
        results_dir=Path(request.results_dir), cache_dir=Path(request.cache_dir), device=request.device,
        eval_size=eval_size, eval_size_source="option" if request.eval_size else "default",
        eval_grid=request.eval_grid, data_roots=_data_roots(request.data_root, datasets),
        data_options=dict(data_options), force=request.force, fit_cache=not request.no_fit_cache,
        weights_dir=Path(request.weights_dir) if request.weights_dir else None,
        progress=False if request.no_progress else None, fast_dev_run=request.fast_dev_run, weights=request.weights,
        checkpoint_interval=request.checkpoint_interval, executor=request.executor, save_maps=request.save_maps,
        job_gpus=request.job_gpus, job_cpus=request.job_cpus, ray_address=request.address, retries=request.retries,
        precision_mode=request.precision_mode, tf32=request.tf32, compile=request.compile,
        eval_batch_size=_eval_batch_size(request.eval_batch_size),
    )


def plan_request(registry: Registry, request: RunRequest) -> PlannedRun:
    """Check ``request`` and plan every job of it; the first usage error raises, before anything runs."""
    notes: list[str] = []
    datasets = split_list(request.datasets) or [DEFAULT_DATASET]
    for name in datasets:
        registry.dataset(name)
    methods = _methods(registry, request, notes)
    fewshot = request.protocol == "fewshot"
    shots = _ints(request.shots, "--shots") if fewshot else None
    if fewshot and not shots:
        raise UsageError("--protocol fewshot needs --shots, e.g. --shots 1,2,4")
    if shots and any(k < 0 for k in shots):
        raise UsageError(f"--shots {request.shots}: shots cannot be negative")
    seeds = _ints(request.seeds, "--seeds")
    if not seeds:
        raise UsageError("--seeds needs at least one seed, e.g. --seeds 0")
    explicit = request.methods.strip() != "all"
    profiles = {(m, d): resolve_profile(registry.method(m), request.profile, registry.dataset(d))
                for m in methods for d in datasets}
    overrides = _method_overrides(registry, methods, _parse_sets(request.set), request.precision, explicit, notes)
    jobs = expand_jobs(methods, datasets, request.protocol, shots, seeds, {**{d: "" for d in datasets}, **profiles},
                       dev_run=request.fast_dev_run, weights=request.weights, method_overrides=overrides,
                       eval_grid=request.eval_grid)
    options = run_options(request, datasets, _data_options(registry, request.data_option, datasets))
    if request.executor == "inprocess":
        # A CUDA request on a machine without CUDA is a usage error, found now; on a cluster the
        # workers, not this driver, have the GPUs.
        options.torch_device()
    registry.executor(request.executor)
    # The Planner resolves and checks each job (settings, the dataset's index, weight files).
    plan = Planner(registry, options).plan(jobs)
    return PlannedRun(jobs=jobs, plan=plan, options=options, notes=notes)
