"""``harness report --out DIR``: a static HTML report from the records and their saved maps.

The report is ``DIR/index.html`` plus PNG files under ``DIR/figures`` and ``DIR/gallery``,
referenced by relative paths: no server, no script, no network; it opens from disk and can be
copied or zipped as a folder. For every (dataset, protocol) it shows

1. the leaderboard tables (:func:`harness.results.leaderboard.build_leaderboard`, HTML), with the
   papers' reported numbers beside ours;
2. for every shots group, accuracy against FPS (one point per method: the mean over seeds of
   the records' category means and FPS);
3. per category, the pixel ROC, pixel precision-recall, PRO and image ROC curves of every
   method, from the exact curve vertices saved with the records (thinned for plotting; the
   legend values are exact);
4. the overlay gallery: for each test image of the fixed sample (the same images for every
   method, see :mod:`harness.results.report.maps`) the image with its ground-truth outline, then each
   method's map as a heat overlay with its image score; then each method's worst false
   positive and worst false negative;
5. for few-shot, each metric against the number of shots, mean ± sample std over seeds;

and, at the end, every failed job with its phase and error.

Which records
-------------
Only records that are results (:attr:`harness.results.records.Record.is_result`): a fast dev run or a
random-weight run never appears, not even among the failures. Damaged record files are listed
as warnings at the top of the page (and given to ``warn``); the rest still renders. When a
method has several seeds, the tables and the FPS figure average them; curves and overlays show
the record of the lowest seed (named in each caption).
"""

from __future__ import annotations

import datetime as _dt
import html
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from harness.engine.support.fsutil import atomic_write, ensure_dir
from harness.engine.jobs import Job
from harness.results.record_parts import ErrorInfo
from harness.results.records import Record, scan_records
from harness.results.report import figures
from harness.results.report.maps import SAMPLE, WORST_FN, WORST_FP, SavedMapsError, read_curves, read_sample
from harness.results.report.overlay import draw_outline, overlay, save_png, upscale
from harness.specs import MetricSpec

#: Side (pixels) small maps are enlarged to in the gallery (nearest neighbour).
GALLERY_SIDE = 160
#: Metrics of the accuracy-vs-FPS and few-shot figures, when the records have them.
SUMMARY_METRICS = ("mad", "image_auroc", "pixel_aupro", "dice")
#: Protocols in the order their sections appear (others after, by name).
_PROTOCOL_ORDER = ("multiclass", "oneclass", "fewshot")


@dataclass
class ReportResult:
    """What :func:`build_report` wrote.

    Attributes
    ----------
    index : Path
        ``DIR/index.html``.
    files : list of Path
        Every image the page references.
    shown, hidden, failed : int
        Records shown, records left out (dev runs, random weights), failed jobs listed.
    warnings : list of str
        Damaged records and unreadable saved maps.
    """

    index: Path
    files: list[Path] = field(default_factory=list)
    shown: int = 0
    hidden: int = 0
    failed: int = 0
    warnings: list[str] = field(default_factory=list)


@dataclass
class _Entry:
    path: Path
    record: Record

    @property
    def job(self) -> Job:
        """The record's job key."""
        return self.record.job

    @property
    def group(self) -> tuple[str, str, int | None]:
        """(dataset, protocol, shots)."""
        return self.job.dataset, self.job.protocol, self.job.shots

    @property
    def variant(self) -> str:
        """``method (profile[; overrides])``: one row, one point, one colour."""
        inside = self.job.profile
        if self.job.overrides:
            inside += "; " + ", ".join(f"{k}={v}" for k, v in sorted(self.job.overrides))
        return f"{self.job.method} ({inside})"

    @property
    def seed(self) -> int:
        """The job's seed."""
        return self.job.seed


def _slug(text: Any) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text)).strip("_") or "x"


def _esc(text: Any) -> str:
    return html.escape(str(text))


def _finite(value: Any) -> bool:
    try:
        return value is not None and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _is_hidden(record: Record) -> bool:
    return not record.run.shows_result or record.job.dev_run or record.job.weights == "random"


def _group_title(group: tuple[str, str, int | None]) -> str:
    dataset, protocol, shots = group
    return f"{dataset} — {protocol}" + ("" if shots is None else f", {shots}-shot")


class _Page:
    """Collects the page's HTML and the image files it references."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.parts: list[str] = []
        self.files: list[Path] = []
        self.toc: list[tuple[str, str]] = []

    def add(self, fragment: str) -> None:
        """Append an HTML fragment."""
        self.parts.append(fragment)

    def image(self, path: Path, alt: str, css: str = "") -> str:
        """An ``<img>`` of a file under the report folder, by relative path (and remember the file)."""
        self.files.append(path)
        rel = path.relative_to(self.out).as_posix()
        cls = f' class="{css}"' if css else ""
        return f'<img src="{_esc(rel)}" alt="{_esc(alt)}"{cls}>'


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1500px}
h1{font-size:1.6em}h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:2em}
.leaderboard h2{font-size:1.1em;border:none;margin-top:1em}.leaderboard h3{font-size:1em}
table{border-collapse:collapse;margin:6px 0 14px}td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}
th{background:#f3f3f3}.warn{background:#fff4e0;border:1px solid #f0b060;padding:8px 12px;margin:10px 0}
.note{color:#555;font-size:13px}figure{margin:8px 0 18px}figcaption{font-size:12px;color:#555}
.gallery td{text-align:center;vertical-align:top;font-size:11px}.gallery img{display:block;margin:auto}
.fig{max-width:100%}pre{white-space:pre-wrap;font-size:11px;background:#f7f7f7;padding:6px}
nav ul{columns:3;font-size:13px}
"""


def build_report(results_dir: Path | str, out: Path | str, reported_dir: Path | str | None = None,
                 metrics: Sequence[MetricSpec] | None = None, warn: Callable[[str], None] | None = None,
                 title: str = "Anomaly detection benchmark report") -> ReportResult:
    """Write the report of everything under ``results_dir`` into the folder ``out``.

    Parameters
    ----------
    results_dir : path
        The results folder whose ``records`` (and saved maps) are read.
    out : path
        Output folder (created; its ``figures`` and ``gallery`` folders are replaced).
    reported_dir : path, optional
        The papers' reported numbers (CSV); ``None`` leaves them out of the tables.
    metrics : sequence of MetricSpec, optional
        The registered metrics (columns, labels); default: the built-in ones.
    warn : callable, optional
        Receives one line per damaged record or unreadable saved-maps file.
    title : str

    Returns
    -------
    ReportResult
    """
    from harness.metrics.builtin import harness_metrics

    results_dir, out = Path(results_dir), Path(out)
    specs = list(metrics) if metrics else list(harness_metrics())
    ensure_dir(out, "report folder")
    for sub in ("figures", "gallery"):
        shutil.rmtree(out / sub, ignore_errors=True)
    scan = scan_records(results_dir)
    result = ReportResult(index=out / "index.html")
    result.warnings += scan.warnings()
    entries = [_Entry(p, r) for p, r in scan.records]
    shown = [e for e in entries if e.record.is_result]
    failed = [e for e in entries if not e.record.ok and not _is_hidden(e.record)]
    result.shown, result.failed = len(shown), len(failed)
    result.hidden = sum(1 for e in entries if e.record.ok and not e.record.is_result)
    palette = figures.colours([e.variant for e in shown])
    page = _Page(out)
    groups: dict[tuple[str, str, int | None], list[_Entry]] = {}
    order = {p: i for i, p in enumerate(_PROTOCOL_ORDER)}
    for entry in sorted(shown, key=lambda e: (e.group[0], order.get(e.group[1], len(order)), e.group[1],
                                              e.group[2] or 0, e.variant, e.seed)):
        groups.setdefault(entry.group, []).append(entry)
    pairs = list(dict.fromkeys((d, p) for d, p, _ in groups))
    for dataset, protocol in pairs:
        anchor = _slug(f"{dataset}-{protocol}")
        page.toc.append((anchor, f"{dataset} — {protocol}"))
        page.add(f'<h2 id="{anchor}">{_esc(dataset)} — {_esc(protocol)}</h2>')
        dataset_specs = [m for m in specs if m.applies_to(dataset)]
        _tables(page, results_dir, reported_dir, dataset, protocol, dataset_specs)
        keys = [g for g in groups if g[:2] == (dataset, protocol)]
        if protocol == "fewshot":
            _fewshot(page, {g: groups[g] for g in keys}, dataset, dataset_specs, palette)
        for key in keys:
            _group(page, key, groups[key], dataset_specs, palette, result.warnings)
    _paper_tables(page, results_dir, reported_dir, specs, result.warnings)
    _failures(page, failed)
    for line in result.warnings:
        if warn is not None:
            warn(line)
    atomic_write(result.index, _document(title, results_dir, page, result))
    result.files = list(dict.fromkeys(page.files))
    return result


def _labels(specs: Sequence[MetricSpec]) -> dict[str, str]:
    labels = {m.name: m.title for m in specs}
    labels["mad"] = "mAD"
    return labels


def _tables(page: _Page, results_dir: Path, reported_dir: Any, dataset: str, protocol: str,
            specs: Sequence[MetricSpec]) -> None:
    from harness.results.leaderboard import build_leaderboard

    fragment = build_leaderboard(results_dir, reported_dir=reported_dir, fmt="html", per_category=True,
                                 groups={(dataset, protocol)}, metrics=specs, warn=lambda _line: None)
    page.add(f'<details open><summary>Tables</summary><div class="leaderboard">{fragment}</div></details>')


def _paper_tables(page: _Page, results_dir: Path, reported_dir: Any, specs: Sequence[MetricSpec],
                  warnings: list[str]) -> None:
    """Each paper's table in which we have numbers, as ``harness leaderboard --paper`` prints it."""
    from harness.results.paper_tables import render_paper_table, tables_with_ours

    if reported_dir is None:
        return
    tables = tables_with_ours(results_dir, reported_dir, specs, warn=warnings.append)
    if not tables:
        return
    page.toc.append(("paper-tables", "The papers' tables beside ours"))
    page.add('<h2 id="paper-tables">The papers\' tables beside ours</h2><p class="note">Published numbers as '
             "transcribed in results/reported; our columns are means over seeds, &Delta; = ours &minus; published.</p>")
    for table in tables:
        page.add(f'<div class="leaderboard">{render_paper_table(table, "html")}</div>')


def _means_by_variant(entries: Sequence[_Entry]) -> dict[str, list[_Entry]]:
    out: dict[str, list[_Entry]] = {}
    for entry in entries:
        out.setdefault(entry.variant, []).append(entry)
    return out


def _mean(values: Iterable[Any]) -> float:
    finite = [float(v) for v in values if _finite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _summary_metrics(specs: Sequence[MetricSpec], entries: Sequence[_Entry]) -> list[tuple[str, str]]:
    labels = _labels(specs)
    present = {k for e in entries for k, v in e.record.mean.items() if _finite(v)}
    return [(m, labels.get(m, m)) for m in SUMMARY_METRICS if m in present and (m == "mad" or m in labels)]


def _group(page: _Page, key: tuple[str, str, int | None], entries: Sequence[_Entry], specs: Sequence[MetricSpec],
           palette: Mapping[str, tuple], warnings: list[str]) -> None:
    title = _group_title(key)
    slug = _slug("-".join(str(k) for k in key if k is not None))
    page.add(f"<h3>Figures and maps: {_esc(title)}</h3>")
    by_variant = _means_by_variant(entries)
    metrics = _summary_metrics(specs, entries)
    if metrics:
        points = []
        for variant, runs in by_variant.items():
            values = {m: 100.0 * _mean(r.record.mean.get(m) for r in runs) for m, _ in metrics}
            points.append({"label": variant, "fps": _mean(r.record.efficiency.fps for r in runs),
                           "values": values})
        path = figures.accuracy_vs_fps(points, metrics, page.out / "figures" / f"fps-{slug}.png",
                                       f"Accuracy vs FPS — {title}", palette)
        batch = sorted({str(r.record.efficiency.eval_batch_size) for r in entries
                        if r.record.efficiency.eval_batch_size is not None})
        devices = sorted({str(r.record.efficiency.device) for r in entries if r.record.efficiency.device})
        page.add(f"<figure>{page.image(path, f'accuracy vs FPS, {title}', 'fig')}<figcaption>One point per method: "
                 f"mean over seeds of the category means and of the FPS of <code>predict</code> (batch size "
                 f"{_esc(', '.join(batch) or '?')}; device {_esc(', '.join(devices) or '?')}).</figcaption></figure>")
    first = {variant: min(runs, key=lambda r: r.seed) for variant, runs in by_variant.items()}
    curves: dict[str, dict[str, dict[str, Any]]] = {}
    samples: dict[str, list[Any]] = {}
    for variant, entry in first.items():
        try:
            curves[variant] = read_curves(entry.path, entry.record)
            samples[variant] = read_sample(entry.path, entry.record)
        except SavedMapsError as exc:
            warnings.append(f"warning: {exc}; its curves and overlays are left out of the report")
    categories = list(dict.fromkeys(c for e in entries for c in e.record.metrics))
    seeds = ", ".join(f"{v}: seed {e.seed}" for v, e in first.items())
    for category in categories:
        page.add(f"<h4>{_esc(category)}</h4>")
        per_method = {v: c[category] for v, c in curves.items() if c.get(category)}
        if per_method:
            path = figures.category_curves(per_method, page.out / "figures" / f"curves-{slug}-{_slug(category)}.png",
                                           f"{title} — {category}", palette)
            page.add(f"<figure>{page.image(path, f'curves of {category}', 'fig')}<figcaption>Exact curves (thinned "
                     f"for drawing; legend values exact) of {_esc(seeds)}.</figcaption></figure>")
        else:
            page.add('<p class="note">No saved curves for this category (run with --save-maps sample or all).</p>')
        _gallery(page, slug, category, {v: [m for m in s if m.category == category] for v, s in samples.items()})


def _range(maps: Sequence[Any]) -> tuple[float, float]:
    low = min(float(np.min(m.amap)) for m in maps)
    high = max(float(np.max(m.amap)) for m in maps)
    return low, high


def _overlay_cell(page: _Page, saved_map: Any, heat_range: Sequence[float], path: Path, alt: str, caption: str) -> str:
    """A table cell with ``saved_map``'s heat overlay (written to ``path``) above ``caption`` (HTML)."""
    image = overlay(saved_map.image, saved_map.amap, saved_map.mask, *heat_range)
    save_png(upscale(image, GALLERY_SIDE), path)
    return f"<td>{page.image(path, alt)}{caption}</td>"


def _gallery(page: _Page, slug: str, category: str, saved: Mapping[str, Sequence[Any]]) -> None:
    saved = {v: maps for v, maps in saved.items() if maps}
    if not saved:
        page.add('<p class="note">No saved maps for this category (run with --save-maps sample or all).</p>')
        return
    folder = page.out / "gallery" / slug / _slug(category)
    variants = list(saved)
    ranges = {v: _range(maps) for v, maps in saved.items()}
    keys: list[str] = []
    by_key: dict[str, dict[str, Any]] = {}
    for variant, maps in saved.items():
        for m in maps:
            if SAMPLE in m.roles and m.key not in keys:
                keys.append(m.key)
            by_key.setdefault(m.key, {})[variant] = m
    header = "".join(f"<th>{_esc(v)}</th>" for v in variants)
    rows = []
    for row, key in enumerate(sorted(keys, key=lambda k: (next(iter(by_key[k].values())).label, k))):
        any_map = next(iter(by_key[key].values()))
        truth = folder / f"{row:03d}-truth.png"
        save_png(upscale(draw_outline(any_map.image, any_map.mask), GALLERY_SIDE), truth)
        kind = "normal" if any_map.label == 0 else f"anomalous ({any_map.defect})"
        cells = [f"<td>{page.image(truth, key)}<br>{_esc(key)}<br>{_esc(kind)}</td>"]
        for index, variant in enumerate(variants):
            m = by_key[key].get(variant)
            if m is None:
                cells.append("<td>–</td>")
                continue
            cells.append(_overlay_cell(page, m, ranges[variant], folder / f"{row:03d}-m{index}.png",
                                       f"{variant} on {key}", f"score {m.score:.4g}"))
        rows.append("<tr>" + "".join(cells) + "</tr>")
    page.add('<table class="gallery"><tr><th>image, ground truth</th>' + header + "</tr>" + "".join(rows) + "</table>")
    worst_rows = []
    for index, variant in enumerate(variants):
        cells = [f"<td>{_esc(variant)}</td>"]
        for role, tag in ((WORST_FP, "fp"), (WORST_FN, "fn")):
            m = next((m for m in saved[variant] if role in m.roles), None)
            if m is None:
                cells.append("<td>–</td>")
                continue
            cells.append(_overlay_cell(page, m, ranges[variant], folder / f"worst-{tag}-m{index}.png",
                                       f"{variant}: {role} {m.key}", f"{_esc(m.key)}<br>score {m.score:.4g}"))
        worst_rows.append("<tr>" + "".join(cells) + "</tr>")
    page.add('<table class="gallery"><tr><th>method</th><th>worst false positive (highest-scoring normal image)</th>'
             '<th>worst false negative (lowest-scoring anomalous image)</th></tr>' + "".join(worst_rows) + "</table>")
    page.add('<p class="note">Heat: each method\'s maps of this category on one scale (its minimum to its maximum '
             'over the maps shown); green outline: the ground truth.</p>')


def _fewshot(page: _Page, groups: Mapping[tuple[str, str, int | None], Sequence[_Entry]], dataset: str,
             specs: Sequence[MetricSpec], palette: Mapping[str, tuple]) -> None:
    entries = [e for g in groups.values() for e in g]
    metrics = _summary_metrics(specs, entries)
    if not metrics:
        return
    series: dict[str, dict[str, dict[int, list[float]]]] = {}
    for entry in entries:
        shots = entry.group[2] or 0
        for metric, _ in metrics:
            value = entry.record.mean.get(metric)
            bucket = series.setdefault(entry.variant, {}).setdefault(metric, {}).setdefault(int(shots), [])
            bucket.append(100.0 * float(value) if _finite(value) else float("nan"))
    path = figures.metric_vs_shots(series, metrics, page.out / "figures" / f"shots-{_slug(dataset)}.png",
                                   f"{dataset} — few-shot", palette)
    counts = sorted({len(v) for by_metric in series.values() for per in by_metric.values() for v in per.values()})
    page.add(f"<figure>{page.image(path, f'metric vs shots, {dataset}', 'fig')}<figcaption>Mean over seeds "
             f"(seeds per point: {_esc(', '.join(map(str, counts)))}); error bars: sample standard deviation over "
             "seeds (none with one seed).</figcaption></figure>")


def _failures(page: _Page, failed: Sequence[_Entry]) -> None:
    page.toc.append(("failures", f"Failed jobs ({len(failed)})"))
    page.add('<h2 id="failures">Failed jobs</h2>')
    if not failed:
        page.add('<p class="note">None.</p>')
        return
    rows = []
    for entry in sorted(failed, key=lambda e: (e.group[0], e.group[1], e.variant, e.seed)):
        error = entry.record.error or ErrorInfo()
        message = str(error.message or "").strip()
        trace = str(error.traceback or "").strip()
        details = f"<details><summary>traceback</summary><pre>{_esc(trace)}</pre></details>" if trace else ""
        rows.append(f"<tr><td>{_esc(_group_title(entry.group))}</td><td>{_esc(entry.variant)}</td><td>{entry.seed}</td>"
                    f"<td>{_esc(error.phase or '?')}</td><td>{_esc(error.type or 'error')}: "
                    f"{_esc(message)}{details}</td></tr>")
    page.add("<table><tr><th>group</th><th>method</th><th>seed</th><th>phase</th><th>error</th></tr>"
             + "".join(rows) + "</table>")


def _document(title: str, results_dir: Path, page: _Page, result: ReportResult) -> str:
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    warnings = "".join(f"<div class=\"warn\">{_esc(w)}</div>" for w in result.warnings)
    toc = "".join(f'<li><a href="#{_esc(a)}">{_esc(t)}</a></li>' for a, t in page.toc)
    hidden = (f" {result.hidden} dev-run or random-weight record(s) are not shown: they test the code, they are not "
              "results." if result.hidden else "")
    empty = "" if result.shown else f'<p class="warn">No result records under {_esc(results_dir / "records")}.</p>'
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>\n"
            f"<h1>{_esc(title)}</h1><p class=\"note\">From {_esc(results_dir)}, {now}: {result.shown} record(s) shown, "
            f"{result.failed} failed job(s).{_esc(hidden)}</p>{warnings}{empty}<nav><ul>{toc}</ul></nav>\n"
            + "\n".join(page.parts) + "\n</body></html>\n")


__all__ = ["GALLERY_SIDE", "ReportResult", "build_report"]
