"""Pinned weights: found or named with the pull command before any fit, hashed into the record, pulled on request."""

from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors.torch import save_file
from toy_plugins import TEMPLATE_FILE, ToyPlugin, WeightedPlugin

from harness.errors import WeightsNotFoundError
from harness.engine.jobs import expand_jobs
from harness.engine.planning import Planner
from harness.engine.preflight import run_preflight
from harness.engine.registry import load_registry
from harness.engine.runner import Runner
from harness.specs import WeightFile
from harness.engine.weights import WeightsPullError, WeightsResolver, WeightsVerifyError, pull, verify


@pytest.fixture
def registry():
    return load_registry(entry_points=[], extra_plugins=[("toy", ToyPlugin()), ("weighted", WeightedPlugin())])


@pytest.fixture(autouse=True)
def empty_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HARNESS_WEIGHTS", raising=False)
    monkeypatch.setenv("HARNESS_HASH_CACHE", str(tmp_path / "hashes.json"))


def _jobs(weights="pretrained"):
    return expand_jobs(["template"], ["toy"], "multiclass", None, [0], {"toy": "paper"}, weights=weights)


def test_a_missing_file_is_found_by_the_preflight_with_the_pull_command(registry, run_options, tmp_path):
    run_options.weights_dir = tmp_path / "weights"
    plan = Planner(registry, run_options).plan(_jobs())
    report = run_preflight(plan)
    (problem,) = report.problems
    assert "toy template weights not found" in problem and "harness weights pull --methods template" in problem
    assert str(tmp_path / "weights" / "toy-template.safetensors") in problem
    assert not run_options.results_dir.exists()


def test_the_record_lists_every_file_used_with_its_sha256(registry, run_options, tmp_path):
    folder = tmp_path / "weights"
    folder.mkdir()
    save_file({"scale": torch.ones(1)}, str(folder / "toy-template.safetensors"))
    run_options.weights_dir = folder
    plan = Planner(registry, run_options).plan(_jobs())
    assert not run_preflight(plan).problems
    record = Runner(registry, run_options).run(plan).outcomes[0].record
    (used,) = record.weights
    digest = hashlib.sha256((folder / "toy-template.safetensors").read_bytes()).hexdigest()
    assert used.key == "template" and used.sha256 == digest and used.path.endswith("toy-template.safetensors")


def test_random_weights_need_no_file_and_are_marked(registry, run_options, tmp_path):
    run_options.weights_dir = tmp_path / "nothing-here"
    plan = Planner(registry, run_options).plan(_jobs("random"))
    assert not run_preflight(plan).problems
    record = Runner(registry, run_options).run(plan).outcomes[0].record
    assert record.status == "ok" and record.run.weights == "random" and record.weights == []
    assert record.method_info["random_weights"] is True
    assert plan.jobs[0].record_path.name.endswith("-randomweights.json")


def test_a_pinned_hash_is_verified_and_a_look_alike_refused(tmp_path):
    folder = tmp_path / "w"
    folder.mkdir()
    (folder / "good.bin").write_bytes(b"right weights")
    (folder / "v2.bin").write_bytes(b"other version")
    pinned = WeightFile("k", "pinned file", filenames=("good.bin",),
                        sha256=hashlib.sha256(b"right weights").hexdigest(), refuse=("v2.bin",))
    resolver = WeightsResolver(folder)
    assert verify(resolver.locate(pinned))[0] == "ok"
    (folder / "good.bin").write_bytes(b"tampered")
    assert verify(resolver.locate(pinned))[0] == "mismatch"
    with pytest.raises(WeightsVerifyError, match="sha256"):
        resolver.resolve(pinned)
    (folder / "good.bin").unlink()
    with pytest.raises(WeightsNotFoundError, match="v2.bin is not accepted"):
        resolver.resolve(pinned)


def test_pull_offline_fails_with_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsPullError, match="offline"):
        pull(TEMPLATE_FILE)

    def unreachable(*args, **kwargs):
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", unreachable)
    with pytest.raises(WeightsPullError, match="harness weights pull"):
        pull(WeightFile("u", "a torchvision file", filenames=("x.pth",), url="https://example.invalid/x.pth"))


def test_weights_commands_list_verify_and_pull(tmp_path, capsys, monkeypatch):
    from harness.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # No network here; a machine whose DNS answers but drops packets must not hang the test either.
    monkeypatch.setattr(torch.hub, "download_url_to_file",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("Network is unreachable")))
    assert main(["weights", "list", "--methods", "patchcore", "--weights-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "MISSING" in out and "wide_resnet50_2-95faca4d.pth" in out and "harness weights pull" in out
    assert main(["weights", "verify", "--methods", "patchcore", "--weights-dir", str(tmp_path)]) == 1
    code = main(["weights", "pull", "--methods", "patchcore", "--weights-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: cannot fetch") and "offline" in err
