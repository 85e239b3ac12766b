"""A change that moves a number on the synthetic benchmark must show up here.

``results/synthetic/leaderboard.csv`` holds the last committed tables and
``results/synthetic/environments.json`` where they were computed. The main job's records are
taken from ``$HARNESS_FRESH_RESULTS`` (CI's main job of this checkout); without it, the main job
runs in this session (minutes, hence ``slow``), never from records left in ``results/``.

In the committed tables' numerics environment (torch, device, CPU model and kernel family,
threads) the run is bit-for-bit repeatable, so every accuracy cell may differ by at most
:data:`SAME_MACHINE_TOLERANCE` points. Elsewhere it is not: training a network is chaotic, and
another CPU kernel family alone moved DiffusionAD's tiny image AUROC from 72.1 (the committed
machine) to 69.8 (AVX-512 kernels) and 76.2 (the same CPU with AVX2 kernels forced). Then only
the means over categories are compared, at :data:`OTHER_MACHINE_TOLERANCE` points: enough to
pass that spread, not enough to hide a method that stopped learning (the learning floors in
``test_tiny_profiles_learn.py`` hold on every machine). Timing columns are never compared.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pandas as pd
import pytest

from synthetic_runs import copy_main_job_records, session_main_job

from harness.results.leaderboard import ENVIRONMENTS_FILE, compare_accuracy, same_numerics

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "results" / "synthetic" / "leaderboard.csv"
COMMITTED_ENVIRONMENTS = COMMITTED.with_name(ENVIRONMENTS_FILE)
SAME_MACHINE_TOLERANCE = 0.5
OTHER_MACHINE_TOLERANCE = 8.0


def _fresh_leaderboard(tmp_path: Path) -> Path:
    methods = set(pd.read_csv(COMMITTED)["method"])
    results = tmp_path / "results"
    copy_main_job_records(session_main_job(), results, methods)
    subprocess.run([sys.executable, "-m", "harness", "leaderboard", "--results-dir", str(results), "--format", "csv",
                    "--out", str(tmp_path / "board"), "--no-reported"], check=True, capture_output=True, timeout=300)
    return tmp_path / "board" / "leaderboard.csv"


@pytest.mark.slow
def test_synthetic_benchmark_matches_committed_tables(tmp_path):
    for path in (COMMITTED, COMMITTED_ENVIRONMENTS):
        assert path.is_file(), f"{path} is missing: run .ci/run (or harness leaderboard --out results/synthetic)"
    fresh = _fresh_leaderboard(tmp_path)
    committed_envs = json.loads(COMMITTED_ENVIRONMENTS.read_text())
    fresh_envs = json.loads(fresh.with_name(ENVIRONMENTS_FILE).read_text())
    regenerate = "if intended, regenerate results/synthetic with .ci/run and commit it"
    if same_numerics(fresh_envs, committed_envs):
        differences = compare_accuracy(fresh, COMMITTED, tolerance=SAME_MACHINE_TOLERANCE)
        assert not differences, (f"accuracy on the synthetic benchmark moved by more than {SAME_MACHINE_TOLERANCE} "
                                 f"points on the machine the tables come from; {regenerate}:\n" + "\n".join(differences))
        return
    warnings.warn(f"this machine's numerics environment {fresh_envs} is not the committed tables' {committed_envs}: "
                  f"comparing means over categories at {OTHER_MACHINE_TOLERANCE} points")
    differences = compare_accuracy(fresh, COMMITTED, tolerance=OTHER_MACHINE_TOLERANCE, categories=("mean",))
    assert not differences, (f"mean accuracy on the synthetic benchmark moved by more than {OTHER_MACHINE_TOLERANCE} "
                             f"points (another machine, {fresh_envs}); {regenerate}:\n" + "\n".join(differences))
