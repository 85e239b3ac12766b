"""The record of a method's main-job run on the synthetic set, trained once per test session.

The main job's records are looked for in ``$HARNESS_FRESH_RESULTS`` (CI points it at the folder
its main job wrote), then in the repository's ``results/`` (where the README's first command
writes them); a record found there is used as is. Otherwise ``harness run --methods NAME`` runs
here (minutes: callers are marked ``slow``), once per method and session.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from functools import lru_cache
from pathlib import Path


def _records(folder: Path, method: str) -> list[dict]:
    records = [json.loads(p.read_text()) for p in (folder / "records").rglob("*.json")]
    return [r for r in records if r["job"]["method"] == method and r["job"]["dataset"] == "synthetic"
            and r["job"]["protocol"] == "multiclass" and r["job"]["profile"] == "tiny" and not r["job"].get("overrides")]


REPO_RESULTS = Path(__file__).resolve().parents[1] / "results"


def main_job_results(methods) -> Path | None:
    """The results folder of a finished main job holding records of every one of ``methods``."""
    for folder in [os.environ.get("HARNESS_FRESH_RESULTS"), REPO_RESULTS]:
        if folder and all(_records(Path(folder), m) for m in methods):
            return Path(folder)
    return None


@lru_cache(maxsize=None)
def synthetic_record(method: str) -> dict:
    """The record of ``harness run --methods METHOD`` (tiny profile, multi-class, seed 0)."""
    found = main_job_results([method])
    if found:
        (record,) = _records(found, method)
        return record
    folder = Path(tempfile.mkdtemp(prefix=f"harness-{method}-"))
    done = subprocess.run([sys.executable, "-m", "harness", "run", "--methods", method, "--results-dir", str(folder),
                           "--no-fit-cache", "--no-progress", "--no-leaderboard"],
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout + done.stderr
    (record,) = _records(folder, method)
    return record


def copy_main_job_records(source: Path, dest: Path, methods) -> None:
    """Copy the main-job records of ``methods`` from results folder ``source`` into ``dest``.

    Only the main job's records travel, so a leaderboard built from ``dest`` has exactly the
    rows the committed tables have, whatever else the user ran into ``source``.
    """
    for path in (Path(source) / "records").rglob("*.json"):
        record = json.loads(path.read_text())
        if record["job"]["method"] in methods and record in _records(Path(source), record["job"]["method"]):
            target = Path(dest) / "records" / path.relative_to(Path(source) / "records")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
