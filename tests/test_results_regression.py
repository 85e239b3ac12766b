"""A change that moves a number on the synthetic benchmark must show up here.

``results/synthetic/leaderboard.csv`` holds the last committed tables. The main job's records
are taken from ``$HARNESS_FRESH_RESULTS`` (CI's main job of this checkout); without it, the
main job runs in this session (minutes, hence ``slow``), never from records left in ``results/``.
Accuracy columns may differ by at most 0.5 points; timing columns are not compared.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from synthetic_runs import copy_main_job_records, session_main_job

from harness.leaderboard import compare_accuracy

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "results" / "synthetic" / "leaderboard.csv"


def _fresh_leaderboard(tmp_path: Path) -> Path:
    methods = set(pd.read_csv(COMMITTED)["method"])
    results = tmp_path / "results"
    copy_main_job_records(session_main_job(), results, methods)
    subprocess.run([sys.executable, "-m", "harness", "leaderboard", "--results-dir", str(results), "--format", "csv",
                    "--out", str(tmp_path / "board"), "--no-reported"], check=True, capture_output=True, timeout=300)
    return tmp_path / "board" / "leaderboard.csv"


@pytest.mark.slow
def test_synthetic_benchmark_matches_committed_tables(tmp_path):
    assert COMMITTED.is_file(), f"{COMMITTED} is missing: run .ci/run (or harness leaderboard --out results/synthetic)"
    differences = compare_accuracy(_fresh_leaderboard(tmp_path), COMMITTED, tolerance=0.5)
    assert not differences, ("accuracy on the synthetic benchmark moved by more than 0.5 points; if intended, "
                             "regenerate results/synthetic with .ci/run and commit it:\n" + "\n".join(differences))
