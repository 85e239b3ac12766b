"""GPU check: every method at its paper inference settings on a CUDA device, with the timing protocol.

For each method (``--methods``, default all installed), with seeded random weights (no weight
file is needed), at the paper's resolution:

1. build the paper architecture on the device and run its real ``fit`` in fast-dev-run mode
   (one epoch, at most two optimiser steps per stage) on synthetic images: peak training memory;
2. set the paper's **inference** settings, which a fast-dev fit shortens: every denoising step
   (``dev_run`` cleared), LafitE's ``ddim_steps`` (10), AnomalySD's paper λ (the
   ``noise_strength`` setting, 0.4, instead of the first λ candidate a dev fit picks);
3. time ``predict`` in each **mode** — ``fp32+tf32`` (TF32 on), ``bf16`` (frozen networks cast
   once, :mod:`harness.engine.inference.acceleration`) and ``bf16+compile`` (``torch.compile``, CUDA graphs with
   ``reduce-overhead``) — at batch 1 and at the auto batch (the largest that fits, doubling up to
   ``--max-batch``), each with the harness's timing protocol (:mod:`harness.engine.inference.efficiency`: a
   warm-up call per shape, then warm calls until ``--calls`` or ``--seconds`` per shape, median
   and IQR per image, the cold call apart), FLOPs per image (counted at batch 1) and the share of
   the device's limit (:mod:`harness.engine.inference.flops`), and how far the bf16 maps are from fp32's;
4. optionally (``--dev-run``) a fast dev run through ``harness run --device cuda``.

It writes ``gpu_check.json`` and ``gpu_check.md`` into ``--out`` in one call, meant to fit in 8
minutes for all five methods on one H100/H200. ``--rehearse`` runs the same code on the CPU on
the ``tiny`` profiles (a few images, small batches; CI runs it so the script keeps working);
``--dry`` prints what would be measured and exits 0.

Run: ``python benchmarks/gpu_check.py [--methods diad,anomalysd] [--out build/gpu-check]
[--rehearse | --dry]``.
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
    from harness.engine.registry import load_registry

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
    from harness.engine.inference.efficiency import peak_rss_mb

    return round(peak_rss_mb() / 1024, 2)  # the process's peak RSS: a rehearsal, not a GPU figure


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


MODES = ("fp32+tf32", "bf16", "bf16+compile")


def paper_inference(method: Any) -> dict[str, Any]:
    """Undo what a fast-dev fit shortens, so the full paper inference is timed; say what was set."""
    done: dict[str, Any] = {}
    if getattr(method, "dev_run", False):
        method.dev_run = False
        done["dev_run"] = False
    if hasattr(method, "ddim_steps") and "ddim_steps" in method.settings:
        method.ddim_steps = int(method.settings["ddim_steps"])
        done["ddim_steps"] = method.ddim_steps
    if hasattr(method, "strengths") and "noise_strength" in method.settings:
        method.strengths = {}
        done["lambda"] = float(method.settings["noise_strength"])
    return done


def _time_shape(evaluator: Any, method: Any, samples: list, calls: int, seconds: float) -> dict[str, Any]:
    """Warm-up call, then warm calls (at least two) until ``calls`` or ``seconds``; the protocol's figures."""
    from harness.engine.inference.efficiency import PredictTimer

    evaluator.timer = PredictTimer(evaluator.device)
    images = evaluator._tensor(method, samples)
    evaluator.predict(method, samples, images)
    start = time.perf_counter()
    while evaluator.timer.warm_calls < calls and (evaluator.timer.warm_calls < 2 or time.perf_counter() - start < seconds):
        evaluator.predict(method, samples, images)
    summary = evaluator.timer.summary()
    keep = ("fps", "per_image_ms_median", "per_image_ms_iqr", "timed_calls", "cold_call_ms")
    return {"batch": len(samples), **{k: summary[k] for k in keep}}


def _maps(method: Any, evaluator: Any, samples: list) -> torch.Tensor:
    from harness.method import call_predict, image_seed

    images = evaluator._tensor(method, samples)
    with torch.no_grad():
        out = call_predict(method, images, [s.category for s in samples], [image_seed(0, s.key) for s in samples])
    return torch.as_tensor(out.anomaly_maps).float().cpu()


def check_method(registry: Any, name: str, workdir: Path, device: torch.device, profile: str, modes: list[str],
                 calls: int, seconds: float, max_batch: int) -> dict:
    """Build and fast-dev fit one method, then time its paper inference in every mode."""
    from harness.engine.inference.acceleration import apply_tf32, prepare_inference
    from harness.engine.support.environment import seed_everything
    from harness.engine.inference.evaluation import Evaluator
    from harness.engine.inference.flops import limit_share
    from harness.engine.support.progress import Progress
    from harness.testing import fit_context

    spec = registry.method(name)
    settings = spec.resolve(profile, {"precision": "fp32"} if "precision" in spec.schema else {})
    seed_everything(0)
    _reset_peak(device)
    start = time.perf_counter()
    method = spec.factory(settings)
    method.to(device)
    _sync(device)
    out: dict[str, Any] = {"method": name, "profile": profile, "build_seconds": round(time.perf_counter() - start, 2),
                           "parameters": sum(method.parameter_count().values()), "modes": {}}
    train, index = _train_set(method, min(max(_batch_sizes(settings).values(), default=8), 64))
    context = fit_context(settings, workdir / name, profile=profile, device=device, fast_dev_run=True,
                          random_weights=True, textures=(), train=train)
    _reset_peak(device)
    start = time.perf_counter()
    method.fit(train, context)
    _sync(device)
    out.update(fit_seconds=round(time.perf_counter() - start, 2), train_peak_memory_gb=_peak_gb(device))
    out["inference_settings"] = paper_inference(method)
    method.eval()
    tests = [s for c in index.categories.values() for s in c.test]
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    reference = None
    for mode in modes:
        precision = "bf16" if mode.startswith("bf16") else "fp32"
        if precision == "bf16" and "precision" not in spec.schema:
            out["modes"][mode] = {"skipped": "the method declares no precision setting"}
            continue
        apply_tf32("on")
        method.settings = method.settings.replace(precision=precision) if "precision" in spec.schema else method.settings
        compile_mode = ("reduce-overhead" if device.type == "cuda" else "default") if "compile" in mode else "none"
        # Cast once (a cast network stays cast: modes run in this order, fp32 first).
        setup = prepare_inference(method, precision, "cast", compile_mode)
        evaluator = Evaluator("synthetic", [], None, device, train._cache, Progress(False), latency_repeats=calls)
        evaluator.fallback = setup.fall_back
        entry: dict[str, Any] = {**setup.record()}
        try:
            _reset_peak(device)
            limit = max_batch if device.type == "cuda" else min(max_batch, method.eval_batch_size)
            batch = evaluator.auto_batch_size(method, tests[0], min(limit, len(tests)))
            entry["auto_batch"] = batch
            entry["batch_1"] = _time_shape(evaluator, method, tests[:1], calls, seconds)
            entry["batch_auto"] = _time_shape(evaluator, method, tests[:batch], calls, seconds)
            with torch.no_grad():
                evaluator.measure_latency(method, tests[0])
            entry["latency_ms"] = evaluator.timer.latency_ms
            entry["flops_per_image"] = evaluator.flops_per_image
            entry["predict_peak_memory_gb"] = _peak_gb(device)
            entry.update(limit_share(entry["flops_per_image"], entry["batch_auto"]["fps"], device_name, precision,
                                     tf32=True))
            maps = _maps(method, evaluator, tests[:2])
            if reference is None and precision == "fp32":
                reference = maps
            elif reference is not None:
                entry["max_abs_diff_vs_fp32"] = float((maps - reference).abs().max())
                entry["map_range_fp32"] = float(reference.max() - reference.min())
            entry["compile_fallback"] = setup.fallback
        except Exception as exc:  # noqa: BLE001 - one mode failing must not hide the others
            entry["error"] = f"{type(exc).__name__}: {exc}"[:500]
        out["modes"][mode] = entry
    del method, context
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
    """The results as a Markdown table: one row per method and mode."""
    lines = [f"GPU check on {device_name} (random weights, paper inference settings; timing protocol of "
             "harness.engine.inference.efficiency)\n",
             "| method | mode | auto batch | FPS at auto batch (IQR ms/img) | FPS batch 1 | latency (ms) | "
             "GFLOP/img | share of limit | max |bf16 - fp32| | peak (GB) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for result in results:
        if "error" in result:
            lines.append(f"| {result['method']} | - | error: {result['error'][:100]} ||||||||")
            continue
        for mode, e in result["modes"].items():
            if "skipped" in e or "error" in e:
                lines.append(f"| {result['method']} | {mode} | {e.get('skipped') or e.get('error', '')[:100]} ||||||||")
                continue
            auto, one = e["batch_auto"], e["batch_1"]
            iqr = auto.get("per_image_ms_iqr") or [None, None]
            share = f"{100 * e['limit_share']:.1f} % of {e['limit_mode']}" if e.get("limit_share") is not None else "-"
            flops = f"{e['flops_per_image'] / 1e9:.2f}" if e.get("flops_per_image") else "-"
            diff = f"{e['max_abs_diff_vs_fp32']:.3g}" if "max_abs_diff_vs_fp32" in e else "-"
            lines.append(f"| {result['method']} | {mode} | {e['auto_batch']} | {auto['fps']:.3g} ({iqr[0]}-{iqr[1]}) | "
                         f"{one['fps']:.3g} | {e['latency_ms']:.1f} | {flops} | {share} | {diff} | "
                         f"{e['predict_peak_memory_gb']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    """Run the check (or its CPU rehearsal, or describe it); write JSON and Markdown."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="all")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--out", default="build/gpu-check")
    parser.add_argument("--dry", action="store_true", help="describe what would be measured (default without CUDA)")
    parser.add_argument("--rehearse", action="store_true",
                        help="run the same code on the CPU with the tiny profiles (what CI runs)")
    parser.add_argument("--calls", type=int, default=5, help="warm calls per shape (default 5)")
    parser.add_argument("--seconds", type=float, default=8.0,
                        help="stop timing a shape after this many seconds (at least 2 warm calls; default 8)")
    parser.add_argument("--max-batch", type=int, default=64, help="largest batch the auto search tries (default 64)")
    parser.add_argument("--dev-run", action="store_true", help="also run harness run --fast-dev-run per method")
    args = parser.parse_args()
    from harness.engine.registry import load_registry

    registry = load_registry()
    methods = list(registry.methods) if args.methods == "all" else [m for m in args.methods.split(",") if m]
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"--modes: unknown {', '.join(unknown)}; use {', '.join(MODES)}")
    out = Path(args.out)
    if args.dry or (not args.rehearse and not torch.cuda.is_available()):
        why = "--dry" if args.dry else "no CUDA device on this machine (--rehearse runs it on the CPU)"
        plan = describe_plan(registry, methods, ["fp32", "bf16"])
        print(f"gpu check, dry run ({why}); on a CUDA machine it measures, per method and mode ({', '.join(modes)}):")
        print(json.dumps(plan, indent=2))
        return 0
    device = torch.device("cpu" if args.rehearse else "cuda")
    profile = "tiny" if args.rehearse else "paper"
    if args.rehearse:
        args.calls, args.seconds, args.max_batch = min(args.calls, 2), min(args.seconds, 2.0), min(args.max_batch, 4)
    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"CPU rehearsal, tiny profiles ({platform.processor() or platform.machine()})")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in methods:
            start = time.perf_counter()
            if profile not in registry.method(name).profiles:
                continue
            try:
                result = check_method(registry, name, Path(tmp), device, profile, modes, args.calls, args.seconds,
                                      args.max_batch)
            except Exception as exc:  # noqa: BLE001 - one method failing must not hide the others
                result = {"method": name, "error": f"{type(exc).__name__}: {exc}",
                          "traceback": traceback.format_exc()[-2000:]}
            if args.dev_run:
                result["dev_run"] = dev_run(name, Path(tmp) / f"dev-{name}", device.type)
            result["seconds"] = round(time.perf_counter() - start, 1)
            results.append(result)
            print(f"{name}: {result.get('seconds')} s", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"device": device_name, "torch": torch.__version__, "cuda": torch.version.cuda if device.type == "cuda" else None,
               "python": platform.python_version(), "profile": profile, "modes": modes, "results": results}
    (out / "gpu_check.json").write_text(json.dumps(payload, indent=2))
    (out / "gpu_check.md").write_text(markdown(results, device_name))
    print(markdown(results, device_name))
    failed = [r["method"] for r in results if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
