"""Job records: one JSON file per finished job, typed, versioned, written atomically.

Layout under the results directory::

    <results>/records/<dataset>/<protocol>[-<k>shot]/<method>/<profile>-seed<seed>[-<hash>].json

A record (:class:`Record`) has these fields:

``schema``
    Record format version (:data:`SCHEMA_VERSION`; version 1 records, written before typed
    records, are read and migrated on load).
``job``
    The job's key: ``method``, ``dataset``, ``protocol``, ``shots`` (null unless few-shot),
    ``seed``, ``profile``, ``overrides`` (settings given on the command line).
``status``
    ``"ok"`` or ``"failed"``.
``error``
    For failed jobs: ``phase`` (``plan``, ``build``, ``fit``, ``predict``, ``evaluate``),
    ``type``, ``message``, ``traceback``. Null otherwise.
``metrics``
    ``{category: {metric: value}}`` with fractions in [0, 1] (NaN written as null).
``mean``
    ``{metric: value}``: the unweighted mean over categories (the papers' ``m`` values), plus
    ``mad`` when every mAD metric is defined.
``efficiency``
    ``fps``, ``eval_batch_size``, ``latency_ms`` (batch 1), ``params`` (total), ``params_by_network``,
    ``flops_per_image``, ``peak_memory_mb``, ``peak_memory_kind``, ``train_seconds``,
    ``predict_seconds``, ``n_test_images``, ``device``.
``method_info``
    What the method reported through ``FitContext.info`` (chosen hyperparameters and the like),
    and ``choices``: every value the paper leaves open, with the reason for it.
``settings``
    The resolved settings the method ran with.
``run``
    How the job ran: ``dev_run`` (``--fast-dev-run``), ``weights`` (``pretrained`` or
    ``random``), ``precision``, ``eval_size``, ``executor``, ``resumed_from`` (the checkpoint a
    fit resumed from), ``paper_protocol`` and ``protocol_note`` (when the paper used another
    protocol). Records with ``dev_run`` or random weights are never shown as results.
``weights``
    Every pretrained file the job read: ``key``, ``what``, ``path``, ``sha256``.
``artifacts``
    Files the job left beside its record (saved anomaly maps and the like), as relative paths
    with what they hold.
``environment``
    Versions of Python, torch and the harness, platform, device name, git revision.
``started``, ``finished``
    ISO timestamps (UTC).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator, Mapping

from harness.errors import HarnessError
from harness.engine.support.fsutil import atomic_write

SCHEMA_VERSION = 2


class DamagedRecordError(HarnessError):
    """A record file is truncated, not JSON, or not a record; the message names it."""


@dataclass
class Record:
    """One job's outcome (see the module docstring for every field)."""

    job: dict[str, Any]
    status: str = "running"
    error: dict[str, Any] | None = None
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    mean: dict[str, Any] = field(default_factory=dict)
    efficiency: dict[str, Any] = field(default_factory=dict)
    method_info: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    run: dict[str, Any] = field(default_factory=dict)
    weights: list[dict[str, Any]] = field(default_factory=list)
    artifacts: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    started: str | None = None
    finished: str | None = None
    schema: int = SCHEMA_VERSION

    @property
    def ok(self) -> bool:
        """The job finished without error."""
        return self.status == "ok"

    @property
    def is_result(self) -> bool:
        """A finished job whose numbers may be shown: not a dev run, not random weights."""
        return self.ok and not self.run.get("dev_run") and self.run.get("weights", "pretrained") != "random"

    def to_dict(self) -> dict[str, Any]:
        """The record as strict-JSON-ready data."""
        return _clean(asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Record":
        """Build a record from JSON data of any schema version (version 1 is migrated)."""
        if not isinstance(data, Mapping) or not isinstance(data.get("job"), Mapping) or "status" not in data:
            raise DamagedRecordError("not a job record (no 'job' or 'status')")
        version = int(data.get("schema", 1) or 1)
        if version > SCHEMA_VERSION:
            raise DamagedRecordError(f"written by a newer harness (schema {version}, this one reads up to "
                                     f"{SCHEMA_VERSION}); upgrade the harness")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["schema"] = SCHEMA_VERSION
        for name in ("metrics", "mean", "efficiency", "method_info", "settings", "run", "artifacts", "environment"):
            if values.get(name) is None:
                values[name] = {}
        values["weights"] = list(values.get("weights") or [])
        return cls(**values)


def _clean(value: Any) -> Any:
    """Make ``value`` strict-JSON: NaN/inf become null, NumPy scalars become Python numbers."""
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            value = value.item()
        except (ValueError, TypeError):
            return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def write_record(path: Path, record: Record | Mapping[str, Any]) -> None:
    """Write ``record`` as JSON to ``path`` atomically (temporary file, fsync, rename, fsync folder).

    A crash, a kill or a full disk during the write leaves either the old file or the new one,
    never a truncated one; the file gets the permissions the user's umask gives (group-readable
    under the usual 022 or 002).

    Raises
    ------
    harness.engine.support.fsutil.StorageError
        Naming the folder when the disk is full or the folder cannot be written.
    """
    data = record.to_dict() if isinstance(record, Record) else _clean(dict(record))
    text = json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n"
    atomic_write(Path(path), text)


def load_record(path: Path) -> Record:
    """Read one record.

    Raises
    ------
    DamagedRecordError
        When the file cannot be read or parsed, or is not a record; the message names it.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DamagedRecordError(f"record {path} cannot be read: {exc}") from exc
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise DamagedRecordError(f"record {path} is not valid JSON ({exc}); it is probably truncated") from exc
    try:
        return Record.from_dict(data)
    except DamagedRecordError as exc:
        raise DamagedRecordError(f"record {path}: {exc}") from None
    except TypeError as exc:
        raise DamagedRecordError(f"record {path} has unexpected fields: {exc}") from exc


def read_record(path: Path) -> dict[str, Any] | None:
    """One record as a dict (migrated to the current schema); ``None`` if it is damaged."""
    try:
        return load_record(path).to_dict()
    except DamagedRecordError:
        return None


@dataclass
class RecordScan:
    """Every record file under a results folder.

    Attributes
    ----------
    records : list of (Path, Record)
        The readable ones, in path order.
    damaged : list of (Path, str)
        The unreadable ones with the reason.
    """

    records: list[tuple[Path, Record]] = field(default_factory=list)
    damaged: list[tuple[Path, str]] = field(default_factory=list)

    def warnings(self) -> list[str]:
        """One line per damaged file, naming it and saying what to do."""
        return [f"warning: {reason}. It is left out; rerun the job (harness run moves the file aside as "
                f"{path.name}.corrupt and redoes it)" for path, reason in self.damaged]


def records_root(results_dir: Path) -> Path:
    """``<results_dir>/records``."""
    return Path(results_dir) / "records"


def scan_records(results_dir: Path) -> RecordScan:
    """Read every ``*.json`` under ``results_dir/records``, keeping track of the damaged ones."""
    scan = RecordScan()
    root = records_root(results_dir)
    if not root.is_dir():
        return scan
    for path in sorted(root.rglob("*.json")):
        try:
            scan.records.append((path, load_record(path)))
        except DamagedRecordError as exc:
            scan.damaged.append((path, str(exc)))
    return scan


def iter_records(results_dir: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Yield ``(path, record dict)`` for every readable record under ``results_dir/records``."""
    for path, record in scan_records(results_dir).records:
        yield path, record.to_dict()
