"""BTAD, the beanTech Anomaly Detection dataset (Mishra et al., ISIE 2021), as distributed.

Layout (``BTech_Dataset_transformed/``), per product ``01``, ``02``, ``03``::

    <cat>/train/ok/0000.bmp ...
    <cat>/test/ok/0000.bmp ...
    <cat>/test/ko/0000.bmp ...
    <cat>/ground_truth/ko/0000.png ...

The archive mixes formats: product 01 has BMP images and PNG masks, 02 PNG images and PNG
masks, 03 BMP images and BMP masks. Images and masks are therefore paired by stem whatever
their suffix. Normal images are in ``ok`` (defect name ``good`` in sample keys, as elsewhere in
the harness), defective ones in ``ko``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from harness import CategoryData, DatasetIndex, DatasetSpec, Sample, hookimpl
from harness_benchmarks.layout import (NORMAL, check_root_extras, counts_table, env_root, key, pair_masks,
                                       scan_images, select_categories)

NAME = "btad"
CATEGORIES = ("01", "02", "03")
OK, KO = "ok", "ko"

#: (train, test ok, test ko), from the dataset paper.
OFFICIAL = counts_table({"01": (400, 21, 49), "02": (399, 30, 200), "03": (1000, 400, 41)})

TREE = """\
<root>/                     (BTech_Dataset_transformed/)
├── 01/
│   ├── train/ok/0000.bmp ...
│   ├── test/ok/0000.bmp ...
│   ├── test/ko/0000.bmp ...
│   └── ground_truth/ko/0000.png ...
├── 02/ ...   (PNG images)
└── 03/ ...   (BMP images, BMP masks)
"""


def _category(cat_dir: Path, category: str, problems: list[str]) -> CategoryData:
    for folder in (cat_dir / "train" / OK, cat_dir / "test" / OK, cat_dir / "test" / KO):
        if not folder.is_dir():
            problems.append(f"missing folder {folder}")
    train = [Sample(key(category, "train", NORMAL, s), category, "train", 0, NORMAL, p)
             for s, p in scan_images(cat_dir / "train" / OK, problems).items()]
    test = [Sample(key(category, "test", NORMAL, s), category, "test", 0, NORMAL, p)
            for s, p in scan_images(cat_dir / "test" / OK, problems).items()]
    bad = scan_images(cat_dir / "test" / KO, problems)
    masks = pair_masks(bad, scan_images(cat_dir / "ground_truth" / KO, problems), ("",), problems,
                       str(cat_dir / "ground_truth" / KO / "{stem}.png"))
    test += [Sample(key(category, "test", KO, s), category, "test", 1, KO, p, masks[s]) for s, p in bad.items()]
    return CategoryData(name=category, train=train, test=test)


def load_btad(root: Path | str | None, categories: Sequence[str] | None = None) -> DatasetIndex:
    """Index BTAD under ``root`` (the folder holding ``01``, ``02``, ``03``).

    Parameters
    ----------
    root : Path or str
    categories : sequence of str, optional

    Returns
    -------
    DatasetIndex

    Raises
    ------
    DatasetError
        When ``root`` holds none of the products; the message shows the expected layout.
    """
    root = Path(root) if root is not None else None
    problems: list[str] = []
    present = lambda d: (d / "train").is_dir() or (d / "test").is_dir()  # noqa: E731
    chosen = select_categories(NAME, root, CATEGORIES, categories, TREE, present, problems)
    assert root is not None
    check_root_extras(root, CATEGORIES, problems)
    return DatasetIndex(name=NAME, categories={c: _category(root / c, c, problems) for c in chosen}, root=root,
                        problems=problems)


@hookimpl
def harness_datasets():
    """Register BTAD."""
    return [DatasetSpec(name=NAME, categories=CATEGORIES, loader=load_btad,
                        find_root=env_root(NAME, "HARNESS_DATA_BTAD"), official_counts=OFFICIAL,
                        description="BTAD: 3 industrial products, mixed BMP/PNG files")]
