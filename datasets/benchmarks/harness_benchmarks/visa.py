"""VisA, the Visual Anomaly dataset (Zou et al., ECCV 2022), raw or prepared.

Two layouts are accepted, detected per root:

- **raw**, as the archive extracts: ``<cat>/Data/Images/{Normal,Anomaly}/*.JPG``,
  ``<cat>/Data/Masks/Anomaly/*.png`` and ``split_csv/1cls.csv`` at the root. The split comes from
  the CSV (columns ``object,split,label,image,mask``; labels ``normal``/``anomaly``; paths
  relative to the root; CRLF line endings). Images on disk that the CSV does not list are
  reported and ignored.
- **prepared**, as written by VisA's own preparation script for the ``1cls`` split:
  ``<cat>/train/good``, ``<cat>/test/{good,bad}`` and ``<cat>/ground_truth/bad/<stem>.png``
  (mask stem equal to the image stem).

Raw masks store a defect class index per pixel (1, 2, ...), not 255; the harness's > 0 rule
binarises them correctly. VisA has no defect types in its folders: anomalous samples get the
defect name ``bad`` in both layouts, so that keys agree.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

from harness import CategoryData, DatasetIndex, DatasetSpec, Sample, hookimpl
from harness.errors import DatasetError
from harness_benchmarks.layout import (NORMAL, check_root_extras, counts_table, env_root, key, layout_error,
                                       mvtec_category, scan_images, select_categories)

NAME = "visa"
ANOMALOUS = "bad"
SPLIT_CSV = Path("split_csv") / "1cls.csv"

CATEGORIES = ("candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1", "pcb2",
              "pcb3", "pcb4", "pipe_fryum")

#: (train, test normal, test anomalous) of the 1cls split; totals 8659 / 962 / 1200.
OFFICIAL = counts_table({
    "candle": (900, 100, 100), "capsules": (542, 60, 100), "cashew": (450, 50, 100), "chewinggum": (453, 50, 100),
    "fryum": (450, 50, 100), "macaroni1": (900, 100, 100), "macaroni2": (900, 100, 100), "pcb1": (904, 100, 100),
    "pcb2": (901, 100, 100), "pcb3": (905, 101, 100), "pcb4": (904, 101, 100), "pipe_fryum": (450, 50, 100),
})

TREE = """\
raw archive:                          or prepared (1cls):
<root>/                               <root>/
├── split_csv/1cls.csv                ├── candle/
├── candle/                           │   ├── train/good/0000.JPG ...
│   └── Data/                         │   ├── test/good/0000.JPG ...
│       ├── Images/Normal/0000.JPG    │   ├── test/bad/000.JPG ...
│       ├── Images/Anomaly/000.JPG    │   └── ground_truth/bad/000.png ...
│       └── Masks/Anomaly/000.png     └── ... (12 categories)
└── ... (12 categories: candle ... pipe_fryum)
"""


def _is_raw(cat_dir: Path) -> bool:
    return (cat_dir / "Data").is_dir()


def _is_prepared(cat_dir: Path) -> bool:
    return (cat_dir / "train").is_dir() or (cat_dir / "test").is_dir()


def read_split_csv(path: Path) -> list[dict[str, str]]:
    """Read VisA's split CSV into rows with keys ``object, split, label, image, mask``.

    Parameters
    ----------
    path : Path
        ``split_csv/1cls.csv`` (CRLF or LF line endings).

    Returns
    -------
    list of dict

    Raises
    ------
    DatasetError
        When the header lacks one of the columns.
    """
    # newline="" lets the csv module handle the archive's CRLF endings without stray "\r".
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        needed = {"object", "split", "label", "image", "mask"}
        header = {h.strip() for h in (reader.fieldnames or [])}
        if not needed <= header:
            raise DatasetError(f"{path}: expected columns {', '.join(sorted(needed))}, found {', '.join(sorted(header))}")
        return [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in reader]


def _raw_category(root: Path, category: str, rows: list[dict[str, str]], problems: list[str]) -> CategoryData:
    train: list[Sample] = []
    test: list[Sample] = []
    listed: set[Path] = set()
    for row in rows:
        image = root / row["image"]
        listed.add(image)
        if not image.is_file():
            problems.append(f"image listed in {root / SPLIT_CSV} is missing: {image}; skipped")
            continue
        anomalous = row["label"].lower() == "anomaly"
        split = "train" if row["split"].lower() == "train" else "test"
        if split == "train" and anomalous:
            problems.append(f"anomalous image in the training split of {root / SPLIT_CSV}: {image}; skipped")
            continue
        defect = ANOMALOUS if anomalous else NORMAL
        mask = None
        if anomalous:
            # Pair by relative path: the CSV names the mask; else the mask folder's same stem.
            candidate = root / row["mask"] if row["mask"] else root / category / "Data" / "Masks" / "Anomaly" / f"{image.stem}.png"
            if candidate.is_file():
                mask = candidate
            else:
                problems.append(f"missing mask for anomalous image {image} (expected {candidate}); "
                                f"pixel metrics of {category} are undefined")
        sample = Sample(key(category, split, defect, image.stem), category, split, int(anomalous), defect, image, mask)
        (train if split == "train" else test).append(sample)
    images_dir = root / category / "Data" / "Images"
    for sub in ("Normal", "Anomaly"):
        for path in scan_images(images_dir / sub, problems).values():
            if path not in listed:
                problems.append(f"image not listed in {root / SPLIT_CSV}: {path}; ignored")
    return CategoryData(name=category, train=train, test=test)


def load_visa(root: Path | str | None, categories: Sequence[str] | None = None) -> DatasetIndex:
    """Index VisA under ``root``, raw archive or prepared ``1cls`` layout.

    Parameters
    ----------
    root : Path or str
        The folder holding the 12 category folders (and ``split_csv/`` for the raw archive).
    categories : sequence of str, optional
        Categories to index; all present ones when ``None``.

    Returns
    -------
    DatasetIndex

    Raises
    ------
    DatasetError
        When ``root`` holds none of the categories, or the raw archive lacks its split CSV.
    """
    root = Path(root) if root is not None else None
    problems: list[str] = []
    present = lambda d: _is_raw(d) or _is_prepared(d)  # noqa: E731
    chosen = select_categories(NAME, root, CATEGORIES, categories, TREE, present, problems)
    assert root is not None
    check_root_extras(root, [*CATEGORIES, "split_csv"], problems)
    raw = [c for c in chosen if _is_raw(root / c)]
    cats: dict[str, CategoryData] = {}
    if raw:
        if not (root / SPLIT_CSV).is_file():
            raise layout_error(NAME, root, TREE, f"the raw archive needs its split file {root / SPLIT_CSV}, "
                                                  "which defines train and test")
        rows = read_split_csv(root / SPLIT_CSV)
        by_object: dict[str, list[dict[str, str]]] = {}
        for row in rows:
            by_object.setdefault(row["object"], []).append(row)
    for c in chosen:
        if c in raw:
            cats[c] = _raw_category(root, c, by_object.get(c, []), problems)
        else:
            cats[c] = mvtec_category(root / c, c, problems, mask_suffixes=("", "_mask"))
    return DatasetIndex(name=NAME, categories=cats, root=root, problems=problems)


@hookimpl
def harness_datasets():
    """Register VisA."""
    return [DatasetSpec(name=NAME, categories=CATEGORIES, loader=load_visa,
                        find_root=env_root(NAME, "HARNESS_DATA_VISA"), official_counts=OFFICIAL,
                        description="VisA: 12 categories, complex structures and multiple instances (1cls split)")]
