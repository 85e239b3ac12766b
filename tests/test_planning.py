"""Planning: every usage error ends ``harness run`` with exit 2 before anything is written."""

from __future__ import annotations

import os

import pytest

from harness.cli import main
from harness.errors import UsageError
from harness.engine.jobs import expand_jobs
from harness.engine.planning import Planner


def _run(tmp_path, *args):
    results, cache = tmp_path / "results", tmp_path / "cache"
    code = main(["run", *args, "--results-dir", str(results), "--cache-dir", str(cache), "--no-progress"])
    return code, results, cache


def _nothing_written(tmp_path):
    return sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))


@pytest.mark.parametrize("args, message", [
    (["--methods", "patchcore", "--set", "nosuch=1"], "nosuch"),
    (["--methods", "patchcore", "--set", "coreset_ratio=lots"], "coreset_ratio"),
    (["--methods", "patchcore", "--set", "coreset_ratio=2"], "maximum"),
    (["--methods", "patchcore", "--profile", "huge"], "no profile 'huge'"),
    (["--methods", "patchcore", "--protocol", "fewshot", "--shots", "500"], "more than"),
    (["--methods", "anomalysd", "--protocol", "multiclass"], "does not support"),
    (["--methods", "nosuchmethod"], "unknown method"),
    (["--methods", "patchcore", "--datasets", "nosuchdata"], "unknown dataset"),
    (["--methods", "patchcore", "--seeds", "a,b"], "--seeds"),
    (["--methods", "patchcore", "--eval-size", "-3"], "--eval-size"),
])
def test_usage_errors_exit_2_and_write_nothing(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    code, results, cache = _run(tmp_path, *args)
    assert code == 2
    assert message in capsys.readouterr().err
    assert not results.exists() and not cache.exists(), _nothing_written(tmp_path)


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, results, cache = _run(tmp_path, "--methods", "patchcore", "--seeds", "0,1", "--set", "coreset_ratio=0.05",
                                "--dry-run")
    out = capsys.readouterr().out
    assert code == 0, out
    assert "plan: 2 job(s), 2 to run" in out and "coreset_ratio=0.05" in out and "preflight: 0 problem(s)" in out
    assert not results.exists() and not cache.exists(), _nothing_written(tmp_path)


def test_a_setting_known_to_only_some_methods_applies_to_those(toy_registry, run_options):
    planner = Planner(toy_registry, run_options)
    jobs = expand_jobs(["meanimage"], ["toy"], "multiclass", None, [0], {"toy": "tiny"},
                       method_overrides={"meanimage": {"image_size": 16}})
    plan = planner.plan(jobs)
    assert plan.jobs[0].settings.image_size == 16 and plan.jobs[0].differences == {"image_size": 16}
    assert plan.jobs[0].status == "pending" and plan.jobs[0].eval_size == 32


def test_plan_rejects_a_protocol_the_method_does_not_support(toy_registry, run_options):
    from harness.engine.jobs import Job

    with pytest.raises(UsageError, match="does not support"):
        Planner(toy_registry, run_options).plan_job(Job("meanimage", "toy", "nonsense", None, 0, "tiny"))


def test_fast_dev_run_plans_a_few_images_per_category(toy_registry, run_options):
    jobs = expand_jobs(["meanimage"], ["toy"], "multiclass", None, [0], {"toy": "tiny"}, dev_run=True)
    planned = Planner(toy_registry, run_options).plan(jobs).jobs[0]
    assert len(planned.units[0].train) == 8  # 4 per category
    assert all(len(t) == 4 and {s.label for s in t} == {0, 1} for t in planned.tests.values())
    assert planned.record_path.name.endswith("-devrun.json")


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_every_usage_error_is_one_line_without_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _run(tmp_path, "--methods", "patchcore", "--set", "nosuch=1")
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "Traceback" not in err and len(err.splitlines()) == 1


def test_fit_bytes_counts_the_finished_state_and_bounds_the_checkpoints():
    from types import SimpleNamespace

    import torch

    from harness.engine.preflight import CHECKPOINTS_KEPT, OPTIMISER_MOMENTS, fit_bytes

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(10, 5)  # 55 parameters
            self.register_buffer("running", torch.zeros(3))

    spec = SimpleNamespace(factory=lambda settings: SimpleNamespace(networks=lambda: {"net": Net()}))
    state, bound = fit_bytes(SimpleNamespace(spec=spec, settings={}))
    assert state == (55 + 3) * 4
    assert bound == state + CHECKPOINTS_KEPT * (state + OPTIMISER_MOMENTS * 55 * 4)


def test_no_room_for_the_finished_fit_is_a_problem_naming_the_cache_dir(tmp_path, capsys, monkeypatch):
    import harness.engine.support.fsutil

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(harness.engine.support.fsutil, "free_bytes", lambda folder: 1)
    code, results, cache = _run(tmp_path, "--methods", "patchcore")
    err = capsys.readouterr().err
    assert code == 2
    assert f"cache dir {cache} has 0.00 GiB free" in err and "finished fit alone needs" in err
    assert not results.exists() and not cache.exists(), _nothing_written(tmp_path)


def test_room_for_the_fit_but_maybe_not_its_checkpoints_is_a_note(tmp_path, capsys, monkeypatch):
    import harness.engine.support.fsutil
    import harness.engine.preflight

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(harness.engine.support.fsutil, "free_bytes", lambda folder: 2**30)
    monkeypatch.setattr(harness.engine.preflight, "fit_bytes", lambda planned: (2**20, 2**40))
    code, results, cache = _run(tmp_path, "--methods", "patchcore", "--dry-run")
    out = capsys.readouterr().out
    assert code == 0, out
    assert "preflight: 0 problem(s)" in out and "a fit needs 0.00 GiB, with its checkpoints at most 1024.00 GiB" in out
    assert f"note: cache dir {cache} has 1.00 GiB free; one job's checkpoints may need up to 1024.00 GiB" in out
