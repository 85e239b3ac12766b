"""The project's import graph: no circles anywhere, and the core imports no plugin.

The graph is read from the source (``ast``), so it also sees imports made inside functions:
a lazy import keeps start-up cheap but is still a dependency a reader has to follow. Imports
under ``if TYPE_CHECKING:`` are left out, since they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _package_roots() -> dict[str, Path]:
    """Top-level package name -> folder, for the core and every first-party plugin."""
    roots = {"harness": ROOT / "harness"}
    for plugin in sorted((ROOT / "plugins").iterdir()):
        for package in plugin.iterdir():
            if (package / "__init__.py").exists():
                roots[package.name] = package
    return roots


def _module_name(path: Path, package: str, root: Path) -> str:
    parts = (package, *path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1]) if parts[-1] == "__init__" else ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported_names(tree: ast.Module, module: str, is_package: bool) -> set[str]:
    """Every absolute module name an import statement in ``tree`` can refer to."""
    names: set[str] = set()
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            skipped.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # "from a import b" loads module a.b when b is one, else reads attribute b of a.
            names.update(f"{prefix}.{alias.name}" for alias in node.names)
    return names


def import_graph() -> dict[str, set[str]]:
    """First-party module -> the first-party modules it imports (lazy imports included)."""
    sources: dict[str, tuple[Path, bool]] = {}
    for package, root in _package_roots().items():
        for path in root.rglob("*.py"):
            sources[_module_name(path, package, root)] = (path, path.name == "__init__.py")
    graph: dict[str, set[str]] = {}
    for module, (path, is_package) in sources.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        targets = set()
        for name in _imported_names(tree, module, is_package):
            # An attribute's name falls back to the module that defines it.
            while name and name not in sources:
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
        graph[module] = targets
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's components of more than one module: each one is an import circle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        # Iterative, so a deep graph cannot hit the recursion limit.
        work = [(node, iter(sorted(graph[node])))]
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        while work:
            current, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[current] = min(low[current], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[current])
            if low[current] == index[current]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == current:
                        break
                if len(component) > 1:
                    circles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return circles


def test_the_graph_is_read_from_every_package():
    graph = import_graph()
    assert "harness.engine.runner" in graph and "harness_patchcore.plugin" in graph
    assert "harness.engine.runner" in graph["harness.cli"] or any(
        target.startswith("harness.") for target in graph["harness.cli"])


def test_tarjan_finds_a_planted_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert strongly_connected(graph) == [["a", "b", "c"]]


def test_no_import_circles_anywhere():
    circles = strongly_connected(import_graph())
    assert not circles, "import circles (each line a set of modules that import each other):\n" + "\n".join(
        " <-> ".join(circle) for circle in circles)


@pytest.mark.parametrize("package", ["harness"])
def test_the_core_imports_no_plugin(package):
    plugins = set(_package_roots()) - {"harness"}
    offenders = {module: sorted(target for target in targets if target.split(".")[0] in plugins)
                 for module, targets in import_graph().items() if module.split(".")[0] == package}
    assert not {module: targets for module, targets in offenders.items() if targets}
