"""The options of a run, shared by planning, the executors and every job."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from harness.engine.support.environment import resolve_device

#: ``--save-maps`` choices (see :mod:`harness.engine.inference.evaluation`).
SAVE_MAPS = ("none", "sample", "all")
#: ``--weights`` choices.
WEIGHT_MODES = ("pretrained", "random")


@dataclass
class RunOptions:
    """Options shared by every job of a run.

    Attributes
    ----------
    results_dir : Path
        Records go to ``<results_dir>/records`` (locks to ``<results_dir>/locks``).
    cache_dir : Path
        Finished fits go to ``<cache_dir>/fits``, mid-fit checkpoints and scratch files to
        ``<cache_dir>/jobs``; it may be shared storage.
    device : str
        ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"auto"`` (CUDA when available).
    eval_size : int or None
        Side of the square evaluation grid for pixel metrics; None keeps each dataset's size.
    eval_size_source : str
        ``"option"`` when the user chose ``eval_size``; ``"default"`` lets a method whose
        profile declares an ``eval_size`` setting (the paper's evaluation size) use it.
    eval_grid : str
        ``harness`` (one grid rule for every method, the default) or ``paper`` (each method's
        declared paper grid, :class:`harness.EvalGrid`); part of each job's key.
    data_roots : mapping of str to Path
        Root folder per dataset name.
    force : bool
        Redo jobs that already have an ``ok`` record (and ignore cached fits and checkpoints).
    fit_cache : bool
        Store each finished fit.
    weights_dir : Path or None
    progress : bool or None
        Progress bars; None shows them on a terminal only.
    latency_repeats : int
        Warm single-image calls timed for the latency figure.
    min_timed_calls : int
        Warm ``predict`` calls the FPS figure needs (the largest batch is repeated to reach them).
    eval_batch_size : str or None
        ``--eval-batch-size``: None keeps each method's ``eval_batch_size``; ``auto`` picks the
        largest batch that fits the device; a number sets it for every method. Predictions do
        not depend on it (inference noise is seeded per image), so it is not part of a job's key.
    precision_mode : str
        ``cast`` (frozen networks cast once to the method's low precision) or ``autocast``
        (:mod:`harness.engine.inference.acceleration`).
    tf32 : str
        ``on`` or ``off`` (default): TF32 for CUDA matmuls and convolutions.
    compile : str
        ``none``, ``default`` or ``reduce-overhead`` (``torch.compile`` of each network).
    fast_dev_run : bool
        Run each job's real code on a few images, one epoch and a few steps per stage.
    weights : str
        ``pretrained`` or ``random`` (build the architecture with seeded random weights).
    checkpoint_interval : float
        Seconds between mid-fit checkpoints (0: after every step).
    executor : str
        Name of the executor that runs the jobs.
    save_maps : str
        ``none``, ``sample`` or ``all`` (see :mod:`harness.engine.inference.evaluation`).
    job_gpus, job_cpus : float or None
        Override every method's resource request (fractions allowed).
    lock_timeout : float or None
        Seconds to wait for a job locked by another run (None: as long as it takes).
    ray_address : str or None
        The Ray cluster to join (``auto``, ``HOST:PORT``, ``ray://...``); None starts a local one.
    retries : int
        Times a job is retried when its worker dies (Ray).
    """

    results_dir: Path = Path("results")
    cache_dir: Path = Path(".harness-cache")
    device: str = "auto"
    eval_size: int | None = 256
    eval_size_source: str = "option"
    eval_grid: str = "harness"
    data_roots: Mapping[str, Path] = field(default_factory=dict)
    #: ``--data-option KEY=VALUE``: loader options, given to each dataset that declares the key.
    data_options: Mapping[str, str] = field(default_factory=dict)
    force: bool = False
    fit_cache: bool = True
    weights_dir: Path | None = None
    progress: bool | None = None
    latency_repeats: int = 5
    min_timed_calls: int = 5
    eval_batch_size: str | None = None
    precision_mode: str = "cast"
    tf32: str = "off"
    compile: str = "none"
    fast_dev_run: bool = False
    weights: str = "pretrained"
    checkpoint_interval: float = 600.0
    executor: str = "inprocess"
    save_maps: str = "sample"
    job_gpus: float | None = None
    job_cpus: float | None = None
    lock_timeout: float | None = None
    ray_address: str | None = None
    retries: int = 2

    def torch_device(self) -> torch.device:
        """Resolve ``device`` (``auto`` picks CUDA when available)."""
        return resolve_device(self.device)
