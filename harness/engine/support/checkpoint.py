"""Mid-fit checkpoints: a long fit saves its whole training state and a rerun resumes from it.

A method's ``fit`` wraps each training stage in :meth:`TrainingCheckpoint.stage`, names the
objects whose state must survive (networks, optimisers, LR schedulers, gradient scalers, EMA,
its own NumPy / torch generators), and reports each optimiser step::

    with context.checkpoint.stage("denoiser", unet=self.unet, optimiser=opt, rng=rng) as position:
        for epoch in range(position.epoch, epochs):
            for index, batch in enumerate(batches(epoch)):
                if position.skip(epoch, index):
                    continue            # consumed before the interruption
                ...                     # one optimiser step
                position.step(epoch=epoch, batch=index + 1)

On entry the objects are restored from the latest intact checkpoint when it reached this stage
(with the global Python, NumPy, torch and CUDA generators when it stopped here), and
``position`` says where to continue: ``position.done`` when the stage had already finished
(its loops then run zero times), else the epoch and the batches of it already consumed. A
checkpoint is written atomically (safetensors + JSON, never pickle; :mod:`harness.engine.support.state_io`)
when ``interval`` seconds have passed since the last one, at the end of every stage, and when a
stop was requested (Ctrl-C, SIGTERM; :mod:`harness.engine.support.signals`), in which case the loop then stops
with :class:`harness.engine.support.signals.RunInterrupted`. Seeded and with the same data order, a resumed fit
on the CPU ends with exactly the state of an uninterrupted one.

The newest ``keep`` checkpoints are kept; a damaged one is moved aside (``.corrupt``) with a
warning naming it, and the next older one is used.
"""

from __future__ import annotations

import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch

from harness.engine.support import signals
from harness.engine.support.fsutil import move_aside
from harness.engine.support.state_io import DamagedStateError, load_state, save_state

CHECKPOINT_GLOB = "checkpoint-*.safetensors"


def _object_state(obj: Any) -> Any:
    if isinstance(obj, np.random.Generator):
        return {"bit_generator": obj.bit_generator.state}
    if isinstance(obj, torch.Generator):
        return {"torch_generator": obj.get_state()}
    if hasattr(obj, "state_dict"):
        return obj.state_dict()
    raise TypeError(f"cannot checkpoint a {type(obj).__name__}: give objects with state_dict()/load_state_dict(), "
                    "NumPy Generators or torch Generators")


def _restore_object(obj: Any, state: Any) -> None:
    if isinstance(obj, np.random.Generator):
        obj.bit_generator.state = state["bit_generator"]
    elif isinstance(obj, torch.Generator):
        obj.set_state(state["torch_generator"])
    else:
        obj.load_state_dict(state)


def global_rng_state() -> dict[str, Any]:
    """Python, NumPy (legacy global), torch CPU and CUDA generator states."""
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(legacy=False),
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_global_rng(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`global_rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


@dataclass
class Position:
    """Where a stage continues after a resume.

    Attributes
    ----------
    stage : str
    done : bool
        The stage had finished before the interruption; its loops should not run.
    epoch : int
        Epoch to continue in (0 for a fresh stage).
    batch : int
        Batches of ``epoch`` already consumed (they are skipped).
    steps : int
        Optimiser steps already made in this stage.
    extra : dict
        What the method keeps with the checkpoint (``position.extra["chosen"] = ...``): JSON
        values and tensors. It is restored on resume, also for a finished stage.
    """

    stage: str
    done: bool = False
    epoch: int = 0
    batch: int = 0
    steps: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    _owner: "TrainingCheckpoint | None" = field(default=None, repr=False)

    def skip(self, epoch: int, index: int) -> bool:
        """Whether batch ``index`` of ``epoch`` was consumed before the interruption."""
        return self.done or epoch < self.epoch or (epoch == self.epoch and index < self.batch)

    def step(self, *, epoch: int, batch: int) -> None:
        """Record one optimiser step after ``batch`` batches of ``epoch``; save when due."""
        self.epoch, self.batch = int(epoch), int(batch)
        self.steps += 1
        if self._owner is not None:
            self._owner._after_step(self)

    def save(self) -> None:
        """Write a checkpoint now, whatever the interval (an epoch end a method wants kept)."""
        if self._owner is not None:
            self._owner._extras[self.stage] = dict(self.extra)
            self._owner._save(self)


class TrainingCheckpoint:
    """The checkpoints of one fit (one fit unit of one job).

    Parameters
    ----------
    folder : Path or None
        Where the checkpoints live (the job's cache); None disables saving and resuming (the
        API still works, so a method needs no special case).
    interval : float
        Seconds between two checkpoints within a stage (0: after every step).
    keep : int
        Newest checkpoints kept.
    notify : callable
        ``notify(message)`` for warnings (a damaged checkpoint) and notes (a resume).
    """

    def __init__(self, folder: Path | None, interval: float = 600.0, keep: int = 2,
                 notify: Callable[[str], None] | None = None) -> None:
        self.folder = Path(folder) if folder is not None else None
        self.interval = float(interval)
        self.keep = max(1, int(keep))
        self.notify = notify or (lambda message: None)
        self.resumed_from: dict[str, Any] | None = None
        self.saved = 0
        self._latest: tuple[Any, dict[str, Any], Path] | None = None
        self._loaded = False
        self._completed: list[str] = []
        self._extras: dict[str, Any] = {}
        self._objects: dict[str, Any] = {}
        self._stage: str | None = None
        self._last_save = time.monotonic()
        self._rng_restored = False

    # -- files --------------------------------------------------------------------------------
    def files(self) -> list[Path]:
        """Checkpoint files, newest first."""
        if self.folder is None or not self.folder.is_dir():
            return []
        return sorted(self.folder.glob(CHECKPOINT_GLOB), key=lambda p: p.name, reverse=True)

    def _load_latest(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for path in self.files():
            try:
                state, info = load_state(path)
                if not isinstance(state, dict) or "objects" not in state:
                    raise DamagedStateError(f"{path} holds no training state")
            except DamagedStateError as exc:
                moved = move_aside(path)
                self.notify(f"warning: checkpoint {path} is damaged ({exc}); moved it to {moved.name} and "
                            "using the previous one")
                continue
            self._latest = (state, info, path)
            self._completed = list(info.get("completed", []))
            self._extras = dict(state.get("extras", {}))
            return

    def clear(self) -> None:
        """Delete every checkpoint (the fit finished and was cached)."""
        for path in self.files():
            path.unlink(missing_ok=True)

    # -- the stage API ----------------------------------------------------------------------------
    @contextmanager
    def stage(self, name: str, **objects: Any) -> Iterator[Position]:
        """Run one training stage with ``objects`` checkpointed (see the module docstring)."""
        for key, obj in objects.items():
            # Fail early, naming the object, rather than at the first save.
            if not isinstance(obj, (np.random.Generator, torch.Generator)) and not (
                    hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")):
                raise TypeError(f"cannot checkpoint {key}={type(obj).__name__}: give objects with state_dict() and "
                                "load_state_dict(), NumPy Generators or torch Generators")
        self._load_latest()
        self._stage, self._objects = name, dict(objects)
        position = Position(name, _owner=self)
        if self._latest is not None:
            state, info, path = self._latest
            reached = name in self._completed or info.get("stage") == name
            if reached:
                saved = state["objects"]
                for key, obj in objects.items():
                    if key in saved:
                        _restore_object(obj, saved[key])
                at_frontier = info.get("stage") == name
                if at_frontier and not self._rng_restored:
                    restore_global_rng(state["rng"])
                    self._rng_restored = True
                position.extra = dict(self._extras.get(name, {}))
                if name in self._completed:
                    position.done = True
                    position.epoch = 1 << 30
                    position.steps = int(info.get("steps", {}).get(name, 0))
                else:
                    position.epoch, position.batch = int(info.get("epoch", 0)), int(info.get("batch", 0))
                    position.steps = int(info.get("step", 0))
                    if self.resumed_from is None:
                        self.resumed_from = {"stage": name, "epoch": position.epoch, "batch": position.batch,
                                             "step": position.steps, "file": str(path)}
                        self.notify(f"resuming {name} from {path.name}: epoch {position.epoch}, "
                                    f"{position.batch} batch(es) in, step {position.steps}")
                if position.done and self.resumed_from is None and at_frontier:
                    self.resumed_from = {"stage": name, "epoch": None, "batch": None, "step": position.steps,
                                         "file": str(path), "stage_completed": True}
        self._last_save = time.monotonic()
        with signals.deferred():
            yield position
            if not position.done:
                self._completed.append(name)
                self._extras[name] = dict(position.extra)
                self._save(position, stage_end=True)
        signals.raise_if_requested()

    def _after_step(self, position: Position) -> None:
        stop = signals.stop_requested()
        if stop is not None or time.monotonic() - self._last_save >= self.interval:
            self._extras[position.stage] = dict(position.extra)
            self._save(position)
        if stop is not None:
            raise signals.RunInterrupted(stop)

    def _save(self, position: Position, stage_end: bool = False) -> None:
        self._last_save = time.monotonic()
        if self.folder is None:
            return
        steps = {}
        if self._latest is not None:
            steps.update(self._latest[1].get("steps", {}))
        steps[position.stage] = int(position.steps)
        info = {"stage": position.stage, "completed": list(self._completed), "epoch": int(position.epoch),
                "batch": int(position.batch), "step": int(position.steps), "steps": steps, "stage_end": stage_end,
                "time": time.time()}
        state = {"objects": {k: _object_state(o) for k, o in self._objects.items()}, "rng": global_rng_state(),
                 "extras": self._extras}
        self.saved += 1
        previous = self.files()
        number = int(previous[0].stem.split("-")[-1]) + 1 if previous else 1
        path = self.folder / f"checkpoint-{number:08d}.safetensors"
        save_state(path, state, info)
        self._latest = (state, info, path)
        for old in self.files()[self.keep:]:
            old.unlink(missing_ok=True)
