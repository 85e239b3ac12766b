"""The training loop methods share: batches resumed from a checkpoint, one optimiser step, the fast-dev stop.

A method keeps what is its own (the loss, the data of a batch, its optimisers and schedule) and
leaves the bookkeeping to two functions:

- :func:`train_batches` walks the epochs and batches of a checkpointed stage still to run: it
  starts where the stage's :class:`harness.StagePosition` says (a resumed
  fit skips what it consumed), shows the epochs' progress, records each optimiser step in the
  position (which saves a checkpoint when one is due) and ends the stage after a few steps in a
  fast dev run;
- :func:`optimiser_step` backpropagates a loss through the gradient scaler of ``--precision``,
  with gradient accumulation and clipping, and steps every optimiser at the end of a cycle.

::

    with context.checkpoint.stage("denoiser", unet=unet, optimiser=opt, scaler=scaler) as position:
        for step in train_batches(context, position, epochs, lambda epoch, first: enumerate(loader)):
            loss = my_loss(step.data)
            optimiser_step(loss, [opt], scaler)

The loop's body must run to its end for every batch (no ``break``): the step is recorded when
the next batch is asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

import torch

if TYPE_CHECKING:  # pragma: no cover
    from harness.method import FitContext, StagePosition

__all__ = ["TrainStep", "train_batches", "optimiser_step", "cycle_ends"]


@dataclass
class TrainStep:
    """One batch of a training stage.

    Attributes
    ----------
    epoch, index : int
        The epoch and the batch's index in it.
    data : object
        What ``epoch_batches`` gave for this batch.
    boundary : bool
        The last batch of a gradient-accumulation cycle: the optimisers step after it.
    """

    epoch: int
    index: int
    data: Any
    boundary: bool = True


def cycle_ends(n_batches: int, accumulate: int, index: int) -> bool:
    """Whether batch ``index`` of an epoch of ``n_batches`` ends an accumulation cycle of ``accumulate``
    batches (the epoch's last batch always does)."""
    return (index + 1) % max(int(accumulate), 1) == 0 or index + 1 == n_batches


def train_batches(context: "FitContext", position: "StagePosition", epochs: int,
                  epoch_batches: Callable[[int, int], Iterable[tuple[int, Any]]], *, accumulate: int = 1,
                  n_batches: Callable[[int], int] | None = None, desc: str = "epochs",
                  on_epoch_end: Callable[[int], None] | None = None) -> Iterator[TrainStep]:
    """Every batch of a checkpointed stage still to run, as :class:`TrainStep` (see the module docstring).

    Parameters
    ----------
    context : FitContext
        ``progress`` shows the epochs; ``stop_early`` ends a fast dev run.
    position : harness.StagePosition
        The stage's position (``context.checkpoint.stage(...)``); each optimiser step is recorded in it.
    epochs : int
        Epochs of the stage (``context.epochs(n)`` already applied).
    epoch_batches : callable
        ``epoch_batches(epoch, first)`` -> ``(index, data)`` pairs of one epoch; ``first`` is the
        first batch not yet consumed (a loader may start there; earlier ones are skipped anyway).
    accumulate : int
        Batches per optimiser step; a step is recorded at the end of each cycle (:func:`cycle_ends`).
    n_batches : callable, optional
        ``n_batches(epoch)``: the epoch's number of batches, needed with ``accumulate > 1``.
    desc : str
        Progress bar label.
    on_epoch_end : callable, optional
        ``on_epoch_end(epoch)`` after each epoch that ran (a schedule stepped per epoch); also after
        the epoch a fast dev run stops in.
    """
    if accumulate > 1 and n_batches is None:
        raise ValueError("train_batches: accumulate > 1 needs n_batches (the last batch of an epoch ends a cycle)")
    start = position.epoch
    for epoch in context.progress.iterate(range(start, epochs), total=max(epochs - start, 0), desc=desc,
                                          unit="epoch"):
        first = position.batch if epoch == position.epoch else 0
        total = n_batches(epoch) if n_batches is not None else None
        stop = False
        for index, data in epoch_batches(epoch, first):
            if position.skip(epoch, index):
                continue
            boundary = accumulate <= 1 or cycle_ends(total, accumulate, index)
            yield TrainStep(epoch, index, data, boundary)
            if boundary:
                position.step(epoch=epoch, batch=index + 1)
                if context.stop_early(position.steps):
                    stop = True
                    break
        if on_epoch_end is not None:
            on_epoch_end(epoch)
        if stop:
            return


def optimiser_step(loss: torch.Tensor, optimisers: Sequence[torch.optim.Optimizer], scaler: Any, *,
                   accumulate: int = 1, boundary: bool = True,
                   clip: tuple[Iterable[torch.nn.Parameter], float] | None = None) -> None:
    """Backpropagate ``loss`` and, at the end of a cycle, step every optimiser.

    Parameters
    ----------
    loss : torch.Tensor
        The batch's loss; divided by ``accumulate`` before backpropagating (the cycle's mean).
    optimisers : sequence of torch.optim.Optimizer
    scaler : torch.amp.GradScaler
        From :func:`harness.toolkit.precision.grad_scaler` (enabled for fp16 only).
    accumulate : int
        Batches per optimiser step.
    boundary : bool
        This batch ends a cycle (:attr:`TrainStep.boundary`): unscale, clip, step, update, zero.
    clip : (parameters, max_norm), optional
        Clip the gradients' global norm (unscaled first) before stepping; ``max_norm <= 0``: no clip.
    """
    scaler.scale(loss / accumulate if accumulate > 1 else loss).backward()
    if not boundary:
        return
    if clip is not None and clip[1] > 0:
        for optimiser in optimisers:
            scaler.unscale_(optimiser)
        torch.nn.utils.clip_grad_norm_(list(clip[0]), clip[1])
    for optimiser in optimisers:
        scaler.step(optimiser)
    scaler.update()
    for optimiser in optimisers:
        optimiser.zero_grad(set_to_none=True)
