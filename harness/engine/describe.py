"""What ``harness describe`` shows of a method, and the cache that spares rebuilding its networks.

Counting a method's parameters builds its networks (on the meta device: no memory, no files), and
that needs the method's own libraries: timm alone imports torchvision and with it
``torch._dynamo``, a second on a laptop. The facts that building gives (parameter counts per
network, input size, predict batch, resizing) depend only on the method's settings, its code and
the libraries it builds with, so they are kept in a small JSON file per (method, settings) under
the user's cache folder and reused while all three are unchanged.

Decisions
---------
- The key holds the resolved settings, the harness's and the plugin's version, the size and
  modification time of every source file of the harness and of the plugin's package, and the
  versions of the libraries methods build networks with. Any edit, upgrade or other setting builds
  again: a stale count is never shown.
- The folder is ``$HARNESS_CACHE_HOME``, else ``$XDG_CACHE_HOME/harness``, else
  ``~/.cache/harness`` (``describe/`` inside it). A file that cannot be read is rebuilt; a folder
  that cannot be written only costs the rebuild next time.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["describe_method", "cache_home", "BUILD_LIBRARIES"]

#: Libraries whose version can change a network's parameter count.
BUILD_LIBRARIES = ("torch", "timm", "torchvision", "diffusers", "transformers", "anomalib", "open-clip-torch", "lpips")
_FORMAT = 1


def cache_home() -> Path:
    """The user's cache folder of the harness (see the module docstring)."""
    if os.environ.get("HARNESS_CACHE_HOME"):
        return Path(os.environ["HARNESS_CACHE_HOME"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "harness"


def _sources(folder: Path) -> list[str]:
    """``path:size:mtime`` of every Python file under ``folder`` (stat only, no reading)."""
    out = []
    for path in sorted(folder.rglob("*.py")):
        try:
            stat = path.stat()
        except OSError:
            continue
        out.append(f"{path}:{stat.st_size}:{stat.st_mtime_ns}")
    return out


def _versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in BUILD_LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def _plugin_folder(spec: Any) -> Path | None:
    """The folder of the top-level package that defines ``spec``'s factory."""
    factory = getattr(spec.factory, "func", spec.factory)
    top = str(getattr(factory, "__module__", "") or "").split(".")[0]
    module = sys.modules.get(top)
    path = getattr(module, "__file__", None)
    return Path(path).parent if path else None


def _key(spec: Any, settings_json: dict[str, Any]) -> str:
    import harness

    harness_folder = Path(harness.__file__).parent
    plugin = _plugin_folder(spec)
    parts = {
        "format": _FORMAT, "method": spec.name, "settings": settings_json, "harness": harness.__version__,
        "libraries": _versions(), "harness_sources": _sources(harness_folder),
        "plugin_sources": _sources(plugin) if plugin is not None and plugin != harness_folder else [],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _built_facts(spec: Any, settings: Any) -> dict[str, Any]:
    """Build the method on the meta device and read what only a built method knows."""
    import torch

    # Building on the meta device allocates nothing: the paper-size networks describe in a second.
    with torch.device("meta"):
        method = spec.factory(settings)
    networks = method.parameter_count()
    return {"networks": networks, "input_size": list(method.input_size), "eval_batch_size": method.eval_batch_size,
            "interpolation": method.interpolation, "antialias": method.antialias, "resize_mode": method.resize_mode}


def _cached_facts(spec: Any, settings: Any, use_cache: bool) -> dict[str, Any]:
    if not use_cache:
        return _built_facts(spec, settings)
    path = cache_home() / "describe" / f"{spec.name}-{_key(spec, settings.as_json())}.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))["facts"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    facts = _built_facts(spec, settings)
    try:
        from harness.engine.support.fsutil import atomic_write

        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps({"method": spec.name, "facts": facts}, indent=1) + "\n")
    except OSError:
        pass  # an unwritable cache only means building again next time
    return facts


def describe_method(spec: Any, profile: str, use_cache: bool = True) -> dict[str, Any]:
    """Everything ``harness describe`` shows, as JSON-ready data.

    Parameters
    ----------
    spec : MethodSpec
    profile : str
    use_cache : bool
        Reuse the built facts (parameter counts, input size, ...) kept for the same settings,
        code and libraries; False builds the networks (on the meta device) every time.
    """
    from harness.engine.planning import resolve_settings
    from harness.settings import describe_settings, open_choices

    settings = resolve_settings(spec, profile, {})
    facts = _cached_facts(spec, settings, use_cache)
    networks = {str(k): int(v) for k, v in facts["networks"].items()}
    return {
        "name": spec.name, "paper": vars(spec.paper), "protocols": list(spec.protocols),
        "paper_protocol": spec.paper_protocol or None, "profiles": list(spec.profiles), "profile": profile,
        "settings": settings.as_json(), "settings_table": describe_settings(spec.schema, settings),
        "settings_help": {s.name: s.help for s in spec.schema}, "choices": open_choices(spec.schema, settings),
        "typed_settings": not spec.schema.inferred, "resources": spec.resources_for(profile).as_dict(),
        "weights": [f.as_dict() for f in spec.weight_files(settings)],
        "data_needs": [n.as_dict() for n in spec.needs(settings)], "input_size": list(facts["input_size"]),
        "eval_batch_size": facts["eval_batch_size"], "interpolation": facts["interpolation"],
        "antialias": facts["antialias"], "resize_mode": facts["resize_mode"],
        "networks": networks, "total_parameters": sum(networks.values()), "description": spec.description,
        "paper_grid": spec.paper_grid(settings).as_dict() if spec.paper_grid is not None else None,
    }
