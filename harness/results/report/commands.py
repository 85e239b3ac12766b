"""The ``harness report`` and ``harness export-maps`` commands (their parsers are in :mod:`harness.cli`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from harness.errors import UsageError


def _warn(line: str) -> None:
    print(line if line.startswith("warning:") else f"warning: {line}", file=sys.stderr)


def cmd_report(args: argparse.Namespace) -> int:
    """``harness report --out DIR``: the HTML report of the records under ``--results-dir``."""
    from harness.engine.registry import load_registry
    from harness.results.report.html import build_report
    from harness.results.reported import default_reported_dir

    results = Path(args.results_dir)
    if results.exists() and not results.is_dir():
        raise UsageError(f"--results-dir {results} is a file, not a folder of records")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder for the report")
    reported = None if args.no_reported else (Path(args.reported_dir) if args.reported_dir else default_reported_dir())
    result = build_report(results, out, reported_dir=reported, metrics=load_registry().metric_specs(), warn=_warn)
    hidden = f", {result.hidden} dev-run/random-weight record(s) left out" if result.hidden else ""
    print(f"report: {result.index} ({result.shown} record(s), {result.failed} failed job(s){hidden}, "
          f"{len(result.files)} image(s))")
    return 0


def _datasets(values: list[str] | None) -> list[str]:
    return [name.strip() for value in values or [] for name in value.split(",") if name.strip()]


def cmd_export_maps(args: argparse.Namespace) -> int:
    """``harness export-maps``: a record's saved maps as TIFFs in the official MVTec evaluation layout."""
    from harness.results.report.export import export_maps

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder for the maps")
    exported = export_maps(Path(args.results_dir), args.method, out, datasets=_datasets(args.dataset),
                           protocol=args.protocol, profile=args.profile, seed=args.seed,
                           ground_truth=args.ground_truth, warn=_warn)
    for item in exported:
        total = sum(item.counts.values())
        print(f"{item.record_path}: {total} map(s) in {len(item.counts)} categor{'y' if len(item.counts) == 1 else 'ies'}"
              f" -> {item.folder} (evaluation size {item.eval_size})")
        if item.counts:
            print(f"  score them: {item.evaluate_command()}")
        if item.unscored:
            print(f"  {sum(item.unscored.values())} map(s) of test images without public ground truth "
                  f"(never scored here) -> {item.folder}/anomaly_images[_thresholded], for the dataset's evaluation server")
    return 0


__all__ = ["cmd_export_maps", "cmd_report"]
