"""The job status board: a small Ray actor where workers post ``started`` / ``ended`` events.

The driver drains it to tell running jobs from queued ones (the progress bar) and to know which
jobs are saving their checkpoints when asked to stop. It is for display: a lost board never
fails a job.
"""

from __future__ import annotations

from typing import Any

import ray

from harness.engine.executors.ray.resources import reason


def board_class() -> type:
    """The status board actor's class, made here so that Ray ships it by value.

    Its process then imports nothing of the harness (or torch) and starts in a moment.
    """

    class JobBoard:
        """Collects the workers' ``started`` / ``ended`` events until the driver drains them."""

        def __init__(self) -> None:
            self.events: list[dict] = []

        def post(self, event: dict) -> None:
            """Keep one event."""
            self.events.append(event)

        def drain(self) -> list:
            """Hand every event kept so far to the driver and forget them."""
            out, self.events = self.events, []
            return out

    return JobBoard


def post_event(board: Any, event: dict) -> None:
    """Tell the driver that a job started or ended on this worker (never fails the job)."""
    if board is None:
        return
    try:
        board.post.remote(event)
    except Exception:  # noqa: BLE001 - the board is for display; a lost board must not fail the job
        pass


def start_board() -> Any:
    """A board actor on the driver's node (anywhere, for a driver on no node: Ray Client)."""
    board = ray.remote(num_cpus=0, max_restarts=0)(board_class())
    try:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=True)
        return board.options(scheduling_strategy=here).remote()
    except Exception:  # noqa: BLE001 - e.g. a Ray Client driver, which is on no node
        return board.remote()


def stop_board(board: Any) -> None:
    """End the board actor (nothing when it is gone already)."""
    if board is not None:
        try:
            ray.kill(board)
        except Exception:  # noqa: BLE001 - already gone
            pass


def drain_board(board: Any, timeout: float) -> tuple[list[dict], str]:
    """The events posted since the last drain, and why the board did not answer (``""`` when it did)."""
    try:
        return ray.get(board.drain.remote(), timeout=timeout), ""
    except Exception as exc:  # noqa: BLE001 - the board only feeds the display and the stop
        return [], reason(exc)
