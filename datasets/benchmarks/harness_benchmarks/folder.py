"""A user's own data in an MVTec-like tree, with or without masks.

Layout: ``<root>/<category>/train/good/*``, ``<category>/test/<defect|good>/*`` and, optionally,
``<category>/ground_truth/<defect>/<stem>_mask.png`` (or ``<stem>.png``). Categories are the
sub-folders of the root that hold ``train/`` or ``test/``, in name order; the spec declares none
(``categories=()``) since they are only known once the root is read. Without a ``ground_truth``
folder a category has no masks and its pixel metrics are undefined. Masks may be greyscale,
0/255, class indices or colour (RGBA alpha is ignored): a pixel is defective where any colour
channel is > 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from harness import DatasetIndex, DatasetSpec, hookimpl
from harness_benchmarks.layout import env_root, layout_error, mvtec_category

NAME = "folder"

TREE = """\
<root>/
├── <category>/
│   ├── train/good/*.png|jpg ...
│   ├── test/good/*.png ...
│   ├── test/<defect>/*.png ...
│   └── ground_truth/<defect>/<stem>_mask.png ...   (optional)
└── <another category>/ ...
"""


def discover_categories(root: Path) -> list[str]:
    """Names of the sub-folders of ``root`` that hold ``train/`` or ``test/``, sorted.

    Parameters
    ----------
    root : Path

    Returns
    -------
    list of str
    """
    return sorted(d.name for d in root.iterdir() if d.is_dir() and ((d / "train").is_dir() or (d / "test").is_dir()))


def load_folder(root: Path | str | None, categories: Sequence[str] | None = None) -> DatasetIndex:
    """Index a user's MVTec-like tree under ``root``.

    Parameters
    ----------
    root : Path or str
        The folder holding one folder per category.
    categories : sequence of str, optional
        Categories to index; every discovered one when ``None``.

    Returns
    -------
    DatasetIndex

    Raises
    ------
    DatasetError
        When ``root`` is missing, holds no category folder, or lacks a requested category.
    """
    root = Path(root) if root is not None else None
    if root is None or not root.is_dir():
        raise layout_error(NAME, root, TREE, "the folder does not exist" if root else "no dataset folder given")
    if (root / "train").is_dir() or (root / "test").is_dir():
        # A single category given directly: its parent is the root, the folder its category.
        root, found = root.parent, [root.name]
    else:
        found = discover_categories(root)
    if not found:
        raise layout_error(NAME, root, TREE, "no category folder (one holding train/ or test/) was found")
    missing = [c for c in (categories or ()) if c not in found]
    if missing:
        raise layout_error(NAME, root, TREE, f"requested categories {missing} are missing; found {', '.join(found)}")
    problems: list[str] = []
    chosen = list(categories) if categories is not None else found
    cats = {c: mvtec_category(root / c, c, problems, mask_suffixes=("_mask", ""),
                              require_masks=None) for c in chosen}
    return DatasetIndex(name=NAME, categories=cats, root=root, problems=problems)


@hookimpl
def harness_datasets():
    """Register the generic folder dataset."""
    return [DatasetSpec(name=NAME, categories=(), loader=load_folder, find_root=env_root(NAME, "HARNESS_DATA_FOLDER"),
                        description="your own MVTec-like tree: <root>/<category>/{train/good,test/<defect>,ground_truth}")]
