"""The main job's records on the synthetic set, produced in this test session.

No test reads records it did not produce: records lying under the repository's ``results/``
may come from older code. The only folder trusted is ``$HARNESS_FRESH_RESULTS``, which CI sets
to the folder its main job wrote minutes before, on this checkout. Without it, the main job
(``harness run --methods all --protocol multiclass``) runs here, once per session, into a
temporary folder (minutes: callers are marked ``slow``).
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


def main_job_results(methods) -> Path | None:
    """CI's fresh main-job folder when it holds records of every one of ``methods``."""
    folder = os.environ.get("HARNESS_FRESH_RESULTS")
    if folder and all(_records(Path(folder), m) for m in methods):
        return Path(folder)
    return None


@lru_cache(maxsize=None)
def session_main_job() -> Path:
    """The results folder of the main job: CI's fresh one, else one run now (once per session)."""
    folder = os.environ.get("HARNESS_FRESH_RESULTS")
    if folder and (Path(folder) / "records").is_dir():
        return Path(folder)
    fresh = Path(tempfile.mkdtemp(prefix="harness-main-job-"))
    done = subprocess.run([sys.executable, "-m", "harness", "run", "--methods", "all", "--protocol", "multiclass",
                           "--results-dir", str(fresh / "results"), "--cache-dir", str(fresh / "cache"),
                           "--no-progress", "--no-leaderboard", "--save-maps", "none"],
                          capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return fresh / "results"


def synthetic_record(method: str) -> dict:
    """The record of ``method`` in the main job (tiny profile, multi-class, seed 0)."""
    (record,) = _records(session_main_job(), method)
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
