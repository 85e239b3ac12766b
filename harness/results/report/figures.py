"""The report's matplotlib figures, written as PNG files.

Figures are drawn on :class:`matplotlib.figure.Figure` with the Agg canvas directly, never
through ``pyplot``: no global backend is chosen and no window opens, so a report can be built
inside a notebook or on a headless machine alike. Every method keeps one colour across all
figures of a report (:func:`colours`).
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from harness.engine.support.fsutil import atomic_write

#: Pixels per inch of the PNG files.
DPI = 100
#: What each curve panel shows: (curve name, title, x label, y label, x range).
CURVE_PANELS = (
    ("pixel_roc", "Pixel ROC", "false positive rate", "true positive rate", (0.0, 1.0)),
    ("pixel_pr", "Pixel precision-recall", "recall", "precision", (0.0, 1.0)),
    ("pixel_pro", "PRO (to FPR 0.3)", "false positive rate", "per-region overlap", (0.0, 0.3)),
    ("image_roc", "Image ROC", "false positive rate", "true positive rate", (0.0, 1.0)),
)
#: Short labels of the curves' metrics in legends.
_METRIC_SHORT = {"pixel_auroc": "AUROC", "pixel_ap": "AP", "pixel_aupro": "AUPRO", "image_auroc": "AUROC",
                 "image_ap": "AP"}


def colours(labels: Sequence[str]) -> dict[str, tuple[float, float, float, float]]:
    """One colour per label (tab10, then tab20), assigned in sorted order."""
    import matplotlib

    names = sorted(dict.fromkeys(labels))
    cmap = matplotlib.colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: Path) -> Path:
    # Fixed margins instead of bbox_inches="tight": a tight box draws every figure twice.
    figure.subplots_adjust(left=0.08, right=0.98, bottom=0.15, top=0.83, wspace=0.32)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    atomic_write(Path(path), buffer.getvalue())
    return Path(path)


def accuracy_vs_fps(points: Sequence[Mapping], metrics: Sequence[tuple[str, str]], path: Path, title: str,
                    palette: Mapping[str, tuple] | None = None) -> Path:
    """One panel per metric: accuracy (percent) against FPS (log scale), one point per method.

    Parameters
    ----------
    points : sequence of mapping
        Each ``{"label": str, "fps": float, "values": {metric: percent}}``.
    metrics : sequence of (name, label)
    path : Path
    title : str
    palette : mapping, optional
        Colour per label.
    """
    palette = dict(palette or colours([p["label"] for p in points]))
    figure = _figure(4.2 * len(metrics), 3.6)
    axes = figure.subplots(1, len(metrics), squeeze=False)[0]
    for ax, (metric, label) in zip(axes, metrics):
        shown = [p for p in points if _finite(p.get("fps")) and p["fps"] > 0 and _finite(p["values"].get(metric))]
        for p in shown:
            ax.scatter([p["fps"]], [p["values"][metric]], s=46, color=palette.get(p["label"]), zorder=3,
                       edgecolors="black", linewidths=0.5)
            ax.annotate(p["label"], (p["fps"], p["values"][metric]), textcoords="offset points", xytext=(5, 4),
                        fontsize=7)
        fps = [p["fps"] for p in shown]
        if shown and max(fps) / min(fps) > 5:
            from matplotlib.ticker import NullFormatter

            ax.set_xscale("log")  # methods' speeds span orders of magnitude; a narrow range reads better linear
            ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels of a short log axis overlap
        ax.margins(x=0.2, y=0.12)  # room for the method labels beside the points
        if not shown:
            ax.text(0.5, 0.5, "no method with both values", ha="center", va="center", transform=ax.transAxes,
                    fontsize=8, color="grey")
        ax.set_xlabel("FPS (images/s" + (", log scale)" if ax.get_xscale() == "log" else ")"))
        ax.set_ylabel(f"{label} (%)")
        ax.set_title(label, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    figure.suptitle(title, fontsize=11)
    return _save(figure, path)


def category_curves(curves: Mapping[str, Mapping[str, object]], path: Path, title: str,
                    palette: Mapping[str, tuple] | None = None) -> Path:
    """Pixel ROC, pixel PR, PRO and image ROC of one category, one line per method.

    Parameters
    ----------
    curves : mapping
        ``{method label: {curve name: harness.metrics.curves.Curve}}`` (thinned curves; the legend
        shows each curve's exact metric value).
    """
    palette = dict(palette or colours(list(curves)))
    figure = _figure(3.3 * len(CURVE_PANELS), 3.3)
    axes = figure.subplots(1, len(CURVE_PANELS), squeeze=False)[0]
    for ax, (name, panel_title, xlabel, ylabel, xlim) in zip(axes, CURVE_PANELS):
        drawn = 0
        for label, by_name in curves.items():
            curve = by_name.get(name)
            if curve is None:
                continue
            short = _METRIC_SHORT.get(curve.metric, curve.metric)
            ax.plot(curve.x, curve.y, color=palette.get(label), linewidth=1.3,
                    label=f"{label} ({short} {100 * curve.value:.1f})")
            drawn += 1
        if name == "pixel_roc" or name == "image_roc":
            ax.plot([0, 1], [0, 1], color="grey", linewidth=0.6, linestyle=":")
        if not drawn:
            ax.text(0.5, 0.5, "undefined\n(one class missing)", ha="center", va="center", transform=ax.transAxes,
                    fontsize=8, color="grey")
        else:
            ax.legend(fontsize=6, loc="lower right" if name != "pixel_pr" else "lower left")
        ax.set_xlim(*xlim)
        ax.set_ylim(0.0, 1.02)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_title(panel_title, fontsize=9)
        ax.grid(True, alpha=0.3)
    figure.suptitle(title, fontsize=10)
    return _save(figure, path)


def metric_vs_shots(series: Mapping[str, Mapping[int, Sequence[float]]], metrics: Sequence[tuple[str, str]],
                    path: Path, title: str, palette: Mapping[str, tuple] | None = None) -> Path:
    """Few-shot: one panel per metric, mean over seeds against shots with ± sample-std error bars.

    Parameters
    ----------
    series : mapping
        ``{method label: {metric: {shots: [value per seed (percent)]}}}``.
    metrics : sequence of (name, label)
    """
    palette = dict(palette or colours(list(series)))
    figure = _figure(4.2 * len(metrics), 3.5)
    axes = figure.subplots(1, len(metrics), squeeze=False)[0]
    for ax, (metric, label) in zip(axes, metrics):
        for method, by_metric in series.items():
            per_shots = by_metric.get(metric, {})
            shots = sorted(k for k, values in per_shots.items() if any(_finite(v) for v in values))
            if not shots:
                continue
            means, errors = [], []
            for k in shots:
                values = [v for v in per_shots[k] if _finite(v)]
                means.append(float(np.mean(values)))
                errors.append(float(np.std(values, ddof=1)) if len(values) > 1 else 0.0)
            ax.errorbar(shots, means, yerr=errors, marker="o", capsize=3, color=palette.get(method), label=method,
                        linewidth=1.2, markersize=4)
        ax.set_xlabel("shots per category")
        ax.set_ylabel(f"{label} (%)")
        ax.set_title(label, fontsize=10)
        ax.grid(True, alpha=0.3)
        handles, _ = ax.get_legend_handles_labels()
        if handles:
            ax.legend(fontsize=7)
    figure.suptitle(title, fontsize=11)
    return _save(figure, path)


def _finite(value) -> bool:
    try:
        return value is not None and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


__all__ = ["CURVE_PANELS", "DPI", "accuracy_vs_fps", "category_curves", "colours", "metric_vs_shots"]
