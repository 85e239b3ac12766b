"""A third-party package written from the documentation (examples/harness-example), installed with pip.

It provides a method, a dataset, a metric and a reporter through one entry point; the harness
lists them, runs them, shows the metric as a leaderboard column, and the conformance kit passes
on the method and fails, with a message, on a copy whose state round trip is broken.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import harness
from cli_helpers import install_package as _install

from harness.results.records import iter_records
from harness.testing import ConformanceError, check_dataset, check_method

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def example_site(tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("example_site")
    _install(REPO / "examples" / "harness-example", site)
    return site


@pytest.fixture
def example_module(example_site, monkeypatch):
    monkeypatch.syspath_prepend(str(example_site))
    for name in [m for m in sys.modules if m.startswith("harness_example")]:
        sys.modules.pop(name)
    import harness_example.plugin

    return harness_example.plugin


def test_the_package_is_listed_with_every_piece(tmp_path, example_site):
    items = json.loads(harness("list", "--format", "json", cwd=tmp_path, pythonpath=example_site).stdout)["items"]
    found = {(i["kind"], i["name"]): i["from"] for i in items}
    for kind, name in (("method", "patchnn"), ("dataset", "checkers"), ("metric", "image_separation")):
        assert found[(kind, name)].startswith("harness-example 0.1.0")


def test_it_runs_its_metric_is_a_column_and_its_reporter_hears_the_job(tmp_path, example_site):
    log = tmp_path / "jobs.jsonl"
    import os

    os.environ["HARNESS_EXAMPLE_LOG"] = str(log)
    try:
        done = harness("run", "--methods", "patchnn", "--datasets", "checkers", "--results-dir", "res",
                       "--cache-dir", "cache", "--no-progress", cwd=tmp_path, pythonpath=example_site)
    finally:
        os.environ.pop("HARNESS_EXAMPLE_LOG")
    (record,) = [r for _, r in iter_records(tmp_path / "res")]
    assert record["status"] == "ok" and record["job"]["profile"] == "tiny"
    assert record["mean"]["image_auroc"] > 0.9 and record["mean"]["image_separation"] > 1
    header = next(line for line in done.stdout.splitlines() if line.startswith("| Method"))
    assert "I-Sep" in header
    (line,) = log.read_text().splitlines()
    assert json.loads(line)["job"]["method"] == "patchnn"


def test_the_conformance_kit_passes_on_the_method_and_the_dataset(tmp_path, example_module):
    (spec,) = example_module.harness_methods()
    check_method(spec, profile="tiny", workdir=tmp_path)
    (dataset,) = example_module.harness_datasets()
    index = check_dataset(dataset)
    assert set(index.categories) == {"cool", "warm"}


def test_the_conformance_kit_fails_on_a_broken_state_round_trip(tmp_path, example_module):
    from dataclasses import replace

    from harness_example.method import PatchNN

    class Forgetful(PatchNN):
        def state_dict(self):
            state = super().state_dict()
            state["categories"] = list(reversed(state["categories"]))  # a subtle loss of state
            return state

    (spec,) = example_module.harness_methods()
    with pytest.raises(ConformanceError, match="load_state_dict\\(state_dict\\(\\)\\) predicts differently"):
        check_method(replace(spec, factory=Forgetful), profile="tiny", workdir=tmp_path)


def test_the_package_s_own_tests_pass(example_site, tmp_path):
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(REPO / "examples" / "harness-example" / "test_example.py")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "PYTHONPATH": str(example_site)})
    assert done.returncode == 0, done.stdout + done.stderr
