"""One paper's comparison table as published, with our numbers beside it (``leaderboard --paper``).

The published numbers come from ``results/reported/<paper>.csv``; how each table is laid out
(which dimension runs along its rows, its columns and inside one cell) comes from
``results/reported/layouts.json``, worked out from the papers. No table is described in code.

Decisions
---------
- Published cells are the CSV text as written ("100", "97.0"), never re-rounded, so the table
  reads exactly as the paper printed it; a cell the paper left empty reads ``-``.
- Ours: every variant (method, profile, overrides) with successful records for the table's
  dataset, protocol and shots, averaged over seeds as the leaderboard does (its tidy table), in
  percent with one decimal, the papers' precision. A method the paper compares gets, right after
  its published column (or row), ``<method> ours (<profile>)`` and ``Δ <method> (<profile>)`` =
  ours minus published, computed on the unrounded mean and shown with a sign. Our methods the
  paper does not compare come after the published ones, ours only.
- Rows or columns with no number at all are dropped (the product of two dimensions can name
  combinations the paper never printed, e.g. AnomalySD's many-shot rows).
- Dev-run and random-weight records never appear (the tidy table leaves them out).
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd

from harness.errors import UsageError
from harness.results.leaderboard import _normalise_format, _Style
from harness.results.tables import STANDARD_COLUMNS, Columns, tidy_table
from harness.results.reported import load_reported, method_label
from harness.specs import MetricSpec

LAYOUTS_FILE = "layouts.json"
DIMENSIONS = ("method", "dataset", "shots", "category", "metric")
_MISSING = "-"


@dataclass(frozen=True)
class TableLayout:
    """How one published table is laid out.

    Attributes
    ----------
    paper, table, caption : str
        ``table`` as the CSV names it (``"Table 1"``, ``"arXiv Table 5"``).
    rows, columns, cell : tuple of str
        Dimensions (from :data:`DIMENSIONS`) along the rows, along the columns and joined with
        ``/`` inside one cell; ``method`` is always in ``rows`` or ``columns``.
    order : dict
        Explicit value order per dimension (otherwise the CSV's order of first appearance).
    """

    paper: str
    table: str
    caption: str
    rows: tuple[str, ...]
    columns: tuple[str, ...]
    cell: tuple[str, ...]
    order: dict[str, list[Any]] = field(default_factory=dict)


def load_layouts(reported_dir: Path | str | None) -> dict[str, dict[str, Any]]:
    """The papers and their table layouts from ``<reported_dir>/layouts.json``.

    Parameters
    ----------
    reported_dir : path or None
        The folder of the reported CSV files.

    Returns
    -------
    dict
        Paper name -> ``{"title": str, "tables": [TableLayout, ...]}`` in file order.

    Raises
    ------
    UsageError
        The folder or the file is missing, or a layout names an unknown dimension.
    """
    path = Path(reported_dir) / LAYOUTS_FILE if reported_dir is not None else None
    if path is None or not path.is_file():
        raise UsageError(f"no table layouts at {path or LAYOUTS_FILE}: --paper needs results/reported/{LAYOUTS_FILE} "
                         "(give --reported-dir)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path}: not valid JSON ({exc}); fix the file") from exc
    papers: dict[str, dict[str, Any]] = {}
    for paper, entry in raw.items():
        if paper.startswith("_"):
            continue  # comments such as "_about"
        tables = []
        for item in entry.get("tables", []):
            layout = TableLayout(paper=paper, table=item["table"], caption=item.get("caption", ""),
                                 rows=tuple(item["rows"]), columns=tuple(item["columns"]),
                                 cell=tuple(item.get("cell", ())), order=dict(item.get("order", {})))
            unknown = [d for d in layout.rows + layout.columns + layout.cell if d not in DIMENSIONS]
            if unknown or "method" not in layout.rows + layout.columns:
                raise UsageError(f"{path}: {paper} {layout.table}: dimensions must come from {', '.join(DIMENSIONS)} "
                                 f"and 'method' must be in rows or columns (got unknown {unknown})")
            tables.append(layout)
        papers[paper] = {"title": entry.get("title", paper), "tables": tables}
    return papers


def find_paper(papers: dict[str, dict[str, Any]], name: str) -> str:
    """The paper's name as the layouts spell it (matched case-insensitively); UsageError listing choices."""
    for paper in papers:
        if paper.lower() == name.strip().lower():
            return paper
    raise UsageError(f"unknown paper {name!r} for --paper; choose from {', '.join(papers)}")


def find_table(papers: dict[str, dict[str, Any]], paper: str, table: str) -> TableLayout:
    """The layout of ``table`` (``"1"``, ``"Table 1"``, ``"arXiv Table 5"``, case-insensitive).

    Raises
    ------
    UsageError
        No such table, or a bare number that several tables end with; the message lists choices.
    """
    tables: list[TableLayout] = papers[paper]["tables"]
    wanted = " ".join(str(table).split()).lower()
    exact = [t for t in tables if t.table.lower() == wanted]
    if exact:
        return exact[0]
    numbered = [t for t in tables if t.table.lower().split()[-1] == wanted]
    if len(numbered) == 1:
        return numbered[0]
    choices = ", ".join(repr(t.table) for t in tables)
    why = "is ambiguous" if numbered else "does not exist"
    raise UsageError(f"--table {table!r} {why} for {paper}; choose from {choices} (a number alone works when unique)")


# -- building the grid ----------------------------------------------------------------------------

@dataclass(frozen=True)
class _Entry:
    """One position along the method dimension: a published method, our variant, or their difference."""

    kind: str  # "paper", "ours" or "diff"
    method: str
    variant: tuple[str, str, str] | None = None  # (method, profile, overrides) for ours and diff

    def label(self, paper: str) -> str:
        if self.kind == "paper":
            return method_label(self.method)
        assert self.variant is not None
        inside = self.variant[1] + (f"; {self.variant[2]}" if self.variant[2] else "")
        if self.kind == "ours":
            return f"{method_label(self.method)} ours ({inside})"
        return f"Δ {method_label(self.method)} ({inside})"


def _published(paper: str, layout: TableLayout, reported: pd.DataFrame) -> pd.DataFrame:
    rows = reported[(reported["paper"] == paper) & (reported["table"] == layout.table)]
    if rows.empty:
        raise UsageError(f"{paper} {layout.table} has a layout but no numbers in the reported CSV files")
    return rows


def _shots_key(value: Any) -> int | None:
    return None if value is None or pd.isna(value) else int(value)


def _values(layout: TableLayout, published: pd.DataFrame, dim: str) -> list[Any]:
    """A dimension's values in the paper's order."""
    if dim in layout.order:
        return list(layout.order[dim])
    column = published[dim]
    if dim == "shots":
        return list(dict.fromkeys(_shots_key(v) for v in column))
    return list(dict.fromkeys(column))


def _ours(layout: TableLayout, published: pd.DataFrame, results_dir: Path | str | None,
          metrics: Sequence[MetricSpec] | None) -> pd.DataFrame:
    """Our aggregated means for the table's dataset(s), protocol, shots, categories and metrics."""
    if results_dir is None or not (Path(results_dir) / "records").is_dir():
        return pd.DataFrame(columns=["dataset", "protocol", "shots", "method", "profile", "overrides", "category",
                                     "metric", "mean"])
    groups = {(str(d), str(p)) for d, p in zip(published["dataset"], published["protocol"])}
    tidy = tidy_table(results_dir, groups=groups, metrics=metrics)
    if tidy.empty:
        return tidy
    shots = {_shots_key(v) for v in published["shots"]}
    keep = (tidy["category"].isin(set(published["category"])) & tidy["metric"].isin(set(published["metric"]))
            & pd.Series([_shots_key(v) in shots for v in tidy["shots"]], index=tidy.index))
    return tidy[keep.to_numpy()]


@dataclass
class PaperTable:
    """One table as strings: the header, the rows and the tidy cells behind them.

    Attributes
    ----------
    paper, table, caption, context : str
        ``context`` says the dataset(s), protocol and shots.
    header : list of str
    rows : list of list of str
    tidy : pandas.DataFrame
        One row per published or our number: ``paper, table, dataset, protocol, shots, category,
        metric, method, profile, overrides, published, ours, difference``.
    has_ours : bool
        Whether any of our numbers is in the table.
    """

    paper: str
    table: str
    caption: str
    context: str
    header: list[str]
    rows: list[list[str]]
    tidy: pd.DataFrame
    has_ours: bool


def _dim_label(dim: str, value: Any, columns: Columns) -> str:
    if dim == "metric":
        return columns.label(value)
    if dim == "shots":
        return "-" if value is None else f"{value}-shot"
    return str(value)


def build_paper_table(paper: str, layout: TableLayout, reported: pd.DataFrame, results_dir: Path | str | None,
                      metrics: Sequence[MetricSpec] | None = None) -> PaperTable:
    """The table's cells: published numbers as written, ours and the differences, in the paper's layout.

    Parameters
    ----------
    paper : str
        The paper, spelled as in the CSV.
    layout : TableLayout
    reported : pandas.DataFrame
        From :func:`harness.results.reported.load_reported` with ``keep_text=True``.
    results_dir : path or None
        Our results folder (``None``: published numbers only).
    metrics : sequence of MetricSpec, optional
        Registered metrics (labels and scaling).

    Returns
    -------
    PaperTable
    """
    columns = Columns(tuple(metrics)) if metrics else STANDARD_COLUMNS
    published = _published(paper, layout, reported)
    protocol = str(published["protocol"].iloc[0])
    fixed = {d: _values(layout, published, d) for d in DIMENSIONS
             if d not in layout.rows + layout.columns + layout.cell}
    loose = [d for d, vs in fixed.items() if len(vs) > 1]
    if loose:
        raise UsageError(f"{paper} {layout.table}: {', '.join(loose)} vary in the CSV but the layout places them "
                         f"nowhere; add them to rows, columns or cell in {LAYOUTS_FILE}")
    text = {(r.method, r.dataset, _shots_key(r.shots), r.category, r.metric): (r.text, float(r.value))
            for r in published.itertuples()}
    ours = _ours(layout, published, results_dir, metrics)
    mine = {((r.method, str(r.profile), str(r.overrides)), r.dataset, _shots_key(r.shots), r.category, r.metric):
            float(r.mean) for r in ours.itertuples()}
    variants = sorted({key[0] for key in mine})
    methods = _values(layout, published, "method")
    entries: list[_Entry] = []
    for method in methods:
        entries.append(_Entry("paper", method))
        for variant in (v for v in variants if v[0] == method):
            entries += [_Entry("ours", method, variant), _Entry("diff", method, variant)]
    entries += [_Entry("ours", v[0], v) for v in variants if v[0] not in methods]

    def axis(dims: Sequence[str]) -> list[dict[str, Any]]:
        lists = [entries if d == "method" else _values(layout, published, d) for d in dims]
        return [dict(zip(dims, combo)) for combo in itertools.product(*lists)]

    tidy_rows: list[dict[str, Any]] = []

    def number(coords: dict[str, Any]) -> str:
        entry: _Entry = coords["method"]
        key = (coords["dataset"], coords["shots"], coords["category"], coords["metric"])
        shown = text.get((entry.method, *key))
        if entry.kind == "paper":
            if shown is not None:
                tidy_rows.append({**_tidy_key(paper, layout, protocol, coords), "method": entry.method, "profile": "",
                                  "overrides": "", "published": shown[1], "ours": math.nan, "difference": math.nan})
            return shown[0] if shown is not None else _MISSING
        value = mine.get((entry.variant, *key))
        if value is None:
            return _MISSING
        if entry.kind == "ours":
            diff = value - shown[1] if shown is not None else math.nan
            tidy_rows.append({**_tidy_key(paper, layout, protocol, coords), "method": entry.method,
                              "profile": entry.variant[1], "overrides": entry.variant[2],
                              "published": shown[1] if shown is not None else math.nan, "ours": round(value, 4),
                              "difference": round(diff, 4)})
            return f"{value:.1f}"
        return _MISSING if shown is None else f"{value - shown[1]:+.1f}"

    base = {d: vs[0] for d, vs in fixed.items()}
    cell_axis = axis(layout.cell) or [{}]
    body: list[list[str]] = []
    row_axis, col_axis = axis(layout.rows), axis(layout.columns)
    grid = [["/".join(number({**base, **r, **c, **k}) for k in cell_axis) for c in col_axis] for r in row_axis]
    empty = "/".join([_MISSING] * len(cell_axis))
    keep_cols = [j for j in range(len(col_axis)) if any(grid[i][j] != empty for i in range(len(row_axis)))]
    for i, r in enumerate(row_axis):
        cells = [grid[i][j] for j in keep_cols]
        if all(c == empty for c in cells):
            continue
        labels = [r[d].label(paper) if d == "method" else _dim_label(d, r[d], columns) for d in layout.rows]
        body.append(labels + cells)
    header = list(layout.rows)
    header += [" ".join(col_axis[j][d].label(paper) if d == "method" else _dim_label(d, col_axis[j][d], columns)
                        for d in layout.columns) for j in keep_cols]
    if layout.cell:
        header[0] += " (cells: " + "/".join(_dim_label(d, k[d], columns) for k in cell_axis for d in layout.cell) + ")"
    context = ", ".join(f"{d} {_dim_label(d, v[0], columns)}" for d, v in fixed.items() if d != "method"
                        and v and v[0] not in (None, "mean")) or ""
    context = f"{protocol}" + (f"; {context}" if context else "")
    tidy = pd.DataFrame(tidy_rows, columns=["paper", "table", "dataset", "protocol", "shots", "category", "metric",
                                            "method", "profile", "overrides", "published", "ours", "difference"])
    return PaperTable(paper, layout.table, layout.caption, context, header, body, tidy, bool(mine))


def _tidy_key(paper: str, layout: TableLayout, protocol: str, coords: dict[str, Any]) -> dict[str, Any]:
    return {"paper": paper, "table": layout.table, "dataset": coords["dataset"], "protocol": protocol,
            "shots": coords["shots"], "category": coords["category"], "metric": coords["metric"]}


# -- rendering --------------------------------------------------------------------------------------

def render_paper_table(table: PaperTable, fmt: str = "markdown") -> str:
    """The table as text in one of the leaderboard's formats (``csv``: the tidy cells)."""
    fmt = _normalise_format(fmt)
    if fmt == "csv":
        return table.tidy.to_csv(index=False, lineterminator="\n")
    style = _Style(fmt)
    ours = ("Our columns: mean over seeds; Δ = ours − published." if table.has_ours
            else "No records of ours for this table's dataset, protocol and metrics yet.")
    parts = [style.heading(f"{table.paper} {table.table}: {table.caption}"),
             style.note(f"{table.context}. Published numbers exactly as printed. {ours}"),
             style.table(table.header, table.rows, numeric=True)]
    return "\n\n".join(parts) + "\n"


def list_tables(papers: dict[str, dict[str, Any]], paper: str, reported: pd.DataFrame, fmt: str = "markdown") -> str:
    """The paper's tables: name, caption, dataset(s), protocol, methods (what ``--table`` accepts)."""
    fmt = _normalise_format(fmt)
    rows = []
    for layout in papers[paper]["tables"]:
        published = reported[(reported["paper"] == paper) & (reported["table"] == layout.table)]
        rows.append([layout.table, layout.caption, ", ".join(dict.fromkeys(published["dataset"])),
                     ", ".join(dict.fromkeys(published["protocol"])), str(published["method"].nunique()),
                     str(len(published))])
    header = ["table", "caption", "dataset", "protocol", "methods", "numbers"]
    if fmt == "csv":
        return pd.DataFrame(rows, columns=header).to_csv(index=False, lineterminator="\n")
    style = _Style(fmt)
    return "\n\n".join([style.heading(papers[paper]["title"]),
                        style.note(f"Show one with: harness leaderboard --paper {paper} --table N"),
                        style.table(header, rows, numeric=False)]) + "\n"


def paper_section(name: str, table: str | None, results_dir: Path | str | None, reported_dir: Path | str | None,
                  fmt: str = "markdown", metrics: Sequence[MetricSpec] | None = None) -> str:
    """What ``harness leaderboard --paper NAME [--table N]`` prints.

    Parameters
    ----------
    name : str
        Paper name, case-insensitive (``DiAD``, ``DiffusionAD``, ``LafitE``, ``AnomalySD``).
    table : str or None
        The table (``"1"``, ``"Table 1"``, ``"arXiv Table 5"``); ``None`` lists the paper's tables.
    results_dir, reported_dir : path or None
    fmt : str
        ``markdown``, ``latex``, ``html`` or ``csv``.
    metrics : sequence of MetricSpec, optional

    Returns
    -------
    str

    Raises
    ------
    UsageError
        Unknown paper or table (the message lists the choices), or missing layouts.
    """
    papers = load_layouts(reported_dir)
    paper = find_paper(papers, name)
    reported = load_reported(reported_dir, keep_text=True)
    if table is None:
        return list_tables(papers, paper, reported, fmt)
    layout = find_table(papers, paper, table)
    return render_paper_table(build_paper_table(paper, layout, reported, results_dir, metrics), fmt)


def tables_with_ours(results_dir: Path | str, reported_dir: Path | str | None,
                     metrics: Sequence[MetricSpec] | None = None,
                     warn: Callable[[str], None] | None = None) -> list[PaperTable]:
    """Every paper table in which some record of ours has a number (for the HTML report).

    A missing or broken layouts file gives an empty list (and a line to ``warn``): the report of
    our own results never depends on the papers' tables.
    """
    try:
        papers = load_layouts(reported_dir)
    except UsageError as exc:
        if warn is not None and reported_dir is not None:
            warn(str(exc))
        return []
    reported = load_reported(reported_dir, keep_text=True)
    out = []
    for paper, entry in papers.items():
        for layout in entry["tables"]:
            try:
                built = build_paper_table(paper, layout, reported, results_dir, metrics)
            except UsageError as exc:
                if warn is not None:
                    warn(str(exc))
                continue
            if built.has_ours:
                out.append(built)
    return out


__all__ = ["DIMENSIONS", "LAYOUTS_FILE", "PaperTable", "TableLayout", "build_paper_table", "find_paper", "find_table",
           "list_tables", "load_layouts", "paper_section", "render_paper_table", "tables_with_ours"]
