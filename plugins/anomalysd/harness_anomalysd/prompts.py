"""Hierarchical text prompts of AnomalySD (Sec. 4.1, "Textual Prompt Design").

For a category ``c`` the prompt set is ``T_c = T_c^1 ∪ T_c^2``: the coarse prompt ``"A perfect
[c]."`` and detailed prompts describing a normal object of that category. The prompts are data,
kept as JSON files in ``harness_anomalysd/prompts/`` (one per dataset: MVTec AD, VisA and the
embedded synthetic set) so that a user can edit them; the ``prompts_file`` setting adds or
replaces categories from a file of the same format::

    {"bottle": {"name": "bottle", "detailed": ["A clean glass bottle ...", "..."]}, ...}

Keys starting with ``_`` are comments. A category found in no file gets its coarse prompt only
(its name with underscores as spaces); :func:`load_prompt_sets` reports which categories did.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Mapping, Sequence

COARSE_TEMPLATE = "A perfect {name}."


def _read(path_or_text: str, origin: str) -> dict[str, dict]:
    try:
        data = json.loads(path_or_text)
    except ValueError as exc:
        raise ValueError(f"prompt file {origin} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"prompt file {origin} must hold an object {{category: {{name, detailed}}}}")
    out = {}
    for category, entry in data.items():
        if category.startswith("_"):
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("detailed", []), list):
            raise ValueError(f"prompt file {origin}: entry {category!r} must be "
                             "{'name': str, 'detailed': [str, ...]}")
        out[category] = entry
    return out


def builtin_prompt_entries() -> dict[str, dict]:
    """Entries of every prompt file shipped with the package, merged (later files win)."""
    merged: dict[str, dict] = {}
    folder = resources.files("harness_anomalysd") / "prompts"
    for item in sorted(folder.iterdir(), key=lambda p: p.name):
        if item.name.endswith(".json"):
            merged.update(_read(item.read_text(encoding="utf-8"), f"harness_anomalysd/prompts/{item.name}"))
    return merged


def prompt_set(category: str, entries: Mapping[str, dict]) -> list[str]:
    """The prompt set ``T_c``: the coarse prompt first, then the detailed ones.

    Parameters
    ----------
    category : str
        Category name as the dataset spells it (``metal_nut``).
    entries : mapping
        Prompt entries by category (see :func:`load_prompt_sets`).

    Returns
    -------
    list of str
    """
    entry = entries.get(category, {})
    name = str(entry.get("name") or category.replace("_", " "))
    return [COARSE_TEMPLATE.format(name=name)] + [str(p) for p in entry.get("detailed", [])]


def load_prompt_sets(categories: Sequence[str], prompts_file: str | None = None,
                     mode: str = "hierarchical") -> tuple[dict[str, list[str]], list[str]]:
    """Prompt sets for ``categories``.

    Parameters
    ----------
    categories : sequence of str
    prompts_file : str, optional
        A JSON file whose entries add to / replace the shipped ones.
    mode : str
        ``"hierarchical"`` (the paper: coarse + detailed), ``"coarse"`` (``"A perfect [c]."`` only),
        ``"simple"`` (``"A photo of [c]."``, the paper's ablation) or ``"none"`` (empty prompt).

    Returns
    -------
    sets : dict of str to list of str
    fallback : list of str
        Categories that no prompt file describes (they get the coarse prompt only).
    """
    entries = builtin_prompt_entries()
    if prompts_file:
        path = Path(prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompts_file {path} does not exist; give a JSON file like "
                                    "harness_anomalysd/prompts/mvtec.json or leave the setting empty")
        entries.update(_read(path.read_text(encoding="utf-8"), str(path)))
    sets, fallback = {}, []
    for c in categories:
        if c not in entries:
            fallback.append(c)
        full = prompt_set(c, entries)
        if mode == "hierarchical":
            sets[c] = full
        elif mode == "coarse":
            sets[c] = full[:1]
        elif mode == "simple":
            sets[c] = [f"A photo of {str(entries.get(c, {}).get('name') or c.replace('_', ' '))}."]
        elif mode == "none":
            sets[c] = [""]
        else:
            raise ValueError(f"prompt_mode must be hierarchical, coarse, simple or none, not {mode!r}")
    return sets, fallback
