"""Records read into tables: one row per record, the values in long form, the mean and spread over seeds.

:func:`collect` reads every record under a results folder into one row each; :func:`aggregate`
turns the values of the successful ones into one row per (group, variant, category, metric) with
the mean, the sample standard deviation and the number of seeds; :func:`tidy_table` is that
table as the leaderboard's CSV writes it. The decisions behind the numbers (percent, sample std,
the last record of a job wins) are listed in :mod:`harness.results.leaderboard`.
"""


from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import pandas as pd

from harness.metrics.builtin import STANDARD_METRICS
from harness.results.record_parts import ErrorInfo
from harness.results.records import Record, scan_records
from harness.specs import MetricSpec

EFFICIENCY_METRICS: tuple[str, ...] = ("fps", "params", "latency_ms", "train_seconds", "predict_seconds",
                                       "flops_per_image", "peak_memory_mb", "eval_batch_size", "limit_share")


@dataclass(frozen=True)
class Columns:
    """The metric columns of every table, taken from the registered metric specs.

    Attributes
    ----------
    specs : tuple of MetricSpec
        In registration order (the built-in seven first); ``harness_metrics`` of a third party
        adds columns like the built-in ones.
    """

    specs: tuple[MetricSpec, ...] = tuple(STANDARD_METRICS)

    @property
    def names(self) -> tuple[str, ...]:
        """Per-category metric names, image and pixel levels first, in registration order."""
        return tuple(m.name for m in self._ordered)

    @property
    def _ordered(self) -> tuple[MetricSpec, ...]:
        order = {"image": 0, "pixel": 1}
        return tuple(sorted(self.specs, key=lambda m: order.get(m.level, 2)))

    @property
    def mad_metrics(self) -> tuple[str, ...]:
        """The metrics averaged into mAD."""
        return tuple(m.name for m in self.specs if m.in_mad)

    @property
    def accuracy(self) -> tuple[str, ...]:
        """Every per-category metric plus ``mad`` (when some metric is in mAD)."""
        return self.names + (("mad",) if self.mad_metrics else ())

    def level(self, level: str) -> tuple[str, ...]:
        """The metrics of one level."""
        return tuple(m.name for m in self._ordered if m.level == level)

    def label(self, name: str) -> str:
        """Column title."""
        if name == "mad":
            return "mAD"
        spec = self._by_name.get(name)
        return spec.title if spec is not None else name

    def scale(self, name: str) -> float:
        """Display factor (records hold fractions; tables show percent)."""
        spec = self._by_name.get(name)
        return 100.0 if spec is None else float(spec.scale)

    def higher_is_better(self, name: str) -> bool:
        """Direction of the metric (``mad`` and unknown names: higher)."""
        spec = self._by_name.get(name)
        return True if spec is None else bool(spec.higher_is_better)

    @property
    def _by_name(self) -> dict[str, MetricSpec]:
        return {m.name: m for m in self.specs}


STANDARD_COLUMNS = Columns()
#: The standard accuracy columns (kept for callers of the first API).
ACCURACY_METRICS: tuple[str, ...] = STANDARD_COLUMNS.accuracy
JOB_KEYS: tuple[str, ...] = ("dataset", "protocol", "shots", "method", "profile", "overrides", "seed")
VARIANT_KEYS: tuple[str, ...] = ("method", "profile", "overrides")
TIDY_COLUMNS: tuple[str, ...] = ("dataset", "protocol", "shots", "method", "profile", "overrides", "category",
                                 "metric", "mean", "std", "n_seeds")
_METRICS_PREFIX = "metrics/"
_EFFICIENCY_PREFIX = "efficiency/"


# -- reading records ----------------------------------------------------------------------------

def _overrides_text(overrides: Any) -> str:
    """A canonical, sorted ``key=value`` text for a job's overrides (``""`` when none)."""
    if not overrides:
        return ""
    if not isinstance(overrides, (dict, tuple)):
        return str(overrides)
    overrides = dict(overrides)
    parts = []
    for key in sorted(overrides):
        value = overrides[key]
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        parts.append(f"{key}={text}")
    return ", ".join(parts)


def _record_row(path: Path, record: Record) -> dict[str, Any]:
    """Flatten one record into a dict of scalars (see :func:`collect` for the columns)."""
    job, error = record.job, record.error or ErrorInfo()
    row: dict[str, Any] = {
        "path": str(path),
        "dataset": job.dataset,
        "protocol": job.protocol,
        "shots": job.shots,
        "method": job.method,
        "profile": job.profile,
        # A paper-grid record is its own variant: never averaged with the harness grid's.
        "overrides": ", ".join(filter(None, [_overrides_text(job.overrides),
                                             "eval_grid=paper" if job.eval_grid == "paper" else ""])),
        "seed": job.seed,
        "status": record.status,
        "result": record.run.shows_result and not job.dev_run and job.weights != "random",
        "error_phase": error.phase,
        "error_type": error.type,
        "error_message": error.message,
        "finished": record.finished,
    }
    for category, metric, value in _record_values(record):
        prefix = _EFFICIENCY_PREFIX if category is None else f"{_METRICS_PREFIX}{category}/"
        row[f"{prefix}{metric}"] = value
    return row


def _record_values(record: Record) -> Iterable[tuple[str | None, str, Any]]:
    """``(category, metric, value)`` for every value the record holds; category None for efficiency."""
    for category, values in record.metrics.items():
        for metric, value in (values or {}).items():
            yield str(category), str(metric), value
    # The record's own mean goes under the reserved category "mean", like the papers' rows.
    for metric, value in record.mean.items():
        yield "mean", str(metric), value
    # Only numbers: the device name and per-network dicts are not figures to average.
    for name, value in record.efficiency.figures():
        yield None, name, value


def _to_float(value: Any) -> float:
    """A float, NaN for null or anything that is not a number."""
    try:
        return math.nan if value is None else float(value)
    except (TypeError, ValueError):
        return math.nan


def _read(results_dir: Path | str, columns: Columns = STANDARD_COLUMNS,
          warn: Callable[[str], None] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The :func:`collect` frame and the long values of every record, sharing a ``record`` index.

    The long values are built from the records themselves, not by melting the wide frame, so a
    record only contributes the categories it has (a VisA record gets no NaN MVTec rows).
    Damaged record files are left out and reported through ``warn`` (one line each, naming the
    file); records of dev runs and random weights are kept in the frame (``result`` False) but
    never aggregated.
    """
    rows, values = [], []
    scan = scan_records(Path(results_dir))
    if warn is not None:
        for line in scan.warnings():
            warn(line)
    for index, (path, record) in enumerate(scan.records):
        rows.append(_record_row(path, record))
        for category, metric, value in _record_values(record):
            number = _to_float(value)
            # Records hold fractions; the papers and every table use percent (or the metric's scale).
            if category is not None and metric in columns.accuracy:
                number *= columns.scale(metric)
            values.append({"record": index, "category": "mean" if category is None else category,
                           "metric": metric, "value": number})
    base = ["path", *JOB_KEYS, "status", "result", "error_phase", "error_type", "error_message", "finished"]
    frame = pd.DataFrame(rows, columns=None if rows else base)
    if rows:
        value_columns = [c for c in frame.columns if c not in base]
        frame[value_columns] = frame[value_columns].apply(pd.to_numeric, errors="coerce").astype(float)
        frame = frame[base + value_columns]
        frame["overrides"] = frame["overrides"].fillna("")
    frame["shots"] = pd.to_numeric(frame["shots"], errors="coerce").astype("Int64")
    return frame, pd.DataFrame(values, columns=["record", "category", "metric", "value"])


def collect(results_dir: Path | str) -> pd.DataFrame:
    """One row per readable record under ``results_dir/records``, successful or failed.

    Parameters
    ----------
    results_dir : path
        The results folder (records are read from its ``records`` subfolder).

    Returns
    -------
    pandas.DataFrame
        Wide, one row per record, in path order. Columns: ``path``, the job keys ``dataset,
        protocol, shots`` (nullable ``Int64``), ``method, profile, overrides`` (canonical
        ``key=value, ...`` text, ``""`` when none), ``seed``; ``status``; ``error_phase,
        error_type, error_message`` (None for successful jobs); ``finished``; then one column
        per metric value named ``metrics/<category>/<metric>`` (fractions, NaN for null; the
        record's ``mean`` appears as category ``mean``, with ``mad``) and one per numeric
        efficiency figure named ``efficiency/<name>``. A record without some column (another
        dataset's category) has NaN there; :func:`tidy_table` gives the aggregated long form.
    """
    return _read(results_dir)[0]


def _deduplicate(frame: pd.DataFrame) -> pd.DataFrame:
    """Keep one record per job key: the one that finished last (see the module notes)."""
    if frame.empty:
        return frame
    order = frame.assign(_finished=frame["finished"].fillna("").astype(str)).sort_values("_finished", kind="stable")
    keep = ~order[list(JOB_KEYS)].astype(str).duplicated(keep="last")
    return frame.loc[order.index[keep.to_numpy()]].sort_index()


def _long_ok(frame: pd.DataFrame, values: pd.DataFrame) -> pd.DataFrame:
    """Long values of the successful, de-duplicated records of ``frame``, with their job keys.

    Columns ``dataset, protocol, shots, method, profile, overrides, seed, category, metric,
    value``; accuracy in percent, efficiency (category ``mean``) in its own units.
    """
    columns = [*JOB_KEYS, "category", "metric", "value"]
    if frame.empty:
        return pd.DataFrame(columns=columns)
    ok = _deduplicate(frame[(frame["status"] == "ok") & frame["result"].astype(bool)])
    keys = ok[list(JOB_KEYS)].rename_axis("record").reset_index()
    # An inner merge keeps the long rows' order (records in path order, values in record order).
    return values.merge(keys, on="record", how="inner", sort=False)[columns]


def aggregate(long: pd.DataFrame) -> pd.DataFrame:
    """Mean, sample std (``ddof=1``) and seed count per variant, category and metric.

    Parameters
    ----------
    long : pandas.DataFrame
        Long values with columns ``dataset, protocol, shots, method, profile, overrides, seed,
        category, metric, value`` (one row per record and value).

    Returns
    -------
    pandas.DataFrame
        Columns ``dataset, protocol, shots, method, profile, overrides, category, metric, mean,
        std, n_seeds`` in the order of first appearance. ``n_seeds`` is the number of successful
        records of the variant; NaN values are left out of mean and std.
    """
    keys = [k for k in JOB_KEYS if k != "seed"]
    if long.empty:
        return pd.DataFrame(columns=list(TIDY_COLUMNS))
    stats = (long.groupby([*keys, "category", "metric"], sort=False, dropna=False)["value"]
             .agg(mean="mean", std=lambda v: v.std(ddof=1)).reset_index())
    seeds = long.groupby(keys, sort=False, dropna=False)["seed"].nunique().rename("n_seeds").reset_index()
    merged = stats.merge(seeds, on=keys, how="left", sort=False)
    return merged[list(TIDY_COLUMNS)]


# -- the tidy CSV -------------------------------------------------------------------------------

def _metric_rank(metric: str, columns: Columns = STANDARD_COLUMNS) -> tuple[int, str]:
    """Sort key: accuracy metrics in table order, then efficiency, then anything else by name."""
    order = columns.accuracy + EFFICIENCY_METRICS
    return (order.index(metric), "") if metric in order else (len(order), metric)


def tidy_table(results_dir: Path | str, groups: set[tuple[str, str]] | None = None,
               metrics: Sequence[MetricSpec] | None = None, warn: Callable[[str], None] | None = None) -> pd.DataFrame:
    """Our aggregated results as one tidy, stably sorted table (what ``leaderboard.csv`` holds).

    Parameters
    ----------
    results_dir : path
        The results folder.
    groups : set of (dataset, protocol), optional
        Restrict to these; ``None`` keeps all.
    metrics : sequence of MetricSpec, optional
        The registered metrics (scaling and order); default the standard seven.
    warn : callable, optional
        Receives one line per damaged record file.

    Returns
    -------
    pandas.DataFrame
        Columns ``dataset, protocol, shots, method, profile, overrides, category, metric, mean,
        std, n_seeds``; accuracy rows in percent rounded to 4 decimals, efficiency rows
        (category ``mean``) in their own units. Sorted by dataset, protocol, shots, method,
        profile, overrides, category (``mean`` first, then by name) and metric (table order),
        so that two versions of the file diff line by line.
    """
    columns = Columns(tuple(metrics)) if metrics else STANDARD_COLUMNS
    frame, values = _read(results_dir, columns, warn)
    table = aggregate(_long_ok(_filter_groups(frame, groups), values))
    if table.empty:
        return table
    table = table.assign(
        _shots=table["shots"].astype("Float64").fillna(-1.0),
        _cat=[(0, "") if c == "mean" else (1, str(c)) for c in table["category"]],
        _metric=[_metric_rank(m, columns) for m in table["metric"]],
    )
    table = table.sort_values(["dataset", "protocol", "_shots", "method", "profile", "overrides", "_cat", "_metric"],
                              kind="stable").reset_index(drop=True)
    table[["mean", "std"]] = table[["mean", "std"]].astype(float).round(4)
    table["n_seeds"] = table["n_seeds"].astype(int)
    return table[list(TIDY_COLUMNS)]


def _tidy_csv(results_dir: Path | str, groups: set[tuple[str, str]] | None, metrics: Sequence[MetricSpec] | None,
              warn: Callable[[str], None] | None) -> str:
    """:func:`tidy_table` as CSV text (empty cells for NaN and for no shots)."""
    return tidy_table(results_dir, groups, metrics, warn).to_csv(index=False, lineterminator="\n")


def _filter_groups(frame: pd.DataFrame, groups: set[tuple[str, str]] | None) -> pd.DataFrame:
    """Rows whose (dataset, protocol) is in ``groups`` (all when ``groups`` is None)."""
    if groups is None or frame.empty:
        return frame
    wanted = {(str(d), str(p)) for d, p in groups}
    keep = [(d, p) in wanted for d, p in zip(frame["dataset"].astype(str), frame["protocol"].astype(str))]
    return frame[keep]
