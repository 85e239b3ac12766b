"""Leaderboard tables, computed from job records only (plus the papers' reported numbers).

A *group* is one ``(dataset, protocol, shots)``; ``shots`` is ``None`` unless the protocol is
few-shot. Within a group, a *variant* is one ``(method, profile, overrides)``: its records (one
per seed) are aggregated into one row.

Decisions
---------
- Everything is shown in percent with one decimal; records hold fractions, the papers' CSV files
  hold percent, so our values are multiplied by 100 as soon as they are read.
- A cell of ours is the mean over seeds of the records' values; with more than one seed it reads
  ``mean ± std`` where ``std`` is the *sample* standard deviation (``ddof=1``), since the seeds
  are a sample of the run-to-run spread. A seed whose value is NaN is left out of both; ``n
  seeds`` counts every successful record of the variant. FPS and parameters show the mean only.
- The summary uses each record's ``mean`` (the unweighted mean over categories, and ``mad``),
  never a recomputation, so the table shows what the run computed.
- "Best" is decided on the value as displayed (rounded to one decimal), so ties in the table are
  all bold; higher is better for every accuracy metric and for FPS; parameters are never bold.
  A column is only bolded when at least two of our rows have a value in it: a lone row is not
  "best" of anything.
- In the per-category tables a cell reads ``AUROC/AP/F1max`` (``AUROC/AP/F1max/AUPRO`` for pixels)
  and the best cell of a row is the one with the highest first number (AUROC), the metric every
  paper reports; the other numbers break no ties. Those cells show means without std to stay
  readable; the CSV has every std.
- Reported rows are the papers' numbers for the same dataset, protocol and shots. They are
  merged per ``(paper, method)`` over the paper's tables while the tables report disjoint
  (category, metric) cells (DiAD prints image metrics, pixel metrics and AUPRO in three
  tables); a table that repeats a cell starts a new row, so no printed number is dropped. They
  are labelled ``method (reported, paper tables)``, never bold, never compared, and their mAD is
  the mean of the seven printed means when all seven are printed.
- Records whose job keys coincide (same variant and seed) are counted once: the one that
  finished last wins, so a re-run replaces rather than double-counts.
- The CSV (:func:`tidy_table`) is ours only: the papers' numbers already live in their own
  CSV files. It has one extra key column beyond the obvious ones, ``overrides``, because two
  runs that differ only in command-line settings must not be averaged together. Efficiency
  figures are rows with category ``mean`` and metric ``fps``, ``params``, ``latency_ms``... in
  their own units (not percent).
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import pandas as pd
from tabulate import tabulate

from harness.engine.support.fsutil import atomic_write
from harness.results.reported import load_reported, select_reported
from harness.specs import MetricSpec
# Reading and comparing live in their own modules; their names stay importable from here.
from harness.results.comparison import compare_accuracy, numerics_environments, same_numerics  # noqa: F401
from harness.results.tables import (ACCURACY_METRICS, EFFICIENCY_METRICS, JOB_KEYS, STANDARD_COLUMNS,  # noqa: F401
                                    TIDY_COLUMNS, VARIANT_KEYS, Columns, _filter_groups, _long_ok, _read, _tidy_csv,
                                    aggregate, collect, tidy_table)

FORMAT_FILES = {"markdown": "leaderboard.md", "csv": "leaderboard.csv", "latex": "leaderboard.tex",
                "html": "leaderboard.html"}
#: Written beside the tables: where their numbers were computed (:func:`numerics_environments`).
ENVIRONMENTS_FILE = "environments.json"
_FORMAT_ALIASES = {"md": "markdown", "tex": "latex", "htm": "html"}
_MAX_ERROR_CHARS = 200

# -- output styles ------------------------------------------------------------------------------

class _Style:
    """How one output format spells bold, missing values, headings and text."""

    def __init__(self, fmt: str) -> None:
        self.fmt = fmt
        self.tablefmt = {"markdown": "pipe", "latex": "latex_raw", "html": "unsafehtml"}[fmt]
        self.dash = "--" if fmt == "latex" else "–"
        self.pm = r" $\pm$ " if fmt == "latex" else " ± "

    def text(self, value: Any) -> str:
        """Escape free text (method names, error messages) for the format."""
        text = str(value)
        if self.fmt == "latex":
            # Backslashes first, through a placeholder, so the braces of their escape survive.
            text = text.replace("\\", "\0")
            for char in "&%$#_{}":
                text = text.replace(char, "\\" + char)
            for char, escaped in (("~", r"\textasciitilde{}"), ("^", r"\textasciicircum{}"), ("|", r"\textbar{}"),
                                  ("<", r"\textless{}"), (">", r"\textgreater{}"), ("—", "---"), ("–", "--"),
                                  ("±", r"$\pm$"), ("…", r"\ldots{}")):
                text = text.replace(char, escaped)
            return text.replace("\0", r"\textbackslash{}")
        if self.fmt == "html":
            return html.escape(text)
        # A "|" would split a pipe-table cell; line breaks would end the row.
        return text.replace("|", "\\|").replace("\n", " ")

    def bold(self, cell: str) -> str:
        """Mark an already formatted cell as best."""
        if self.fmt == "latex":
            return rf"\textbf{{{cell}}}"
        if self.fmt == "html":
            return f"<b>{cell}</b>"
        return f"**{cell}**"

    def heading(self, text: str, level: int = 2) -> str:
        """A section heading (level 2 for groups, 3 inside a group)."""
        if self.fmt == "latex":
            command = "subsection" if level <= 2 else "subsubsection"
            return rf"\{command}*{{{self.text(text)}}}"
        if self.fmt == "html":
            return f"<h{level}>{self.text(text)}</h{level}>"
        return f"{'#' * level} {text}"

    def note(self, text: str) -> str:
        """A short explanatory line under a heading."""
        if self.fmt == "html":
            return f"<p><i>{self.text(text)}</i></p>"
        if self.fmt == "latex":
            return rf"\textit{{{self.text(text)}}}"
        return f"_{text}_"

    def table(self, header: Sequence[str], rows: Sequence[Sequence[str]], numeric: bool = True) -> str:
        """Render cells that are already strings (no number parsing, so "97.0" stays "97.0").

        ``numeric`` right-aligns every column but the first, for columns of numbers.
        """
        header = [self.text(h) for h in header]
        align = ("left",) + ("right" if numeric else "left",) * (len(header) - 1)
        return tabulate(rows, headers=header, tablefmt=self.tablefmt, disable_numparse=True, colalign=align)


def _number(value: Any, style: _Style) -> str:
    """One decimal, or the dash for NaN/None."""
    if value is None or pd.isna(value):
        return style.dash
    return f"{float(value):.1f}"


def _mean_std(mean: Any, std: Any, n_seeds: int, style: _Style) -> str:
    """``mean`` or ``mean ± std`` (only with more than one seed and a defined std)."""
    text = _number(mean, style)
    if n_seeds > 1 and text != style.dash and std is not None and not pd.isna(std):
        text += f"{style.pm}{float(std):.1f}"
    return text


def _best_mask(values: Sequence[Any], higher_is_better: bool = True) -> list[bool]:
    """Which entries equal the displayed best; all False when fewer than two are defined."""
    shown = [None if v is None or pd.isna(v) else round(float(v), 1) for v in values]
    defined = [v for v in shown if v is not None]
    if len(defined) < 2:
        return [False] * len(shown)
    top = max(defined) if higher_is_better else min(defined)
    return [v is not None and v == top for v in shown]


# -- groups -------------------------------------------------------------------------------------

def _shots_value(shots: Any) -> int | None:
    """``None`` for NA shots, else the int."""
    return None if shots is None or pd.isna(shots) else int(shots)


def _group_keys(frame: pd.DataFrame) -> list[tuple[str, str, int | None]]:
    """The distinct (dataset, protocol, shots) of the records, sorted (no shots first)."""
    keys = {(str(d), str(p), _shots_value(s)) for d, p, s in zip(frame["dataset"], frame["protocol"], frame["shots"])}
    return sorted(keys, key=lambda k: (k[0], k[1], -1 if k[2] is None else k[2]))


def _in_group(frame: pd.DataFrame, dataset: str, protocol: str, shots: int | None) -> pd.DataFrame:
    """The rows of one group."""
    mask = (frame["dataset"].astype(str) == dataset) & (frame["protocol"].astype(str) == protocol)
    shots_col = frame["shots"].astype("Float64")
    mask &= shots_col.isna() if shots is None else shots_col.eq(shots).fillna(False)
    return frame[mask.astype(bool).to_numpy()]


def _group_title(dataset: str, protocol: str, shots: int | None) -> str:
    """``mvtec — multiclass`` or ``mvtec — fewshot, 2-shot``."""
    title = f"{dataset} — {protocol}"
    return title if shots is None else f"{title}, {shots}-shot"


def _variant_label(method: str, profile: Any, overrides: str) -> str:
    """``patchcore (tiny)``, with the overrides when there are any."""
    inside = str(profile) if profile is not None and not pd.isna(profile) else "?"
    if overrides:
        inside += f"; {overrides}"
    return f"{method} ({inside})"


def _variants(agg: pd.DataFrame) -> list[tuple[str, str, str]]:
    """Sorted (method, profile, overrides) of a group's aggregate."""
    triples = {(str(m), str(p), str(o)) for m, p, o in zip(agg["method"], agg["profile"], agg["overrides"])}
    return sorted(triples)


def _variant_rows(agg: pd.DataFrame, variant: tuple[str, str, str]) -> pd.DataFrame:
    """One variant's aggregated rows."""
    method, profile, overrides = variant
    mask = ((agg["method"].astype(str) == method) & (agg["profile"].astype(str) == profile)
            & (agg["overrides"].astype(str) == overrides))
    return agg[mask.to_numpy()]


# -- reported numbers ---------------------------------------------------------------------------

def _reported_entries(reported: pd.DataFrame) -> list[tuple[str, dict[tuple[str, str], float]]]:
    """Merge a group's reported numbers into labelled rows (see the module notes).

    Returns
    -------
    list of (label, {(category, metric): percent})
        In file order of first appearance of each (paper, method).
    """
    entries: list[tuple[str, str, list[str], dict[tuple[str, str], float]]] = []
    for (paper, method), rows in reported.groupby(["paper", "method"], sort=False):
        merged: list[tuple[list[str], dict[tuple[str, str], float]]] = []
        for table, cells in rows.groupby("table", sort=False):
            values = {(str(c), str(m)): float(v) for c, m, v in zip(cells["category"], cells["metric"], cells["value"])}
            target = next((entry for entry in merged if not entry[1].keys() & values.keys()), None)
            if target is None:
                merged.append(([str(table)], values))
            else:
                target[0].append(str(table))
                target[1].update(values)
        for tables, values in merged:
            entries.append((str(method), str(paper), tables, values))
    return [(f"{method} (reported, {paper} {', '.join(tables)})", values) for method, paper, tables, values in entries]


def _reported_mad(values: dict[tuple[str, str], float], columns: Columns = STANDARD_COLUMNS) -> float | None:
    """mAD from the printed means of the mAD metrics, when all of them are printed."""
    means = [values.get(("mean", m)) for m in columns.mad_metrics]
    return None if any(v is None for v in means) else sum(means) / len(means)


# -- the group sections -------------------------------------------------------------------------

_SUMMARY_NOTE = ("Mean over seeds in percent (± sample std when n seeds > 1); best of our rows in bold; "
                 "'reported' rows are the papers' numbers, never bold.")


def _summary_table(agg: pd.DataFrame, reported: list[tuple[str, dict[tuple[str, str], float]]],
                   style: _Style, cols: Columns = STANDARD_COLUMNS) -> str:
    """The group's summary: our variants, then the reported rows."""
    columns = list(cols.accuracy) + ["fps"]
    header = ["Method", *[cols.label(m) for m in cols.accuracy], "FPS", "Params (M)", "n seeds"]
    summary = agg[agg["category"] == "mean"]
    # On a GPU of known peak the records hold the share of the device's limit (harness.engine.inference.flops);
    # CPU-only tables keep their columns.
    shares = summary[summary["metric"] == "limit_share"]["mean"]
    show_limit = bool(len(shares)) and bool(shares.notna().any())
    if show_limit:
        header.append("% of limit")
    variants = _variants(agg)
    means: dict[str, list[Any]] = {c: [] for c in columns}
    rows: list[list[str]] = []
    for variant in variants:
        part = _variant_rows(summary, variant).set_index("metric")
        n_seeds = int(_variant_rows(agg, variant)["n_seeds"].max())
        row = [style.text(_variant_label(*variant))]
        for column in columns:
            mean = part["mean"].get(column, math.nan)
            means[column].append(mean)
            std = part["std"].get(column, math.nan) if column != "fps" else math.nan
            row.append(_mean_std(mean, std, n_seeds, style))
        params = part["mean"].get("params", math.nan)
        row += [_number(params / 1e6 if not pd.isna(params) else params, style), str(n_seeds)]
        if show_limit:
            share = part["mean"].get("limit_share", math.nan)
            row.append(_number(share * 100 if not pd.isna(share) else share, style))
        rows.append(row)
    for index, column in enumerate(columns, start=1):
        for row, best in zip(rows, _best_mask(means[column], cols.higher_is_better(column))):
            if best:
                row[index] = style.bold(row[index])
    for label, values in reported:
        row = [style.text(label)] + [_number(values.get(("mean", m)), style) for m in cols.names]
        if cols.mad_metrics:
            row.append(_number(_reported_mad(values, cols), style))
        row += [style.dash, style.dash, style.dash] + ([style.dash] if show_limit else [])
        rows.append(row)
    return style.table(header, rows)


def _category_order(agg: pd.DataFrame, reported: list[tuple[str, dict[tuple[str, str], float]]]) -> list[str]:
    """Our categories in record order, then categories only the papers have, then ``mean``."""
    order: list[str] = []
    for category in list(agg["category"].astype(str)) + [c for _, values in reported for c, _ in values]:
        if category != "mean" and category not in order:
            order.append(category)
    return order + ["mean"]


def _cell(values: Sequence[Any], style: _Style) -> str:
    """``a/b/c`` with dashes for missing parts, a lone dash when all are missing."""
    parts = [_number(v, style) for v in values]
    return style.dash if all(p == style.dash for p in parts) else "/".join(parts)


def _category_table(agg: pd.DataFrame, reported: list[tuple[str, dict[tuple[str, str], float]]],
                    metrics: Sequence[str], style: _Style, higher_is_better: bool = True) -> str | None:
    """One per-category table for ``metrics``; None when nobody has any of them."""
    variants = _variants(agg)
    lookup = {(str(m), str(p), str(o), str(c), str(k)): v for m, p, o, c, k, v in
              zip(agg["method"], agg["profile"], agg["overrides"], agg["category"], agg["metric"], agg["mean"])}
    shown_reported = [(label, values) for label, values in reported if any(k in metrics for _, k in values)]
    if not variants and not shown_reported:
        return None
    header = ["Category", *[_variant_label(*v) for v in variants], *[label for label, _ in shown_reported]]
    rows = []
    for category in _category_order(agg, shown_reported):
        ours = [[lookup.get((*v, category, m), math.nan) for m in metrics] for v in variants]
        row = [style.text(category)] + [_cell(values, style) for values in ours]
        for index, best in enumerate(_best_mask([values[0] for values in ours], higher_is_better), start=1):
            if best:
                row[index] = style.bold(row[index])
        row += [_cell([values.get((category, m)) for m in metrics], style) for _, values in shown_reported]
        rows.append(row)
    return style.table(header, rows)


def _failures_table(failed: pd.DataFrame, style: _Style) -> str:
    """Method, profile, seed, phase and the first line of the error of each failed record."""
    rows = []
    for record in failed.sort_values(["method", "profile", "overrides", "seed"], kind="stable").itertuples():
        message = str(record.error_message or "").strip().splitlines()
        text = f"{record.error_type or 'error'}: {message[0] if message else ''}"
        if len(text) > _MAX_ERROR_CHARS:
            text = text[:_MAX_ERROR_CHARS - 1] + "…"
        label = record.method if not record.overrides else f"{record.method} ({record.overrides})"
        rows.append([style.text(label), style.text(record.profile), style.text(record.seed),
                     style.text(record.error_phase or "?"), style.text(text)])
    return style.table(["Method", "Profile", "Seed", "Phase", "Error"], rows, numeric=False)


def _group_section(frame: pd.DataFrame, agg: pd.DataFrame, reported: pd.DataFrame, key: tuple[str, str, int | None],
                   style: _Style, per_category: bool, cols: Columns = STANDARD_COLUMNS) -> str:
    """Heading, summary, per-category tables and failures of one group."""
    # A metric computed on some datasets only (DICE on the medical sets) is a column of their groups only.
    cols = Columns(tuple(m for m in cols.specs if m.applies_to(key[0])))
    group_agg = _in_group(agg, *key) if not agg.empty else agg
    entries = _reported_entries(select_reported(reported, *key)) if not reported.empty else []
    parts = [style.heading(_group_title(*key))]
    if group_agg.empty and not entries:
        # Only failed runs and nothing reported: an empty table would say less than a sentence.
        parts.append(style.note("No successful runs."))
    else:
        parts += [style.note(_SUMMARY_NOTE), _summary_table(group_agg, entries, style, cols)]
    if per_category and not (group_agg.empty and not entries):
        levels = [("image", cols.level("image")), ("pixel", cols.level("pixel"))]
        levels += [(level, cols.level(level)) for level in sorted({m.level for m in cols.specs} - {"image", "pixel"})]
        for title, metrics in levels:
            if not metrics:
                continue
            table = _category_table(group_agg, entries, metrics, style, cols.higher_is_better(metrics[0]))
            if table is not None:
                labels = "/".join(cols.label(m) for m in metrics)
                parts += [style.heading(f"Per category, {title}: {labels} (best {cols.label(metrics[0])} "
                                        "of our rows in bold)", 3), table]
    group_frame = _in_group(frame, *key)
    failed = group_frame[(group_frame["status"] != "ok") & group_frame["result"].astype(bool)]
    if not failed.empty:
        parts += [style.heading("Failures", 3), _failures_table(failed, style)]
    return "\n\n".join(parts)


def _normalise_format(fmt: str) -> str:
    """The canonical format name; ValueError for an unknown one."""
    name = _FORMAT_ALIASES.get(fmt.lower(), fmt.lower())
    if name not in FORMAT_FILES:
        raise ValueError(f"unknown leaderboard format {fmt!r}; choose from {', '.join(FORMAT_FILES)}")
    return name


def build_leaderboard(results_dir: Path | str, reported_dir: Path | str | None = None, fmt: str = "markdown",
                      per_category: bool = True, groups: set[tuple[str, str]] | None = None,
                      metrics: Sequence[MetricSpec] | None = None, warn: Callable[[str], None] | None = None) -> str:
    """The leaderboard as text, one section per (dataset, protocol, shots) group.

    Parameters
    ----------
    results_dir : path
        The results folder whose ``records`` are read.
    reported_dir : path, optional
        Folder of the papers' reported numbers (CSV); ``None`` leaves them out.
    fmt : {"markdown", "latex", "html", "csv"}
        Output format. ``csv`` gives the tidy table of :func:`tidy_table` instead of sections.
    per_category : bool
        Add the per-category image and pixel tables to each group.
    groups : set of (dataset, protocol), optional
        Only these groups; ``None`` shows all.
    metrics : sequence of MetricSpec, optional
        The registered metrics: columns, labels, direction, scaling and mAD membership come from
        them (default: the standard seven).
    warn : callable, optional
        Receives one line per damaged record file (the tables are still built).

    Returns
    -------
    str
        For each group in sorted order: a heading, the summary table (ours then reported), the
        per-category tables and the failed records.
    """
    fmt = _normalise_format(fmt)
    if fmt == "csv":
        return _tidy_csv(results_dir, groups, metrics, warn)
    cols = Columns(tuple(metrics)) if metrics else STANDARD_COLUMNS
    style = _Style(fmt)
    frame, values = _read(results_dir, cols, warn)
    frame = _filter_groups(frame, groups)
    hidden = int((~frame["result"].astype(bool)).sum()) if not frame.empty else 0
    frame = frame[frame["result"].astype(bool)] if not frame.empty else frame
    if frame.empty:
        extra = f" ({hidden} dev-run or random-weight record(s) are never shown)" if hidden else ""
        return style.note(f"No records under {Path(results_dir) / 'records'}{extra}.") + "\n"
    agg = aggregate(_long_ok(frame, values))
    reported = load_reported(reported_dir)
    sections = [_group_section(frame, agg, reported, key, style, per_category, cols) for key in _group_keys(frame)]
    if hidden:
        sections.append(style.note(f"{hidden} dev-run or random-weight record(s) are not shown: they test the code, "
                                   "they are not results."))
    return "\n\n".join(sections) + "\n"


def _html_document(body: str) -> str:
    """A minimal standalone page around the HTML fragments."""
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Leaderboard</title>\n"
            "<style>table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}</style>\n"
            f"</head><body>\n{body}</body></html>\n")


def write_leaderboard(results_dir: Path | str, out: Path | str, formats: Iterable[str] = ("markdown",),
                      reported_dir: Path | str | None = None, metrics: Sequence[MetricSpec] | None = None,
                      warn: Callable[[str], None] | None = None) -> list[Path]:
    """Write the leaderboard files into the folder ``out``.

    Parameters
    ----------
    results_dir : path
        The results folder whose ``records`` are read.
    out : path
        Folder to write into (created when missing).
    formats : iterable of str
        Any of ``markdown`` (``leaderboard.md``), ``csv`` (``leaderboard.csv``, the tidy table),
        ``latex`` (``leaderboard.tex``, fragments to ``\\input``) and ``html``
        (``leaderboard.html``, a standalone page). :data:`ENVIRONMENTS_FILE` is always written
        too: the numerics environments of the records (:func:`numerics_environments`).
    reported_dir : path, optional
        Folder of the papers' reported numbers; ``None`` leaves them out.

    Returns
    -------
    list of pathlib.Path
        The files written, in the order of ``formats``, then :data:`ENVIRONMENTS_FILE`.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for fmt in dict.fromkeys(_normalise_format(f) for f in formats):
        text = build_leaderboard(results_dir, reported_dir=reported_dir, fmt=fmt, metrics=metrics, warn=warn)
        if fmt == "html":
            text = _html_document(text)
        path = out / FORMAT_FILES[fmt]
        atomic_write(path, text)
        written.append(path)
    path = out / ENVIRONMENTS_FILE
    atomic_write(path, json.dumps(numerics_environments(results_dir), indent=1) + "\n")
    written.append(path)
    return written
