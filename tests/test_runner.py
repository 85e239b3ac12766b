"""The runner: records, failures, reruns, interruption, protocols end to end on the toy plugins."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from harness.engine.jobs import Job, expand_jobs
from harness.results.records import iter_records, read_record
from harness.engine.runner import Runner


def _jobs(methods, protocol="multiclass", shots=None, seeds=(0,)):
    return expand_jobs(methods, ["toy"], protocol, shots, list(seeds), {"toy": "tiny"})


def test_multiclass_job_writes_a_complete_record(toy_registry, run_options):
    summary = Runner(toy_registry, run_options).run(_jobs(["meanimage"]))
    assert [o.status for o in summary.outcomes] == ["ok"]
    record = read_record(summary.outcomes[0].record_path)
    assert record["status"] == "ok"
    assert set(record["metrics"]) == {"red", "blue"}
    for values in record["metrics"].values():
        assert set(values) == {"image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro"}
    # A white square on flat colour is trivially found by the mean-image distance.
    assert record["mean"]["image_auroc"] == pytest.approx(1.0)
    assert 0 <= record["mean"]["mad"] <= 1
    eff = record["efficiency"]
    assert eff["fps"] > 0 and eff["latency_ms"] > 0 and eff["n_test_images"] == 16
    assert eff["params_by_network"] == {"stats": 0}  # buffers are state, not parameters
    assert record["method_info"]["categories_seen"] == ["red", "blue"]
    assert record["environment"]["torch"]
    # What decides bit-for-bit agreement with another run (harness.engine.support.environment.NUMERICS_KEYS).
    assert record["environment"]["cpu_model"] and record["environment"]["cpu_capability"]
    if Path("/proc/cpuinfo").is_file():
        assert record["environment"]["cpu_signature"]


def test_fit_never_sees_test_images(toy_registry, run_options):
    runner = Runner(toy_registry, run_options)
    summary = runner.run(_jobs(["meanimage"]))
    record = summary.outcomes[0].record
    assert record.method_info["n_train"] == 12


def test_failures_are_recorded_and_the_run_goes_on(toy_registry, run_options):
    summary = Runner(toy_registry, run_options).run(_jobs(["raising", "nanmaps", "badshape", "meanimage"]))
    status = {o.job.method: o for o in summary.outcomes}
    assert status["meanimage"].status == "ok"
    for name, text in [("raising", "boom in predict"), ("nanmaps", "NaN"), ("badshape", "shape")]:
        outcome = status[name]
        assert outcome.status == "failed"
        assert text in outcome.message
        record = read_record(outcome.record_path)
        assert record["status"] == "failed" and record["error"]["phase"] == "predict"
        assert text in record["error"]["message"]
    assert "red/test" in status["nanmaps"].message  # the offending image is named
    assert "3 failed" in summary.describe()


def test_rerun_skips_finished_jobs_and_reuses_cached_fits(toy_registry, run_options):
    jobs = _jobs(["meanimage"], seeds=(0, 1))
    Runner(toy_registry, run_options).run(jobs)
    second = Runner(toy_registry, run_options).run(jobs)
    assert [o.status for o in second.outcomes] == ["skipped", "skipped"]
    # Without the record but with the cached fit, the job predicts again without fitting.
    jobs[0].record_path(run_options.results_dir).unlink()
    third = Runner(toy_registry, run_options).run(jobs)
    assert [o.status for o in third.outcomes] == ["ok", "skipped"]
    assert "fit_restored_from" in third.outcomes[0].record.method_info


def test_force_redoes_finished_jobs(toy_registry, run_options):
    jobs = _jobs(["meanimage"])
    Runner(toy_registry, run_options).run(jobs)
    run_options.force = True
    again = Runner(toy_registry, run_options).run(jobs)
    assert [o.status for o in again.outcomes] == ["ok"]
    assert "fit_restored_from" not in again.outcomes[0].record.method_info


def test_interrupt_keeps_finished_records(toy_registry, run_options, monkeypatch):
    jobs = _jobs(["meanimage"], seeds=(0, 1, 2))
    runner = Runner(toy_registry, run_options)
    original = runner.job_runner.run_job
    calls = []

    def interrupt_second(planned):
        calls.append(planned)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(planned)

    monkeypatch.setattr(runner.job_runner, "run_job", interrupt_second)
    summary = runner.run(jobs)
    assert summary.interrupted
    assert [o.status for o in summary.outcomes] == ["ok"]
    assert len(list(iter_records(run_options.results_dir))) == 1
    resumed = Runner(toy_registry, run_options).run(jobs)
    assert [o.status for o in resumed.outcomes] == ["skipped", "ok", "ok"]


def test_oneclass_fits_one_model_per_category(toy_registry, run_options):
    summary = Runner(toy_registry, run_options).run(_jobs(["meanimage"], protocol="oneclass"))
    record = summary.outcomes[0].record
    assert record.status == "ok"
    assert record.method_info["n_train"] == 6  # the last fit saw one category only
    assert set(record.metrics) == {"red", "blue"}


def test_fewshot_jobs_use_k_images_per_category(toy_registry, run_options):
    summary = Runner(toy_registry, run_options).run(_jobs(["meanimage"], protocol="fewshot", shots=[1, 2], seeds=(0, 1)))
    assert len(summary.outcomes) == 4
    n_train = {(o.job.shots, o.job.seed): o.record.method_info["n_train"] for o in summary.outcomes}
    assert n_train == {(1, 0): 2, (1, 1): 2, (2, 0): 4, (2, 1): 4}
    paths = {o.record_path.parent.parent.name for o in summary.outcomes}
    assert paths == {"fewshot-1shot", "fewshot-2shot"}


def test_records_are_strict_json(toy_registry, run_options):
    summary = Runner(toy_registry, run_options).run(_jobs(["nanmaps"]))
    text = summary.outcomes[0].record_path.read_text()
    json.loads(text)  # no NaN literals
    assert "NaN" not in text.replace("NaN or inf", "")


def test_job_keys_differ_by_overrides():
    a = Job("m", "d", "multiclass", None, 0, "tiny")
    b = Job("m", "d", "multiclass", None, 0, "tiny", (("epochs", 3),))
    assert a.relative_path() != b.relative_path()
    assert np.all([a.relative_path().suffix == ".json"])
