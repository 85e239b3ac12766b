"""Fitting: one model per fit unit, with the finished fit cached and the fit in progress checkpointed.

A finished fit is stored as ``<cache>/fits/<job>/<unit>.safetensors`` (the method's
``state_dict()`` through :mod:`harness.engine.support.state_io`: safetensors + JSON, never pickle) and reused by
a rerun, so a job interrupted during prediction does not train again. A fit in progress keeps
its checkpoints in ``<cache>/jobs/<job>/<unit>/checkpoints`` (:mod:`harness.engine.support.checkpoint`); they
are deleted once the fit is cached. A damaged cache or checkpoint is moved aside with a warning
naming it and the job refits (or resumes from an older checkpoint).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from harness.engine.support.checkpoint import TrainingCheckpoint
from harness.data import ImageCache, TrainSet
from harness.engine.support.fsutil import move_aside
from harness.method import FitContext, Method
from harness.engine.options import RunOptions
from harness.engine.planning import PlannedJob
from harness.engine.support.progress import Progress
from harness.engine.protocols import FitUnit
from harness.engine.support.state_io import DamagedStateError, load_state, save_state
from harness.engine.weights import WeightsResolver


@dataclass
class FitResult:
    """What fitting one unit produced.

    Attributes
    ----------
    train_seconds : float
        Wall time of ``fit`` (of the original fit when restored from the cache).
    info : dict
        What the method put in ``FitContext.info``.
    restored_from : str or None
        The fit cache file, when the fit was not run again.
    resumed_from : dict or None
        The checkpoint a resumed fit continued from.
    """

    train_seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)
    restored_from: str | None = None
    resumed_from: dict[str, Any] | None = None


def job_folder(cache_dir: Path, planned: PlannedJob) -> Path:
    """``<cache_dir>/jobs/<dataset>/<protocol>/<method>/<stem>``: the job's scratch space."""
    return Path(cache_dir) / "jobs" / planned.job.relative_path().with_suffix("")


class FitCache:
    """The cached finished fit of one unit of one job."""

    def __init__(self, cache_dir: Path, planned: PlannedJob, unit: FitUnit) -> None:
        self.path = Path(cache_dir) / "fits" / planned.job.relative_path().with_suffix("") / f"{unit.name}.safetensors"

    def load(self, method: Method, device: torch.device, notify: Callable[[str], None]) -> FitResult | None:
        """Restore the fit into ``method``; None when there is none or it is damaged (moved aside)."""
        legacy = self.path.with_suffix(".pt")
        if legacy.exists():
            # Pickled caches of earlier versions are never unpickled: unpickling runs code.
            notify(f"note: ignoring {legacy} (a pickled fit cache of an earlier version); the fit is redone")
        if not self.path.exists():
            return None
        try:
            state, info = load_state(self.path)
            method.load_state_dict(state["state"])
        except (DamagedStateError, KeyError, RuntimeError, TypeError, ValueError) as exc:
            moved = move_aside(self.path)
            notify(f"warning: the fit cache {self.path} is damaged or does not fit the method "
                   f"({type(exc).__name__}: {exc}); moved it to {moved.name} and fitting again")
            return None
        method.to(device)
        return FitResult(float(info.get("train_seconds", 0.0)), dict(info.get("info", {})), str(self.path),
                         info.get("resumed_from"))

    def save(self, method: Method, result: FitResult) -> None:
        """Store a finished fit (atomic)."""
        save_state(self.path, {"state": method.state_dict()},
                   info={"train_seconds": result.train_seconds, "info": result.info,
                         "resumed_from": result.resumed_from})


def fit_unit(planned: PlannedJob, unit: FitUnit, method: Method, *, options: RunOptions, device: torch.device,
             progress: Progress, images: ImageCache, weights: WeightsResolver, notify: Callable[[str], None]
             ) -> FitResult:
    """Fit ``method`` on ``unit``'s training images, or restore the cached fit.

    Parameters
    ----------
    planned : PlannedJob
    unit : FitUnit
    method : Method
        Built and on ``device``.
    options : RunOptions
    device : torch.device
    progress : Progress
    images : ImageCache
        Decoded images shared by every job of the run.
    weights : WeightsResolver
        Finds pretrained files and remembers them for the record.
    notify : callable
        ``notify(message)`` prints a line without breaking the progress bars.
    """
    cache = FitCache(options.cache_dir, planned, unit)
    if options.fit_cache and not options.force:
        restored = cache.load(method, device, notify)
        if restored is not None:
            return restored
    train = TrainSet(planned.job.dataset, unit.train, method.input_size, images, **method.resize_rule())
    scratch = job_folder(options.cache_dir, planned) / unit.name
    scratch.mkdir(parents=True, exist_ok=True)
    checkpoint = TrainingCheckpoint(scratch / "checkpoints" if options.fit_cache else None,
                                    options.checkpoint_interval, notify=notify)
    if options.force:
        checkpoint.clear()
    job_seed = planned.job.seed

    def pseudo_validation(n: int = 8, seed: int | None = None):
        from harness.toolkit.pseudo_validation import make_pseudo_validation

        return make_pseudo_validation(train, n, job_seed if seed is None else seed)

    context = FitContext(
        device=device, seed=job_seed, profile=planned.job.profile, settings=planned.settings, cache_dir=scratch,
        weights=weights, progress=progress, pseudo_validation=pseudo_validation, checkpoint=checkpoint,
        fast_dev_run=planned.job.dev_run, random_weights=planned.job.weights == "random",
        textures=frozenset(planned.dataset.textures), dataset=planned.job.dataset, protocol=planned.job.protocol,
    )
    start = time.perf_counter()
    method.fit(train, context)
    result = FitResult(time.perf_counter() - start, dict(context.info), None, checkpoint.resumed_from)
    if options.fit_cache:
        cache.save(method, result)
        checkpoint.clear()
    return result
