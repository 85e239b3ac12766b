"""The ``harness`` command line.

Exit status: 0 success; 1 some job failed (a summary says which); 2 bad usage, a broken dataset,
a failed preflight or another error the message explains; 130 interrupted by Ctrl-C, 143 by
SIGTERM (finished records are kept, the fit in progress is checkpointed).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

from harness.engine.jobs import DEFAULT_DATASET
from harness.errors import HarnessError, UsageError


def _split(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


# -- commands -------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    """``harness run``: plan every job (:mod:`harness.engine.request`), check it, run it, print the outcome."""
    from harness.engine.preflight import PreflightError, run_preflight
    from harness.engine.registry import load_registry
    from harness.engine.request import RunRequest, plan_request
    from harness.engine.runner import run_plan

    if args.tracker:
        # Tracker reporters (harness_mlflow, ...) switch themselves on from this variable.
        import os

        os.environ["HARNESS_TRACKER"] = ",".join(_split(args.tracker))
    registry = load_registry()
    for problem in registry.problems:
        print(f"warning: {problem}", file=sys.stderr)
    run = plan_request(registry, RunRequest.from_namespace(args))
    for note in run.notes:
        print(note, file=sys.stderr)
    report = run_preflight(run.plan, check_images=not args.skip_data_check, probe_folders=not args.dry_run)
    if args.dry_run:
        print(run.plan.describe())
        print(report.describe())
        return 2 if report.problems else 0
    if report.problems:
        raise PreflightError("the preflight found problems before any fit (nothing was run):\n"
                             + "\n".join(f"  - {p}" for p in report.problems))
    for note in report.notes:
        print(f"note: {note}", file=sys.stderr)
    where = run.options.torch_device() if args.executor == "inprocess" else f"--device {args.device}"
    print(f"running {len(run.jobs)} job(s) on {where} ({args.executor}); records in "
          f"{run.options.results_dir / 'records'}", file=sys.stderr)
    summary = run_plan(registry, run.plan, registry.executor(args.executor).factory(run.options))
    for problem in registry.problems:
        if problem.kind == "reporter":
            print(f"warning: {problem}", file=sys.stderr)
    if not args.no_leaderboard:
        _print_leaderboard(registry, run, args.per_category)
    print(summary.describe(), file=sys.stderr)
    return summary.exit_code


def _print_leaderboard(registry: Any, run: Any, per_category: bool) -> None:
    """The tables of the run's (dataset, protocol) groups, the papers' numbers beside them."""
    from harness.results.leaderboard import build_leaderboard
    from harness.results.reported import default_reported_dir

    groups = {(j.dataset, j.protocol) for j in run.jobs}
    print(build_leaderboard(run.options.results_dir, reported_dir=default_reported_dir(), fmt="markdown",
                            per_category=per_category, groups=groups, metrics=registry.metric_specs(),
                            warn=lambda line: print(line, file=sys.stderr)))


def cmd_list(args: argparse.Namespace) -> int:
    """``harness list``: what is installed and where it comes from."""
    from tabulate import tabulate

    from harness.engine.protocols import PROTOCOL_HELP
    from harness.engine.registry import load_registry

    registry = load_registry()
    rows = []
    for name, p in registry.methods.items():
        paper = f"; paper protocol: {p.spec.paper_protocol}" if p.spec.paper_protocol else ""
        rows.append(["method", name, p.plugin.distribution, f"{p.spec.paper.title} ({p.spec.paper.venue}); "
                     f"protocols: {', '.join(p.spec.protocols)}{paper}; profiles: {', '.join(p.spec.profiles)}"])
    for name, p in registry.datasets.items():
        options = f"; --data-option {', '.join(f'{k}=...' for k in p.spec.options)}" if p.spec.options else ""
        rows.append(["dataset", name, p.plugin.distribution,
                     f"{p.spec.description} ({len(p.spec.categories)} categories{options})"])
    for name, p in registry.metrics.items():
        where = f"; only on {', '.join(p.spec.datasets)}" if p.spec.datasets else ""
        rows.append(["metric", name, p.plugin.distribution,
                     f"{p.spec.level}, {'higher' if p.spec.higher_is_better else 'lower'} is better{where}"])
    for name, text in PROTOCOL_HELP.items():
        rows.append(["protocol", name, "harness (built-in)", text])
    for name, p in registry.executors.items():
        rows.append(["executor", name, p.plugin.distribution, p.spec.description])
    if args.format == "json":
        print(json.dumps({"items": [dict(zip(["kind", "name", "from", "about"], r)) for r in rows],
                          "problems": [p.as_dict() for p in registry.problems]}, indent=2))
    else:
        print(tabulate(rows, headers=["kind", "name", "from", "about"], tablefmt="simple"))
        for problem in registry.problems:
            print(f"problem: {problem}")
    return 0


def describe_method(spec: Any, profile: str, use_cache: bool = True) -> dict[str, Any]:
    """Everything ``harness describe`` shows (:func:`harness.engine.describe.describe_method`)."""
    from harness.engine.describe import describe_method as describe

    return describe(spec, profile, use_cache)


def cmd_describe(args: argparse.Namespace) -> int:
    """``harness describe METHOD``: paper, profiles, typed settings, choices and parameter counts."""
    from harness.engine.registry import load_registry

    spec = load_registry().method(args.method)
    profile = args.profile or ("paper" if "paper" in spec.profiles else next(iter(spec.profiles)))
    info = describe_method(spec, profile, use_cache=not args.no_cache)
    if args.format == "json":
        print(json.dumps(info, indent=2, default=str))
        return 0
    print(f"{spec.name}: {spec.paper.title} ({spec.paper.venue})")
    for key in ("url", "code"):
        if getattr(spec.paper, key):
            print(f"  {key}: {getattr(spec.paper, key)}")
    if spec.description:
        print(f"\n{spec.description}\n")
    paper = f"; the paper's protocol: {spec.paper_protocol}" if spec.paper_protocol else ""
    print(f"protocols: {', '.join(spec.protocols)}{paper}; profiles: {', '.join(spec.profiles)} (showing {profile!r})")
    resize = info["interpolation"] + ("" if info["antialias"] else ", cv2.resize: no antialiasing")
    side = (f"shorter side {info['input_size'][0]}" if info["resize_mode"] == "shorter_side"
            else f"{info['input_size'][0]}x{info['input_size'][1]}")
    print(f"input: {side} ({resize}), predict batch "
          f"{info['eval_batch_size']}; resources per job: "
          + ", ".join(f"{k}={v:g}" for k, v in info["resources"].items()))
    print("settings (name: type = value [default]  help):")
    for row in info["settings_table"]:
        default = "" if row["value"] == row["default"] else f" [default {row['default']!r}]"
        help_text = f"  # {row['help']}" if row["help"] else ""
        print(f"  {row['name']}: {row['type']} = {row['value']!r}{default}{help_text}")
    if info["choices"]:
        print("choices the paper leaves open:")
        for name, choice in info["choices"].items():
            print(f"  {name} = {choice['value']!r}: {choice['why']}")
    if info["weights"]:
        print("pretrained files:")
        for file in info["weights"]:
            source = file["repo_id"] + (f"@{file['revision']}" if file["revision"] else "") if file["repo_id"] else file["url"]
            print(f"  {file['key']}: {file['what']} ({source or 'local only'})")
    if info["data_needs"]:
        print("data it needs (checked by the preflight):")
        for need in info["data_needs"]:
            print(f"  {need['setting']}: {need['what']} ({need['how']})")
    print("networks (parameters):")
    for name, count in info["networks"].items():
        print(f"  {name}: {count:,} ({count / 1e6:.1f} M)")
    print(f"  total: {info['total_parameters']:,}")
    return 0


def _weight_rows(args: argparse.Namespace) -> list[tuple[str, str, Any]]:
    """(method, profile, Located) for every pinned file of the chosen methods and profile."""
    from harness.engine.planning import resolve_settings
    from harness.engine.registry import load_registry
    from harness.engine.weights import WeightsResolver

    registry = load_registry()
    names = _split(args.methods) if args.methods and args.methods != "all" else list(registry.methods)
    resolver = WeightsResolver(Path(args.weights_dir) if args.weights_dir else None)
    rows = []
    for name in names:
        spec = registry.method(name)
        profile = args.profile if args.profile in spec.profiles else None
        if profile is None:
            if args.methods and args.methods != "all":
                raise UsageError(f"method {name!r} has no profile {args.profile!r}; profiles: {', '.join(spec.profiles)}")
            continue
        settings = resolve_settings(spec, profile, {})
        rows += [(name, profile, resolver.locate(f, settings)) for f in spec.weight_files(settings)]
    return rows


def cmd_weights_list(args: argparse.Namespace) -> int:
    """``harness weights list``: each pinned file, where it was looked for, whether it is there."""
    rows = _weight_rows(args)
    if args.format == "json":
        print(json.dumps([{"method": m, "profile": p, **located.file.as_dict(),
                           "found": str(located.path) if located.path else None,
                           "searched": [str(c) for c in located.searched]} for m, p, located in rows], indent=2))
        return 0
    if not rows:
        print(f"no pinned weight files for profile {args.profile!r}")
    for method, profile, located in rows:
        file = located.file
        state = f"found: {located.path}" if located.path else "MISSING"
        print(f"{method}/{profile} {file.key}: {file.what}\n    {state}")
        source = f"{file.repo_id}{'@' + file.revision if file.revision else ''} {file.filename}".strip() or file.url
        print(f"    source: {source}" + (f"; sha256 {file.sha256}" if file.sha256 else ""))
        if located.path is None:
            for candidate in located.searched[:8]:
                print(f"    looked in {candidate}")
    missing = [r for r in rows if r[2].path is None]
    if missing:
        print(f"\n{len(missing)} file(s) missing; fetch them with: harness weights pull --methods "
              f"{','.join(dict.fromkeys(m for m, _, _ in missing))} --profile {args.profile}")
    return 0


def cmd_weights_verify(args: argparse.Namespace) -> int:
    """``harness weights verify``: sha256 of every pinned file found; exit 1 on a mismatch or a missing file."""
    from harness.engine.weights import verify

    bad = 0
    for method, profile, located in _weight_rows(args):
        status, detail = verify(located)
        bad += status in ("missing", "mismatch")
        print(f"{status:9s} {method}/{profile} {located.file.key}: {located.path or located.file.what} ({detail})")
    return 1 if bad else 0


def cmd_weights_pull(args: argparse.Namespace) -> int:
    """``harness weights pull``: fetch exactly the pinned files into the Hugging Face / torch caches."""
    from harness.engine.weights import pull

    rows = _weight_rows(args)
    for method, profile, located in rows:
        if located.path is not None and not args.force:
            print(f"present  {method}/{profile} {located.file.key}: {located.path}")
            continue
        path = pull(located.file)
        print(f"pulled   {method}/{profile} {located.file.key}: {path}")
    return 0


def cmd_leaderboard(args: argparse.Namespace) -> int:
    """``harness leaderboard``: tables from the records under the results folder."""
    from harness.results.leaderboard import build_leaderboard, write_leaderboard

    from harness.engine.registry import load_registry

    results = Path(args.results_dir)
    if results.exists() and not results.is_dir():
        raise UsageError(f"--results-dir {results} is a file, not a folder of records")
    from harness.results.reported import default_reported_dir

    reported = None if args.no_reported else (Path(args.reported_dir) if args.reported_dir else default_reported_dir())
    formats = _split(args.format) or ["markdown"]
    metrics = load_registry().metric_specs()
    warn = lambda line: print(line, file=sys.stderr)  # noqa: E731
    if args.paper or args.table:
        return _paper_table(args, results, reported, formats, metrics)
    if args.out:
        for path in write_leaderboard(Path(args.results_dir), Path(args.out), formats=formats, reported_dir=reported,
                                      metrics=metrics, warn=warn):
            print(path)
        return 0
    for fmt in formats:
        print(build_leaderboard(Path(args.results_dir), reported_dir=reported, fmt=fmt, per_category=not args.summary_only,
                                metrics=metrics, warn=warn))
    return 0


def _paper_table(args: argparse.Namespace, results: Path, reported: Path | None, formats: list[str],
                 metrics: list) -> int:
    """``harness leaderboard --paper NAME [--table N]``: one paper's table as published, ours beside it."""
    from harness.results.paper_tables import paper_section

    if not args.paper:
        raise UsageError("--table needs --paper NAME (DiAD, DiffusionAD, LafitE, AnomalySD)")
    if args.out:
        raise UsageError("--paper prints its table; leave out --out (redirect the output to a file instead)")
    if reported is None:
        raise UsageError("--paper needs the papers' numbers: leave out --no-reported, or give --reported-dir")
    for fmt in formats:
        print(paper_section(args.paper, args.table, results, reported, fmt=fmt, metrics=metrics))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """``harness evaluate``: score maps written by another codebase; print the table, write a record."""
    from harness.results.evaluate_maps import evaluate_maps, evaluation_record, format_table, now
    from harness.results.records import write_record
    from harness.engine.registry import load_registry

    started = now()
    spec = load_registry().dataset(args.dataset)
    root = Path(args.root) if args.root else (spec.find_root() if spec.find_root else None)
    if root is None and spec.needs_root:
        raise UsageError(f"dataset {args.dataset!r} needs --root PATH")
    if args.protocol == "fewshot" and not args.shots:
        raise UsageError("--protocol fewshot needs --shots K (the shots the maps were made with)")
    maps_dir = Path(args.maps)
    categories = _split(args.categories) or None
    from harness.data import load_index, parse_data_options

    index = load_index(spec, root, categories, parse_data_options(args.data_option))
    eval_size = None if args.eval_size == "native" else int(args.eval_size)
    evaluation = evaluate_maps(maps_dir, index, categories, eval_size,
                               metrics=load_registry().metric_specs(args.dataset))
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
    from harness.results.export import write_mvtec_layout
    from harness.engine.registry import load_registry

    spec = load_registry().dataset(args.dataset)
    index = spec.loader(None, _split(args.categories) or None)
    counts = write_mvtec_layout(index, Path(args.out))
    print(f"wrote {args.dataset} to {args.out}: {counts}")
    return 0


def cmd_data_summary(args: argparse.Namespace) -> int:
    """``harness data summary``: what the loader found, per category, and every problem."""
    from harness.engine.support.dataset_summary import format_summary, summarize
    from harness.engine.registry import load_registry

    spec = load_registry().dataset(args.dataset)
    root = Path(args.root) if args.root else (spec.find_root() if spec.find_root else None)
    if root is None and spec.needs_root:
        raise UsageError(f"dataset {args.dataset!r} needs --root PATH")
    categories = _split(getattr(args, "categories", None)) or None
    from harness.data import load_index, parse_data_options

    index = load_index(spec, root, categories, parse_data_options(getattr(args, "data_option", None)))
    summary = summarize(index, spec.official_counts, check=not getattr(args, "no_check", False))
    summary["dataset"] = args.dataset
    if args.format == "json":
        print(json.dumps(summary, indent=2))
    else:
        print(format_summary(summary))
    return 0


class _WarningCollector:
    """Keeps each distinct warning once, with how often it came (for ``showwarning``).

    Recording every occurrence (``catch_warnings(record=True)``) grows without bound when a
    library warns inside a loop: a paper-profile run collected gigabytes of identical warnings
    that way. Keyed by category, text and place, the collection stays as small as the set of
    distinct warnings.
    """

    def __init__(self) -> None:
        self.seen: dict[tuple, list] = {}

    def __call__(self, message, category, filename, lineno, file=None, line=None) -> None:
        key = (category, str(message), filename, lineno)
        if key in self.seen:
            self.seen[key][1] += 1
        else:
            self.seen[key] = [message, 1]

    def print(self) -> None:
        """The harness's own warnings as one ``warning:`` line each; others as Python shows them."""
        from harness.errors import HarnessWarning

        shown = set()
        for (category, text, filename, lineno), (message, count) in self.seen.items():
            if issubclass(category, HarnessWarning):
                if text not in shown:
                    shown.add(text)
                    print(f"warning: {text}", file=sys.stderr)
            elif not issubclass(category, (DeprecationWarning, PendingDeprecationWarning)):
                repeat = f" (x{count})" if count > 1 else ""
                sys.stderr.write(warnings.formatwarning(f"{message}{repeat}", category, filename, lineno))


# -- parser ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``harness`` command."""
    parser = argparse.ArgumentParser(prog="harness", description="Benchmark visual anomaly detection methods.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run methods under a protocol and print the leaderboard")
    run.add_argument("--methods", default="all", help="comma-separated method names, or 'all' (default)")
    run.add_argument("--datasets", default="", help=f"comma-separated dataset names (default: {DEFAULT_DATASET})")
    run.add_argument("--protocol", default="multiclass", choices=["multiclass", "fewshot", "oneclass"])
    run.add_argument("--shots", default="1,2,4", help="shots per category for fewshot, e.g. 1,2,4")
    run.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2")
    run.add_argument("--profile", default="auto",
                     help="method profile: paper, tiny, ... (auto: the dataset's default, tiny on the synthetic set, "
                          "paper on real data)")
    run.add_argument("--set", action="append", default=[], metavar="[METHOD.]KEY=VALUE",
                     help="override one setting of the profile, parsed by its declared type (the record key changes)")
    run.add_argument("--data-root", action="append", default=[], metavar="[NAME=]PATH", help="dataset folder")
    run.add_argument("--data-option", action="append", default=[], metavar="KEY=VALUE",
                     help="a dataset loader's option, e.g. resolution=512 for realiad (harness list shows them)")
    run.add_argument("--results-dir", default="results", help="where records are written (default: results)")
    run.add_argument("--cache-dir", default=".harness-cache", help="where finished fits are cached")
    run.add_argument("--weights-dir", default=None, help="folder with pretrained weights (or $HARNESS_WEIGHTS)")
    run.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    run.add_argument("--eval-size", default=None,
                     help="side of the pixel-metric grid, or 'native' (default: the profile's eval_size, else 256)")
    run.add_argument("--eval-grid", default="harness", choices=["harness", "paper"],
                     help="pixel grid of the metrics: harness (one rule for every method, default) or paper (each "
                          "paper's own mask resizing and binarisation, to reproduce its number; recorded)")
    run.add_argument("--precision", default=None, choices=["fp32", "bf16", "fp16"],
                     help="numeric precision (default: each paper's, i.e. the profile's); at inference the frozen "
                          "networks are cast once (see --precision-mode)")
    run.add_argument("--precision-mode", default="cast", choices=["cast", "autocast"],
                     help="low-precision inference: cast the frozen networks once (default) or autocast over fp32 "
                          "weights; recorded")
    run.add_argument("--tf32", default="off", choices=["on", "off"],
                     help="TF32 for CUDA matmuls and convolutions (default off: fp32 is fp32); recorded")
    run.add_argument("--compile", default="none", choices=["none", "default", "reduce-overhead"],
                     help="torch.compile each network for inference (falls back to eager with a warning); recorded")
    run.add_argument("--eval-batch-size", default=None, metavar="N|auto",
                     help="images per predict call for every method; auto: the largest that fits the device "
                          "(default: each method's eval_batch_size); predictions do not depend on it")
    run.add_argument("--weights", default="pretrained", choices=["pretrained", "random"],
                     help="random: build the architecture with seeded random weights (records marked, never ranked)")
    run.add_argument("--fast-dev-run", action="store_true",
                     help="each job's real code on a few images, one epoch and a few steps per stage (never ranked)")
    run.add_argument("--dry-run", action="store_true", help="print the plan and the preflight; write nothing")
    run.add_argument("--skip-data-check", action="store_true",
                     help="preflight without decoding every image and mask (faster on huge datasets)")
    run.add_argument("--checkpoint-interval", type=float, default=600.0, metavar="SECONDS",
                     help="seconds between mid-fit checkpoints (default 600; 0 = after every step)")
    run.add_argument("--executor", default="inprocess", help="inprocess (default), ray, or a plugin's executor")
    run.add_argument("--address", default=None, help="Ray cluster: auto, HOST:PORT or ray://... (default: start one)")
    run.add_argument("--job-gpus", type=float, default=None, help="GPUs per job (fractions allowed)")
    run.add_argument("--job-cpus", type=float, default=None, help="CPUs per job (fractions allowed)")
    run.add_argument("--retries", type=int, default=2, help="retries of a job whose worker died (Ray)")
    run.add_argument("--save-maps", default="sample", choices=["none", "sample", "all"],
                     help="keep anomaly maps for the report and export-maps (default: a fixed sample)")
    run.add_argument("--tracker", default=None, metavar="NAME[,NAME]",
                     help="send each job to a tracker reporter plugin, e.g. mlflow (pip install 'harness-ad[mlflow]')")
    run.add_argument("--force", action="store_true", help="redo jobs that already finished")
    run.add_argument("--no-fit-cache", action="store_true", help="do not store finished fits or checkpoints")
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
    desc.add_argument("--no-cache", action="store_true",
                      help="build the networks (meta device) to count parameters even when the counts for the same "
                           "settings, code and libraries are cached")
    desc.set_defaults(func=cmd_describe)

    board = sub.add_parser("leaderboard", help="tables from the records under the results folder")
    board.add_argument("--results-dir", default="results")
    board.add_argument("--format", default="markdown", help="markdown, csv, latex, html (comma-separated)")
    board.add_argument("--out", default=None, help="write files into this folder instead of printing")
    board.add_argument("--reported-dir", default=None, help="folder of the papers' reported numbers (CSV)")
    board.add_argument("--no-reported", action="store_true", help="leave the papers' reported numbers out")
    board.add_argument("--summary-only", action="store_true", help="no per-category tables")
    board.add_argument("--paper", default=None,
                       help="one paper's tables as published, ours beside them: DiAD, DiffusionAD, LafitE, AnomalySD")
    board.add_argument("--table", default=None, help="with --paper: the table (1, 'Table 1', 'arXiv Table 5'); "
                                                     "without it the paper's tables are listed")
    board.set_defaults(func=cmd_leaderboard)

    evaluate = sub.add_parser("evaluate", help="score anomaly maps made elsewhere (MVTec evaluation layout)")
    evaluate.add_argument("--maps", required=True, help="folder of maps: <category>/test/<defect>/<stem>.tiff|.npy")
    evaluate.add_argument("--dataset", required=True, help="dataset whose test ground truth scores the maps")
    evaluate.add_argument("--root", default=None, help="the dataset's folder")
    evaluate.add_argument("--data-option", action="append", default=[], metavar="KEY=VALUE",
                          help="a dataset loader's option, e.g. split=sv for realiad")
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

    weights = sub.add_parser("weights", help="the pinned pretrained files of each method: list, verify, pull")
    weights_sub = weights.add_subparsers(dest="weights_command", required=True)
    for name, func, text in (("list", cmd_weights_list, "each pinned file, where it was looked for, whether it is there"),
                             ("verify", cmd_weights_verify, "check the sha256 of every pinned file found"),
                             ("pull", cmd_weights_pull, "fetch the pinned files into the Hugging Face / torch caches "
                                                        "(the only command that uses the network)")):
        cmd = weights_sub.add_parser(name, help=text)
        cmd.add_argument("--methods", default="all", help="comma-separated method names, or 'all' (default)")
        cmd.add_argument("--profile", default="paper", help="profile whose files are meant (default paper)")
        cmd.add_argument("--weights-dir", default=None, help="folder with pretrained weights (or $HARNESS_WEIGHTS)")
        if name == "list":
            cmd.add_argument("--format", default="text", choices=["text", "json"])
        if name == "pull":
            cmd.add_argument("--force", action="store_true", help="fetch even the files already present")
        cmd.set_defaults(func=func)

    from harness.results.report.commands import cmd_export_maps, cmd_report

    report = sub.add_parser("report", help="a static HTML report: tables, accuracy vs FPS, curves, overlays")
    report.add_argument("--out", required=True, help="folder to write index.html and its images into")
    report.add_argument("--results-dir", default="results", help="the results folder (default: results)")
    report.add_argument("--reported-dir", default=None, help="folder of the papers' reported numbers (CSV)")
    report.add_argument("--no-reported", action="store_true", help="leave the papers' reported numbers out")
    report.set_defaults(func=cmd_report)

    export = sub.add_parser("export-maps", help="saved maps (--save-maps all) in the official MVTec evaluation layout")
    export.add_argument("--results-dir", default="results", help="the results folder (default: results)")
    export.add_argument("--method", required=True, help="the method whose records are exported")
    export.add_argument("--dataset", action="append", default=[], metavar="D",
                        help="only these datasets (repeat, or comma-separated; default: all)")
    export.add_argument("--protocol", default=None, choices=["multiclass", "fewshot", "oneclass"],
                        help="only this protocol")
    export.add_argument("--profile", default=None, help="only this profile")
    export.add_argument("--seed", type=int, default=None, help="only this seed")
    export.add_argument("--ground-truth", action="store_true",
                        help="also write the test images and masks at the evaluation size (a complete MVTec-layout "
                             "folder for the official evaluation script)")
    export.add_argument("--out", required=True, help="folder for <category>/test/<defect>/<stem>.tiff")
    export.set_defaults(func=cmd_export_maps)

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
    summary.add_argument("--data-option", action="append", default=[], metavar="KEY=VALUE",
                         help="a dataset loader's option, e.g. resolution=512 for realiad")
    summary.add_argument("--format", default="table", choices=["table", "json"])
    summary.set_defaults(func=cmd_data_summary)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``harness`` console script."""
    args = build_parser().parse_args(argv)
    # File names that are not UTF-8 reach messages as surrogates; print them escaped, never crash.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    if getattr(args, "debug", False):
        import logging

        logging.basicConfig(level=logging.DEBUG)
    try:
        collector = _WarningCollector()
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = collector
            if getattr(args, "command", "") in ("run", "evaluate"):
                # Undefined metrics (e.g. no defect pixel) are reported as NaN in the tables.
                from harness.metrics import UndefinedMetricWarning

                warnings.filterwarnings("ignore", category=UndefinedMetricWarning)
            try:
                code = int(args.func(args) or 0)
            finally:
                collector.print()
        return code
    except HarnessError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print("interrupted; finished records are kept — rerun the same command to resume", file=sys.stderr)
        return int(getattr(exc, "exit_code", 130))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
