"""The MLflow reporter plugin (plugins/mlflow) against a local file store."""

from __future__ import annotations

import json
import sys

import pytest

import harness_mlflow.plugin as mlflow_plugin
from toy_plugins import ToyPlugin

from harness.engine.jobs import Job
from harness.engine.registry import load_registry
from harness.results.report.maps import read_sample
from harness.engine.runner import Runner


def _registry():
    return load_registry(entry_points=[], extra_plugins=[("toy", ToyPlugin()), ("mlflow", mlflow_plugin)])


@pytest.fixture
def no_tracker_env(monkeypatch):
    for name in (mlflow_plugin.URI_VARIABLE, mlflow_plugin.TRACKER_VARIABLE, mlflow_plugin.EXPERIMENT_VARIABLE):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_the_plugin_is_idle_unless_asked_for(no_tracker_env, run_options, tmp_path):
    assert not mlflow_plugin.requested()
    no_tracker_env.chdir(tmp_path)  # MLflow's default store would be ./mlruns
    registry = _registry()
    summary = Runner(registry, run_options).run([Job("meanimage", "toy", "multiclass", None, 0, "tiny")])
    assert summary.exit_code == 0
    assert not [p for p in registry.problems if p.kind == "reporter"]
    assert not (tmp_path / "mlruns").exists()
    no_tracker_env.setenv(mlflow_plugin.TRACKER_VARIABLE, "wandb, MLflow")
    assert mlflow_plugin.requested()


def test_missing_mlflow_is_one_clear_problem(no_tracker_env, run_options, tmp_path):
    no_tracker_env.setenv(mlflow_plugin.URI_VARIABLE, (tmp_path / "mlruns").as_uri())
    no_tracker_env.setitem(sys.modules, "mlflow.tracking", None)  # import mlflow.tracking now fails
    registry = _registry()
    summary = Runner(registry, run_options).run([Job("meanimage", "toy", "multiclass", None, s, "tiny")
                                                 for s in (0, 1)])
    assert summary.exit_code == 0  # a reporter never stops a run
    problems = [p for p in registry.problems if p.kind == "reporter"]
    assert len(problems) == 1 and problems[0].plugin == "mlflow"
    assert "pip install 'harness-ad[mlflow]'" in problems[0].message


@pytest.fixture
def store(no_tracker_env, tmp_path):
    pytest.importorskip("mlflow", reason="mlflow is not installed (pip install 'harness-ad[mlflow]')")
    uri = (tmp_path / "mlruns").as_uri()
    no_tracker_env.setenv(mlflow_plugin.URI_VARIABLE, uri)
    no_tracker_env.setenv(mlflow_plugin.EXPERIMENT_VARIABLE, "harness-test")
    no_tracker_env.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses a folder store without it
    return uri


def _runs(uri):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("harness-test")
    return client, client.search_runs([experiment.experiment_id], max_results=100)


def test_each_job_is_a_run_with_params_metrics_and_artifacts(store, run_options, tmp_path):
    registry = _registry()
    jobs = [Job("meanimage", "toy", "multiclass", None, 0, "tiny"), Job("raising", "toy", "multiclass", None, 0, "tiny")]
    summary = Runner(registry, run_options).run(jobs)
    assert summary.exit_code == 1
    assert not [p for p in registry.problems if p.kind == "reporter"], registry.problems
    client, runs = _runs(store)
    by_method = {run.data.params["job.method"]: run for run in runs}
    assert set(by_method) == {"meanimage", "raising"}

    ok = by_method["meanimage"]
    outcome = summary.outcomes[0]
    record = outcome.record
    assert ok.info.status == "FINISHED" and ok.info.run_name == jobs[0].label
    assert ok.data.params["job.seed"] == "0" and ok.data.params["setting.image_size"] == "32"
    assert ok.data.params["run.weights"] == "pretrained"
    assert ok.data.metrics["mean/image_auroc"] == pytest.approx(record.mean["image_auroc"])
    assert ok.data.metrics["mean/mad"] == pytest.approx(record.mean["mad"])
    for category, values in record.metrics.items():
        for metric, value in values.items():
            assert ok.data.metrics[f"{category}/{metric}"] == pytest.approx(value)
    assert ok.data.metrics["efficiency/fps"] == pytest.approx(record.efficiency["fps"])
    assert "efficiency/params" in ok.data.metrics
    assert ok.data.tags["harness.status"] == "ok"
    assert ok.data.tags["harness.record"] == str(outcome.record_path)
    artifacts = {a.path for a in client.list_artifacts(ok.info.run_id)}
    assert {"record.json", "overlays"} <= artifacts
    local = client.download_artifacts(ok.info.run_id, "record.json", str(tmp_path / "dl"))
    assert json.loads(open(local).read()) == json.loads(outcome.record_path.read_text())
    saved = read_sample(outcome.record_path, record)
    for category in ("red", "blue"):
        pngs = [a.path for a in client.list_artifacts(ok.info.run_id, f"overlays/{category}")]
        assert len(pngs) == sum(m.category == category for m in saved) and all(p.endswith(".png") for p in pngs)

    failed = by_method["raising"]
    assert failed.info.status == "FAILED"
    assert failed.data.tags["harness.error_phase"] == "predict"
    text = open(client.download_artifacts(failed.info.run_id, "error.txt", str(tmp_path / "dl2"))).read()
    assert "boom in predict" in text

    # A rerun skips the finished job (no second run of it) and retries the failed one.
    Runner(_registry(), run_options).run(jobs)
    _, runs = _runs(store)
    methods = sorted(run.data.params["job.method"] for run in runs)
    assert methods == ["meanimage", "raising", "raising"]
