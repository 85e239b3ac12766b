"""MVTec 3D-AD (Bergmann et al., VISAPP 2022), RGB images only.

Layout: ``<cat>/{train,validation,test}/<label>/rgb/NNN.png`` with, beside ``rgb/``, the point
clouds in ``xyz/NNN.tiff`` (ignored here) and, for the test split, ``gt/NNN.png``. Ground-truth
masks store defect ids (e.g. 253, 254, 255) rather than 255; the harness's > 0 rule binarises
them. ``test/good`` has all-zero masks; normal samples carry no mask, as everywhere else.

Training uses ``train/good`` only. The ``validation`` split (more defect-free images) is not
used: the papers this harness reproduces train on ``train`` alone, and no method here selects a
checkpoint on it. A ``calibration`` folder per category is accepted and ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from harness import CategoryData, DatasetIndex, DatasetSpec, Sample, hookimpl
from harness_benchmarks.layout import (NORMAL, check_root_extras, env_root, key, pair_masks, scan_images,
                                       select_categories)

NAME = "mvtec3d"

CATEGORIES = ("bagel", "cable_gland", "carrot", "cookie", "dowel", "foam", "peach", "potato", "rope", "tire")

#: Folders inside ``<split>/<label>/`` besides ``rgb``.
SAMPLE_DIRS = ("rgb", "xyz", "gt")

TREE = """\
<root>/                       (e.g. mvtec_3d_anomaly_detection/)
├── bagel/
│   ├── train/good/rgb/000.png ...      (xyz/000.tiff beside rgb/, ignored)
│   ├── validation/good/rgb/000.png ... (ignored)
│   ├── test/good/rgb/000.png ...
│   ├── test/crack/rgb/000.png ...
│   └── test/crack/gt/000.png ...
└── ... (10 categories: bagel ... tire)
"""


def _check_sample_dir(folder: Path, problems: list[str]) -> None:
    for entry in sorted(folder.iterdir()):
        if entry.name not in SAMPLE_DIRS:
            problems.append(f"unexpected {'folder' if entry.is_dir() else 'file'} {entry}; ignored")


def _category(cat_dir: Path, category: str, problems: list[str]) -> CategoryData:
    for entry in sorted(cat_dir.iterdir()):
        if entry.name not in ("train", "validation", "test", "calibration"):
            problems.append(f"unexpected {'folder' if entry.is_dir() else 'file'} {entry}; ignored")
    train_good = cat_dir / "train" / NORMAL
    train: list[Sample] = []
    if train_good.is_dir():
        _check_sample_dir(train_good, problems)
        train = [Sample(key(category, "train", NORMAL, s), category, "train", 0, NORMAL, p)
                 for s, p in scan_images(train_good / "rgb", problems).items()]
    else:
        problems.append(f"missing folder {train_good}: category {category} has no training images")
    test: list[Sample] = []
    test_dir = cat_dir / "test"
    for defect_dir in sorted(test_dir.iterdir()) if test_dir.is_dir() else ():
        if not defect_dir.is_dir():
            problems.append(f"unexpected file {defect_dir}; ignored")
            continue
        _check_sample_dir(defect_dir, problems)
        defect = defect_dir.name
        images = scan_images(defect_dir / "rgb", problems)
        if defect == NORMAL:
            test += [Sample(key(category, "test", defect, s), category, "test", 0, defect, p) for s, p in images.items()]
            continue
        masks = pair_masks(images, scan_images(defect_dir / "gt", problems), ("",), problems,
                           str(defect_dir / "gt" / "{stem}.png"))
        test += [Sample(key(category, "test", defect, s), category, "test", 1, defect, p, masks[s])
                 for s, p in images.items()]
    return CategoryData(name=category, train=train, test=test)


def load_mvtec3d(root: Path | str | None, categories: Sequence[str] | None = None) -> DatasetIndex:
    """Index the RGB images of MVTec 3D-AD under ``root``.

    Parameters
    ----------
    root : Path or str
        The folder holding the 10 category folders.
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
    """Register MVTec 3D-AD (RGB)."""
    return [DatasetSpec(name=NAME, categories=CATEGORIES, loader=load_mvtec3d,
                        find_root=env_root(NAME, "HARNESS_DATA_MVTEC3D"),
                        description="MVTec 3D-AD, RGB images only: 10 categories")]
