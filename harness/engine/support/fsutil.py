"""Writing files so that a crash, a kill or a full disk never leaves a half-written one.

Every file the harness writes for later reading (records, tables, fit caches, checkpoints) goes
through :func:`atomic_write`: the bytes go to a temporary file in the same folder, which is
fsync'd, given the permissions an ordinary ``open()`` would give it under the user's umask
(``mkstemp`` creates 0600, which would hide a shared results folder from the rest of a group),
renamed over the target, and the folder is fsync'd so the rename itself survives a power cut.
On any failure the temporary file is removed; a full disk becomes a :class:`StorageError`
naming the folder.
"""

from __future__ import annotations

import errno
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from harness.errors import HarnessError


class StorageError(HarnessError):
    """A file could not be written (full disk, read-only folder, a file where a folder should be)."""


def current_umask() -> int:
    """The process's umask (read without changing it for longer than one call)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode ``open(path, "w")`` would give a new file: 0666 minus the umask."""
    return 0o666 & ~current_umask()


def ensure_dir(folder: Path, what: str = "folder") -> Path:
    """Create ``folder`` (and parents); a clear error when a file stands in the way."""
    folder = Path(folder)
    for parent in [folder, *folder.parents]:
        if parent.exists() and not parent.is_dir():
            raise StorageError(f"{what} {folder}: {parent} is a file, not a folder; choose another path "
                               "or move the file away")
        if parent.exists():
            break
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"cannot create {what} {folder}: {exc.strerror or exc}") from exc
    return folder


def fsync_dir(folder: Path) -> None:
    """fsync a folder so that a rename into it is durable (a no-op where unsupported)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _storage_error(path: Path, exc: OSError) -> StorageError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageError(f"no space left in {path.parent} while writing {path.name}; free some space (or point "
                            "--results-dir / --cache-dir elsewhere) and rerun: finished work is kept")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StorageError(f"cannot write {path}: {exc.strerror}; make {path.parent} writable or choose another "
                            "folder")
    return StorageError(f"cannot write {path}: {exc.strerror or exc}")


@contextmanager
def atomic_writer(path: Path) -> Iterator[BinaryIO]:
    """Open a temporary file next to ``path``; on success it replaces ``path`` atomically."""
    path = Path(path)
    ensure_dir(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _storage_error(path, exc) from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except OSError as exc:
        _remove(tmp)
        raise _storage_error(path, exc) from exc
    except BaseException:
        _remove(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` atomically (see the module docstring)."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_writer(path) as handle:
        handle.write(payload)


def atomic_write_with(path: Path, write: Callable[[Path], None]) -> None:
    """Let ``write(tmp_path)`` produce the file (for libraries that take a path), then rename it."""
    path = Path(path)
    ensure_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except OSError as exc:
        _remove(tmp)
        raise _storage_error(path, exc) from exc
    except BaseException:
        _remove(tmp)
        raise
    fsync_dir(path.parent)


def move_aside(path: Path, suffix: str = ".corrupt") -> Path:
    """Rename a damaged file to ``<name><suffix>`` (numbered if taken) and return the new path."""
    path = Path(path)
    target = path.with_name(path.name + suffix)
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}{suffix}.{n}")
        n += 1
    os.replace(path, target)
    return target


def free_bytes(folder: Path) -> int | None:
    """Free space of the filesystem holding ``folder`` (its nearest existing parent)."""
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        stats = os.statvfs(folder)
    except (OSError, AttributeError):
        return None
    return stats.f_bavail * stats.f_frsize


def _remove(path: str | Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
