"""MVTec AD 2 (Heckler-Kram et al., 2025), as distributed.

Layout, per category::

    <cat>/train/good/000_regular.png ...
    <cat>/validation/good/000_regular.png ...
    <cat>/test_public/good/000_regular.png ...
    <cat>/test_public/bad/000_regular.png ...
    <cat>/test_public/ground_truth/bad/000_regular_mask.png ...
    <cat>/test_private/000_regular.png ...            (no ground truth)
    <cat>/test_private_mixed/000_regular.png ...      (no ground truth)

``test_public`` is the scored test set (its masks are 0/255 PNGs named ``<stem>_mask.png``).
``validation`` holds normal images only; the dataset paper chooses the SegF1 threshold on them
and so does the harness (:mod:`harness.metrics.segf1`). ``test_private`` and
``test_private_mixed`` have no public ground truth: their samples are the category's
``unscored`` list (split ``test_private`` / ``test_private_mixed``, defect ``unknown``); the
harness predicts them and ``harness export-maps`` writes their maps in the layout of MVTec's
evaluation server, but no metric is ever computed on them.

The published per-category counts are not reproduced here (``official_counts`` is empty): the
summary reports what it finds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from harness import CategoryData, DatasetIndex, DatasetSpec, MetricSpec, Sample, hookimpl
from harness.metrics.dataset_metrics import aupro_at, pixel_segf1
from harness_benchmarks.layout import (NORMAL, check_root_extras, env_root, key, pair_masks, scan_images,
                                       select_categories)

NAME = "mvtec_ad2"

CATEGORIES = ("can", "fabric", "fruit_jelly", "rice", "sheet_metal", "vial", "wallplugs", "walnuts")

PUBLIC = "test_public"
PRIVATE_SETS = ("test_private", "test_private_mixed")
ANOMALOUS = "bad"
#: The defect name of images whose label is not public.
UNKNOWN = "unknown"

TREE = """\
<root>/                                      (e.g. mvtec_ad_2/)
├── can/
│   ├── train/good/000_regular.png ...
│   ├── validation/good/000_regular.png ...
│   ├── test_public/good/000_regular.png ...
│   ├── test_public/bad/000_regular.png ...
│   ├── test_public/ground_truth/bad/000_regular_mask.png ...
│   ├── test_private/000_regular.png ...
│   └── test_private_mixed/000_regular.png ...
└── ... (8 categories: can, fabric, fruit_jelly, rice, sheet_metal, vial, wallplugs, walnuts)
"""


def _category(cat_dir: Path, category: str, problems: list[str]) -> CategoryData:
    def normal(split: str, folder: Path) -> list[Sample]:
        if not folder.is_dir():
            problems.append(f"missing folder {folder}")
        return [Sample(key(category, split, NORMAL, s), category, split, 0, NORMAL, p)
                for s, p in scan_images(folder, problems).items()]

    train = normal("train", cat_dir / "train" / NORMAL)
    validation = normal("validation", cat_dir / "validation" / NORMAL)
    public = cat_dir / PUBLIC
    test = normal("test", public / NORMAL)
    bad = scan_images(public / ANOMALOUS, problems)
    if not (public / ANOMALOUS).is_dir():
        problems.append(f"missing folder {public / ANOMALOUS}")
    masks = pair_masks(bad, scan_images(public / "ground_truth" / ANOMALOUS, problems), ("_mask",), problems,
                       str(public / "ground_truth" / ANOMALOUS / "{stem}_mask.png"))
    test += [Sample(key(category, "test", ANOMALOUS, s), category, "test", 1, ANOMALOUS, p, masks[s])
             for s, p in bad.items()]
    if public.is_dir():
        for entry in sorted(public.iterdir()):
            if entry.name not in (NORMAL, ANOMALOUS, "ground_truth"):
                problems.append(f"unexpected {'folder' if entry.is_dir() else 'file'} {entry}; ignored")
    unscored: list[Sample] = []
    for split in PRIVATE_SETS:
        folder = cat_dir / split
        if not folder.is_dir():
            problems.append(f"missing folder {folder} (private test set; nothing to export for it)")
        # label 0 is a placeholder: these samples are never scored (their labels are not public).
        unscored += [Sample(key(category, split, UNKNOWN, s), category, split, 0, UNKNOWN, p)
                     for s, p in scan_images(folder, problems).items()]
    return CategoryData(name=category, train=train, test=test, validation=validation, unscored=unscored)


def load_mvtec_ad2(root: Path | str | None, categories: Sequence[str] | None = None) -> DatasetIndex:
    """Index MVTec AD 2 under ``root`` (the folder holding the eight category folders).

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
    present = lambda d: (d / "train").is_dir() or (d / PUBLIC).is_dir()  # noqa: E731
    chosen = select_categories(NAME, root, CATEGORIES, categories, TREE, present, problems)
    assert root is not None
    check_root_extras(root, CATEGORIES, problems)
    cats = {c: _category(root / c, c, problems) for c in chosen}
    return DatasetIndex(name=NAME, categories=cats, root=root, problems=problems)


@hookimpl
def harness_datasets():
    """Register MVTec AD 2."""
    return [DatasetSpec(name=NAME, categories=CATEGORIES, loader=load_mvtec_ad2,
                        find_root=env_root(NAME, "HARNESS_DATA_MVTEC_AD2"),
                        description="MVTec AD 2: 8 categories, public test set scored; private sets exported only")]


@hookimpl
def harness_metrics():
    """MVTec AD 2's SegF1 (validation threshold) and AU-PRO to FPR 0.05."""
    return [MetricSpec("pixel_segf1", "pixel", True, pixel_segf1, "SegF1", datasets=(NAME,),
                       description="MVTec AD 2 SegF1: pixel F1 at mean + 3 std of the validation maps"),
            MetricSpec("pixel_aupro_fpr0.05", "pixel", True, aupro_at(0.05), "P-AUPRO@5%", datasets=(NAME,),
                       description="AU-PRO to FPR 0.05 (MVTec AD 2)")]
