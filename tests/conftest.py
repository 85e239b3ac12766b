"""Shared fixtures: a registry with the toy plugins, and run options in a temporary folder."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from toy_plugins import ToyPlugin  # noqa: E402

from harness.engine.registry import load_registry  # noqa: E402
from harness.engine.runner import RunOptions  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def private_cache_home(tmp_path_factory):
    """The user's cache folder (``describe``'s parameter counts) is a fresh one for this test session.

    Set in the environment, so that the harness started in a subprocess uses it too: no test reads
    what an earlier session, or the user, left there.
    """
    import os

    before = os.environ.get("HARNESS_CACHE_HOME")
    os.environ["HARNESS_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache-home"))
    yield Path(os.environ["HARNESS_CACHE_HOME"])
    if before is None:
        os.environ.pop("HARNESS_CACHE_HOME", None)
    else:
        os.environ["HARNESS_CACHE_HOME"] = before


@pytest.fixture
def toy_registry():
    """The built-in metrics plus the toy dataset and methods, without installed entry points."""
    return load_registry(entry_points=[], extra_plugins=[("toy", ToyPlugin())])


@pytest.fixture
def run_options(tmp_path):
    """Run options writing under ``tmp_path``, on the CPU, without progress bars."""
    return RunOptions(results_dir=tmp_path / "results", cache_dir=tmp_path / "cache", device="cpu", eval_size=32,
                      progress=False, latency_repeats=1)


@pytest.fixture
def make_context(tmp_path):
    """``make_context(settings, **kwargs)``: a FitContext in a private folder (harness.testing.fit_context)."""
    from harness.testing import fit_context

    def make(settings, **kwargs):
        kwargs.setdefault("workdir", tmp_path / "fit")
        return fit_context(settings, kwargs.pop("workdir"), **kwargs)

    return make
