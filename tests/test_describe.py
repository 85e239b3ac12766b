"""``harness describe``: built facts cached per settings, code and libraries, never stale."""

from __future__ import annotations

import dataclasses
import os

import pytest

from harness.engine import describe as describe_module
from harness.engine.describe import cache_home, describe_method


@pytest.fixture
def counted(toy_registry, monkeypatch, tmp_path):
    """The toy ``meanimage`` spec with a factory that counts its calls, in a private cache home."""
    monkeypatch.setenv("HARNESS_CACHE_HOME", str(tmp_path / "home"))
    spec = toy_registry.method("meanimage")
    calls = []

    def factory(settings):
        calls.append(dict(settings.as_json()))
        return spec.factory(settings)

    factory.__module__ = spec.factory.__module__
    return dataclasses.replace(spec, factory=factory), calls


def test_the_second_call_reads_the_counts_and_says_the_same(counted):
    spec, calls = counted
    first = describe_method(spec, "tiny")
    second = describe_method(spec, "tiny")
    assert first == second and first["total_parameters"] == sum(first["networks"].values())
    assert len(calls) == 1 and len(list((cache_home() / "describe").glob("meanimage-*.json"))) == 1
    describe_method(spec, "tiny", use_cache=False)
    assert len(calls) == 2


def test_other_settings_code_or_libraries_build_again(counted, monkeypatch, tmp_path):
    spec, calls = counted
    describe_method(spec, "tiny")
    describe_method(spec, "paper")  # other settings (the toy profiles differ only in name: same key)
    plugin = tmp_path / "plugin"
    plugin.mkdir()
    (plugin / "model.py").write_text("x = 1\n")
    monkeypatch.setattr(describe_module, "_plugin_folder", lambda spec: plugin)
    describe_method(spec, "tiny")
    assert len(calls) == 2  # a new plugin folder is new code
    describe_method(spec, "tiny")
    assert len(calls) == 2
    (plugin / "model.py").write_text("x = 22\n")  # an edit changes the file's size and time
    os.utime(plugin / "model.py", ns=(1, 1))
    describe_method(spec, "tiny")
    assert len(calls) == 3
    monkeypatch.setattr(describe_module, "_versions", lambda: {"timm": "0.0-another"})
    describe_method(spec, "tiny")
    assert len(calls) == 4


def test_a_damaged_cache_file_is_rebuilt(counted):
    spec, calls = counted
    expected = describe_method(spec, "tiny")
    (path,) = (cache_home() / "describe").glob("meanimage-*.json")
    path.write_text('{"facts": {"networks": ')
    assert describe_method(spec, "tiny") == expected and len(calls) == 2
    assert describe_method(spec, "tiny") == expected and len(calls) == 2


def test_an_unwritable_cache_home_only_costs_the_rebuild(counted, monkeypatch, tmp_path):
    spec, calls = counted
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("HARNESS_CACHE_HOME", str(blocker))
    assert describe_method(spec, "tiny")["total_parameters"] >= 0
    describe_method(spec, "tiny")
    assert len(calls) == 2


def test_cache_home_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("HARNESS_CACHE_HOME", str(tmp_path / "h"))
    assert cache_home() == tmp_path / "h"
    monkeypatch.delenv("HARNESS_CACHE_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_home() == tmp_path / "x" / "harness"
