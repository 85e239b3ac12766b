"""Import paths that moved keep working: the same module object, and a warning naming the new path."""

from __future__ import annotations

import importlib
import subprocess
import sys
import warnings

import pytest

from harness._compat import MOVED


@pytest.mark.parametrize("old", sorted(MOVED))
def test_every_old_path_is_the_module_at_its_new_path(old):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        assert importlib.import_module(old) is importlib.import_module(MOVED[old])


def test_an_old_path_warns_with_the_new_one_in_a_fresh_interpreter():
    code = ("import warnings; warnings.simplefilter('always')\n"
            "with warnings.catch_warnings(record=True) as seen:\n"
            "    from harness.runner import JobRunner\n"
            "    from harness.report.maps import read_sample\n"
            "    from harness.executors.ray import RayExecutor\n"
            "print('|'.join(str(w.message) for w in seen if w.category is DeprecationWarning))\n"
            "import harness.engine.runner as new; print(JobRunner is new.JobRunner)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    messages, same = done.stdout.strip().splitlines()[-2:]
    assert "harness.runner moved to harness.engine.runner" in messages
    assert "harness.report.maps moved to harness.results.report.maps" in messages
    assert "harness.executors.ray moved to harness.engine.executors.ray" in messages
    assert same == "True"


def test_a_patch_through_the_old_name_reaches_the_new_module(monkeypatch):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old = importlib.import_module("harness.leaderboard")
    monkeypatch.setattr(old, "_MAX_ERROR_CHARS", 7)
    from harness.results import leaderboard

    assert leaderboard._MAX_ERROR_CHARS == 7


def test_a_name_that_never_existed_is_still_an_import_error():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("harness.no_such_module")


def test_no_old_path_is_also_a_file():
    from pathlib import Path

    root = Path(__import__("harness").__file__).parent
    for old in MOVED:
        relative = Path(*old.split(".")[1:])
        assert not (root / relative.with_suffix(".py")).exists() and not (root / relative).is_dir(), old
