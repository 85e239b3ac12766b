"""Executors: where and in which order planned jobs run.

An executor is an object with ``run(plan, runner) -> RunSummary``: ``plan`` is a
:class:`harness.engine.planning.Plan` (every job validated, finished ones marked), ``runner`` a
:class:`harness.engine.runner.JobRunner` that runs one job in the current process. Executors are
declared through the ``harness_executors`` hook (:class:`harness.ExecutorSpec`), so another engine
(SLURM through submitit, ...) can be a plugin. Built in:

``inprocess`` (default)
    One job after another in this process (:mod:`harness.engine.executors.inprocess`).
``ray``
    Jobs as Ray tasks on a local or remote cluster, with per-job resources and retries
    (:mod:`harness.engine.executors.ray`; ``pip install 'harness-ad[ray]'``).
"""

from __future__ import annotations

from typing import Any, Protocol

from harness.hookspecs import hookimpl
from harness.specs import ExecutorSpec


class Executor(Protocol):
    """What an executor provides."""

    def run(self, plan: Any, runner: Any) -> Any:
        """Run every job of ``plan``; return a :class:`harness.engine.runner.RunSummary`."""


def _inprocess(options: Any) -> Executor:
    from harness.engine.executors.inprocess import InProcessExecutor

    return InProcessExecutor()


def _ray(options: Any) -> Executor:
    from harness.errors import UsageError

    try:
        import ray  # noqa: F401
    except ImportError:
        raise UsageError("--executor ray needs Ray, which is not installed: pip install 'harness-ad[ray]'") from None
    from harness.engine.executors.ray import RayExecutor

    return RayExecutor(options)


@hookimpl
def harness_executors():
    """The built-in executors."""
    return [ExecutorSpec("inprocess", _inprocess, "one job after another in this process (default)"),
            ExecutorSpec("ray", _ray, "jobs as Ray tasks on a local or remote cluster (pip install 'harness-ad[ray]')")]
