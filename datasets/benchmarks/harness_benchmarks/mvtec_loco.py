"""MVTec LOCO AD (Bergmann et al., IJCV 2022), as distributed.

Layout, per category::

    <cat>/train/good/000.png ...
    <cat>/validation/good/000.png ...
    <cat>/test/{good,logical_anomalies,structural_anomalies}/000.png ...
    <cat>/ground_truth/{logical_anomalies,structural_anomalies}/000/000.png, 001.png, ...
    <cat>/defects_config.json

An anomalous image has a *folder* of masks named after its stem, one PNG per annotated defect
(defects may overlap, so the masks are not merged): each holds the defect type's
``pixel_value`` on zeros. ``defects_config.json`` lists per defect type ``defect_name``,
``pixel_value``, ``saturation_threshold`` and ``relative_saturation``: the saturation rule of
the sPRO metric (:mod:`harness.metrics.spro`). Each mask becomes a
:class:`harness.MaskChannel` of the sample; the sample's ``mask`` is their union (for the pixel
metrics that take one mask per image).

The two anomaly types are the reporting groups of the official evaluation: logical anomalies
scored together with all good test images, structural anomalies likewise, and the category's
value their mean (see :data:`GROUPS`). The validation images (normal only) are indexed as the
category's ``validation`` split; the harness never trains on them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from harness import CategoryData, DatasetIndex, DatasetSpec, MaskChannel, MetricSpec, Sample, hookimpl
from harness.metrics.dataset_metrics import group_image_auroc, spro_metric
from harness.errors import DatasetError
from harness_benchmarks.layout import (NORMAL, check_root_extras, env_root, is_image, key, scan_images,
                                       select_categories)

NAME = "mvtec_loco"

CATEGORIES = ("breakfast_box", "juice_bottle", "pushpins", "screw_bag", "splicing_connectors")

LOGICAL, STRUCTURAL = "logical_anomalies", "structural_anomalies"

#: Reporting groups: each anomaly type is scored with all good test images (the official evaluation);
#: the leaderboard shows LOCO by them through the metrics of :func:`harness_metrics`.
GROUPS = {"logical": (LOGICAL,), "structural": (STRUCTURAL,)}

#: (train, validation, test good, test logical, test structural), from the dataset paper (Table 1).
COUNTS = {
    "breakfast_box": (351, 62, 102, 83, 90), "juice_bottle": (335, 54, 94, 142, 94),
    "pushpins": (372, 69, 138, 91, 81), "screw_bag": (360, 60, 122, 137, 82),
    "splicing_connectors": (354, 59, 119, 108, 85),
}
OFFICIAL = {c: {"train": a, "validation": v, "test_normal": g, "test_anomalous": lo + st}
            for c, (a, v, g, lo, st) in COUNTS.items()}

CONFIG_FILE = "defects_config.json"

TREE = """\
<root>/                                   (e.g. mvtec_loco_anomaly_detection/)
├── breakfast_box/
│   ├── train/good/000.png ...
│   ├── validation/good/000.png ...
│   ├── test/good/000.png ...
│   ├── test/logical_anomalies/000.png ...
│   ├── test/structural_anomalies/000.png ...
│   ├── ground_truth/logical_anomalies/000/000.png, 001.png ...   (one folder of masks per image)
│   └── defects_config.json
└── ... (5 categories: breakfast_box ... splicing_connectors)
"""


class UnionMask:
    """The union of an image's masks, read lazily (``path``: the first file, for integrity checks)."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = tuple(paths)
        self.path = self.paths[0]

    def __call__(self) -> np.ndarray:
        from harness import read_mask

        union = read_mask(self.paths[0])
        for path in self.paths[1:]:
            union = union | read_mask(path)
        return union.astype(np.uint8) * 255


def read_defects_config(path: Path) -> dict[int, tuple[float, bool]]:
    """``{pixel_value: (saturation_threshold, relative_saturation)}`` from a ``defects_config.json``.

    Raises
    ------
    DatasetError
        When the file is not a list of defect entries with those keys; the message names it.
    """
    try:
        entries = json.loads(Path(path).read_text(encoding="utf-8"))
        return {int(e["pixel_value"]): (float(e["saturation_threshold"]), bool(e["relative_saturation"]))
                for e in entries}
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise DatasetError(f"{path}: expected a JSON list of defects with pixel_value, saturation_threshold and "
                           f"relative_saturation ({exc}); re-extract it from the dataset archive") from exc


def _category(cat_dir: Path, category: str, problems: list[str]) -> CategoryData:
    def normal(split: str) -> list[Sample]:
        folder = cat_dir / split / NORMAL
        if not folder.is_dir():
            problems.append(f"missing folder {folder}")
        return [Sample(key(category, split, NORMAL, s), category, split, 0, NORMAL, p)
                for s, p in scan_images(folder, problems).items()]

    train, validation = normal("train"), normal("validation")
    config_path = cat_dir / CONFIG_FILE
    saturation: dict[int, tuple[float, bool]] = {}
    if config_path.is_file():
        saturation = read_defects_config(config_path)
    else:
        problems.append(f"missing {config_path}: sPRO of {category} is undefined (its saturation thresholds are there)")
    test = normal("test")
    for defect in (LOGICAL, STRUCTURAL):
        folder = cat_dir / "test" / defect
        if not folder.is_dir():
            problems.append(f"missing folder {folder}")
        gt_dir = cat_dir / "ground_truth" / defect
        for stem, path in scan_images(folder, problems).items():
            mask_dir = gt_dir / stem
            masks = sorted(p for p in mask_dir.iterdir() if is_image(p)) if mask_dir.is_dir() else []
            if not masks:
                problems.append(f"missing masks for anomalous image {path} (expected {mask_dir}/000.png); "
                                f"pixel metrics of {category} are undefined")
            channels = tuple(MaskChannel(m, saturation) for m in masks)
            test.append(Sample(key(category, "test", defect, stem), category, "test", 1, defect, path,
                               UnionMask(masks) if masks else None, channels))
        if gt_dir.is_dir():
            stems = {s.key.rsplit("/", 1)[1] for s in test if s.defect == defect}
            for entry in sorted(gt_dir.iterdir()):
                if entry.name not in stems:
                    problems.append(f"mask folder without image: {entry} (no {folder / entry.name}.png); ignored")
    for entry in sorted((cat_dir / "test").iterdir()) if (cat_dir / "test").is_dir() else []:
        if entry.name not in (NORMAL, LOGICAL, STRUCTURAL):
            problems.append(f"unexpected {'folder' if entry.is_dir() else 'file'} {entry}; ignored")
    return CategoryData(name=category, train=train, test=test, validation=validation)


def load_mvtec_loco(root: Path | str | None, categories: Sequence[str] | None = None) -> DatasetIndex:
    """Index MVTec LOCO AD under ``root`` (the folder holding the five category folders).

    Parameters
    ----------
    root : Path or str
    categories : sequence of str, optional
        Categories to index; all present ones when ``None``.

    Returns
    -------
    DatasetIndex

    Raises
    ------
    DatasetError
        When ``root`` holds none of the categories; the message shows the expected layout.
    """
    root = Path(root) if root is not None else None
    problems: list[str] = []
    present = lambda d: (d / "train").is_dir() or (d / "test").is_dir()  # noqa: E731
    chosen = select_categories(NAME, root, CATEGORIES, categories, TREE, present, problems)
    assert root is not None
    check_root_extras(root, CATEGORIES, problems)
    cats = {c: _category(root / c, c, problems) for c in chosen}
    return DatasetIndex(name=NAME, categories=cats, root=root, problems=problems)


@hookimpl
def harness_datasets():
    """Register MVTec LOCO AD."""
    return [DatasetSpec(name=NAME, categories=CATEGORIES, loader=load_mvtec_loco,
                        find_root=env_root(NAME, "HARNESS_DATA_MVTEC_LOCO"), official_counts=OFFICIAL,
                        description="MVTec LOCO AD: 5 categories, logical and structural anomalies (sPRO)")]


@hookimpl
def harness_metrics():
    """The official evaluation's metrics, and image AUROC per anomaly type (the reporting groups)."""
    specs = [MetricSpec("pixel_spro", "pixel", True, spro_metric("pixel_spro"), "P-sPRO", datasets=(NAME,),
                        description="AUC-sPRO to FPR 0.05 (MVTec LOCO AD), mean of logical and structural")]
    for group, folders in GROUPS.items():
        short = group[:3]
        specs.append(MetricSpec(f"image_auroc_{group}", "image", True, group_image_auroc(folders),
                                f"I-AUROC-{short}", datasets=(NAME,), needs_maps=False,
                                description=f"image AUROC, {group} anomalies with all good images"))
        specs.append(MetricSpec(f"pixel_spro_{group}", "pixel", True, spro_metric(f"pixel_spro_{group}"),
                                f"P-sPRO-{short}", datasets=(NAME,),
                                description=f"AUC-sPRO to FPR 0.05, {group} anomalies with all good images"))
    return specs
