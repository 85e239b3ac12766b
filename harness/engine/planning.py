"""Planning: everything about a run is decided and validated before anything runs.

:func:`plan_jobs` turns jobs (method, dataset, protocol, shots, seed, profile, overrides) into a
:class:`Plan`. For every job it resolves the method spec and profile, validates the typed
settings, checks that the method supports the protocol, loads the dataset index once per
dataset, splits it into fit units (which raises for impossible shots), decides the evaluation
size, finds the record path and whether the job already finished, locates every weight file the
job will need, and takes the resources it asks for. Any usage error raises
:class:`harness.errors.UsageError` (exit 2) before a record, a cache file or a fit exists.

``harness run --dry-run`` prints :meth:`Plan.describe` and writes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from harness.data import DatasetIndex, Sample
from harness.errors import UsageError
from harness.engine.jobs import Job
from harness.engine.options import RunOptions
from harness.engine.protocols import FitUnit, plan_fit_units
from harness.results.record_parts import RunInfo
from harness.results.records import DamagedRecordError, load_record
from harness.engine.registry import Registry
from harness.settings import SettingError, Settings, open_choices
from harness.specs import DatasetSpec, EvalGrid, MethodSpec, Resources, harness_grid
from harness.engine.weights import Located, WeightsResolver

#: Training and test images per category in a fast dev run.
FAST_DEV_TRAIN, FAST_DEV_TEST = 4, 4
#: Evaluation size when neither the user nor the method's profile chooses one.
DEFAULT_EVAL_SIZE = 256


@dataclass
class PlannedJob:
    """One job, fully resolved.

    Attributes
    ----------
    job : Job
    spec : MethodSpec
    dataset : DatasetSpec
    settings : Settings
    differences : dict
        Settings whose value differs from the profile's (the user's overrides, typed).
    units : list of FitUnit
        The fits the protocol asks for, with their training samples and test categories.
    tests : dict of str to list of Sample
        The test images of each category (a few per category in a fast dev run).
    record_path : Path
    status : str
        ``pending``, ``finished`` (an ``ok`` record exists; skipped unless ``--force``) or
        ``damaged`` (a record exists but cannot be read: it is moved aside and the job redone).
    weights : list of Located
        Every pretrained file the job needs, and where it was found (or not).
    resources : Resources
    eval_size : int or None
        The evaluation grid's side (None: native resolution).
    eval_size_source : str
        ``--eval-size``, ``profile`` (the method's ``eval_size`` setting), ``paper grid`` or
        ``default``.
    eval_grid : EvalGrid or None
        The pixel grid (None: the harness grid at ``eval_size``).
    notes : list of str
        Facts the record repeats (another protocol than the paper's, ...).
    """

    job: Job
    spec: MethodSpec
    dataset: DatasetSpec
    settings: Settings
    differences: dict[str, Any]
    units: list[FitUnit]
    tests: dict[str, list[Sample]]
    record_path: Path
    status: str
    weights: list[Located]
    resources: Resources
    eval_size: int | None
    eval_size_source: str
    notes: list[str] = field(default_factory=list)
    eval_grid: EvalGrid | None = None
    #: Per category, the normal validation images (threshold choice; MVTec AD 2, MVTec LOCO AD).
    validation: dict[str, list[Sample]] = field(default_factory=dict)
    #: Per category, test images without public ground truth: predicted and written, never scored.
    unscored: dict[str, list[Sample]] = field(default_factory=dict)

    @property
    def grid(self) -> EvalGrid:
        """The pixel grid the job is evaluated on."""
        return self.eval_grid or harness_grid(self.eval_size)

    @property
    def missing_weights(self) -> list[Located]:
        """Weight files that were not found."""
        return [w for w in self.weights if w.path is None]

    def run_info(self, options: RunOptions) -> RunInfo:
        """The record's ``run`` part (how the job ran)."""
        return RunInfo(dev_run=self.job.dev_run, weights=self.job.weights,
                       precision=self.settings.get("precision", "fp32"),
                       eval_size=self.eval_size if self.eval_size else "native", eval_size_source=self.eval_size_source,
                       eval_grid=self.grid.as_dict(), executor=options.executor,
                       paper_protocol=self.spec.paper_protocol or None, resources=self.resources.as_dict(),
                       notes=list(self.notes) if self.notes else None)

    def choices(self) -> dict[str, Any]:
        """``method_info.choices``: the values the paper leaves open, with their reasons."""
        return open_choices(self.spec.schema, self.settings)


@dataclass
class Plan:
    """Every job of a run, in order, with the dataset indexes they share.

    Attributes
    ----------
    jobs : list of PlannedJob
    indexes : dict of str to DatasetIndex
    options : RunOptions
    """

    jobs: list[PlannedJob]
    indexes: dict[str, DatasetIndex]
    options: RunOptions

    @property
    def pending(self) -> list[PlannedJob]:
        """Jobs that will run (not finished, or forced)."""
        return [p for p in self.jobs if p.status != "finished" or self.options.force]

    def describe(self) -> str:
        """The plan as text for ``--dry-run``: jobs, skips, settings that differ, weights."""
        lines = [f"plan: {len(self.jobs)} job(s), {len(self.pending)} to run, "
                 f"{len(self.jobs) - len(self.pending)} finished (skipped)"]
        for planned in self.jobs:
            status = planned.status if not (self.options.force and planned.status == "finished") else "forced"
            lines.append(f"- {planned.job.label}: {status}")
            lines.append(f"    record: {planned.record_path}")
            units = ", ".join(f"{u.name} ({len(u.train)} train)" for u in planned.units)
            lines.append(f"    fits: {units}")
            eval_size = planned.eval_size or "native"
            source = planned.eval_size_source
            where = source if source == "paper grid" else f"{source}; {planned.grid.name} grid"
            lines.append(f"    evaluation size: {eval_size} ({where}); resources: "
                         + ", ".join(f"{k}={v:g}" for k, v in planned.resources.as_dict().items()))
            if planned.differences:
                lines.append("    settings changed from the profile: "
                             + ", ".join(f"{k}={v!r}" for k, v in planned.differences.items()))
            for located in planned.weights:
                where = str(located.path) if located.path else "MISSING"
                lines.append(f"    weights {located.file.key}: {where}")
            for note in planned.notes:
                lines.append(f"    note: {note}")
        return "\n".join(lines)


def check_protocol(spec: MethodSpec, protocol: str) -> None:
    """A usage error unless method ``spec`` supports ``protocol``."""
    if protocol not in spec.protocols:
        raise UsageError(f"method {spec.name!r} does not support --protocol {protocol} "
                         f"(it supports {', '.join(spec.protocols)})")


def resolve_profile(spec: MethodSpec, profile: str, dataset: DatasetSpec) -> str:
    """The profile name a job uses: ``auto`` means the dataset's ``default_profile``.

    Raises
    ------
    UsageError
        For a profile the method does not have.
    """
    name = dataset.default_profile if profile == "auto" else profile
    if name not in spec.profiles:
        why = f" (--profile auto picks {name!r} on {dataset.name})" if profile == "auto" else ""
        raise UsageError(f"method {spec.name!r} has no profile {name!r}{why}; profiles: {', '.join(spec.profiles)}")
    return name


def resolve_settings(spec: MethodSpec, profile: str, overrides: dict[str, Any] | None = None) -> Settings:
    """The typed settings of ``profile`` with ``overrides`` applied.

    Raises
    ------
    UsageError
        For an unknown profile or setting, or a value of the wrong type or out of range.
    """
    if profile not in spec.profiles:
        raise UsageError(f"method {spec.name!r} has no profile {profile!r}; profiles: {', '.join(spec.profiles)}")
    try:
        return spec.schema.resolve(spec.profiles[profile], overrides or {})
    except SettingError as exc:
        raise UsageError(f"method {spec.name!r}, --set: {exc}") from None


def _eval_size(settings: Settings, options: RunOptions) -> tuple[int | None, str]:
    if options.eval_size_source == "option":
        return options.eval_size, "--eval-size"
    declared = settings.get("eval_size")
    if declared is not None:
        return (int(declared) or None), "profile"
    return options.eval_size if options.eval_size is not None else DEFAULT_EVAL_SIZE, "default"


def _paper_grid(spec: MethodSpec, settings: Settings, options: RunOptions) -> EvalGrid:
    """The paper's grid a method declares, or the harness rule at its size when it declares none."""
    if options.eval_size_source == "option":
        raise UsageError("--eval-grid paper uses each paper's own grid size; leave --eval-size out")
    if spec.paper_grid is not None:
        return spec.paper_grid(settings)
    size, _ = _eval_size(settings, options)
    return EvalGrid(name="paper", size=size, note=f"{spec.name} declares no paper grid: the harness rule at its "
                    "evaluation size")


def _dev_units(units: list[FitUnit]) -> list[FitUnit]:
    """Fit units of a fast dev run: a few training images per category."""
    out = []
    for unit in units:
        by_category: dict[str, list[Sample]] = {}
        for sample in unit.train:
            by_category.setdefault(sample.category, []).append(sample)
        train = tuple(s for samples in by_category.values() for s in samples[:FAST_DEV_TRAIN])
        out.append(FitUnit(unit.name, train, unit.test_categories))
    return out


def _dev_tests(samples: list[Sample]) -> list[Sample]:
    """A fast dev run's test images of one category: half normal, half anomalous."""
    normal = [s for s in samples if s.label == 0][:FAST_DEV_TEST // 2]
    anomalous = [s for s in samples if s.label == 1][:FAST_DEV_TEST - len(normal)]
    return normal + anomalous


def _check_not_empty(index: DatasetIndex, job: Job) -> None:
    """A category without training or test images cannot be evaluated: a data error, before any fit."""
    from harness.errors import DatasetError

    for name, category in index.categories.items():
        missing = [what for what, samples in (("training", category.train), ("test", category.test))
                   if not samples and not (what == "training" and job.protocol == "fewshot" and job.shots == 0)]
        if missing:
            hint = next((p for p in index.problems if f"/{name}/" in p or f"category {name} " in p), "")
            raise DatasetError(f"{index.name}/{name} has no {' and no '.join(missing)} images"
                               + (f" ({hint})" if hint else "") + "; put the images in place, or leave the category "
                               "out of the dataset folder. 'harness data summary' lists what was found.")


def _record_status(path: Path) -> str:
    if not path.exists():
        return "pending"
    try:
        return "finished" if load_record(path).ok else "pending"
    except DamagedRecordError:
        return "damaged"


class Planner:
    """Plans jobs against a registry, loading each dataset once.

    Parameters
    ----------
    registry : Registry
    options : RunOptions
    """

    def __init__(self, registry: Registry, options: RunOptions) -> None:
        self.registry = registry
        self.options = options
        self.indexes: dict[str, DatasetIndex] = {}
        self.resolver = WeightsResolver(options.weights_dir)

    def index(self, name: str) -> DatasetIndex:
        """The index of dataset ``name`` (loaded once per plan)."""
        if name not in self.indexes:
            spec = self.registry.dataset(name)
            root = self.options.data_roots.get(name)
            if root is None and spec.find_root is not None:
                root = spec.find_root()
            if root is None and spec.needs_root:
                raise UsageError(f"dataset {name!r} needs its folder: pass --data-root PATH "
                                 f"(or --data-root {name}=PATH when running several datasets)")
            from harness.data import load_index

            options = {k: v for k, v in self.options.data_options.items() if k in spec.options}
            self.indexes[name] = load_index(spec, root, None, options)
        return self.indexes[name]

    def plan_job(self, job: Job) -> PlannedJob:
        """Resolve and validate one job (see the module docstring)."""
        spec = self.registry.method(job.method)
        dataset = self.registry.dataset(job.dataset)
        check_protocol(spec, job.protocol)
        settings = resolve_settings(spec, job.profile, dict(job.overrides))
        index = self.index(job.dataset)
        units = plan_fit_units(index, job.protocol, job.shots, job.seed)
        _check_not_empty(index, job)
        tests = {c: list(index.categories[c].test) for u in units for c in u.test_categories}
        if job.dev_run:
            units = _dev_units(units)
            tests = {c: _dev_tests(samples) for c, samples in tests.items()}
        files = [] if job.weights == "random" else spec.weight_files(settings)
        weights = [self.resolver.locate(f, settings) for f in files]
        resources = spec.resources_for(job.profile)
        if self.options.job_gpus is not None or self.options.job_cpus is not None:
            resources = Resources(gpus=resources.gpus if self.options.job_gpus is None else self.options.job_gpus,
                                  cpus=resources.cpus if self.options.job_cpus is None else self.options.job_cpus,
                                  memory_gb=resources.memory_gb)
        eval_size, source = _eval_size(settings, self.options)
        grid = None
        if job.eval_grid == "paper":
            grid = _paper_grid(spec, settings, self.options)
            eval_size, source = grid.size, "paper grid"
        notes = []
        if spec.paper_protocol and spec.paper_protocol != job.protocol:
            notes.append(f"the paper evaluates {spec.name} under the {spec.paper_protocol} protocol; this job runs "
                         f"{job.protocol}")
        path = job.record_path(self.options.results_dir)
        return PlannedJob(job=job, spec=spec, dataset=dataset, settings=settings,
                          differences=spec.schema.differences(settings, spec.profiles[job.profile]), units=units,
                          tests=tests, record_path=path, status=_record_status(path), weights=weights, resources=resources,
                          eval_size=eval_size, eval_size_source=source, notes=notes, eval_grid=grid,
                          validation={c: list(index.categories[c].validation)[:FAST_DEV_TEST if job.dev_run else None]
                                      for c in tests if index.categories[c].validation},
                          unscored={c: list(index.categories[c].unscored) for c in tests
                                    if index.categories[c].unscored and not job.dev_run})

    def plan(self, jobs: Sequence[Job]) -> Plan:
        """Plan every job; the first usage error raises."""
        planned = [self.plan_job(job) for job in jobs]
        return Plan(planned, self.indexes, self.options)


def plan_jobs(registry: Registry, jobs: Sequence[Job], options: RunOptions) -> Plan:
    """Plan ``jobs`` (see :class:`Planner`)."""
    return Planner(registry, options).plan(jobs)
