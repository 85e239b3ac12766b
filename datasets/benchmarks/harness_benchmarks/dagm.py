"""DAGM 2007 (the weakly supervised texture-defect competition set), unsupervised setting.

Two layouts are accepted, detected per class folder:

- **as distributed**: ``ClassN/Train/*.PNG`` and ``ClassN/Test/*.PNG`` (8-bit greyscale), each
  with ``Label/Labels.txt`` and ``Label/<stem>_label.PNG`` masks (255 inside the defect
  ellipse). ``Labels.txt`` starts with a header line, then one row per image:
  ``<index> <is_defective 0|1> <image file> <0> <label file or 0>`` separated by tabs.
- **MVTec-style conversion** (as used by DiffusionAD and others): ``ClassN/train/good``,
  ``ClassN/test/{good,<defect>}``, ``ClassN/ground_truth/<defect>/<stem>{_mask,_label,}.png``.

The unsupervised protocol (DiffusionAD's): train on the defect-free images of the training
split only (its defective ones are left out), test on the whole test split with its labels.
Anomalous samples get the defect name ``bad``. No per-class counts are published for this
setting, so ``harness data summary`` makes no comparison.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from harness import CategoryData, DatasetIndex, DatasetSpec, Sample, hookimpl
from harness_benchmarks.layout import (NORMAL, check_root_extras, env_root, key, mvtec_category, scan_images,
                                       select_categories)

NAME = "dagm"
ANOMALOUS = "bad"
CATEGORIES = tuple(f"Class{i}" for i in range(1, 11))

TREE = """\
as distributed:                          or converted to the MVTec layout:
<root>/                                  <root>/
├── Class1/                              ├── Class1/
│   ├── Train/0576.PNG ...               │   ├── train/good/0576.png ...
│   ├── Train/Label/Labels.txt           │   ├── test/good/0001.png ...
│   ├── Train/Label/0577_label.PNG ...   │   ├── test/bad/0002.png ...
│   ├── Test/0001.PNG ...                │   └── ground_truth/bad/0002_mask.png ...
│   └── Test/Label/Labels.txt, ...       └── ... (Class1 ... Class10)
└── ... (Class1 ... Class10)
"""


def read_labels(path: Path, problems: list[str]) -> dict[str, tuple[bool, str | None]]:
    """Parse a DAGM ``Labels.txt``.

    Parameters
    ----------
    path : Path
        The file; a missing file gives ``{}``.
    problems : list of str
        Receives malformed rows.

    Returns
    -------
    dict of str to (bool, str or None)
        Image file name to (defective, label file name or None).
    """
    out: dict[str, tuple[bool, str | None]] = {}
    if not path.is_file():
        return out
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for number, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) < 3:
            # The first line is a header (a bare "1" in the archive); anything else short is malformed.
            if number > 1:
                problems.append(f"{path}, line {number}: expected 'index flag image 0 label', got {line.strip()!r}")
            continue
        defective = fields[1] == "1"
        label = fields[4] if len(fields) >= 5 and fields[4] != "0" else None
        out[fields[2]] = (defective, label)
    return out


def _raw_split(cat_dir: Path, category: str, folder: str, problems: list[str]) -> list[Sample]:
    split = "train" if folder == "Train" else "test"
    split_dir = cat_dir / folder
    label_dir = split_dir / "Label"
    images = scan_images(split_dir, problems, allowed_dirs=("Label",))
    labels = read_labels(label_dir / "Labels.txt", problems)
    if not labels and images:
        problems.append(f"missing {label_dir / 'Labels.txt'}: labels taken from the presence of <stem>_label.PNG masks")
    masks = scan_images(label_dir, problems, allowed_files=("Labels.txt",)) if label_dir.is_dir() else {}
    used: set[str] = set()
    samples = []
    for stem, path in images.items():
        if path.name in labels:
            defective, label_name = labels[path.name]
        else:
            defective, label_name = f"{stem}_label" in masks, None
            if labels:
                problems.append(f"image not listed in {label_dir / 'Labels.txt'}: {path}; label taken from its mask")
        if not defective:
            samples.append(Sample(key(category, split, NORMAL, stem), category, split, 0, NORMAL, path))
            continue
        mask_stem = Path(label_name).stem if label_name else f"{stem}_label"
        mask = masks.get(mask_stem)
        if mask is None:
            problems.append(f"missing mask for anomalous image {path} (expected {label_dir / (mask_stem + '.PNG')}); "
                            f"pixel metrics of {category} are undefined")
        used.add(mask_stem)
        if split == "train":
            continue  # unsupervised setting: the defective training images are left out
        samples.append(Sample(key(category, split, ANOMALOUS, stem), category, split, 1, ANOMALOUS, path, mask))
    for mask_stem, mask in masks.items():
        if mask_stem not in used:
            problems.append(f"mask without a defective image: {mask}; ignored")
    return samples


def _raw_category(cat_dir: Path, category: str, problems: list[str]) -> CategoryData:
    for entry in sorted(cat_dir.iterdir()):
        if entry.name not in ("Train", "Test"):
            problems.append(f"unexpected {'folder' if entry.is_dir() else 'file'} {entry}; ignored")
    return CategoryData(name=category, train=_raw_split(cat_dir, category, "Train", problems),
                        test=_raw_split(cat_dir, category, "Test", problems))


def _is_converted(cat_dir: Path) -> bool:
    # Checked on train/good, not on "train" alone: on a case-insensitive disk "Train" matches "train".
    return (cat_dir / "train" / NORMAL).is_dir()


def load_dagm(root: Path | str | None, categories: Sequence[str] | None = None) -> DatasetIndex:
    """Index DAGM 2007 under ``root`` (as distributed or converted to the MVTec layout).

    Parameters
    ----------
    root : Path or str
        The folder holding ``Class1`` ... ``Class10``.
    categories : sequence of str, optional
        Classes to index; all present ones when ``None``.

    Returns
    -------
    DatasetIndex
        Training samples are the defect-free training images only.

    Raises
    ------
    DatasetError
        When ``root`` holds none of the classes; the message shows the expected layout.
    """
    root = Path(root) if root is not None else None
    problems: list[str] = []
    present = lambda d: (d / "Train").is_dir() or (d / "Test").is_dir() or _is_converted(d)  # noqa: E731
    chosen = select_categories(NAME, root, CATEGORIES, categories, TREE, present, problems)
    assert root is not None
    check_root_extras(root, CATEGORIES, problems)
    cats = {}
    for c in chosen:
        if _is_converted(root / c):
            cats[c] = mvtec_category(root / c, c, problems, mask_suffixes=("_mask", "_label", ""))
        else:
            cats[c] = _raw_category(root / c, c, problems)
    return DatasetIndex(name=NAME, categories=cats, root=root, problems=problems)


@hookimpl
def harness_datasets():
    """Register DAGM 2007."""
    # Every DAGM class is a texture: the defects are drawn on statistically generated surfaces.
    return [DatasetSpec(name=NAME, categories=CATEGORIES, loader=load_dagm, textures=CATEGORIES,
                        find_root=env_root(NAME, "HARNESS_DATA_DAGM"),
                        description="DAGM 2007: 10 synthetic textures with weakly labelled defects (unsupervised split)")]
