"""Real-IAD (Wang et al., CVPR 2024), as distributed.

Layout::

    <root>/realiad_1024/<cat>/OK/S0001/<cat>_0001_OK_C1_<time>.jpg ...        (also realiad_512, _256, _raw)
    <root>/realiad_1024/<cat>/NG/<defect>/S0025/<cat>_0025_NG_<defect>_C1_<time>.jpg, same stem .png (mask)
    <root>/realiad_jsons/realiad_jsons/<cat>.json       (multi-view split)
    <root>/realiad_jsons/realiad_jsons_sv/<cat>.json    (single-view split)

(``realiad_jsons.zip`` extracts to ``realiad_jsons/`` holding one folder per split; the split
folders directly under the root are accepted too.)

The split is the authors' JSON: ``{"meta": {"normal_class": "OK", "prefix": ...}, "train": [...],
"test": [...]}``, each entry with ``anomaly_class``, ``image_path`` and ``mask_path`` (null for
normal images), paths relative to ``realiad_<r>/<meta.prefix>/`` (the prefix is the category;
a path relative to ``realiad_<r>/`` itself is accepted too). An image is
anomalous when its ``anomaly_class`` is not ``meta.normal_class``; its defect name is the
anomaly class (``good`` for normal ones).

Options (``--data-option KEY=VALUE``):

- ``resolution``: ``1024`` (default), ``512``, ``256`` or ``raw``: which ``realiad_<r>`` folder
  is read (the JSONs are the same for all).
- ``split``: ``mv`` (default; ``realiad_jsons``, the multi-view setting, where the five views of
  an object are one *sample*) or ``sv`` (``realiad_jsons_sv``, single view).

The five camera views of one object (``..._C1_...`` to ``..._C5_...``, one folder ``S<id>``)
form a sample; :func:`sample_id` recovers it from a key, and the metric ``image_sample_auroc``
scores samples as the Real-IAD paper does: a sample is anomalous when any of its views is, its
score is the maximum of its views' scores, and the AUROC is taken over samples.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Sequence

from harness import CategoryData, DatasetIndex, DatasetSpec, MetricSpec, Sample, hookimpl
from harness.metrics.dataset_metrics import sample_image_auroc
from harness.errors import DatasetError
from harness_benchmarks.layout import NORMAL, env_root, key, layout_error

NAME = "realiad"

CATEGORIES = ("audiojack", "bottle_cap", "button_battery", "end_cap", "eraser", "fire_hood", "mint", "mounts", "pcb",
              "phone_battery", "plastic_nut", "plastic_plug", "porcelain_doll", "regulator", "rolled_strip_base",
              "sim_card_set", "switch", "tape", "terminalblock", "toothbrush", "toy", "toy_brick", "transistor1",
              "u_block", "usb", "usb_adaptor", "vcpill", "wooden_beads", "woodstick", "zipper")

RESOLUTIONS = ("1024", "512", "256", "raw")
SPLITS = {"mv": "realiad_jsons", "sv": "realiad_jsons_sv"}
OPTIONS = {"resolution": "which realiad_<resolution> folder is read: " + ", ".join(RESOLUTIONS) + " (default 1024)",
           "split": "mv (realiad_jsons, multi-view; default) or sv (realiad_jsons_sv, single view)"}

_VIEW = re.compile(r"^(?P<sample>.+)_C[1-9]_[^_]*$")

TREE = """\
<root>/                                    (the folder holding the extracted archives)
├── realiad_1024/                     (or realiad_512, _256, _raw: --data-option resolution=...)
│   ├── audiojack/OK/S0001/audiojack_0001_OK_C1_20230922093512.jpg ...
│   ├── audiojack/NG/AK/S0025/audiojack_0025_NG_AK_C1_....jpg, ....png ...
│   └── ... (30 categories)
└── realiad_jsons/
    ├── realiad_jsons/audiojack.json ...       (multi-view split; --data-option split=mv)
    └── realiad_jsons_sv/audiojack.json ...    (single-view split; --data-option split=sv)
"""


def sample_id(sample_key: str) -> str:
    """The object (multi-view sample) a Real-IAD image key belongs to: its stem without ``_C<k>_<time>``."""
    stem = sample_key.rsplit("/", 1)[-1]
    match = _VIEW.match(stem)
    return match.group("sample") if match else stem


def _json_dir(root: Path, split: str) -> Path:
    """The folder of the split's JSONs: ``realiad_jsons.zip`` extracts to ``realiad_jsons/<name>/``
    (``realiad_jsons``, ``realiad_jsons_sv``, ...); ``<root>/<name>/`` is accepted too."""
    name = SPLITS[split]
    candidates = [root / "realiad_jsons" / name, root / name, root / name / name]
    return next((c for c in candidates if c.is_dir() and any(c.glob("*.json"))), candidates[0])


def _resolve(base: Path, category: str, prefix: str, relative: str) -> Path:
    for candidate in (base / (prefix or category) / relative, base / category / relative, base / relative):
        if candidate.is_file():
            return candidate
    return base / (prefix or category) / relative


def _category(base: Path, json_path: Path, category: str, problems: list[str]) -> CategoryData:
    try:
        spec: dict[str, Any] = json.loads(json_path.read_text(encoding="utf-8"))
        meta = spec.get("meta", {}) or {}
        normal = str(meta.get("normal_class", "OK"))
        prefix = str(meta.get("prefix", "") or "")
        splits = {s: list(spec[s]) for s in ("train", "test")}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DatasetError(f"{json_path}: not a Real-IAD split file (expected meta, train and test): {exc}") from exc
    out: dict[str, list[Sample]] = {"train": [], "test": []}
    seen: set[str] = set()
    for split, entries in splits.items():
        for entry in entries:
            try:
                relative, cls = str(entry["image_path"]), str(entry["anomaly_class"])
            except (KeyError, TypeError):
                problems.append(f"{json_path}: {split} entry without image_path/anomaly_class: {entry!r}; skipped")
                continue
            image = _resolve(base, category, prefix, relative)
            if not image.is_file():
                problems.append(f"image listed in {json_path} is missing: {image}; skipped")
                continue
            anomalous = cls != normal
            if split == "train" and anomalous:
                problems.append(f"anomalous image in the training split of {json_path}: {image}; skipped")
                continue
            defect = cls if anomalous else NORMAL
            sample_key = key(category, split, defect, image.stem)
            if sample_key in seen:
                problems.append(f"{json_path} lists {image} twice; kept the first")
                continue
            seen.add(sample_key)
            mask = None
            if anomalous:
                if entry.get("mask_path"):
                    candidate = _resolve(base, category, prefix, str(entry["mask_path"]))
                else:
                    candidate = image.with_suffix(".png")
                if candidate.is_file():
                    mask = candidate
                else:
                    problems.append(f"missing mask for anomalous image {image} (expected {candidate}); "
                                    f"pixel metrics of {category} are undefined")
            out[split].append(Sample(sample_key, category, split, int(anomalous), defect, image, mask))
    return CategoryData(name=category, train=out["train"], test=out["test"])


def load_realiad(root: Path | str | None, categories: Sequence[str] | None = None, *, resolution: str = "1024",
                 split: str = "mv") -> DatasetIndex:
    """Index Real-IAD under ``root``.

    Parameters
    ----------
    root : Path or str
        The folder holding ``realiad_<resolution>/`` and ``realiad_jsons*/``.
    categories : sequence of str, optional
        Categories to index; all those with a split file and an image folder when ``None``.
    resolution : str
        ``1024``, ``512``, ``256`` or ``raw``.
    split : str
        ``mv`` (multi-view) or ``sv`` (single view).

    Returns
    -------
    DatasetIndex

    Raises
    ------
    DatasetError
        When an option is invalid, or the root lacks the resolution folder or the split files.
    """
    resolution, split = str(resolution).removeprefix("realiad_"), str(split).lower()
    if resolution not in RESOLUTIONS:
        raise DatasetError(f"{NAME}: --data-option resolution={resolution} is not one of {', '.join(RESOLUTIONS)}")
    if split not in SPLITS:
        raise DatasetError(f"{NAME}: --data-option split={split} is not one of {', '.join(SPLITS)}")
    root = Path(root) if root is not None else None
    if root is None or not root.is_dir():
        raise layout_error(NAME, root, TREE, "the folder does not exist" if root else "no dataset folder given")
    base, json_dir = root / f"realiad_{resolution}", _json_dir(root, split)
    if not base.is_dir():
        raise layout_error(NAME, root, TREE, f"no image folder {base.name}/ (resolution {resolution})")
    if not json_dir.is_dir():
        raise layout_error(NAME, root, TREE, f"no split folder {json_dir.relative_to(root)}/ with <category>.json "
                                             f"files (split {split})")
    unknown = [c for c in (categories or ()) if c not in CATEGORIES]
    if unknown:
        raise DatasetError(f"{NAME}: unknown categories {unknown}; valid: {', '.join(CATEGORIES)}")
    problems: list[str] = []
    found = [c for c in CATEGORIES if (json_dir / f"{c}.json").is_file() and (base / c).is_dir()]
    if not found:
        raise layout_error(NAME, root, TREE, f"no category has both {json_dir.name}/<category>.json and "
                                             f"{base.name}/<category>/")
    wanted = list(categories) if categories else list(CATEGORIES)
    absent = [c for c in wanted if c not in found]
    if categories and absent:
        raise layout_error(NAME, root, TREE, f"requested categories {absent} lack a split file or an image folder")
    for c in absent:
        what = json_dir / f"{c}.json" if not (json_dir / f"{c}.json").is_file() else base / c
        problems.append(f"missing {what} (partial download?); category {c} skipped")
    cats = {c: _category(base, json_dir / f"{c}.json", c, problems) for c in wanted if c in found}
    return DatasetIndex(name=NAME, categories=cats, root=root, problems=problems)


@hookimpl
def harness_datasets():
    """Register Real-IAD."""
    return [DatasetSpec(name=NAME, categories=CATEGORIES, loader=load_realiad,
                        find_root=env_root(NAME, "HARNESS_DATA_REALIAD"), options=OPTIONS,
                        description="Real-IAD: 30 categories, 5 views per object")]


@hookimpl
def harness_metrics():
    """Real-IAD's sample-level AUROC (the five views of an object are one sample)."""
    return [MetricSpec("image_sample_auroc", "image", True, sample_image_auroc(sample_id), "S-AUROC",
                       datasets=(NAME,), needs_maps=False,
                       description="Real-IAD sample-level AUROC: max over an object's views, anomalous if any is")]
