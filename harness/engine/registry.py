"""Load plugins through pluggy and collect the specs they declare.

The core's own plugins (the built-in metrics) are registered first; everything else comes from
the entry-point group ``harness`` of installed distributions, first-party plugins included.

One broken plugin never hides the others: each entry point is imported on its own, and each
plugin's hook implementation is called on its own. A failure to import, a hook that raises, a
spec with a missing field, a profile naming an unknown setting or giving a bad value, a name
declared twice, or a hook implementation that matches no hook specification (a misspelling)
becomes a :class:`Problem` naming the plugin, its distribution and the kind of problem;
``harness list`` prints the problems, ``harness run`` warns about them.
"""

from __future__ import annotations

import importlib
import importlib.metadata as metadata
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import pluggy

from harness import hookspecs
from harness.errors import UsageError
from harness.settings import SettingError, check_profiles
from harness.specs import LEVELS, PROTOCOLS, DatasetSpec, ExecutorSpec, MethodSpec, MetricSpec, missing_fields

ENTRY_POINT_GROUP = "harness"

#: Modules of the core that are registered as plugins, like any other.
BUILTIN_PLUGINS = ("harness.metrics.builtin", "harness.engine.executors")

_REQUIRED = {
    "methods": (MethodSpec, ("name", "paper", "protocols", "profiles", "factory")),
    # categories may be empty (discovered in the root, e.g. a user's folder), but must be a tuple.
    "datasets": (DatasetSpec, ("name", "loader")),
    "metrics": (MetricSpec, ("name", "level", "compute")),
    "executors": (ExecutorSpec, ("name", "factory")),
}

#: Kinds of :class:`Problem`.
PROBLEM_KINDS = ("import", "register", "hook", "spec", "duplicate", "unknown-hook", "reporter")


@dataclass(frozen=True)
class Problem:
    """Something wrong with a plugin, found while loading it or calling its reporter hooks.

    Attributes
    ----------
    plugin : str
        The plugin's name (entry-point name).
    distribution : str
        The distribution that declared it.
    kind : str
        One of :data:`PROBLEM_KINDS`.
    message : str
        What is wrong and what to do.
    """

    plugin: str
    distribution: str
    kind: str
    message: str

    def __str__(self) -> str:
        return f"plugin {self.plugin!r} from {self.distribution}: {self.message}"

    def as_dict(self) -> dict[str, str]:
        """JSON form."""
        return {"plugin": self.plugin, "distribution": self.distribution, "kind": self.kind, "message": self.message}


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
    methods, datasets, metrics, executors : dict of str to Provided
        Specs by name, in load order.
    plugins : list of PluginInfo
        Plugins that loaded.
    problems : list of Problem
        What went wrong while loading, each naming the plugin and distribution.
    manager : pluggy.PluginManager
        The manager, used to call the reporter hooks.
    """

    methods: dict[str, Provided] = field(default_factory=dict)
    datasets: dict[str, Provided] = field(default_factory=dict)
    metrics: dict[str, Provided] = field(default_factory=dict)
    executors: dict[str, Provided] = field(default_factory=dict)
    plugins: list[PluginInfo] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    manager: pluggy.PluginManager | None = None

    def problem(self, info: PluginInfo, kind: str, message: str) -> None:
        """Record a problem of plugin ``info``."""
        self.problems.append(Problem(info.name, info.distribution, kind, message))

    def method(self, name: str) -> MethodSpec:
        """Return the method spec called ``name`` or raise a :class:`UsageError` listing the known ones."""
        return self._get(self.methods, name, "method", "--methods").spec

    def dataset(self, name: str) -> DatasetSpec:
        """Return the dataset spec called ``name`` or raise a :class:`UsageError` listing the known ones."""
        return self._get(self.datasets, name, "dataset", "--datasets").spec

    def metric_specs(self, dataset: str | None = None) -> list[MetricSpec]:
        """All metric specs in load order (only those computed on ``dataset`` when given)."""
        specs = [p.spec for p in self.metrics.values()]
        return specs if dataset is None else [m for m in specs if m.applies_to(dataset)]

    def executor(self, name: str) -> ExecutorSpec:
        """Return the executor spec called ``name`` or raise a :class:`UsageError` listing the known ones."""
        return self._get(self.executors, name, "executor", "--executor").spec

    def call_reporters(self, hook: str, **kwargs: Any) -> None:
        """Call a reporter hook on every plugin; a reporter that raises is reported, not fatal."""
        if self.manager is None:
            return
        caller = getattr(self.manager.hook, hook)
        by_name = {p.name: p for p in self.plugins}
        for impl in caller.get_hookimpls():
            try:
                impl.function(**{k: kwargs[k] for k in impl.argnames})
            except Exception as exc:  # noqa: BLE001 - a reporter must not stop the run
                info = by_name.get(impl.plugin_name, PluginInfo(impl.plugin_name, "unknown distribution", "?"))
                self.problem(info, "reporter", f"reporter raised in {hook}: {type(exc).__name__}: {exc}")

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

    _check_unknown_hooks(registry)
    for kind in ("methods", "datasets", "metrics", "executors"):
        _collect(registry, kind)
    return registry


def _check_unknown_hooks(registry: Registry) -> None:
    """Hook implementations that match no specification (pluggy's ``check_pending``, per plugin)."""
    assert registry.manager is not None
    known = {name for name in dir(hookspecs) if name.startswith("harness_")}
    by_name = {p.name: p for p in registry.plugins}
    for name in dir(registry.manager.hook):
        caller = getattr(registry.manager.hook, name)
        if name.startswith("_") or not hasattr(caller, "get_hookimpls") or caller.has_spec():
            continue
        for impl in caller.get_hookimpls():
            if impl.optionalhook:
                continue
            info = by_name.get(impl.plugin_name, PluginInfo(impl.plugin_name, "unknown distribution", "?"))
            close = [k for k in known if k.rstrip("s") == name.rstrip("s") or k.startswith(name) or name.startswith(k)]
            hint = f"; did you mean {close[0]!r}?" if close else f"; hooks: {', '.join(sorted(known))}"
            registry.problem(info, "unknown-hook", f"implements {name!r}, which is not a harness hook{hint} "
                             "It is ignored.")
    # A function named like a hook but without @hookimpl is silently skipped by pluggy.
    for info in registry.plugins:
        plugin = registry.manager.get_plugin(info.name)
        for name in known:
            function = getattr(plugin, name, None)
            if callable(function) and registry.manager.parse_hookimpl_opts(plugin, name) is None:
                registry.problem(info, "unknown-hook", f"defines {name}() without the @harness.hookimpl decorator; "
                                 "it is ignored. Decorate it with @hookimpl")


def _register(registry: Registry, info: PluginInfo, load: Any) -> None:
    assert registry.manager is not None
    try:
        plugin = load()
    except Exception as exc:  # noqa: BLE001 - any import error must be reported, not raised
        registry.problem(info, "import", f"failed to import ({info.module}): {type(exc).__name__}: {exc}. "
                         "Reinstall it or uninstall that distribution.")
        return
    if registry.manager.is_registered(plugin) or registry.manager.has_plugin(info.name):
        registry.problem(info, "register", "is registered twice; ignored the second")
        return
    try:
        registry.manager.register(plugin, name=info.name)
    except Exception as exc:  # noqa: BLE001 - pluggy validates hook signatures here
        registry.problem(info, "register", f"is invalid: {exc}")
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
            registry.problem(info, "hook", f"raised in harness_{kind}: {type(exc).__name__}: {exc}")
            continue
        for spec in specs:
            problem = _validate(spec, spec_type, required, kind)
            if problem:
                registry.problem(info, "spec", problem)
                continue
            if spec.name in table:
                first = table[spec.name].plugin
                registry.problem(info, "duplicate",
                                 f"duplicate {kind[:-1]} name {spec.name!r}: also declared by plugin {first.name!r} "
                                 f"({first.distribution}); keeping the first")
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
        if spec.paper_protocol and spec.paper_protocol not in PROTOCOLS:
            return f"method {spec.name!r} declares an unknown paper_protocol {spec.paper_protocol!r}"
        try:
            schema = spec.schema
        except (SettingError, TypeError, ValueError) as exc:
            return f"method {spec.name!r} declares invalid settings: {exc}"
        problems = check_profiles(schema, spec.profiles)
        if problems:
            return f"method {spec.name!r}: " + "; ".join(problems)
    if kind == "metrics" and spec.level not in LEVELS:
        return f"metric {spec.name!r} has level {spec.level!r}; use one of {', '.join(LEVELS)}"
    return None
