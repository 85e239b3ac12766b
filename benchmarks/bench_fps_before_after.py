"""CPU speed of ``predict`` before and after a change, in one run on the same machine.

Checks out a reference revision (default: the commit issue 23's work started from) into a
temporary ``git worktree``, then times, in a fresh interpreter for each tree, ``predict`` of the
same method (seeded random weights, tiny profile, no fit: only inference is compared) on the same
images: a warm-up call, then ``--calls`` timed calls; median seconds per call. Both trees'
plugins are put first on ``PYTHONPATH`` so each side imports its own code.

Run: ``python benchmarks/bench_fps_before_after.py [--ref af53ed1] [--method diffusionad] [--calls 7]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
START = "af53ed1"

#: Runs inside each tree: prints the median predict seconds as JSON.
PROBE = r"""
import json, statistics, sys, time, torch
torch.manual_seed(0)
torch.set_num_threads(int(sys.argv[4]))
# The 0.2 path: it names the registry in both trees (the newer one keeps it through harness._compat).
from harness.registry import load_registry
spec = load_registry().method(sys.argv[1])
method = spec.factory(spec.resolve("tiny", {})).eval()
size = method.input_size
images = torch.rand(int(sys.argv[3]), 3, *size, generator=torch.Generator().manual_seed(1))
cats = ["carpet"] * images.shape[0]
times = []
with torch.no_grad():
    method.predict(images, cats)
    for _ in range(int(sys.argv[2])):
        start = time.perf_counter(); method.predict(images, cats); times.append(time.perf_counter() - start)
print(json.dumps({"median_s": statistics.median(times), "min_s": min(times)}))
"""


def tree_paths(root: Path) -> str:
    """``PYTHONPATH`` for a checkout: its root and every plugin and dataset package folder."""
    folders = [root] + sorted(p for p in (root / "plugins").iterdir() if p.is_dir()) + \
        sorted(p for p in (root / "datasets").iterdir() if p.is_dir())
    return os.pathsep.join(str(f) for f in folders)


def probe(root: Path, method: str, calls: int, batch: int, threads: int) -> dict:
    """Time ``method`` with the code of ``root``."""
    env = {**os.environ, "PYTHONPATH": tree_paths(root)}
    done = subprocess.run([sys.executable, "-c", PROBE, method, str(calls), str(batch), str(threads)], env=env,
                          capture_output=True, text=True, cwd=root)
    if done.returncode:
        raise SystemExit(f"{root}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    """Time before and after, alternating, and print both."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", default=START)
    parser.add_argument("--method", default="diffusionad")
    parser.add_argument("--calls", type=int, default=7)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2, help="before/after pairs, alternated")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ref = Path(tmp) / "ref"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(ref), args.ref], check=True,
                       capture_output=True)
        try:
            rows = []
            for _ in range(args.rounds):
                rows.append({"before": probe(ref, args.method, args.calls, args.batch, args.threads),
                             "after": probe(REPO, args.method, args.calls, args.batch, args.threads)})
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(ref)], capture_output=True)
    before = min(r["before"]["median_s"] for r in rows)
    after = min(r["after"]["median_s"] for r in rows)
    print(json.dumps({"method": args.method, "batch": args.batch, "ref": args.ref, "rounds": rows,
                      "before_s": before, "after_s": after, "after_over_before": after / before}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
