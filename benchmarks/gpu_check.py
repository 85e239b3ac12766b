"""GPU check: every method's ``paper`` profile on a CUDA device, with random weights, in minutes.

For each method (``--methods``, default all installed), at the paper's resolution and batch
sizes, with seeded random weights (``--weights random``: no weight file is needed):

1. build the paper architecture on the GPU (seconds, parameters);
2. one short training run per precision (``fp32`` and ``bf16``): the method's real ``fit`` in
   fast-dev-run mode (one epoch, at most two optimiser steps per stage) on enough synthetic
   images for one full paper batch; peak GPU memory of that fit (the training step);
3. ``predict`` of the fitted model on one paper-size batch (the method's full inference, even
   where its fast-dev-run fit would shorten it): FPS, latency at batch 1, peak GPU memory;
4. a fast dev run through the harness (``harness run --profile paper --weights random
   --fast-dev-run --device cuda``), recorded like any job (the record is marked as a dev run).

It writes ``gpu_check.json`` and ``gpu_check.md`` into ``--out`` and is meant to fit in about 8
minutes for all five methods on one H100/H200-class GPU (``--methods`` picks a subset,
``--skip-dev-run`` / ``--precisions fp32`` make it shorter). Without CUDA (or with ``--dry``) it
prints, for every method, what it would measure and with which settings, and exits 0: CI runs
it that way so the script keeps working.

Run: ``python benchmarks/gpu_check.py [--methods diad,anomalysd] [--out build/gpu-check] [--dry]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch


def _paper_settings(spec: Any, precision: str | None) -> Any:
    overrides = {"precision": precision} if precision and "precision" in spec.schema else {}
    return spec.resolve("paper", overrides)


def _batch_sizes(settings: Any) -> dict[str, int]:
    return {k: int(v) for k, v in settings.items() if k.endswith("batch_size") and isinstance(v, int)}


def describe_plan(registry: Any, methods: list[str], precisions: list[str]) -> list[dict[str, Any]]:
    """What the check measures for each method (the dry run prints this)."""
    rows = []
    for name in methods:
        spec = registry.method(name)
        if "paper" not in spec.profiles:
            rows.append({"method": name, "skipped": "no paper profile"})
            continue
        settings = _paper_settings(spec, None)
        with torch.device("meta"):
            method = spec.factory(settings)
        rows.append({"method": name, "image_size": list(method.input_size), "eval_batch_size": method.eval_batch_size,
                     "batch_sizes": _batch_sizes(settings), "parameters": sum(method.parameter_count().values()),
                     "precisions": [p for p in precisions if p == "fp32" or "precision" in spec.schema],
                     "measures": ["build on cuda (s)", "peak memory of a fast-dev fit per precision",
                                  "predict fps / latency / peak memory", "harness fast dev run (s)"]})
    return rows


def _train_set(method: Any, batch: int) -> Any:
    """Synthetic training images, enough for one full paper batch (and at least two per category)."""
    from harness.data import ImageCache, TrainSet
    from harness.registry import load_registry

    index = load_registry().dataset("synthetic").loader(None, None)
    per_category = max(2, -(-batch // len(index.categories)))
    samples = [s for c in index.categories.values() for s in c.train[:per_category]]
    return TrainSet("synthetic", samples, method.input_size, ImageCache(), **method.resize_rule()), index


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    from harness.efficiency import peak_rss_mb

    return round(peak_rss_mb() / 1024, 2)  # the process's peak RSS: a rehearsal, not a GPU figure


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_method(registry: Any, name: str, precisions: list[str], workdir: Path, device: torch.device) -> dict:
    """Build, fit (fast dev) per precision, and predict one method's paper profile on ``device``."""
    from harness.environment import seed_everything
    from harness.evaluation import Evaluator
    from harness.progress import Progress
    from harness.testing import fit_context

    spec = registry.method(name)
    out: dict[str, Any] = {"method": name, "precisions": {}}
    for precision in precisions:
        if precision != "fp32" and "precision" not in spec.schema:
            out["precisions"][precision] = {"skipped": "the method declares no precision setting"}
            continue
        settings = _paper_settings(spec, precision)
        _reset_peak(device)
        seed_everything(0)
        start = time.perf_counter()
        method = spec.factory(settings)
        method.to(device)
        _sync(device)
        entry: dict[str, Any] = {"build_seconds": round(time.perf_counter() - start, 2),
                                 "parameters": sum(method.parameter_count().values())}
        batch = max(_batch_sizes(settings).values(), default=method.eval_batch_size)
        train, index = _train_set(method, batch)
        context = fit_context(settings, workdir / f"{name}-{precision}", profile="paper", device=device,
                              fast_dev_run=True, random_weights=True, textures=(), train=train)
        _reset_peak(device)
        start = time.perf_counter()
        method.fit(train, context)
        _sync(device)
        entry["fit_seconds"] = round(time.perf_counter() - start, 2)
        entry["train_peak_memory_gb"] = _peak_gb(device)
        # Time the method's full inference: a fast-dev fit may have shortened it.
        if hasattr(method, "dev_run"):
            method.dev_run = False
        method.eval()
        samples = [s for c in index.categories.values() for s in c.test][: method.eval_batch_size]
        evaluator = Evaluator("synthetic", [], None, device, train._cache, Progress(False), latency_repeats=2)
        _reset_peak(device)
        with torch.no_grad():
            evaluator.warm_up(method, samples[0])
            images = evaluator._tensor(method, samples)
            categories = [s.category for s in samples]
            evaluator.timer.time(lambda m=method: m.predict(images, categories), len(samples))
        entry.update(predict_fps=round(evaluator.timer.fps or 0.0, 3),
                     latency_ms=round(evaluator.timer.latency_ms or 0.0, 1), predict_batch=len(samples),
                     predict_peak_memory_gb=_peak_gb(device))
        out["precisions"][precision] = entry
        del method, context, evaluator
    return out


def dev_run(name: str, workdir: Path, device: str = "cuda") -> dict[str, Any]:
    """``harness run --methods NAME --profile paper --weights random --fast-dev-run --device cuda``."""
    import subprocess

    protocol = ["--protocol", "fewshot", "--shots", "1"] if name == "anomalysd" else []
    command = [sys.executable, "-m", "harness", "run", "--methods", name, "--profile", "paper", "--weights", "random",
               "--fast-dev-run", "--device", device, "--results-dir", str(workdir / "results"), "--cache-dir",
               str(workdir / "cache"), "--no-progress", "--no-leaderboard", *protocol]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    return {"exit": done.returncode, "seconds": round(time.perf_counter() - start, 1),
            "tail": (done.stderr or "")[-800:] if done.returncode else ""}


def markdown(results: list[dict[str, Any]], device_name: str) -> str:
    """The results as a Markdown table."""
    lines = [f"GPU check on {device_name} (paper profiles, random weights)\n",
             "| method | precision | params (M) | build (s) | fast-dev fit (s) | train peak (GB) | predict FPS | "
             "latency (ms) | predict peak (GB) | dev run |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for result in results:
        dev = result.get("dev_run") or {}
        dev_text = f"exit {dev['exit']} in {dev['seconds']} s" if dev else "-"
        if "error" in result:
            lines.append(f"| {result['method']} | - | - | - | - | - | - | - | - | error: {result['error'][:80]} |")
            continue
        for precision, entry in result["precisions"].items():
            if "skipped" in entry:
                lines.append(f"| {result['method']} | {precision} | {entry['skipped']} |||||||| |")
                continue
            lines.append(f"| {result['method']} | {precision} | {entry['parameters'] / 1e6:.1f} | {entry['build_seconds']} | "
                         f"{entry['fit_seconds']} | {entry['train_peak_memory_gb']} | {entry['predict_fps']} | "
                         f"{entry['latency_ms']} | {entry['predict_peak_memory_gb']} | {dev_text} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    """Run the check (or describe it without CUDA); write JSON and Markdown."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="all")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--out", default="build/gpu-check")
    parser.add_argument("--dry", action="store_true", help="describe what would be measured (default without CUDA)")
    parser.add_argument("--skip-dev-run", action="store_true")
    parser.add_argument("--device", default="cuda",
                        help="cuda (default); cpu runs the same steps as a rehearsal (memory = peak RSS)")
    args = parser.parse_args()
    from harness.registry import load_registry

    registry = load_registry()
    methods = list(registry.methods) if args.methods == "all" else [m for m in args.methods.split(",") if m]
    precisions = [p for p in args.precisions.split(",") if p]
    out = Path(args.out)
    if args.dry or (args.device == "cuda" and not torch.cuda.is_available()):
        why = "--dry" if args.dry else "no CUDA device on this machine"
        plan = describe_plan(registry, methods, precisions)
        print(f"gpu check, dry run ({why}); on a CUDA machine it measures, per method:")
        print(json.dumps(plan, indent=2))
        return 0
    device = torch.device(args.device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU rehearsal ({platform.processor() or platform.machine()})"
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in methods:
            start = time.perf_counter()
            try:
                result = check_method(registry, name, precisions, Path(tmp), device)
            except Exception as exc:  # noqa: BLE001 - one method failing must not hide the others
                result = {"method": name, "error": f"{type(exc).__name__}: {exc}",
                          "traceback": traceback.format_exc()[-2000:]}
            if not args.skip_dev_run:
                result["dev_run"] = dev_run(name, Path(tmp) / f"dev-{name}", args.device)
            result["seconds"] = round(time.perf_counter() - start, 1)
            results.append(result)
            print(f"{name}: {result.get('seconds')} s", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"device": device_name, "torch": torch.__version__, "cuda": torch.version.cuda if device.type == "cuda" else None,
               "python": platform.python_version(), "results": results}
    (out / "gpu_check.json").write_text(json.dumps(payload, indent=2))
    (out / "gpu_check.md").write_text(markdown(results, device_name))
    print(markdown(results, device_name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
