"""Ctrl-C and SIGTERM: stop cleanly, keep every finished record, save the fit in progress.

Schedulers (SLURM, Kubernetes, Ray on preemption) send SIGTERM and wait a while before SIGKILL;
a user presses Ctrl-C. Both are handled the same way by :func:`handle_stop_signals`:

- outside a checkpointed training loop, the signal raises :class:`RunInterrupted` at once (the
  runner keeps every record written so far and writes none for the interrupted job);
- inside one (a fit that called :meth:`harness.engine.support.checkpoint.TrainingCheckpoint.begin`), the signal
  only sets a flag: the loop saves a checkpoint at its next step boundary and raises
  :class:`RunInterrupted` then, so the rerun resumes from that step. A second signal raises at
  once.

The exit status is ``128 + signal``: 130 for Ctrl-C, 143 for SIGTERM.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator


class RunInterrupted(KeyboardInterrupt):
    """The run was stopped by a signal; ``exit_code`` is ``128 + signal number``."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        """130 for SIGINT, 143 for SIGTERM."""
        return 128 + self.signum


_lock = threading.Lock()
_requested: int | None = None
_graceful_depth = 0


def stop_requested() -> int | None:
    """The signal number of a pending stop request, or None."""
    return _requested


def clear() -> None:
    """Forget a pending request (at the start of a run)."""
    global _requested
    with _lock:
        _requested = None


def raise_if_requested() -> None:
    """Raise :class:`RunInterrupted` when a stop was requested."""
    if _requested is not None:
        raise RunInterrupted(_requested)


@contextmanager
def deferred() -> Iterator[None]:
    """Inside this block a first signal only sets the flag (the loop checks it at step boundaries)."""
    global _graceful_depth
    with _lock:
        _graceful_depth += 1
    try:
        yield
    finally:
        with _lock:
            _graceful_depth -= 1


def _handler(signum: int, _frame: object) -> None:
    global _requested
    with _lock:
        first = _requested is None
        _requested = signum
        defer = _graceful_depth > 0
    if first and defer:
        return
    raise RunInterrupted(signum)


@contextmanager
def handle_stop_signals() -> Iterator[None]:
    """Install the SIGINT and SIGTERM handlers for the duration of a run (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    clear()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, _handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
