"""The method interface, as the runner sees it.

A method plugin's factory returns a :class:`Method`. The runner calls, in order::

    method = spec.factory(settings)          # architecture only, no weights, no data
    method.to(device)
    method.fit(train_set, context)           # normal training images only
    method.eval()
    prediction = method.predict(images, categories)   # batches of test images, no gradients

A method that draws noise at inference declares ``predict(images, categories, seeds=None)``:
the runner then passes one seed per image (:func:`image_seed`: the job's seed and the image's
key), so that a method drawing each image's noise from its own seed
(:class:`harness.toolkit.noise.ImageNoise`) predicts the same at any batch size. Methods
without the argument are called as before (:func:`call_predict`).

and stores ``method.state_dict()`` after ``fit`` so that a finished fit is reused: for a fresh
instance, ``load_state_dict(state_dict())`` must reproduce the predictions exactly
(:func:`harness.testing.check_method` checks it).
"""

from __future__ import annotations

import abc
import hashlib
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterable, Iterator, Mapping, Protocol, Sequence, \
    runtime_checkable

import numpy as np
import torch

from harness.settings import Settings

if TYPE_CHECKING:  # pragma: no cover
    from harness.data import TrainSet
    from harness.specs import WeightFile
    from harness.toolkit.pseudo_validation import PseudoValidationSet


@dataclass
class Prediction:
    """What ``predict`` returns for a batch of B images.

    Attributes
    ----------
    anomaly_maps : torch.Tensor or numpy.ndarray
        Shape (B, h, w), float, higher = more anomalous. Any resolution: the runner resizes maps
        bilinearly to the evaluation size.
    image_scores : torch.Tensor or numpy.ndarray
        Shape (B,), by the paper's own rule (not necessarily the map's maximum).
    """

    anomaly_maps: Any
    image_scores: Any


# -- what FitContext hands a method: narrow interfaces, implemented by the engine -------------------

@runtime_checkable
class WeightFinder(Protocol):
    """``context.weights``: pinned files found on disk (never downloaded), each remembered with its
    sha256 for the job's record (the engine's :class:`~harness.engine.weights.WeightsResolver`)."""

    def resolve(self, file: "WeightFile", settings: Mapping[str, Any] | None = None) -> Path:
        """The path of ``file`` (its ``setting`` may name one explicitly); raises
        :class:`harness.WeightsNotFoundError` naming where it looked and ``harness weights pull``."""
        ...

    def note_used(self, path: Path, what: str, key: str = "") -> str:
        """Remember a file the method read by other means (an authors' checkpoint); its sha256."""
        ...


@runtime_checkable
class StagePosition(Protocol):
    """Where a checkpointed stage continues (``with context.checkpoint.stage(...) as position``).

    ``done``: the stage finished before an interruption (its loops should not run); ``epoch``,
    ``batch``: where to continue; ``steps``: optimiser steps made; ``extra``: JSON values and
    tensors kept with the checkpoint.
    """

    done: bool
    epoch: int
    batch: int
    steps: int
    extra: dict[str, Any]

    def skip(self, epoch: int, index: int) -> bool:
        """Whether batch ``index`` of ``epoch`` was consumed before the interruption."""
        ...

    def step(self, *, epoch: int, batch: int) -> None:
        """Record one optimiser step after ``batch`` batches of ``epoch`` (saves when one is due)."""
        ...

    def save(self) -> None:
        """Write a checkpoint now."""
        ...


@runtime_checkable
class Checkpointing(Protocol):
    """``context.checkpoint``: mid-fit checkpoints, one stage at a time (the engine's
    :class:`~harness.engine.support.checkpoint.TrainingCheckpoint`)."""

    def stage(self, name: str, **objects: Any) -> ContextManager[StagePosition]:
        """Run stage ``name`` with ``objects`` (modules, optimisers, schedulers, scalers, generators:
        anything with ``state_dict``/``load_state_dict``) saved and, after a kill, restored."""
        ...


@runtime_checkable
class ProgressReporter(Protocol):
    """``context.progress``: progress bars for a fit's loops (the engine's
    :class:`~harness.engine.support.progress.Progress`, silent when ``--no-progress``)."""

    def iterate(self, iterable: Iterable[Any], total: int | None = None, desc: str = "",
                unit: str = "it") -> Iterator[Any]:
        """``iterable``, shown as it is consumed."""
        ...

    def epochs(self, n: int, desc: str = "epochs") -> Iterator[int]:
        """``range(n)``, shown as epochs."""
        ...


@dataclass
class FitContext:
    """Everything ``fit`` may use besides the training images. It never contains test data.

    Attributes
    ----------
    device : torch.device
        Where to train and infer.
    seed : int
        The job's seed; the runner has already seeded Python, NumPy and torch with it.
    profile : str
        Name of the profile in use (``paper``, ``tiny``, ...).
    settings : Settings
        The resolved, typed settings (profile plus user overrides).
    cache_dir : Path
        A directory private to this job and fit unit for intermediate files.
    weights : WeightFinder
        Finds pretrained weights on disk (never downloads) and remembers each file it found, with
        its sha256, for the record.
    progress : ProgressReporter
        Progress reporting for epochs and steps.
    pseudo_validation : callable
        ``pseudo_validation(n=8, seed=None) -> PseudoValidationSet``: synthetic anomalies made
        from the training images (kept for plugins written against the first API; a method that
        selects hyperparameters should hold out its own images with
        :func:`harness.toolkit.pseudo_validation.split_holdout`).
    info : dict
        Facts the method wants in the job's record (chosen hyperparameters, whether a backbone
        was randomly initialised, ...). Values must be JSON-serialisable.
    checkpoint : Checkpointing
        Mid-fit checkpoints: wrap each training stage in ``context.checkpoint.stage(...)``
        (:mod:`harness.engine.support.checkpoint`) so that a killed fit resumes where it stopped.
    fast_dev_run : bool
        ``--fast-dev-run``: run every stage's real code for :meth:`epochs` = 1 epoch and at most
        :data:`FAST_DEV_STEPS` optimiser steps (:meth:`stop_early`), to find crashes in minutes.
    random_weights : bool
        ``--weights random``: build and initialise every network randomly (seeded) instead of
        loading pretrained files; such a job's record is marked and never shown as a result.
    textures : frozenset of str
        The job's dataset's texture categories (:attr:`harness.DatasetSpec.textures`).
    dataset : str
        The job's dataset name.
    protocol : str
        The job's protocol.
    """

    device: torch.device
    seed: int
    profile: str
    settings: Mapping[str, Any]
    cache_dir: Path
    weights: WeightFinder
    progress: ProgressReporter
    pseudo_validation: Callable[..., "PseudoValidationSet"] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    checkpoint: Checkpointing | None = None
    fast_dev_run: bool = False
    random_weights: bool = False
    textures: frozenset[str] = frozenset()
    dataset: str = ""
    protocol: str = ""

    def __post_init__(self) -> None:
        if self.checkpoint is None:
            from harness.engine.support.checkpoint import TrainingCheckpoint

            self.checkpoint = TrainingCheckpoint(None)

    def epochs(self, n: int) -> int:
        """Epochs to run for a stage of ``n`` epochs: ``n``, or 1 in a fast dev run (0 stays 0)."""
        return min(int(n), 1) if self.fast_dev_run else int(n)

    def stop_early(self, steps: int) -> bool:
        """Whether a stage that made ``steps`` optimiser steps should stop (fast dev run only)."""
        return self.fast_dev_run and steps >= FAST_DEV_STEPS


#: Optimiser steps per training stage in a fast dev run.
FAST_DEV_STEPS = 2


class Method(abc.ABC):
    """Base class of every method plugin.

    Subclasses implement :meth:`fit` and :meth:`predict`, and list their networks in
    :meth:`networks` so that the core can count parameters and move them to a device.

    Parameters
    ----------
    settings : mapping
        The resolved settings of the job's profile.
    """

    #: Input size (H, W) the runner resizes images to before ``fit`` and ``predict``.
    input_size: tuple[int, int] = (256, 256)
    #: Batch size the runner uses for ``predict`` (the FPS figure states it).
    eval_batch_size: int = 8
    #: Filter the runner resizes images with (a name of :data:`harness.data.RESAMPLING`).
    interpolation: str = "bicubic"
    #: True: Pillow's antialiased filter; False: OpenCV's ``cv2.resize`` (no antialiasing).
    antialias: bool = True
    #: ``square`` (both sides to :attr:`input_size`) or ``shorter_side`` (aspect ratio kept).
    resize_mode: str = "square"
    #: Set by ``fit`` in a fast dev run (``context.fast_dev_run``) for methods whose ``predict`` is
    #: long (many denoising steps): ``predict`` may then run only a handful of its steps. The GPU
    #: check clears it to time the full inference of a dev-fitted model.
    dev_run: bool = False

    def __init__(self, settings: Mapping[str, Any]) -> None:
        self.settings = settings if isinstance(settings, Settings) else Settings(settings)
        # These settings have a meaning the runner relies on (see harness.settings.SHARED_NAMES);
        # a method that declares none of them sets the class attributes instead.
        if "image_size" in self.settings:
            size = self.settings["image_size"]
            self.input_size = (int(size), int(size)) if np.isscalar(size) else tuple(int(s) for s in size)
        if "eval_batch_size" in self.settings:
            self.eval_batch_size = int(self.settings["eval_batch_size"])
        if "interpolation" in self.settings:
            self.interpolation = str(self.settings["interpolation"])
        if "antialias" in self.settings:
            self.antialias = bool(self.settings["antialias"])
        if "resize_mode" in self.settings:
            self.resize_mode = str(self.settings["resize_mode"])
        self.device = torch.device("cpu")

    def resize_rule(self) -> dict[str, Any]:
        """How the runner resizes images for this method: ``interpolation``, ``antialias`` and ``mode``
        (the keyword arguments of :func:`harness.data.resize_image` and :class:`harness.data.TrainSet`)."""
        return {"interpolation": self.interpolation, "antialias": self.antialias, "mode": self.resize_mode}

    @abc.abstractmethod
    def networks(self) -> Mapping[str, torch.nn.Module]:
        """Return the method's networks by name (for parameter counts, FLOPs and ``to``)."""

    @abc.abstractmethod
    def fit(self, train: "TrainSet", context: FitContext) -> None:
        """Train on normal images of every category of the job.

        Parameters
        ----------
        train : TrainSet
            ``(image, category)`` items; images float32 (3, H, W) in [0, 1] at :attr:`input_size`.
        context : FitContext
            Device, seed, weights, progress, pseudo-validation set.
        """

    @abc.abstractmethod
    def predict(self, images: torch.Tensor, categories: Sequence[str]) -> Prediction:
        """Score a batch of test images.

        Parameters
        ----------
        images : torch.Tensor
            Float32 (B, 3, H, W) in [0, 1] at :attr:`input_size`, already on :attr:`device`.
        categories : sequence of str
            The category of each image (methods with per-category prompts or banks use it).

        Returns
        -------
        Prediction
        """

    def to(self, device: torch.device | str) -> "Method":
        """Move every network to ``device`` and remember it."""
        self.device = torch.device(device)
        for net in self.networks().values():
            net.to(self.device)
        return self

    def eval(self) -> "Method":
        """Put every network in evaluation mode."""
        for net in self.networks().values():
            net.eval()
        return self

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to restore a finished fit (networks plus any extra state).

        The result is a tree of mappings, lists, tuples, tensors, arrays, numbers and strings: the
        fit cache stores it as safetensors + JSON (:mod:`harness.engine.support.state_io`), never pickled.
        """
        return {name: net.state_dict() for name, net in self.networks().items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        nets = self.networks()
        for name, net in nets.items():
            net.load_state_dict(state[name])

    def parameter_count(self) -> dict[str, int]:
        """Number of parameters per network (works on the meta device)."""
        return {name: sum(p.numel() for p in net.parameters()) for name, net in self.networks().items()}



def as_numpy(value: Any) -> np.ndarray:
    """Convert a tensor or array-like to a float32 NumPy array on the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().float().cpu().numpy()
    return np.asarray(value, dtype=np.float32)


def image_seed(job_seed: int, key: str) -> int:
    """The inference seed of one test image: a 63-bit hash of the job's seed and the image's key.

    It depends on nothing else (not the batch, not the position in the test set), so a method
    that seeds each image's noise with it predicts the same at any ``eval_batch_size``.
    """
    # surrogateescape: a key from a file name that is not valid UTF-8 still hashes (to its bytes).
    digest = hashlib.sha256(f"{int(job_seed)}\0{key}".encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def accepts_seeds(method: Any) -> bool:
    """Whether ``method.predict`` takes per-image seeds (a ``seeds`` argument or ``**kwargs``)."""
    try:
        params = inspect.signature(method.predict).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "seeds" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def call_predict(method: Any, images: torch.Tensor, categories: Sequence[str],
                 seeds: Sequence[int] | None = None) -> "Prediction":
    """``method.predict``, with ``seeds`` when the method accepts them (older plugins do not)."""
    if seeds is not None and accepts_seeds(method):
        return method.predict(images, categories, seeds=list(seeds))
    return method.predict(images, categories)

