"""Load plugins through pluggy and collect the specs they declare.

The core's own plugins (the built-in metrics) are registered first; everything else comes from
the entry-point group ``harness`` of installed distributions, first-party plugins included.

One broken plugin never hides the others: each entry point is imported on its own, and each
plugin's hook implementation is called on its own. A failure to import, a hook that raises, a
spec with a missing field, or a name declared twice becomes a *problem* naming the plugin and its
distribution; ``harness list`` prints the problems, ``harness run`` warns about them.
"""

from __future__ import annotations

import importlib
import importlib.metadata as metadata
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import pluggy

from harness import hookspecs
from harness.errors import UsageError
from harness.specs import PROTOCOLS, DatasetSpec, MethodSpec, MetricSpec, missing_fields

ENTRY_POINT_GROUP = "harness"

#: Modules of the core that are registered as plugins, like any other.
BUILTIN_PLUGINS = ("harness.metrics.builtin",)

_REQUIRED = {
    "methods": (MethodSpec, ("name", "paper", "protocols", "profiles", "factory")),
    # categories may be empty (discovered in the root, e.g. a user's folder), but must be a tuple.
    "datasets": (DatasetSpec, ("name", "loader")),
    "metrics": (MetricSpec, ("name", "level", "compute")),
}


@dataclass(frozen=True)
class PluginInfo:
    """Where a plugin comes from.

    Attributes
    ----------
    name : str
        Entry-point name (or module name for built-ins).
    distribution : str
        ``"<dist> <version>"`` that declared it, or ``"harness (built-in)"``.
    module : str
        The module that was imported.
    """

    name: str
    distribution: str
    module: str


@dataclass(frozen=True)
class Provided:
    """A spec together with the plugin that provided it."""

    spec: Any
    plugin: PluginInfo


@dataclass
class Registry:
    """Everything the installed plugins provide.

    Attributes
    ----------
    methods, datasets, metrics : dict of str to Provided
        Specs by name, in load order.
    plugins : list of PluginInfo
        Plugins that loaded.
    problems : list of str
        What went wrong while loading, each naming the plugin and distribution.
    manager : pluggy.PluginManager
        The manager, used to call the reporter hooks.
    """

    methods: dict[str, Provided] = field(default_factory=dict)
    datasets: dict[str, Provided] = field(default_factory=dict)
    metrics: dict[str, Provided] = field(default_factory=dict)
    plugins: list[PluginInfo] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    manager: pluggy.PluginManager | None = None

    def method(self, name: str) -> MethodSpec:
        """Return the method spec called ``name`` or raise a :class:`UsageError` listing the known ones."""
        return self._get(self.methods, name, "method", "--methods").spec

    def dataset(self, name: str) -> DatasetSpec:
        """Return the dataset spec called ``name`` or raise a :class:`UsageError` listing the known ones."""
        return self._get(self.datasets, name, "dataset", "--datasets").spec

    def metric_specs(self) -> list[MetricSpec]:
        """All metric specs in load order."""
        return [p.spec for p in self.metrics.values()]

    def call_reporters(self, hook: str, **kwargs: Any) -> None:
        """Call a reporter hook on every plugin; a reporter that raises is reported, not fatal."""
        if self.manager is None:
            return
        caller = getattr(self.manager.hook, hook)
        for impl in caller.get_hookimpls():
            try:
                impl.function(**{k: kwargs[k] for k in impl.argnames})
            except Exception as exc:  # noqa: BLE001 - a reporter must not stop the run
                self.problems.append(f"reporter {impl.plugin_name!r} raised in {hook}: {type(exc).__name__}: {exc}")

    @staticmethod
    def _get(table: dict[str, Provided], name: str, what: str, option: str) -> Provided:
        if name not in table:
            known = ", ".join(table) or "none installed"
            raise UsageError(f"unknown {what} {name!r} in {option}; installed: {known}. "
                             "Run 'harness list' to see where each comes from.")
        return table[name]


def _entry_points() -> Iterable[metadata.EntryPoint]:
    return metadata.entry_points(group=ENTRY_POINT_GROUP)


def _distribution_label(ep: metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "unknown distribution"
    return f"{dist.metadata['Name']} {dist.version}"


def load_registry(entry_points: Sequence[metadata.EntryPoint] | None = None, builtins: Sequence[str] = BUILTIN_PLUGINS,
                  extra_plugins: Sequence[tuple[str, Any]] = ()) -> Registry:
    """Import every plugin and collect its specs.

    Parameters
    ----------
    entry_points : sequence of EntryPoint, optional
        Defaults to the installed entry points of group ``harness``.
    builtins : sequence of str
        Core modules registered as plugins before the entry points.
    extra_plugins : sequence of (name, object)
        Plugin objects registered after the entry points (for embedding the harness in a script
        or a test without installing a distribution).

    Returns
    -------
    Registry
    """
    manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    manager.add_hookspecs(hookspecs)
    registry = Registry(manager=manager)

    for module_name in builtins:
        info = PluginInfo(name=module_name, distribution="harness (built-in)", module=module_name)
        _register(registry, info, lambda m=module_name: importlib.import_module(m))

    for ep in (entry_points if entry_points is not None else _entry_points()):
        info = PluginInfo(name=ep.name, distribution=_distribution_label(ep), module=ep.value)
        _register(registry, info, ep.load)

    for name, plugin in extra_plugins:
        _register(registry, PluginInfo(name=name, distribution="registered in-process", module=repr(plugin)),
                  lambda p=plugin: p)

    for kind in ("methods", "datasets", "metrics"):
        _collect(registry, kind)
    return registry


def _register(registry: Registry, info: PluginInfo, load: Any) -> None:
    assert registry.manager is not None
    try:
        plugin = load()
    except Exception as exc:  # noqa: BLE001 - any import error must be reported, not raised
        registry.problems.append(
            f"plugin {info.name!r} from {info.distribution} failed to import ({info.module}): "
            f"{type(exc).__name__}: {exc}. Reinstall it or uninstall that distribution.")
        return
    if registry.manager.is_registered(plugin) or registry.manager.has_plugin(info.name):
        registry.problems.append(f"plugin {info.name!r} from {info.distribution} is registered twice; ignored the second")
        return
    try:
        registry.manager.register(plugin, name=info.name)
    except Exception as exc:  # noqa: BLE001 - pluggy validates hook signatures here
        registry.problems.append(f"plugin {info.name!r} from {info.distribution} is invalid: {exc}")
        return
    registry.plugins.append(info)


def _collect(registry: Registry, kind: str) -> None:
    assert registry.manager is not None
    spec_type, required = _REQUIRED[kind]
    table: dict[str, Provided] = getattr(registry, kind)
    by_name = {p.name: p for p in registry.plugins}
    caller = getattr(registry.manager.hook, f"harness_{kind}")
    # get_hookimpls() is in registration order (pluggy's call order is the reverse); the core
    # wants load order so that, on a duplicate name, the earlier plugin wins.
    for impl in caller.get_hookimpls():
        info = by_name.get(impl.plugin_name, PluginInfo(impl.plugin_name, "unknown distribution", "?"))
        try:
            specs = list(impl.function() or [])
        except Exception as exc:  # noqa: BLE001
            registry.problems.append(f"plugin {info.name!r} from {info.distribution} raised in harness_{kind}: "
                                     f"{type(exc).__name__}: {exc}")
            continue
        for spec in specs:
            problem = _validate(spec, spec_type, required, kind)
            if problem:
                registry.problems.append(f"plugin {info.name!r} from {info.distribution}: {problem}")
                continue
            if spec.name in table:
                first = table[spec.name].plugin
                registry.problems.append(
                    f"duplicate {kind[:-1]} name {spec.name!r}: declared by plugin {first.name!r} ({first.distribution}) "
                    f"and by plugin {info.name!r} ({info.distribution}); keeping the first")
                continue
            table[spec.name] = Provided(spec, info)


def _validate(spec: Any, spec_type: type, required: Sequence[str], kind: str) -> str | None:
    if not isinstance(spec, spec_type):
        return f"harness_{kind} returned {type(spec).__name__}, expected {spec_type.__name__}"
    missing = missing_fields(spec, required)
    if missing:
        return f"{kind[:-1]} spec {getattr(spec, 'name', '?')!r} lacks {', '.join(missing)}"
    if kind == "datasets" and not isinstance(spec.categories, tuple):
        return (f"dataset {spec.name!r}: categories must be a tuple of names (empty when they are found in the "
                f"root), got {type(spec.categories).__name__}")
    if kind == "methods":
        unknown = [p for p in spec.protocols if p not in PROTOCOLS]
        if unknown:
            return f"method {spec.name!r} declares unknown protocols {unknown}; known: {', '.join(PROTOCOLS)}"
    return None
