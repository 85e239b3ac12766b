"""FitContext's narrow interfaces: what a method may call on ``context.weights``, ``context.checkpoint``
and ``context.progress``, that the engine's classes provide it, and that methods use nothing more."""

from __future__ import annotations

import ast
import inspect
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from harness import Checkpointing, FitContext, ProgressReporter, StagePosition, WeightFinder
from harness.engine.support.checkpoint import Position, TrainingCheckpoint
from harness.engine.support.progress import Progress
from harness.engine.weights import WeightsResolver
from harness.toolkit.training import optimiser_step, train_batches

ROOT = Path(__file__).resolve().parents[1]
#: Code written against the public API: the plugins, the toolkit they share, the examples.
PLUGIN_CODE = [*(ROOT / "plugins").rglob("*.py"), *(ROOT / "harness" / "toolkit").rglob("*.py"),
               *(ROOT / "examples").rglob("*.py"), *(ROOT / "datasets").rglob("*.py")]
INTERFACES = {"weights": WeightFinder, "checkpoint": Checkpointing, "progress": ProgressReporter}


def _members(protocol) -> set[str]:
    return {n for n in dir(protocol) if not n.startswith("_")} | set(getattr(protocol, "__annotations__", {}))


@pytest.mark.parametrize("engine_class, protocol", [(WeightsResolver, WeightFinder), (TrainingCheckpoint, Checkpointing),
                                                    (Progress, ProgressReporter)])
def test_the_engine_provides_every_interface_with_compatible_signatures(engine_class, protocol):
    for name in _members(protocol):
        wanted = inspect.signature(getattr(protocol, name))
        given = inspect.signature(getattr(engine_class, name))
        for parameter in wanted.parameters.values():
            assert parameter.name in given.parameters, f"{engine_class.__name__}.{name} lacks {parameter.name}"
            assert given.parameters[parameter.name].kind == parameter.kind, (engine_class.__name__, name, parameter)


def test_the_engine_objects_are_instances_of_the_interfaces(tmp_path):
    assert isinstance(WeightsResolver(tmp_path), WeightFinder)
    assert isinstance(TrainingCheckpoint(None), Checkpointing)
    assert isinstance(Progress(False), ProgressReporter)
    assert isinstance(Position("stage"), StagePosition)


def _calls_on(tree: ast.AST, base: str) -> set[tuple[str, int]]:
    """``(attribute, line)`` of every ``<...>.context.<base>.<attribute>`` or ``context.<base>.<attribute>``."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == base:
            owner = node.value.value
            if (isinstance(owner, ast.Name) and owner.id in ("context", "ctx")) or (
                    isinstance(owner, ast.Attribute) and owner.attr == "context"):
                found.add((node.attr, node.lineno))
    return found


def test_methods_use_only_what_the_interfaces_declare():
    misuse = []
    for path in PLUGIN_CODE:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for base, protocol in INTERFACES.items():
            allowed = _members(protocol)
            misuse += [f"{path.relative_to(ROOT)}:{line} context.{base}.{attr}"
                       for attr, line in _calls_on(tree, base) if attr not in allowed]
    assert not misuse, "calls outside FitContext's interfaces (add them to the protocol, or use what it offers):\n" \
        + "\n".join(sorted(misuse))


def test_the_scan_sees_a_call_outside_the_interface():
    tree = ast.parse("def fit(self, train, context):\n    context.weights.find_file(['x'], 'x')\n")
    assert _calls_on(tree, "weights") == {("find_file", 2)}


class _Finder:
    """A third party's weight finder: only what WeightFinder declares."""

    def resolve(self, file, settings=None):
        raise AssertionError("not asked for in this test")

    def note_used(self, path, what, key=""):
        return "0" * 64


class _MemoryCheckpoints:
    """A third party's checkpointing that keeps nothing: only what Checkpointing declares."""

    def __init__(self) -> None:
        self.stages = []

    @contextmanager
    def stage(self, name, **objects):
        self.stages.append(name)
        yield Position(name)


class _Quiet:
    def iterate(self, iterable, total=None, desc="", unit="it"):
        return iter(iterable)

    def epochs(self, n, desc="epochs"):
        return iter(range(n))


def test_the_training_loop_runs_on_any_implementation_of_the_interfaces(tmp_path):
    context = FitContext(device=torch.device("cpu"), seed=0, profile="tiny", settings={}, cache_dir=tmp_path,
                         weights=_Finder(), progress=_Quiet(), checkpoint=_MemoryCheckpoints(), fast_dev_run=True)
    assert isinstance(context.weights, WeightFinder) and isinstance(context.checkpoint, Checkpointing)
    layer = torch.nn.Linear(2, 1)
    optimiser = torch.optim.SGD(layer.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    with context.checkpoint.stage("train", layer=layer, optimiser=optimiser) as position:
        for step in train_batches(context, position, 3, lambda epoch, first: enumerate([torch.ones(4, 2)] * 5)):
            optimiser_step(layer(step.data).square().mean(), [optimiser], scaler)
    assert context.checkpoint.stages == ["train"] and position.steps == 2  # a fast dev run's two steps
