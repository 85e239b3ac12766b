"""MVTec AD (Bergmann et al., CVPR 2019), as distributed.

Layout: ``<root>/<category>/train/good/NNN.png``, ``<category>/test/<defect|good>/NNN.png`` and
``<category>/ground_truth/<defect>/NNN_mask.png`` (0/255). File numbers restart at 000 in every
defect folder, so a mask is paired with the image of the same defect folder and stem. ``grid``,
``screw`` and ``zipper`` are greyscale PNGs; :func:`harness.read_image` turns them into RGB.
The root may also hold ``license.txt`` and ``readme.txt``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from harness import DatasetIndex, DatasetSpec, hookimpl
from harness_benchmarks.layout import counts_table, env_root, load_mvtec_style

NAME = "mvtec"

CATEGORIES = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill", "screw",
              "tile", "toothbrush", "transistor", "wood", "zipper")

#: The five texture categories, as the dataset paper classifies them (the other ten are objects).
TEXTURES = ("carpet", "grid", "leather", "tile", "wood")

#: (train, test good, test defective) per category, from the dataset paper; totals 3629 / 467 / 1258.
OFFICIAL = counts_table({
    "bottle": (209, 20, 63), "cable": (224, 58, 92), "capsule": (219, 23, 109), "carpet": (280, 28, 89),
    "grid": (264, 21, 57), "hazelnut": (391, 40, 70), "leather": (245, 32, 92), "metal_nut": (220, 22, 93),
    "pill": (267, 26, 141), "screw": (320, 41, 119), "tile": (230, 33, 84), "toothbrush": (60, 12, 30),
    "transistor": (213, 60, 40), "wood": (247, 19, 60), "zipper": (240, 32, 119),
})

TREE = """\
<root>/                      (e.g. mvtec_anomaly_detection/)
├── bottle/
│   ├── train/good/000.png ...
│   ├── test/good/000.png ...
│   ├── test/broken_large/000.png ...
│   └── ground_truth/broken_large/000_mask.png ...
├── cable/ ...
└── zipper/   (15 categories: bottle ... zipper)
"""


def load_mvtec(root: Path | str | None, categories: Sequence[str] | None = None) -> DatasetIndex:
    """Index MVTec AD under ``root``.

    Parameters
    ----------
    root : Path or str
        The folder holding the 15 category folders.
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
    """Register MVTec AD."""
    return [DatasetSpec(name=NAME, categories=CATEGORIES, loader=load_mvtec,
                        find_root=env_root(NAME, "HARNESS_DATA_MVTEC"), official_counts=OFFICIAL, textures=TEXTURES,
                        description="MVTec AD: 15 industrial categories (5 textures, 10 objects)")]
