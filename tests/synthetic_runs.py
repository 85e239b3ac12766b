"""The record of a method's main-job run on the synthetic set, trained once per test session.

CI runs the main job first and points ``HARNESS_FRESH_RESULTS`` at its results folder; a record
found there is used as is. Otherwise ``harness run --methods NAME`` runs here (minutes: callers
are marked ``slow``), once per method and session.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from functools import lru_cache
from pathlib import Path


def _records(folder: Path, method: str) -> list[dict]:
    records = [json.loads(p.read_text()) for p in (folder / "records").rglob("*.json")]
    return [r for r in records if r["job"]["method"] == method and r["job"]["dataset"] == "synthetic"
            and r["job"]["protocol"] == "multiclass" and r["job"]["profile"] == "tiny" and not r["job"].get("overrides")]


@lru_cache(maxsize=None)
def synthetic_record(method: str) -> dict:
    """The record of ``harness run --methods METHOD`` (tiny profile, multi-class, seed 0)."""
    fresh = os.environ.get("HARNESS_FRESH_RESULTS")
    if fresh and _records(Path(fresh), method):
        (record,) = _records(Path(fresh), method)
        return record
    folder = Path(tempfile.mkdtemp(prefix=f"harness-{method}-"))
    done = subprocess.run([sys.executable, "-m", "harness", "run", "--methods", method, "--results-dir", str(folder),
                           "--no-fit-cache", "--no-progress", "--no-leaderboard"],
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout + done.stderr
    (record,) = _records(folder, method)
    return record
