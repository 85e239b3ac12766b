"""A run request (what ``harness run`` was given) becomes a checked plan in one place."""

from __future__ import annotations

import dataclasses

import pytest
from toy_plugins import WeightedPlugin, ToyPlugin

from harness.cli import build_parser
from harness.engine.registry import load_registry
from harness.engine.request import RunRequest, plan_request
from harness.errors import UsageError


@pytest.fixture
def registry():
    """The toy dataset and methods (every protocol) plus ``template`` (multiclass only)."""
    return load_registry(entry_points=[], extra_plugins=[("toy", ToyPlugin()), ("template", WeightedPlugin())])


def _request(tmp_path, **fields) -> RunRequest:
    return RunRequest(datasets="toy", results_dir=tmp_path / "results", cache_dir=tmp_path / "cache", device="cpu",
                      **fields)


def test_the_command_line_defaults_are_the_request_defaults():
    args = build_parser().parse_args(["run"])
    from_cli = RunRequest.from_namespace(args)
    assert dataclasses.asdict(from_cli) == dataclasses.asdict(RunRequest()) | {"set": [], "data_root": [],
                                                                               "data_option": []}


def test_all_methods_are_those_that_support_the_protocol(registry, tmp_path):
    run = plan_request(registry, _request(tmp_path, protocol="oneclass", seeds="0,1"))
    assert sorted({j.method for j in run.jobs}) == ["badshape", "meanimage", "nanmaps", "raising"]
    assert len(run.jobs) == 8 and len(run.plan.jobs) == 8
    assert run.notes == ["note: template does not support the oneclass protocol; skipped"]
    assert run.options.results_dir == tmp_path / "results" and run.options.eval_size == 256


def test_a_script_plans_exactly_as_the_command_line(registry, tmp_path):
    cli = build_parser().parse_args(["run", "--methods", "meanimage", "--datasets", "toy", "--protocol", "fewshot",
                                     "--shots", "1,2", "--seeds", "3", "--set", "image_size=16", "--device", "cpu",
                                     "--results-dir", str(tmp_path / "results"),
                                     "--cache-dir", str(tmp_path / "cache")])
    script = _request(tmp_path, methods="meanimage", protocol="fewshot", shots="1,2", seeds="3",
                      set=["image_size=16"])
    a, b = plan_request(registry, RunRequest.from_namespace(cli)), plan_request(registry, script)
    assert a.jobs == b.jobs and [j.shots for j in a.jobs] == [1, 2]
    assert all(p.settings.image_size == 16 for p in a.plan.jobs)


@pytest.mark.parametrize("fields, message", [
    ({"methods": "template", "protocol": "fewshot"}, "does not support --protocol fewshot"),
    ({"protocol": "fewshot", "shots": ""}, "--protocol fewshot needs --shots"),
    ({"protocol": "fewshot", "shots": "-1"}, "shots cannot be negative"),
    ({"seeds": ""}, "--seeds needs at least one seed"),
    ({"seeds": "zero"}, "--seeds takes comma-separated integers"),
    ({"methods": "meanimage", "set": ["nosuch=1"]}, "--set nosuch: not a setting of meanimage"),
    ({"methods": "meanimage", "set": ["other.image_size=8"]}, "'other' is not one of the methods"),
    ({"methods": "meanimage", "set": ["image_size"]}, "expected KEY=VALUE"),
    ({"methods": "meanimage", "data_option": ["resolution=512"]}, "--data-option resolution: no dataset"),
    ({"methods": "meanimage", "eval_size": "0"}, "--eval-size takes a positive integer"),
    ({"methods": "meanimage", "eval_batch_size": "many"}, "--eval-batch-size"),
    ({"methods": "meanimage", "executor": "nosuch"}, "nosuch"),
])
def test_every_usage_error_is_found_while_planning(registry, tmp_path, fields, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace("[", r"\[")):
        plan_request(registry, _request(tmp_path, **fields))
    assert not (tmp_path / "results").exists() and not (tmp_path / "cache").exists()
