"""Comparing results: where they were computed, and two leaderboard CSV files cell by cell.

The regression test uses both: :func:`numerics_environments` says whether the committed tables and
a fresh run come from the same numerics environment (then every cell must agree to
``tolerance``), :func:`compare_accuracy` lists the cells that differ.
"""


from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from harness.results.records import scan_records
from harness.results.tables import ACCURACY_METRICS, TIDY_COLUMNS

def _numerics_key(env: Mapping[str, Any]) -> str:
    """The :data:`harness.engine.support.environment.NUMERICS_KEYS` entries of ``env`` as canonical JSON."""
    from harness.engine.support.environment import NUMERICS_KEYS

    return json.dumps({k: env.get(k) for k in NUMERICS_KEYS}, sort_keys=True)


def numerics_environments(results_dir: Path | str) -> list[dict[str, Any]]:
    """Where the tabled numbers were computed: each distinct numerics environment of the records.

    Only successful result records count (not dev runs, not random weights), as in the tables.
    An environment is the record's :data:`harness.engine.support.environment.NUMERICS_KEYS` entries (missing
    ones, in records older than a key, are None); two runs can only agree bit for bit when
    their environments are equal.

    Returns
    -------
    list of dict
        Sorted; each has the keys and ``records``, the number of records computed there.
    """
    counts: dict[str, int] = {}
    for _path, record in scan_records(Path(results_dir)).records:
        if not record.is_result:
            continue
        key = _numerics_key(record.environment)
        counts[key] = counts.get(key, 0) + 1
    return [{**json.loads(key), "records": n} for key, n in sorted(counts.items())]


def same_numerics(a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]]) -> bool:
    """Whether two :func:`numerics_environments` lists name the same single environment."""
    first, second = {_numerics_key(e) for e in a}, {_numerics_key(e) for e in b}
    return len(first) == 1 and first == second


# -- comparing two CSV files --------------------------------------------------------------------

def _read_tidy(path: Path | str) -> pd.DataFrame:
    """A leaderboard CSV with text keys and numeric means, accuracy rows only."""
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    frame = frame[frame["metric"].isin(ACCURACY_METRICS)].copy()
    frame["mean"] = pd.to_numeric(frame["mean"].replace("", None), errors="coerce").astype(float)
    return frame


def _row_key(row: pd.Series, keys: Sequence[str]) -> str:
    """``mvtec/multiclass/-/patchcore (tiny)/bottle/image_auroc``: readable and unique."""
    parts = [row[k] if row[k] != "" else "-" for k in keys]
    return "/".join(str(p) for p in parts)


def compare_accuracy(fresh_csv: Path | str, committed_csv: Path | str, tolerance: float = 0.5,
                     categories: Sequence[str] | None = None) -> list[str]:
    """Differences in accuracy between two ``leaderboard.csv`` files.

    Parameters
    ----------
    fresh_csv, committed_csv : path
        The newly written file and the reference one.
    tolerance : float
        Allowed absolute difference in percentage points; larger differences are reported.
    categories : sequence of str, optional
        Compare only these categories (``("mean",)``: the means over categories); all by default.

    Returns
    -------
    list of str
        One line per accuracy row (the seven metrics and ``mad``; efficiency rows are ignored)
        whose means differ by more than ``tolerance``, that is defined in one file and NaN in the
        other, or that exists in only one file. Empty when the files agree.
    """
    fresh, committed = _read_tidy(fresh_csv), _read_tidy(committed_csv)
    if categories is not None:
        fresh = fresh[fresh["category"].isin(list(categories))]
        committed = committed[committed["category"].isin(list(categories))]
    keys = [k for k in TIDY_COLUMNS[:8] if k in fresh.columns and k in committed.columns]
    fresh_values = {_row_key(r, keys): r["mean"] for _, r in fresh.iterrows()}
    committed_values = {_row_key(r, keys): r["mean"] for _, r in committed.iterrows()}
    problems: list[str] = []
    for key in sorted(fresh_values.keys() | committed_values.keys()):
        if key not in committed_values:
            problems.append(f"{key}: only in the fresh file (fresh {fresh_values[key]:.2f})")
        elif key not in fresh_values:
            problems.append(f"{key}: missing from the fresh file (committed {committed_values[key]:.2f})")
        else:
            old, new = committed_values[key], fresh_values[key]
            if math.isnan(old) and math.isnan(new):
                continue
            # A small epsilon keeps a difference of exactly the tolerance from failing on float noise.
            if math.isnan(old) or math.isnan(new) or abs(new - old) > tolerance + 1e-9:
                problems.append(f"{key}: committed {old:.2f}, fresh {new:.2f} ({new - old:+.2f} points)")
    return problems
