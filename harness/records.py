"""Job records: one JSON file per finished job, written atomically.

Layout under the results directory::

    <results>/records/<dataset>/<protocol>[-<k>shot]/<method>/<profile>-seed<seed>[-<hash>].json

A record is a JSON object with these keys:

``schema``
    Record format version (int).
``job``
    The job's key: ``method``, ``dataset``, ``protocol``, ``shots`` (null unless few-shot),
    ``seed``, ``profile``, ``overrides`` (settings given on the command line).
``status``
    ``"ok"`` or ``"failed"``.
``error``
    For failed jobs: ``phase`` (``build``, ``fit``, ``predict``, ``evaluate``), ``type``,
    ``message``, ``traceback``. Null otherwise.
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
    What the method reported through ``FitContext.info`` (chosen hyperparameters and the like).
``settings``
    The resolved settings the method ran with.
``environment``
    Versions of Python, torch and the harness, platform, device name, git revision.
``started``, ``finished``
    ISO timestamps (UTC).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

SCHEMA_VERSION = 1


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


def write_record(path: Path, record: Mapping[str, Any]) -> None:
    """Write ``record`` as JSON to ``path`` atomically (temporary file, fsync, rename).

    A crash or Ctrl-C during the write leaves either the old file or the new one, never a
    truncated one, so a rerun can trust any record it finds.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(_clean(record), handle, indent=2, sort_keys=False, allow_nan=False)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_record(path: Path) -> dict[str, Any] | None:
    """Read one record; ``None`` if the file is not a readable record (it is then ignored)."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or "job" not in data or "status" not in data:
        return None
    return data


def iter_records(results_dir: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Yield ``(path, record)`` for every readable record under ``results_dir/records``."""
    root = Path(results_dir) / "records"
    if not root.is_dir():
        return
    for path in sorted(root.rglob("*.json")):
        record = read_record(path)
        if record is not None:
            yield path, record
