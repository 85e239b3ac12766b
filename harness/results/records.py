"""Job records: one JSON file per finished job, typed, versioned, written atomically.

Layout under the results directory::

    <results>/records/<dataset>/<protocol>[-<k>shot]/<method>/<profile>-seed<seed>[-<hash>].json

A record (:class:`Record`) has these fields; ``job``, ``run``, ``efficiency``, ``environment``,
``error`` and ``weights`` are typed (:mod:`harness.results.record_parts`):

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
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator, Mapping

from harness.errors import HarnessError
from harness.engine.jobs import Job
from harness.engine.support.fsutil import atomic_write
from harness.results.record_parts import Efficiency, Environment, ErrorInfo, RunInfo, WeightUse

SCHEMA_VERSION = 2


class DamagedRecordError(HarnessError):
    """A record file is truncated, not JSON, or not a record; the message names it."""


@dataclass
class Record:
    """One job's outcome (see the module docstring for every field).

    The nested parts are typed: :attr:`job` is the job's key (:class:`~harness.engine.jobs.Job`),
    :attr:`run`, :attr:`efficiency`, :attr:`environment`, :attr:`error` and :attr:`weights` are the
    dataclasses of :mod:`harness.results.record_parts`. Plain dicts given to the constructor are
    converted. Reading a record by key (``record["status"]``) gives its JSON form, as the dict
    records of harness 0.3 did; it is deprecated in favour of the attributes.
    """

    job: Job
    status: str = "running"
    error: ErrorInfo | None = None
    metrics: dict[str, dict[str, float | None]] = field(default_factory=dict)
    mean: dict[str, float | None] = field(default_factory=dict)
    efficiency: Efficiency = field(default_factory=Efficiency)
    method_info: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    run: RunInfo = field(default_factory=RunInfo)
    weights: list[WeightUse] = field(default_factory=list)
    artifacts: dict[str, Any] = field(default_factory=dict)
    environment: Environment = field(default_factory=Environment)
    started: str | None = None
    finished: str | None = None
    schema: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.job, Job):
            self.job = _job_key(self.job)
        if self.error is not None and not isinstance(self.error, ErrorInfo):
            self.error = ErrorInfo.from_dict(self.error)
        self.efficiency = Efficiency.from_dict(self.efficiency)
        self.run = RunInfo.from_dict(self.run)
        self.environment = Environment.from_dict(self.environment)
        self.weights = [WeightUse.from_dict(w) for w in self.weights]
        for name in ("metrics", "mean", "method_info", "settings", "artifacts"):
            if getattr(self, name) is None:
                setattr(self, name, {})

    @property
    def ok(self) -> bool:
        """The job finished without error."""
        return self.status == "ok"

    @property
    def is_result(self) -> bool:
        """A finished job whose numbers may be shown: not a dev run, not random weights."""
        return (self.ok and self.run.shows_result and not self.job.dev_run and self.job.weights != "random")

    def to_dict(self) -> dict[str, Any]:
        """The record as strict-JSON-ready data."""
        return _clean({
            "job": self.job.as_dict(), "status": self.status,
            "error": None if self.error is None else self.error.to_dict(),
            "metrics": self.metrics, "mean": self.mean, "efficiency": self.efficiency.to_dict(),
            "method_info": self.method_info, "settings": self.settings, "run": self.run.to_dict(),
            "weights": [w.to_dict() for w in self.weights], "artifacts": self.artifacts,
            "environment": self.environment.to_dict(), "started": self.started, "finished": self.finished,
            "schema": self.schema,
        })

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Record":
        """Build a record from JSON data of any schema version (version 1 is migrated)."""
        if isinstance(data, Record):
            return data
        if not isinstance(data, Mapping) or not isinstance(data.get("job"), Mapping) or "status" not in data:
            raise DamagedRecordError("not a job record (no 'job' or 'status')")
        version = int(data.get("schema", 1) or 1)
        if version > SCHEMA_VERSION:
            raise DamagedRecordError(f"written by a newer harness (schema {version}, this one reads up to "
                                     f"{SCHEMA_VERSION}); upgrade the harness")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["schema"] = SCHEMA_VERSION
        values["weights"] = list(values.get("weights") or [])
        return cls(**values)

    # -- the JSON form by key, for hooks written against the dict records of harness 0.3 -------------
    def __getitem__(self, key: str) -> Any:
        warnings.warn(f"reading a record by key (record[{key!r}]) is deprecated: read the typed attribute "
                      f"record.{key} (or record.to_dict()[{key!r}] for the JSON form)", DeprecationWarning,
                      stacklevel=2)
        return self.to_dict()[key]

    def get(self, key: str, default: Any = None) -> Any:
        """The JSON form's ``key`` (deprecated, as ``record[key]``)."""
        try:
            return self[key]
        except KeyError:
            return default

    def keys(self) -> Any:
        """The JSON form's keys (so that ``dict(record)`` gives the JSON form)."""
        return self.to_dict().keys()


def _job_key(data: Any) -> Job:
    """The :class:`Job` of a record's ``job`` block."""
    if not isinstance(data, Mapping):
        raise DamagedRecordError("not a job record ('job' is not an object)")
    try:
        return Job.from_dict(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise DamagedRecordError(f"its 'job' lacks or garbles {exc}") from None


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
