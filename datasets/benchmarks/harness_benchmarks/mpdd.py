"""MPDD, the Metal Parts Defect Detection dataset (Jezek et al., ICUMT 2021).

It is distributed in the MVTec AD layout: ``<category>/train/good``, ``test/<defect|good>`` and
``ground_truth/<defect>/<stem>_mask.png``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from harness import DatasetIndex, DatasetSpec, hookimpl
from harness_benchmarks.layout import counts_table, env_root, load_mvtec_style

NAME = "mpdd"

CATEGORIES = ("bracket_black", "bracket_brown", "bracket_white", "connector", "metal_plate", "tubes")

#: (train, test good, test defective) per category; totals 888 / 176 / 282 (1346 images).
OFFICIAL = counts_table({
    "bracket_black": (289, 32, 47), "bracket_brown": (185, 26, 51), "bracket_white": (110, 30, 30),
    "connector": (128, 30, 14), "metal_plate": (54, 26, 71), "tubes": (122, 32, 69),
})

TREE = """\
<root>/
├── bracket_black/
│   ├── train/good/000.png ...
│   ├── test/good/000.png ...
│   ├── test/hole/000.png ...
│   └── ground_truth/hole/000_mask.png ...
└── ... (6 categories: bracket_black, bracket_brown, bracket_white, connector, metal_plate, tubes)
"""


def load_mpdd(root: Path | str | None, categories: Sequence[str] | None = None) -> DatasetIndex:
    """Index MPDD under ``root``.

    Parameters
    ----------
    root : Path or str
        The folder holding the six category folders.
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
    return load_mvtec_style(NAME, Path(root) if root is not None else None, categories, CATEGORIES, TREE)


@hookimpl
def harness_datasets():
    """Register MPDD."""
    return [DatasetSpec(name=NAME, categories=CATEGORIES, loader=load_mpdd,
                        find_root=env_root(NAME, "HARNESS_DATA_MPDD"), official_counts=OFFICIAL,
                        description="MPDD: 6 categories of painted metal parts")]
