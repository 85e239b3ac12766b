"""A change that moves a number on the synthetic benchmark must show up here.

``results/synthetic/leaderboard.csv`` holds the last committed tables. CI runs the main job and
points ``HARNESS_FRESH_RESULTS`` at its results folder; without it, this test runs the benchmark
itself (a few minutes, hence ``slow``). Accuracy columns may differ by at most 0.5 points; timing
columns are not compared (machines differ).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.leaderboard import compare_accuracy

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "results" / "synthetic" / "leaderboard.csv"


def _fresh_leaderboard(tmp_path: Path) -> Path:
    fresh = os.environ.get("HARNESS_FRESH_RESULTS")
    if fresh:
        results = Path(fresh)
    else:
        results = tmp_path / "results"
        subprocess.run([sys.executable, "-m", "harness", "run", "--methods", "all", "--protocol", "multiclass",
                        "--results-dir", str(results), "--cache-dir", str(tmp_path / "cache"), "--no-progress",
                        "--no-leaderboard"], check=True, timeout=1800)
    subprocess.run([sys.executable, "-m", "harness", "leaderboard", "--results-dir", str(results), "--format", "csv",
                    "--out", str(tmp_path / "board"), "--no-reported"], check=True, capture_output=True, timeout=300)
    return tmp_path / "board" / "leaderboard.csv"


@pytest.mark.slow
def test_synthetic_benchmark_matches_committed_tables(tmp_path):
    assert COMMITTED.is_file(), f"{COMMITTED} is missing: run .ci/run (or harness leaderboard --out results/synthetic)"
    differences = compare_accuracy(_fresh_leaderboard(tmp_path), COMMITTED, tolerance=0.5)
    assert not differences, ("accuracy on the synthetic benchmark moved by more than 0.5 points; if intended, "
                             "regenerate results/synthetic with .ci/run and commit it:\n" + "\n".join(differences))
