"""KolektorSDD2 (Božič et al., Computers in Industry 2021), as distributed.

Layout: ``<root>/train/10000.png`` with its mask ``<root>/train/10000_GT.png``, the same in
``<root>/test/``. Every image has a mask; an image is defective when its mask has a positive
pixel (there are no defect folders), so the loader reads the masks (small PNGs) to label the
images. One category, ``ksdd2``.

Unsupervised protocol (as anomalib and the papers that report KSDD2 use it): the model trains
on the *defect-free* training images only; the 246 defective training images are left out (the
summary's ``train`` counts the normal ones). The test set is scored as distributed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from harness import CategoryData, DatasetIndex, DatasetSpec, Sample, hookimpl, read_mask
from harness_benchmarks.layout import counts_table, env_root, key, layout_error, scan_images

NAME = "ksdd2"
CATEGORY = "ksdd2"
MASK_SUFFIX = "_GT"

#: (train defect-free, test defect-free, test defective), from the dataset paper (2331 train images
#: of which 246 defective; 1004 test images of which 110 defective).
OFFICIAL = counts_table({CATEGORY: (2085, 894, 110)})

TREE = """\
<root>/                (KolektorSDD2/)
├── train/10000.png, 10000_GT.png ...
└── test/20000.png, 20000_GT.png ...
"""


def _split(root: Path, split: str, problems: list[str]) -> list[Sample]:
    files = scan_images(root / split, problems)
    images = {s: p for s, p in files.items() if not s.endswith(MASK_SUFFIX)}
    masks = {s[:-len(MASK_SUFFIX)]: p for s, p in files.items() if s.endswith(MASK_SUFFIX)}
    for stem in sorted(set(masks) - set(images)):
        problems.append(f"mask without image: {masks[stem]}; ignored")
    out = []
    for stem, path in images.items():
        mask = masks.get(stem)
        if mask is None:
            problems.append(f"missing mask {root / split / (stem + MASK_SUFFIX + '.png')} for {path}: "
                            "its label is unknown; image skipped")
            continue
        defective = bool(np.any(read_mask(mask)))
        if split == "train" and defective:
            continue  # the unsupervised protocol trains on defect-free images only (module docstring)
        defect = "defect" if defective else "good"
        out.append(Sample(key(CATEGORY, split, defect, stem), CATEGORY, split, int(defective), defect, path,
                          mask if defective else None))
    return out


def load_ksdd2(root: Path | str | None, categories: Sequence[str] | None = None) -> DatasetIndex:
    """Index KolektorSDD2 under ``root`` (the folder holding ``train/`` and ``test/``).

    Parameters
    ----------
    root : Path or str
    categories : sequence of str, optional
        Only ``["ksdd2"]`` (or None).

    Returns
    -------
    DatasetIndex

    Raises
    ------
    DatasetError
        When ``root`` has no ``train/`` or ``test/`` folder; the message shows the expected layout.
    """
    from harness.errors import DatasetError

    if categories and list(categories) != [CATEGORY]:
        raise DatasetError(f"{NAME}: unknown categories {list(categories)}; valid: {CATEGORY}")
    root = Path(root) if root is not None else None
    if root is None or not root.is_dir():
        raise layout_error(NAME, root, TREE, "the folder does not exist" if root else "no dataset folder given")
    if not (root / "train").is_dir() and not (root / "test").is_dir():
        hint = [d for d in sorted(root.iterdir()) if d.is_dir() and (d / "train").is_dir()]
        more = f" did you mean {hint[0]}?" if hint else ""
        raise layout_error(NAME, root, TREE, f"no train/ or test/ folder.{more}")
    problems: list[str] = []
    for split in ("train", "test"):
        if not (root / split).is_dir():
            problems.append(f"missing folder {root / split}")
    category = CategoryData(name=CATEGORY, train=_split(root, "train", problems), test=_split(root, "test", problems))
    return DatasetIndex(name=NAME, categories={CATEGORY: category}, root=root, problems=problems)


@hookimpl
def harness_datasets():
    """Register KolektorSDD2."""
    return [DatasetSpec(name=NAME, categories=(CATEGORY,), loader=load_ksdd2,
                        find_root=env_root(NAME, "HARNESS_DATA_KSDD2"), official_counts=OFFICIAL,
                        description="KolektorSDD2: surface defects, one category; trains on defect-free images")]
