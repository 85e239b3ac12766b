"""The preflight: after planning and before the first fit, check everything a run will need.

- **Weights**: every file each pending job loads is on disk, and its sha256 matches where the
  method pins one.
- **Data**: every training and test image and every mask of the pending jobs decodes (a
  truncated file is found now, not after hours of training), and each mask has its image's size.
- **Data needs**: every path a job's method declares it reads besides its dataset
  (:class:`harness.specs.DataNeed`: DTD textures, ImageNette, ...) is set and exists.
- **Folders**: the results and cache folders can be written, and the cache's filesystem has room
  for the largest job's fit. Sizes come from the networks built on the meta device. The finished
  fit's state (every network's weights and buffers) is certain to be written: less room than that
  is a problem. The mid-fit checkpoints can only be bounded (which networks and optimisers a stage
  saves is the method's choice): the bound is weights plus two optimiser moments for every
  parameter, for each checkpoint kept, and less room than that is a note, since a fit that meets
  a full disk stops with its last checkpoint intact and a rerun resumes from it.

Every problem is one line naming the file or folder and what to do; :func:`check_plan` raises
:class:`PreflightError` (exit 2) with all of them. ``harness run --dry-run`` shows the same report
and writes nothing.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from harness.data import Sample
from harness.errors import HarnessError
from harness.engine.planning import Plan, PlannedJob
from harness.engine.weights import WeightsResolver, verify

#: Adam's two moments per parameter, in the parameter's own dtype (the bound on a checkpoint).
OPTIMISER_MOMENTS = 2
#: Checkpoints kept per fit (:class:`harness.engine.support.checkpoint.TrainingCheckpoint`'s default).
CHECKPOINTS_KEPT = 2


class PreflightError(HarnessError):
    """The preflight found problems; the message lists each with its file and fix."""


@dataclass
class PreflightReport:
    """What the preflight found.

    Attributes
    ----------
    problems : list of str
        One line each, naming the file or folder and the fix.
    checked_images : int
        Images and masks decoded.
    state_bytes : int
        The finished fit's state of the largest job: room it certainly needs.
    checkpoint_bytes : int
        The bound on the largest job's room: its finished state and the checkpoints kept.
    notes : list of str
        Findings that do not stop the run.
    """

    problems: list[str] = field(default_factory=list)
    checked_images: int = 0
    state_bytes: int = 0
    checkpoint_bytes: int = 0
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """The report as text."""
        head = (f"preflight: {len(self.problems)} problem(s); {self.checked_images} image(s) and mask(s) decoded; "
                f"a fit needs {_gib(self.state_bytes)} GiB, with its checkpoints at most {_gib(self.checkpoint_bytes)} GiB")
        return "\n".join([head, *[f"  - {p}" for p in self.problems], *[f"  note: {n}" for n in self.notes]])


def check_data(samples: Iterable[Sample], threads: int | None = None) -> tuple[list[str], int]:
    """Check every image and mask file of ``samples`` (:func:`harness.engine.support.dataset_summary.check_files`).

    Returns
    -------
    (problems, files checked)
    """
    from harness.engine.support.dataset_summary import check_files, source_path

    unique = list({s.key: s for s in samples}.values())
    files = [s for s in unique if source_path(s.image) is not None or source_path(s.mask) is not None]
    if not files:
        return [], 0
    workers = threads or min(8, os.cpu_count() or 1)
    chunks = [files[i::workers] for i in range(workers)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(check_files, chunks))
    checked = sum(source_path(s.image) is not None for s in files) + sum(source_path(s.mask) is not None for s in files)
    return sorted(p for _, problems in results for p in problems), checked


def check_weights(planned: PlannedJob, resolver: WeightsResolver) -> list[str]:
    """Missing or mismatching weight files of one job."""
    problems = []
    resolver = WeightsResolver(resolver.weights_dir, pull_hint=f"harness weights pull --methods {planned.job.method} "
                                                              f"--profile {planned.job.profile}")
    for located in planned.weights:
        if located.path is None:
            problems.append(f"{planned.job.label}: " + str(resolver.missing_error(located)).replace("\n", " "))
            continue
        status, detail = verify(located)
        if status == "mismatch":
            problems.append(f"{planned.job.label}: {located.path} ({located.file.what}) has the wrong sha256 ({detail}); "
                            f"it is another file or damaged: harness weights pull --methods {planned.job.method}")
    return problems


def check_data_needs(planned: PlannedJob) -> list[str]:
    """Unmet data needs of one job, each naming the setting, the data and how to get it."""
    problems = []
    random_weights = planned.job.weights == "random"
    for need in planned.spec.needs(planned.settings):
        value = str(planned.settings.get(need.setting, "") or "")
        problem = need.problem(planned.job.method, value, random_weights)
        if problem:
            problems.append(f"{planned.job.label}: {problem}")
    return problems


def _writable(folder: Path, what: str, probe: bool) -> str | None:
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        return f"{what} {folder}: {existing} is a file, not a folder; choose another --{what.replace(' ', '-')}"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{what} {folder} is not writable ({existing}); choose another --{what.replace(' ', '-')} or fix its permissions"
    if probe and folder.is_dir():
        test = folder / f".harness-write-test-{os.getpid()}"
        try:
            test.write_bytes(b"")
            test.unlink()
        except OSError as exc:
            return f"{what} {folder} cannot be written: {exc.strerror}"
    return None


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f}"


def fit_bytes(planned: PlannedJob) -> tuple[int, int]:
    """Room one fit needs on the cache's filesystem, from its networks built on the meta device.

    Returns
    -------
    (state, bound)
        ``state``: the finished fit's weights and buffers, which the fit cache certainly writes.
        ``bound``: ``state`` plus :data:`CHECKPOINTS_KEPT` checkpoints holding every parameter
        with :data:`OPTIMISER_MOMENTS` optimiser moments. Both are 0 for a method that cannot be
        built on the meta device.
    """
    import torch

    try:
        with torch.device("meta"):
            method = planned.spec.factory(planned.settings)
        networks = method.networks().values()
    except Exception:  # noqa: BLE001 - a method that cannot build on meta is estimated at zero here
        return 0, 0
    params = sum(p.numel() * p.element_size() for net in networks for p in net.parameters())
    buffers = sum(b.numel() * b.element_size() for net in networks for b in net.buffers())
    state = params + buffers
    return state, state + CHECKPOINTS_KEPT * (state + OPTIMISER_MOMENTS * params)


def run_preflight(plan: Plan, check_images: bool = True, probe_folders: bool = True) -> PreflightReport:
    """Check ``plan``'s pending jobs (see the module docstring)."""
    from harness.engine.support.fsutil import free_bytes

    report = PreflightReport()
    pending = plan.pending
    options = plan.options
    resolver = WeightsResolver(options.weights_dir)
    for planned in pending:
        report.problems += check_weights(planned, resolver)
        report.problems += check_data_needs(planned)
    if check_images and pending:
        samples = [s for p in pending for u in p.units for s in u.train]
        samples += [s for p in pending for tests in p.tests.values() for s in tests]
        problems, report.checked_images = check_data(samples)
        report.problems += [p if "its image" in p else f"{p}; re-extract it from the dataset archive (or remove it)"
                            for p in problems]
    for folder, what in ((options.results_dir, "results dir"), (options.cache_dir, "cache dir")):
        problem = _writable(folder, what, probe_folders)
        if problem:
            report.problems.append(problem)
    if pending and options.fit_cache:
        seen: dict[tuple, tuple[int, int]] = {}
        for planned in pending:
            key = (planned.job.method, repr(sorted(planned.settings.as_json().items())))
            if key not in seen:
                seen[key] = fit_bytes(planned)
        report.state_bytes = max((state for state, _ in seen.values()), default=0)
        report.checkpoint_bytes = max((bound for _, bound in seen.values()), default=0)
        free = free_bytes(options.cache_dir)
        if free is not None and report.state_bytes > free:
            report.problems.append(f"cache dir {options.cache_dir} has {_gib(free)} GiB free but one job's finished fit "
                                   f"alone needs {_gib(report.state_bytes)} GiB; free some space or point --cache-dir "
                                   "at a larger disk")
        elif free is not None and report.checkpoint_bytes > free:
            report.notes.append(f"cache dir {options.cache_dir} has {_gib(free)} GiB free; one job's checkpoints may "
                                f"need up to {_gib(report.checkpoint_bytes)} GiB. A fit that fills the disk stops with "
                                "its last checkpoint intact: free space (or move --cache-dir) and rerun to resume")
    return report


def check_plan(plan: Plan, check_images: bool = True) -> PreflightReport:
    """Run the preflight and raise :class:`PreflightError` listing every problem, if any."""
    report = run_preflight(plan, check_images)
    if report.problems:
        raise PreflightError("the preflight found problems before any fit (nothing was run):\n"
                             + "\n".join(f"  - {p}" for p in report.problems))
    return report
