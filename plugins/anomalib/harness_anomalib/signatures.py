"""Each anomalib model's constructor arguments as typed harness settings.

The settings are derived from the constructor's signature (name, annotation, default) by
:func:`derive`. Importing anomalib takes seconds, and ``harness list`` must stay fast, so the
derived table is stored in ``signatures.json`` beside this module and read from there;
``python -m harness_anomalib.signatures`` regenerates it, and a test checks that it still equals
what the installed anomalib's signatures give.

Type mapping: ``int``, ``float``, ``bool`` and ``str`` stay; ``Path | str`` is ``str``; lists,
sequences and tuples are ``tuple[...]`` of their element type (a ``float | tuple[float, float]``
is a tuple); an enum is a ``str`` with the enum's values as choices. A ``None`` default is kept as
the empty value of the type (``""``, ``()``, ``0``), which the adapter turns back into ``None``.
"""

from __future__ import annotations

import enum
import inspect
import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

#: Arguments of every anomalib module that the adapter fixes (our metrics only).
PIPELINE = ("pre_processor", "post_processor", "evaluator", "visualizer")
TABLE = Path(__file__).with_name("signatures.json")


def _element(text: str) -> str:
    inner = re.search(r"\[(.*)\]", text)
    inner_text = inner.group(1) if inner else "int"
    if inner_text.startswith(("list[", "tuple[", "Sequence[")):
        return "tuple[" + _element(inner_text) + ", ...]"
    first = inner_text.split(",")[0].strip()
    return first if first in ("int", "float", "str", "bool") else "int"


def harness_type(annotation: str, default: Any) -> tuple[str, Any, bool, list | None]:
    """(harness type, default, None-when-empty, choices) for one constructor argument."""
    choices = None
    none = default is None
    parts = [p.strip() for p in annotation.split("|") if p.strip() != "None"]
    if isinstance(default, enum.Enum):
        return "str", default.value, False, [m.value for m in type(default)]
    seq = next((p for p in parts if p.startswith(("list[", "tuple[", "Sequence[")) or p == "tuple"), None)
    if seq is not None:
        kind = "tuple[" + _element(seq) + ", ...]"
        if none:
            return kind, (), True, None
        value = default if isinstance(default, (list, tuple)) else (default,)
        return kind, [list(v) if isinstance(v, (list, tuple)) else v for v in value], False, None
    base = next((p for p in parts if p in ("int", "float", "bool", "str")), "str")
    if none:
        return base, {"int": 0, "float": 0.0, "bool": False, "str": ""}[base], True, None
    if base == "str":
        default = str(default)
    return base, default, False, choices


def derive(cls: type, variant) -> list[dict[str, Any]]:
    """The settings of ``cls``'s constructor (anomalib installed)."""
    out = []
    for param in list(inspect.signature(cls.__init__).parameters.values())[1:]:
        if param.name in PIPELINE or param.name in variant.owned or param.kind in (param.VAR_POSITIONAL,
                                                                                   param.VAR_KEYWORD):
            continue
        annotation = inspect.formatannotation(param.annotation).replace("collections.abc.", "")
        annotation = re.sub(r"\b(pathlib\.)?Path\b", "str", annotation)
        annotation = re.sub(r"\b[\w.]+\.(\w+)\b", r"\1", annotation)
        kind, default, none, choices = harness_type(annotation, param.default)
        out.append({"name": param.name, "setting": variant.renames.get(param.name, param.name), "annotation": annotation,
                    "type": kind, "default": default, "none_when_empty": none, "choices": choices})
    return out


@lru_cache(maxsize=None)
def _table() -> dict[str, Any]:
    return json.loads(TABLE.read_text())


def constructor_settings(variant) -> list[dict[str, Any]]:
    """The stored settings of ``variant``'s constructor (see the module docstring)."""
    return _table()["models"][variant.model]


def anomalib_version_of_table() -> str:
    """The anomalib version the table was derived from."""
    return _table()["anomalib"]


def regenerate() -> dict[str, Any]:
    """Derive the table from the installed anomalib."""
    from importlib import metadata

    import anomalib.models

    from harness_anomalib.variants import VARIANTS

    return {"anomalib": metadata.version("anomalib"),
            "models": {v.model: derive(getattr(anomalib.models, v.model), v) for v in VARIANTS}}


if __name__ == "__main__":
    TABLE.write_text(json.dumps(regenerate(), indent=1) + "\n")
    print(f"wrote {TABLE}")
