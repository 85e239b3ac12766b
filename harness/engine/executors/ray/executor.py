"""The Ray executor: joins a running cluster or starts a local instance, then hands the plan to a driver."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from typing import Any, Mapping

import ray

from harness.engine.executors.ray.driver import STOP_GRACE_SECONDS, Driver
from harness.engine.executors.ray.resources import NAME, reason
from harness.engine.options import RunOptions
from harness.errors import UsageError

#: Object store of a local instance: tasks exchange only jobs and records, a few kB each.
LOCAL_OBJECT_STORE_BYTES = 512 * 2**20


class RayExecutor:
    """Runs planned jobs as Ray tasks (see the module docstring).

    Parameters
    ----------
    options : RunOptions
        ``ray_address`` (None: ``$RAY_ADDRESS`` or a new local instance), ``retries``,
        ``device``, ``force``, ``lock_timeout`` are read here.
    init_kwargs : mapping, optional
        Extra ``ray.init`` arguments (``num_cpus``, ``runtime_env``, ...), for scripts.
    stop_grace : float
        Seconds to wait after Ctrl-C for running jobs to save their checkpoints.
    """

    name = NAME

    def __init__(self, options: RunOptions, init_kwargs: Mapping[str, Any] | None = None,
                 stop_grace: float = STOP_GRACE_SECONDS) -> None:
        self.options = options
        self.init_kwargs = dict(init_kwargs or {})
        self.stop_grace = float(stop_grace)
        self.local = False

    def run(self, plan: Any, runner: Any) -> Any:
        """Run ``plan``'s jobs on Ray; ``runner`` is the driver's JobRunner (skips, progress, messages).

        When every job already has its ``ok`` record, Ray is not even started.
        """
        driver = Driver(self, plan, runner)
        driver.skip_finished()
        if not driver.todo:
            return driver.summary
        owned = self._connect(runner)
        try:
            return driver.go()
        finally:
            if owned:
                ray.shutdown()

    def _connect(self, runner: Any) -> bool:
        """Join or start Ray; True when this executor opened the connection (and closes it)."""
        if ray.is_initialized():
            self.local = False
            return False
        address = self.options.ray_address or os.environ.get("RAY_ADDRESS") or None
        common: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
        main = threading.current_thread() is threading.main_thread()
        # ray.init installs its own SIGTERM handler (exit at once); the run's handler, which stops
        # cleanly, must stay in charge.
        sigterm = signal.getsignal(signal.SIGTERM) if main else None
        try:
            if address:
                unreachable = _unreachable(address)
                if unreachable:
                    raise UsageError(f"--address {address}: {unreachable}. Start the cluster with 'ray start --head' "
                                     "on its head node (it prints the address), or leave out --address to start a "
                                     "local instance")
                try:
                    ray.init(address=address, **{**common, **self.init_kwargs})
                except (ConnectionError, RuntimeError, ValueError) as exc:
                    raise UsageError(f"--address {address}: cannot join that Ray cluster ({reason(exc)}). "
                                     "Start one with 'ray start --head' (then --address auto on that machine, or "
                                     "HOST:6379 elsewhere), or leave out --address to start a local instance") from None
                self.local = False
                runner.notify(f"ray: joined the cluster at {address} "
                              f"({_describe(ray.cluster_resources())})")
            else:
                ray.init(address="local", include_dashboard=False, object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                         **{**common, **self.init_kwargs})
                self.local = True
                runner.notify(f"ray: started a local instance ({_describe(ray.cluster_resources())})")
        finally:
            if main and sigterm is not None:
                signal.signal(signal.SIGTERM, sigterm)
        return True


def _unreachable(address: str, timeout: float = 5.0) -> str | None:
    """Why nothing can answer at a ``HOST:PORT`` address, or None (also for ``auto`` and ``ray://``).

    Ray itself retries an unreachable address for minutes; a plain TCP connection says it at once.
    """
    host, sep, port = address.rpartition(":")
    if not sep or "://" in address or not port.isdigit():
        return None
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout):
            return None
    except OSError as exc:
        return f"nothing answers at {host}:{port} ({exc.strerror or type(exc).__name__})"


def _describe(resources: Mapping[str, Any]) -> str:
    return (f"{float(resources.get('CPU', 0)):g} CPU(s), {float(resources.get('GPU', 0)):g} GPU(s), "
            f"{float(resources.get('memory', 0)) / 2**30:.1f} GB")
