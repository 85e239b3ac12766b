"""Peak memory of an exact evaluation the size of a Real-IAD category at native resolution.

A Real-IAD category has about 5,000 images of five views (1024 x 1024 in ``realiad_1024``); its
test set is a few thousand of them. Other codebases keep a list of every map (and mask) of the
category until the metrics are computed, which runs out of memory; the harness streams them
into :class:`harness.metrics.MetricAccumulator`, which keeps one float32 score per defect-free
pixel in sorted runs and moves the runs to disk beyond ``$HARNESS_METRIC_MEMORY_MB``.

The script generates seeded synthetic maps batch by batch (never all at once), feeds them to the
accumulator, computes the seven metrics, and reports in a fresh process per mode:

- ``stream``: the accumulator with the memory budget given (``--memory-mb``; 0 never spills);
- ``list``:   the maps and masks kept in a list and then scored (what the other codebases do);
  only run when asked (``--modes stream,list``), as it needs their full size in memory.

It prints the process peak RSS (``ru_maxrss``), the wall time, the bytes a list of the maps and
masks would hold, and the metrics (equal in both modes). Usage::

    python benchmarks/bench_realiad_memory.py                               # 2500 maps of 1024 x 1024
    python benchmarks/bench_realiad_memory.py --images 40 --size 512        # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np


def _batches(images: int, size: int, batch: int, seed: int):
    """Seeded maps (float32) and masks (bool): a rectangle defect on every third image, scored higher."""
    rng = np.random.default_rng(seed)
    for start in range(0, images, batch):
        n = min(batch, images - start)
        maps = rng.random((n, size, size), dtype=np.float32)
        masks = np.zeros((n, size, size), dtype=bool)
        labels = np.zeros(n, dtype=int)
        for i in range(n):
            if (start + i) % 3 == 0:
                y, x = rng.integers(0, size - size // 8, 2)
                h, w = rng.integers(size // 64, size // 8, 2)
                masks[i, y:y + h, x:x + w] = True
                maps[i, y:y + h, x:x + w] += np.float32(0.3)
                labels[i] = 1
        yield maps, masks, labels


def run_mode(mode: str, images: int, size: int, batch: int, seed: int) -> dict:
    """Evaluate in this process; return the peak RSS, the time and the metrics."""
    from harness.metrics import MetricAccumulator

    started = time.perf_counter()
    accumulator = MetricAccumulator(name="realiad-sized")
    if mode == "stream":
        for maps, masks, labels in _batches(images, size, batch, seed):
            accumulator.update(maps, masks, labels=labels)
    else:
        kept = list(_batches(images, size, batch, seed))
        for maps, masks, labels in kept:
            accumulator.update(maps, masks, labels=labels)
    metrics = accumulator.compute()
    spilled = sum(not isinstance(run, np.ndarray) for run in accumulator._neg_runs)
    return {"mode": mode, "seconds": round(time.perf_counter() - started, 1),
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 3),
            "runs_on_disk": spilled, "runs": len(accumulator._neg_runs),
            "metrics": {k: float(v) for k, v in metrics.items()}}


def main(argv=None) -> int:
    """Run each mode in a fresh process and print a table and the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2500, help="test images of the category (default 2500)")
    parser.add_argument("--size", type=int, default=1024, help="map side in pixels (default 1024)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory-mb", default=os.environ.get("HARNESS_METRIC_MEMORY_MB", "2048"),
                        help="$HARNESS_METRIC_MEMORY_MB for the stream mode (default 2048)")
    parser.add_argument("--modes", default="stream", help="stream and/or list, comma-separated")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_mode(args.child, args.images, args.size, args.batch, args.seed)))
        return 0
    results = []
    list_gb = args.images * args.size * args.size * (4 + 1) / 2 ** 30
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        env = dict(os.environ, HARNESS_METRIC_MEMORY_MB=str(args.memory_mb))
        cmd = [sys.executable, __file__, "--child", mode, "--images", str(args.images), "--size", str(args.size),
               "--batch", str(args.batch), "--seed", str(args.seed)]
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    print(f"{args.images} maps of {args.size}x{args.size} ({args.images * args.size ** 2 / 1e9:.2f} G pixels); "
          f"a list of the float32 maps and bool masks holds {list_gb:.1f} GiB; budget {args.memory_mb} MB")
    for r in results:
        print(f"{r['mode']:>6}: peak RSS {r['peak_rss_gb']:.2f} GiB, {r['seconds']} s, "
              f"runs on disk {r['runs_on_disk']}/{r['runs']}, pixel AUROC {r['metrics']['pixel_auroc']:.6f}, "
              f"AUPRO {r['metrics']['pixel_aupro']:.6f}")
    if len(results) > 1:
        first = results[0]["metrics"]
        same = all(r["metrics"] == first for r in results[1:])
        print("metrics identical across modes:", same)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"images": args.images, "size": args.size, "list_gib": list_gb, "memory_mb": args.memory_mb,
                       "results": results}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
