"""The ``harness`` command line.

Exit status: 0 success; 1 some job failed (a summary says which); 2 bad usage, a broken dataset
or another error the message explains; 130 interrupted (finished records are kept).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

from harness.errors import HarnessError, UsageError

DEFAULT_DATASET = "synthetic"


def _split(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def _ints(value: str, option: str) -> list[int]:
    try:
        return [int(v) for v in _split(value)]
    except ValueError:
        raise UsageError(f"{option} takes comma-separated integers, e.g. {option} 0,1,2; got {value!r}") from None


def _parse_value(text: str) -> Any:
    """A --set value: JSON when it parses (numbers, booleans, lists), else the string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _parse_sets(items: Sequence[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        if "=" not in item:
            raise UsageError(f"--set {item!r}: expected KEY=VALUE, e.g. --set epochs=5")
        key, value = item.split("=", 1)
        out[key.strip()] = _parse_value(value.strip())
    return out


def _data_roots(items: Sequence[str], datasets: Sequence[str]) -> dict[str, Path]:
    roots: dict[str, Path] = {}
    for item in items:
        if "=" in item and not Path(item).exists():
            name, path = item.split("=", 1)
            roots[name] = Path(path)
        elif len(datasets) == 1:
            roots[datasets[0]] = Path(item)
        else:
            raise UsageError(f"--data-root {item}: with several datasets, give NAME=PATH for each, "
                             f"e.g. --data-root mvtec=/data/mvtec --data-root visa=/data/visa")
    return roots


def default_reported_dir() -> Path | None:
    """``results/reported`` of the current folder, else of the source checkout."""
    for candidate in (Path.cwd() / "results" / "reported", Path(__file__).resolve().parents[1] / "results" / "reported"):
        if candidate.is_dir():
            return candidate
    return None


# -- commands -------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    """``harness run``: expand jobs, run them, print the failures and the leaderboard."""
    from harness.jobs import expand_jobs
    from harness.registry import load_registry
    from harness.runner import RunOptions, Runner

    registry = load_registry()
    for problem in registry.problems:
        print(f"warning: {problem}", file=sys.stderr)
    datasets = _split(args.datasets) or [DEFAULT_DATASET]
    for name in datasets:
        registry.dataset(name)
    if args.methods.strip() == "all":
        methods = [n for n, p in registry.methods.items() if args.protocol in p.spec.protocols]
        skipped = [n for n, p in registry.methods.items() if args.protocol not in p.spec.protocols]
        for name in skipped:
            print(f"note: {name} does not support the {args.protocol} protocol; skipped", file=sys.stderr)
    else:
        methods = _split(args.methods)
        for name in methods:
            spec = registry.method(name)
            if args.protocol not in spec.protocols:
                raise UsageError(f"method {name!r} does not support --protocol {args.protocol} "
                                 f"(it supports {', '.join(spec.protocols)})")
    if not methods:
        raise UsageError("no method to run: none of the installed methods supports this protocol")
    shots = _ints(args.shots, "--shots") if args.protocol == "fewshot" else None
    if args.protocol == "fewshot" and not shots:
        raise UsageError("--protocol fewshot needs --shots, e.g. --shots 1,2,4")
    seeds = _ints(args.seeds, "--seeds")
    profiles = {d: _profile_for(args.profile, registry.dataset(d)) for d in datasets}
    overrides = _parse_sets(args.set)
    jobs = expand_jobs(methods, datasets, args.protocol, shots, seeds, profiles, overrides)

    eval_size = None if args.eval_size == "native" else int(args.eval_size)
    options = RunOptions(
        results_dir=Path(args.results_dir), cache_dir=Path(args.cache_dir), device=args.device, eval_size=eval_size,
        data_roots=_data_roots(args.data_root, datasets), force=args.force, fit_cache=not args.no_fit_cache,
        weights_dir=Path(args.weights_dir) if args.weights_dir else None, progress=False if args.no_progress else None,
    )
    runner = Runner(registry, options)
    print(f"running {len(jobs)} job(s) on {runner.device}; records in {options.results_dir / 'records'}", file=sys.stderr)
    summary = runner.run(jobs)
    for problem in registry.problems:
        if "reporter" in problem:
            print(f"warning: {problem}", file=sys.stderr)
    if not args.no_leaderboard:
        from harness.leaderboard import build_leaderboard

        groups = {(j.dataset, j.protocol) for j in jobs}
        text = build_leaderboard(options.results_dir, reported_dir=default_reported_dir(), fmt="markdown",
                                 per_category=args.per_category, groups=groups)
        print(text)
    print(summary.describe(), file=sys.stderr)
    if summary.interrupted:
        return 130
    return 1 if summary.failed else 0


def _profile_for(choice: str, dataset_spec: Any) -> str:
    # The generated dataset exists to run offline on a CPU: the tiny profile fits it; real
    # benchmarks default to the paper's settings.
    if choice != "auto":
        return choice
    return "paper" if dataset_spec.needs_root else "tiny"


def cmd_list(args: argparse.Namespace) -> int:
    """``harness list``: what is installed and where it comes from."""
    from tabulate import tabulate

    from harness.protocols import PROTOCOL_HELP
    from harness.registry import load_registry

    registry = load_registry()
    rows = []
    for name, p in registry.methods.items():
        rows.append(["method", name, p.plugin.distribution, f"{p.spec.paper.title} ({p.spec.paper.venue}); "
                     f"protocols: {', '.join(p.spec.protocols)}; profiles: {', '.join(p.spec.profiles)}"])
    for name, p in registry.datasets.items():
        rows.append(["dataset", name, p.plugin.distribution, f"{p.spec.description} ({len(p.spec.categories)} categories)"])
    for name, p in registry.metrics.items():
        rows.append(["metric", name, p.plugin.distribution, f"{p.spec.level}, {'higher' if p.spec.higher_is_better else 'lower'} is better"])
    for name, text in PROTOCOL_HELP.items():
        rows.append(["protocol", name, "harness (built-in)", text])
    if args.format == "json":
        print(json.dumps({"items": [dict(zip(["kind", "name", "from", "about"], r)) for r in rows],
                          "problems": registry.problems}, indent=2))
    else:
        print(tabulate(rows, headers=["kind", "name", "from", "about"], tablefmt="simple"))
        for problem in registry.problems:
            print(f"problem: {problem}")
    return 0


def cmd_describe(args: argparse.Namespace) -> int:
    """``harness describe METHOD``: paper, profiles, settings and parameter counts (meta device)."""
    import torch

    from harness.registry import load_registry
    from harness.runner import resolve_settings

    spec = load_registry().method(args.method)
    profile = args.profile or ("paper" if "paper" in spec.profiles else next(iter(spec.profiles)))
    settings = resolve_settings(spec, profile, {})
    # Building on the meta device allocates nothing: the paper-size networks describe in a second.
    with torch.device("meta"):
        method = spec.factory(settings)
    networks = method.parameter_count()
    info = {
        "name": spec.name, "paper": vars(spec.paper), "protocols": list(spec.protocols), "profiles": list(spec.profiles),
        "profile": profile, "settings": settings, "settings_help": dict(spec.settings_help),
        "networks": networks, "total_parameters": sum(networks.values()), "description": spec.description,
    }
    if args.format == "json":
        print(json.dumps(info, indent=2, default=str))
        return 0
    print(f"{spec.name}: {spec.paper.title} ({spec.paper.venue})")
    for key in ("url", "code"):
        if getattr(spec.paper, key):
            print(f"  {key}: {getattr(spec.paper, key)}")
    if spec.description:
        print(f"\n{spec.description}\n")
    print(f"protocols: {', '.join(spec.protocols)}; profiles: {', '.join(spec.profiles)} (showing {profile!r})")
    print("settings:")
    for key, value in settings.items():
        help_text = spec.settings_help.get(key, "")
        print(f"  {key} = {value!r}" + (f"  # {help_text}" if help_text else ""))
    print("networks (parameters):")
    for name, count in networks.items():
        print(f"  {name}: {count:,} ({count / 1e6:.1f} M)")
    print(f"  total: {info['total_parameters']:,}")
    return 0


def cmd_leaderboard(args: argparse.Namespace) -> int:
    """``harness leaderboard``: tables from the records under the results folder."""
    from harness.leaderboard import build_leaderboard, write_leaderboard

    reported = None if args.no_reported else (Path(args.reported_dir) if args.reported_dir else default_reported_dir())
    formats = _split(args.format) or ["markdown"]
    if args.out:
        for path in write_leaderboard(Path(args.results_dir), Path(args.out), formats=formats, reported_dir=reported):
            print(path)
        return 0
    for fmt in formats:
        print(build_leaderboard(Path(args.results_dir), reported_dir=reported, fmt=fmt, per_category=not args.summary_only))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """``harness evaluate``: score maps written by another codebase; print the table, write a record."""
    from harness.evaluate_maps import evaluate_maps, evaluation_record, format_table, now
    from harness.records import write_record
    from harness.registry import load_registry

    started = now()
    spec = load_registry().dataset(args.dataset)
    root = Path(args.root) if args.root else (spec.find_root() if spec.find_root else None)
    if root is None and spec.needs_root:
        raise UsageError(f"dataset {args.dataset!r} needs --root PATH")
    if args.protocol == "fewshot" and not args.shots:
        raise UsageError("--protocol fewshot needs --shots K (the shots the maps were made with)")
    maps_dir = Path(args.maps)
    categories = _split(args.categories) or None
    index = spec.loader(root, categories)
    eval_size = None if args.eval_size == "native" else int(args.eval_size)
    evaluation = evaluate_maps(maps_dir, index, categories, eval_size)
    for path in evaluation.extra_files[:20]:
        print(f"warning: {path} matches no test image of {args.dataset}; ignored", file=sys.stderr)
    if len(evaluation.extra_files) > 20:
        print(f"warning: ... and {len(evaluation.extra_files) - 20} more map files that match no test image",
              file=sys.stderr)
    name = args.name or maps_dir.resolve().name
    shots = args.shots if args.protocol == "fewshot" else None
    job, record = evaluation_record(evaluation, name=name, dataset=args.dataset, protocol=args.protocol, shots=shots,
                                    maps_dir=maps_dir, eval_size=eval_size, started=started)
    print(format_table(evaluation.metrics))
    if not args.no_record:
        path = job.record_path(Path(args.results_dir))
        write_record(path, record)
        print(f"record: {path}", file=sys.stderr)
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    """``harness data synth --out DIR``: write the synthetic dataset in the MVTec-AD layout."""
    from harness.export import write_mvtec_layout
    from harness.registry import load_registry

    spec = load_registry().dataset(args.dataset)
    index = spec.loader(None, _split(args.categories) or None)
    counts = write_mvtec_layout(index, Path(args.out))
    print(f"wrote {args.dataset} to {args.out}: {counts}")
    return 0


def cmd_data_summary(args: argparse.Namespace) -> int:
    """``harness data summary``: what the loader found, per category, and every problem."""
    from harness.dataset_summary import format_summary, summarize
    from harness.registry import load_registry

    spec = load_registry().dataset(args.dataset)
    root = Path(args.root) if args.root else (spec.find_root() if spec.find_root else None)
    if root is None and spec.needs_root:
        raise UsageError(f"dataset {args.dataset!r} needs --root PATH")
    categories = _split(getattr(args, "categories", None)) or None
    index = spec.loader(root, categories)
    summary = summarize(index, spec.official_counts, check=not getattr(args, "no_check", False))
    summary["dataset"] = args.dataset
    if args.format == "json":
        print(json.dumps(summary, indent=2))
    else:
        print(format_summary(summary))
    return 0


# -- parser ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``harness`` command."""
    parser = argparse.ArgumentParser(prog="harness", description="Benchmark visual anomaly detection methods.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run methods under a protocol and print the leaderboard")
    run.add_argument("--methods", default="all", help="comma-separated method names, or 'all' (default)")
    run.add_argument("--datasets", default="", help=f"comma-separated dataset names (default: {DEFAULT_DATASET})")
    run.add_argument("--protocol", default="multiclass", choices=["multiclass", "fewshot", "oneclass"])
    run.add_argument("--shots", default="1,2,4", help="shots per category for fewshot, e.g. 1,2,4")
    run.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2")
    run.add_argument("--profile", default="auto",
                     help="method profile: paper, tiny, ... (auto: tiny on the synthetic set, paper on real data)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one setting of the profile")
    run.add_argument("--data-root", action="append", default=[], metavar="[NAME=]PATH", help="dataset folder")
    run.add_argument("--results-dir", default="results", help="where records are written (default: results)")
    run.add_argument("--cache-dir", default=".harness-cache", help="where finished fits are cached")
    run.add_argument("--weights-dir", default=None, help="folder with pretrained weights (or $HARNESS_WEIGHTS)")
    run.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    run.add_argument("--eval-size", default="256", help="side of the pixel-metric grid, or 'native' (default 256)")
    run.add_argument("--force", action="store_true", help="redo jobs that already finished")
    run.add_argument("--no-fit-cache", action="store_true", help="do not store finished fits")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument("--no-leaderboard", action="store_true", help="do not print the leaderboard at the end")
    run.add_argument("--per-category", action="store_true", help="print per-category tables too")
    run.set_defaults(func=cmd_run)

    lst = sub.add_parser("list", help="installed methods, datasets, metrics and protocols, with their origin")
    lst.add_argument("--format", default="table", choices=["table", "json"])
    lst.set_defaults(func=cmd_list)

    desc = sub.add_parser("describe", help="a method's paper, profiles, settings and parameter counts")
    desc.add_argument("method")
    desc.add_argument("--profile", default=None)
    desc.add_argument("--format", default="text", choices=["text", "json"])
    desc.set_defaults(func=cmd_describe)

    board = sub.add_parser("leaderboard", help="tables from the records under the results folder")
    board.add_argument("--results-dir", default="results")
    board.add_argument("--format", default="markdown", help="markdown, csv, latex, html (comma-separated)")
    board.add_argument("--out", default=None, help="write files into this folder instead of printing")
    board.add_argument("--reported-dir", default=None, help="folder of the papers' reported numbers (CSV)")
    board.add_argument("--no-reported", action="store_true", help="leave the papers' reported numbers out")
    board.add_argument("--summary-only", action="store_true", help="no per-category tables")
    board.set_defaults(func=cmd_leaderboard)

    evaluate = sub.add_parser("evaluate", help="score anomaly maps made elsewhere (MVTec evaluation layout)")
    evaluate.add_argument("--maps", required=True, help="folder of maps: <category>/test/<defect>/<stem>.tiff|.npy")
    evaluate.add_argument("--dataset", required=True, help="dataset whose test ground truth scores the maps")
    evaluate.add_argument("--root", default=None, help="the dataset's folder")
    evaluate.add_argument("--name", default=None, help="method name in the record (default: the maps folder's name)")
    evaluate.add_argument("--protocol", default="multiclass", choices=["multiclass", "fewshot", "oneclass"],
                          help="protocol the maps were made under (default multiclass)")
    evaluate.add_argument("--shots", type=int, default=None, help="shots per category, for --protocol fewshot")
    evaluate.add_argument("--categories", default="", help="comma-separated categories (default: all)")
    evaluate.add_argument("--eval-size", default="native",
                          help="'native' (default: the masks' resolution, maps must match it) or N to resize to NxN")
    evaluate.add_argument("--results-dir", default="results", help="where the record is written (default: results)")
    evaluate.add_argument("--no-record", action="store_true", help="print the table only")
    evaluate.set_defaults(func=cmd_evaluate)

    data = sub.add_parser("data", help="dataset tools")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    synth = data_sub.add_parser("synth", help="write the synthetic dataset to disk in the MVTec-AD layout")
    synth.add_argument("--out", required=True)
    synth.add_argument("--dataset", default=DEFAULT_DATASET)
    synth.add_argument("--categories", default="")
    synth.set_defaults(func=cmd_data_synth)
    summary = data_sub.add_parser("summary", help="what the loader finds in a dataset folder")
    summary.add_argument("--dataset", required=True)
    summary.add_argument("--root", default=None)
    summary.add_argument("--format", default="table", choices=["table", "json"])
    summary.set_defaults(func=cmd_data_summary)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``harness`` console script."""
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            if getattr(args, "command", "") in ("run", "evaluate"):
                # Undefined metrics (e.g. no defect pixel) are reported as NaN in the tables.
                from harness.metrics import UndefinedMetricWarning

                warnings.filterwarnings("ignore", category=UndefinedMetricWarning)
            return int(args.func(args) or 0)
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished records are kept — rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
