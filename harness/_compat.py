"""Import paths that moved, kept working for code written against them; the one place that knows them.

0.1 put the methods' building blocks beside the core (``harness.ops``, ...); 0.2 moved them to
:mod:`harness.toolkit`. 0.3 grouped the engine under :mod:`harness.engine` and the readers of
records under :mod:`harness.results` (``harness.runner`` is now ``harness.engine.runner``). An
import of an old path gives the module at its new path, the same object (so a patch through
either name reaches both), with a :class:`DeprecationWarning` naming the new path.

Decisions
---------
- An import hook (``sys.meta_path``), not a file per old path: the old names cost nothing and
  do not crowd the package's folders.
- Only the paths listed in :data:`MOVED` are served; anything else under ``harness`` is an
  ordinary ``ModuleNotFoundError``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType

__all__ = ["MOVED", "install"]

_ENGINE = ("options", "jobs", "registry", "protocols", "planning", "preflight", "weights", "runner", "outcomes",
           "fitting", "recording")
_INFERENCE = ("evaluation", "acceleration", "efficiency", "flops", "unscored")
_SUPPORT = ("checkpoint", "locks", "signals", "progress", "environment", "fsutil", "state_io", "dataset_summary")
_RESULTS = ("records", "leaderboard", "paper_tables", "reported", "export", "evaluate_maps")
_REPORT = ("commands", "export", "figures", "html", "maps", "overlay")

#: Old module path -> where the module lives now.
MOVED: dict[str, str] = {
    # 0.1 -> 0.2: the methods' building blocks.
    "harness.backbones": "harness.toolkit.backbones",
    "harness.coreset": "harness.toolkit.coreset",
    "harness.ops": "harness.toolkit.ops",
    "harness.pseudo_validation": "harness.toolkit.pseudo_validation",
    # 0.2 -> 0.3: the engine and the results in their own folders.
    **{f"harness.{name}": f"harness.engine.{name}" for name in _ENGINE},
    **{f"harness.{name}": f"harness.engine.inference.{name}" for name in _INFERENCE},
    **{f"harness.{name}": f"harness.engine.support.{name}" for name in _SUPPORT},
    **{f"harness.{name}": f"harness.results.{name}" for name in _RESULTS},
    "harness.executors": "harness.engine.executors",
    "harness.executors.inprocess": "harness.engine.executors.inprocess",
    "harness.executors.ray": "harness.engine.executors.ray",
    "harness.report": "harness.results.report",
    # 0.3 -> 0.4: two engine modules into the sub-folders of their stage.
    "harness.engine.unscored": "harness.engine.inference.unscored",
    "harness.engine.dataset_summary": "harness.engine.support.dataset_summary",
    **{f"harness.report.{name}": f"harness.results.report.{name}" for name in _REPORT},
}


class _Alias(importlib.abc.Loader):
    """Loads an old path as the module at its new path."""

    def __init__(self, new: str) -> None:
        self.new = new

    def create_module(self, spec) -> ModuleType:
        """The module at the new path (imported if it is not yet)."""
        warnings.warn(f"{spec.name} moved to {self.new}; import it from there", DeprecationWarning, stacklevel=2)
        return importlib.import_module(self.new)

    def exec_module(self, module: ModuleType) -> None:
        """Nothing: the module ran when it was imported at its new path."""


class _MovedFinder(importlib.abc.MetaPathFinder):
    """Finds the old paths of :data:`MOVED`, and only those."""

    def find_spec(self, fullname: str, path=None, target=None):
        """A spec that aliases ``fullname`` to its new path, or ``None`` for any other name."""
        new = MOVED.get(fullname)
        if new is None:
            return None
        is_package = any(other.startswith(new + ".") for other in MOVED.values())
        return importlib.util.spec_from_loader(fullname, _Alias(new), is_package=is_package)


def install() -> None:
    """Serve the old paths (idempotent; ``import harness`` calls it)."""
    if not any(isinstance(finder, _MovedFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _MovedFinder())
