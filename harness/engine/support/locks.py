"""Per-job locks, so that two runs of the same job (two terminals, two cluster nodes) never train it twice.

A lock is a file created with ``O_CREAT | O_EXCL`` (atomic on local filesystems and on NFS v3+)
holding its owner (host, pid, start time). While held, a heartbeat thread touches it every
``heartbeat`` seconds. Another run that finds the lock waits; it takes the lock over when the
owner is gone: on the same host, when its pid no longer exists; on any host, when the heartbeat
is older than ``stale_after`` seconds (a crashed node). Taking over renames the stale file first,
so two waiters cannot both break it.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

from harness.engine.support.fsutil import ensure_dir


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class JobLock:
    """An exclusive lock on one job.

    Parameters
    ----------
    path : Path
        The lock file.
    stale_after : float
        Seconds without a heartbeat after which a lock from another host is considered abandoned.
    heartbeat : float
        Seconds between two touches of the held lock.
    """

    def __init__(self, path: Path, stale_after: float = 300.0, heartbeat: float = 30.0) -> None:
        self.path = Path(path)
        self.stale_after = float(stale_after)
        self.heartbeat = float(heartbeat)
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.held = False

    def owner(self) -> dict | None:
        """The current owner's facts, or None when unlocked (or unreadable)."""
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def _stale(self) -> bool:
        owner = self.owner()
        try:
            age = time.time() - self.path.stat().st_mtime
        except OSError:
            return False  # gone: not stale, just free
        if owner and owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int):
            return not _pid_alive(owner["pid"]) or age > self.stale_after
        return age > self.stale_after

    def try_acquire(self) -> bool:
        """Take the lock if free (or stale); never waits."""
        ensure_dir(self.path.parent, "lock folder")
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                if not self._stale():
                    return False
                try:
                    os.replace(self.path, self.path.with_name(f"{self.path.name}.stale-{self.token}"))
                    os.unlink(self.path.with_name(f"{self.path.name}.stale-{self.token}"))
                except OSError:
                    pass
                continue
            with os.fdopen(fd, "w") as handle:
                json.dump({"host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
                           "started": time.time()}, handle)
            self.held = True
            self._start_heartbeat()
            return True
        return False

    def acquire(self, poll: float = 1.0, on_wait: Callable[[dict | None], None] | None = None,
                timeout: float | None = None) -> bool:
        """Wait for the lock; ``on_wait(owner)`` is called once when it is held by someone else."""
        start = time.monotonic()
        told = False
        while not self.try_acquire():
            if not told and on_wait is not None:
                on_wait(self.owner())
                told = True
            if timeout is not None and time.monotonic() - start > timeout:
                return False
            time.sleep(poll)
        return True

    def _start_heartbeat(self) -> None:
        self._stop.clear()

        def beat() -> None:
            while not self._stop.wait(self.heartbeat):
                try:
                    os.utime(self.path)
                except OSError:
                    return

        self._thread = threading.Thread(target=beat, name=f"lock-heartbeat-{self.path.name}", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Release the lock if this object holds it."""
        if not self.held:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        owner = self.owner()
        if owner is None or owner.get("token") == self.token:
            try:
                self.path.unlink()
            except OSError:
                pass
        self.held = False

    def __enter__(self) -> "JobLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
