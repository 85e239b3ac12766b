"""Jobs whose fit waits: in process, one after another, against a local Ray instance with fractional CPUs.

The issue "Scale out on Ray" asks that jobs which spend their fit waiting (on I/O, a remote
service, a sleeping GPU queue: not computing) run at least 2x faster on a local Ray cluster with
fractional CPUs than in process, with identical metrics, and that a rerun skips them.

This script installs a small plugin (a method ``waitfit`` whose fit sleeps ``fit_seconds`` and
then fits per-category means of a seeded subset of the training images, and a dataset
``waiting`` made in memory) through an entry point, as every Ray worker finds plugins, and times
three runs of the real command line in fresh processes:

1. ``harness run ... --seeds 0,...,N-1`` (in process);
2. the same with ``--executor ray --job-cpus 0.25`` (starts a local Ray instance, so its start-up
   and the workers' first imports are in the time);
3. that Ray command again, which must skip every job and leave every record as it was.

It compares the metrics of every job of runs 1 and 2 and prints a Markdown table and the commands.
With 0.25 CPUs per job, a machine with C CPUs runs 4C jobs at once. The Ray run pays a fixed cost
that the in-process run does not: Ray's start (5-15 s here) and, in every new worker process, the
first import of torch, the harness and the job's plugins and metrics (several seconds each when 8
start at once on 2 busy cores, up to 1 GB of memory each). The longer the fits wait, the closer the
speed-up comes to the number of jobs Ray runs at once; run it alone on a shared machine.

Run: ``python benchmarks/bench_ray.py [--jobs 16] [--fit-seconds 15] [--job-cpus 0.25] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

HERE = Path(__file__).resolve().parent
SIZE = 32
CATEGORIES = ("plain", "stripes")


# -- the plugin the workers load (imported through the entry point ``benchray = bench_ray:plugin``) ----------
def _picture(category: str, number: int, defect: bool):
    """A seeded 32x32 picture of ``category``; a defect is a faintly brighter disc."""
    import numpy as np

    rng = np.random.default_rng([CATEGORIES.index(category), number, int(defect)])
    base = np.full((SIZE, SIZE, 3), 90.0) if category == "plain" else np.tile(
        (np.arange(SIZE)[:, None] % 8 < 4)[..., None] * 120.0 + 40.0, (1, SIZE, 3))
    image = base + rng.normal(0, 20, (SIZE, SIZE, 3))
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    if defect:
        # Faint against the noise, so that the metrics differ from seed to seed (not all 1.0).
        cy, cx = rng.integers(6, SIZE - 6, 2)
        yy, xx = np.mgrid[:SIZE, :SIZE]
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= int(rng.integers(9, 25))
        image[mask] += 30.0
    return np.clip(image, 0, 255).astype(np.uint8), mask


def load_waiting(root: Any = None, categories: Sequence[str] | None = None):
    """Two categories, 8 training images and 6 test images (3 with a defect) each, made in memory."""
    from harness import CategoryData, DatasetIndex, Sample

    found = {}
    for category in CATEGORIES:
        if categories and category not in categories:
            continue
        train = [Sample(f"{category}/train/good/{i:03d}", category, "train", 0, "good",
                        image=lambda c=category, i=i: _picture(c, i, False)[0]) for i in range(8)]
        test = []
        for i in range(6):
            defect = i >= 3
            kind = "disc" if defect else "good"
            test.append(Sample(f"{category}/test/{kind}/{i:03d}", category, "test", int(defect), kind,
                               image=lambda c=category, i=i, d=defect: _picture(c, 100 + i, d)[0],
                               mask=(lambda c=category, i=i: _picture(c, 100 + i, True)[1]) if defect else None))
        found[category] = CategoryData(category, train, test)
    return DatasetIndex("waiting", found)


def _build(settings: Mapping[str, Any]):
    return WaitFit(settings)


try:  # the driver of this script does not need the harness; the workers and the runs do
    import torch

    from harness import Method, Prediction

    class WaitFit(Method):
        """Waits ``fit_seconds`` in fit, then keeps the mean of a seeded quarter of each category's images."""

        def __init__(self, settings: Mapping[str, Any]) -> None:
            super().__init__(settings)
            self.model = torch.nn.Module()
            self.model.register_buffer("means", torch.zeros(0, 3, SIZE, SIZE))
            self.categories: list[str] = []

        def networks(self):
            """The means, as buffers."""
            return {"model": self.model}

        def fit(self, train, context) -> None:
            """Sleep (the waiting), then the means of a subset drawn by the job's seed (so seeds differ)."""
            time.sleep(self.settings.fit_seconds)
            generator = torch.Generator().manual_seed(int(context.seed))
            groups = train.by_category()
            self.categories = list(groups)
            means = []
            for indices in groups.values():
                chosen = torch.randperm(len(indices), generator=generator)[: max(1, len(indices) // 4)]
                means.append(torch.stack([train[indices[int(k)]][0] for k in chosen]).mean(0))
            self.model.means = torch.stack(means).to(self.device)

        def predict(self, images, categories) -> Prediction:
            """Distance to the category's mean; image score = the map's maximum."""
            idx = torch.tensor([self.categories.index(c) for c in categories], device=images.device)
            maps = (images - self.model.means[idx]).abs().mean(1)
            return Prediction(maps, maps.flatten(1).amax(1))

        def state_dict(self):
            """Means and category order."""
            return {"means": self.model.means, "categories": self.categories}

        def load_state_dict(self, state) -> None:
            """Restore :meth:`state_dict`."""
            self.model.means = state["means"]
            self.categories = list(state["categories"])

    from harness import DatasetSpec, MethodSpec, PaperRef, Resources, Setting, hookimpl
    from harness.settings import eval_batch_size, image_size

    class BenchPlugin:
        """The ``waiting`` dataset and the ``waitfit`` method."""

        @hookimpl
        def harness_datasets(self):
            """The in-memory dataset."""
            return [DatasetSpec(name="waiting", categories=CATEGORIES, loader=load_waiting, needs_root=False,
                                description="benchmarks/bench_ray.py: two tiny in-memory categories")]

        @hookimpl
        def harness_methods(self):
            """The method whose fit waits."""
            settings = (image_size(SIZE), eval_batch_size(8),
                        Setting("fit_seconds", float, 8.0, "seconds the fit waits before it computes", minimum=0))
            return [MethodSpec(name="waitfit", paper=PaperRef(title="A fit that waits", venue="benchmark"),
                               protocols=("multiclass",), profiles={"tiny": {}, "paper": {}}, factory=_build,
                               settings=settings, resources={"tiny": Resources(cpus=1), "paper": Resources(cpus=1)})]

    plugin = BenchPlugin()
except ImportError:  # pragma: no cover - only when the harness is not installed
    plugin = None


# -- the benchmark -------------------------------------------------------------------------------------
def install_entry_point(site: Path) -> None:
    """Metadata of a distribution ``harness-benchray`` with the entry point ``benchray = bench_ray:plugin``."""
    info = site / "harness_benchray-0.0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: harness-benchray\nVersion: 0.0.1\n")
    (info / "entry_points.txt").write_text("[harness]\nbenchray = bench_ray:plugin\n")


def timed(command: list[str], cwd: Path, env: Mapping[str, str]) -> tuple[float, subprocess.CompletedProcess]:
    """Run ``command``; its wall time and result (raises with its stderr when it fails)."""
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=dict(env), capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited {done.returncode}:\n{done.stderr[-4000:]}")
    return seconds, done


def records(results: Path) -> dict[str, dict[str, Any]]:
    """Every record under ``results/records`` by relative path."""
    root = results / "records"
    return {str(p.relative_to(root)): json.loads(p.read_text()) for p in sorted(root.rglob("*.json"))}


def main() -> None:
    """Time the three runs and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=16, help="jobs (seeds 0..N-1)")
    parser.add_argument("--fit-seconds", type=float, default=15.0, help="seconds each fit waits")
    parser.add_argument("--job-cpus", type=float, default=0.25, help="CPUs per job on Ray")
    parser.add_argument("--json", default=None, help="also write the figures here")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (printed)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    site = work / "site"
    install_entry_point(site)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(HERE)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    seeds = ",".join(str(s) for s in range(args.jobs))
    common = ["--methods", "waitfit", "--datasets", "waiting", "--profile", "tiny", "--seeds", seeds,
              "--set", f"fit_seconds={args.fit_seconds:g}", "--device", "cpu", "--eval-size", "32", "--no-progress",
              "--no-leaderboard"]
    harness = [sys.executable, "-m", "harness", "run"]
    inprocess = harness + common + ["--results-dir", "inprocess/results", "--cache-dir", "inprocess/cache"]
    on_ray = harness + common + ["--executor", "ray", "--job-cpus", f"{args.job_cpus:g}", "--results-dir",
                                 "ray/results", "--cache-dir", "ray/cache"]
    try:
        t_inprocess, _ = timed(inprocess, work, env)
        t_ray, _ = timed(on_ray, work, env)
        before = {k: json.dumps(v, sort_keys=True) for k, v in records(work / "ray" / "results").items()}
        t_rerun, rerun = timed(on_ray, work, env)
        after = {k: json.dumps(v, sort_keys=True) for k, v in records(work / "ray" / "results").items()}
        ours, theirs = records(work / "inprocess" / "results"), records(work / "ray" / "results")
        same = sorted(ours) == sorted(theirs) and all(
            ours[k]["status"] == theirs[k]["status"] == "ok" and ours[k]["metrics"] == theirs[k]["metrics"]
            for k in ours)
        distinct = len({json.dumps(r["mean"], sort_keys=True) for r in ours.values()})
        skipped = f"0 job(s) finished, {args.jobs} skipped" in rerun.stderr and before == after
    finally:
        if args.keep:
            print(f"scratch folder: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)

    figures = {"jobs": args.jobs, "fit_seconds": args.fit_seconds, "job_cpus": args.job_cpus,
               "cpus": os.cpu_count(), "inprocess_seconds": round(t_inprocess, 2), "ray_seconds": round(t_ray, 2),
               "speedup": round(t_inprocess / t_ray, 2), "ray_rerun_seconds": round(t_rerun, 2),
               "identical_metrics": same, "distinct_mean_metrics": distinct, "rerun_skipped_all": skipped}
    print(f"{args.jobs} jobs, each fit waits {args.fit_seconds:g} s; {os.cpu_count()} CPU(s); wall times of the whole "
          "command (start-up, Ray's start and the workers' imports included)\n")
    print("| run | wall s | vs in process |\n|---|---:|---:|")
    print(f"| in process | {t_inprocess:.1f} | 1.00x |")
    print(f"| Ray, local instance, --job-cpus {args.job_cpus:g} | {t_ray:.1f} | {t_inprocess / t_ray:.2f}x faster |")
    print(f"| Ray, rerun (skips every job) | {t_rerun:.1f} | |")
    print(f"\nidentical metrics in process and on Ray: {'yes' if same else 'NO'} ({distinct} distinct mean rows over "
          f"{args.jobs} seeds); rerun skipped every job and left every record unchanged: {'yes' if skipped else 'NO'}")
    print("\ncommands (in a scratch folder, with the plugin on PYTHONPATH):\n")
    print("    harness " + " ".join(inprocess[3:]))
    print("    harness " + " ".join(on_ray[3:]) + "   # twice")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    if not (same and skipped):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
