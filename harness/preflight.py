"""The preflight: after planning and before the first fit, check everything a run will need.

- **Weights**: every file each pending job loads is on disk, and its sha256 matches where the
  method pins one.
- **Data**: every training and test image and every mask of the pending jobs decodes (a
  truncated file is found now, not after hours of training), and each mask has its image's size.
- **Folders**: the results and cache folders can be written, and the cache's filesystem has room
  for the jobs' checkpoints (estimated from the networks' parameter counts, built on the meta
  device: weights plus two optimiser moments, for the checkpoints kept and the finished fit).

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
from harness.planning import Plan, PlannedJob
from harness.weights import WeightsResolver, verify

#: Bytes stored per parameter in a checkpoint: fp32 weights and Adam's two moments.
CHECKPOINT_BYTES_PER_PARAM = 12
#: Checkpoints kept per fit (plus the finished fit itself).
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
    checkpoint_bytes : int
        The estimated room the largest job's checkpoints need.
    notes : list of str
    """

    problems: list[str] = field(default_factory=list)
    checked_images: int = 0
    checkpoint_bytes: int = 0
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """The report as text."""
        head = (f"preflight: {len(self.problems)} problem(s); {self.checked_images} image(s) and mask(s) decoded; "
                f"checkpoints need about {self.checkpoint_bytes / 2**30:.2f} GiB")
        return "\n".join([head, *[f"  - {p}" for p in self.problems], *[f"  note: {n}" for n in self.notes]])


def check_data(samples: Iterable[Sample], threads: int | None = None) -> tuple[list[str], int]:
    """Check every image and mask file of ``samples`` (:func:`harness.dataset_summary.check_files`).

    Returns
    -------
    (problems, files checked)
    """
    from harness.dataset_summary import check_files, source_path

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


def checkpoint_bytes(planned: PlannedJob) -> int:
    """Estimated bytes of one fit's checkpoints and cache (meta-device parameter count)."""
    import torch

    try:
        with torch.device("meta"):
            method = planned.spec.factory(planned.settings)
        params = sum(method.parameter_count().values())
    except Exception:  # noqa: BLE001 - a method that cannot build on meta is estimated at zero here
        return 0
    return params * CHECKPOINT_BYTES_PER_PARAM * (CHECKPOINTS_KEPT + 1)


def run_preflight(plan: Plan, check_images: bool = True, probe_folders: bool = True) -> PreflightReport:
    """Check ``plan``'s pending jobs (see the module docstring)."""
    from harness.fsutil import free_bytes

    report = PreflightReport()
    pending = plan.pending
    options = plan.options
    resolver = WeightsResolver(options.weights_dir)
    for planned in pending:
        report.problems += check_weights(planned, resolver)
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
        seen: dict[tuple, int] = {}
        for planned in pending:
            key = (planned.job.method, repr(sorted(planned.settings.as_json().items())))
            if key not in seen:
                seen[key] = checkpoint_bytes(planned)
        report.checkpoint_bytes = max(seen.values(), default=0)
        free = free_bytes(options.cache_dir)
        if free is not None and report.checkpoint_bytes > free:
            report.problems.append(f"cache dir {options.cache_dir} has {free / 2**30:.1f} GiB free but the checkpoints "
                                   f"of one job need about {report.checkpoint_bytes / 2**30:.1f} GiB; free some space "
                                   "or point --cache-dir at a larger disk")
    return report


def check_plan(plan: Plan, check_images: bool = True) -> PreflightReport:
    """Run the preflight and raise :class:`PreflightError` listing every problem, if any."""
    report = run_preflight(plan, check_images)
    if report.problems:
        raise PreflightError("the preflight found problems before any fit (nothing was run):\n"
                             + "\n".join(f"  - {p}" for p in report.problems))
    return report
