"""The BMAD medical sets with pixel masks, and the multi-class "medical" set built from them.

BMAD (Bao et al., CVPR Workshops 2024) reorganised public medical data into anomaly-detection
splits. Three of its sets have pixel-level ground truth:

- ``brainmri``: brain MRI slices from BraTS2021 (BMAD folder ``Brain``; also ``BraTS2021``,
  ``Brain_AD``),
- ``liverct``: liver CT slices from BTCV + LiTS (``Liver``, ``Liver_AD``),
- ``resc``: retinal OCT from RESC (``RESC``, ``RESC_AD``, ``RetinaRESC_AD``).

Each set is a folder with ``train/``, ``valid/`` (or ``val/``) and ``test/``. The nesting of the
test split differs between sets and releases; both orders are accepted::

    test/{good,Ungood}/{img,label}/*.png     (e.g. Brain)
    test/{img,label}/{good,Ungood}/*.png     (e.g. Liver, RESC)

Training images are ``train/good/img/*.png`` or ``train/good/*.png``. RESC is also read as its
authors released it (and as BMAD's own loaders read that release)::

    Train/train/good/*.png
    Test/test/{good,Ungood}/*.png
    Test/test_label/Ungood/*.png           (masks of the anomalous images, same stems)

The validation split is not
used (the harness never selects on labelled data). Label images are colour-mapped, often RGBA
with an opaque alpha channel everywhere: a pixel is anomalous where any colour channel is > 0,
alpha ignored (:func:`harness.read_mask` ignores alpha). ``test/good/label`` (all-zero
masks of normal slices) is ignored.

The dataset ``medical`` is the multi-class set DiAD evaluates: its categories are the three
sets above, found as sub-folders of its root under any of their folder names, and the
``multiclass`` protocol trains one model on all of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from harness import CategoryData, DatasetIndex, DatasetSpec, Sample, hookimpl
from harness_benchmarks.layout import (NORMAL, check_root_extras, env_root, key, layout_error,
                                       pair_masks, scan_images, select_categories)

ANOMALOUS = "Ungood"

#: Dataset name to the folder names BMAD releases use for it.
SUBSETS = {
    "brainmri": ("Brain", "BraTS2021", "Brain_AD", "BrainMRI", "brainmri"),
    "liverct": ("Liver", "Liver_AD", "LiverCT", "liverct"),
    "resc": ("RESC", "RESC_AD", "RetinaRESC_AD", "Retina_RESC", "resc"),
}

SET_TREE = """\
<root>/                        (one BMAD set, e.g. Brain/)
├── train/good/img/00003_60.png ...       (or train/good/*.png)
├── valid/...                             (ignored)
└── test/
    ├── good/img/00000_96.png ...         or  img/good/*.png
    ├── Ungood/img/00002_60.png ...       or  img/Ungood/*.png
    └── Ungood/label/00002_60.png ...     or  label/Ungood/*.png
or, for RESC as released: Train/train/good/*.png, Test/test/{good,Ungood}/*.png, Test/test_label/Ungood/*.png
"""

MEDICAL_TREE = """\
<root>/
├── Brain/   (BraTS2021; or BraTS2021/, Brain_AD/)   laid out as below
├── Liver/   (BTCV + LiTS; or Liver_AD/)
└── RESC/    (or RESC_AD/, RetinaRESC_AD/)
each: train/good/img/*.png, test/{good,Ungood}/{img,label}/*.png or test/{img,label}/{good,Ungood}/*.png
"""


def _is_set(folder: Path) -> bool:
    return ((folder / "train").is_dir() and (folder / "test").is_dir()) or _is_release(folder)


def _is_release(folder: Path) -> bool:
    """The RESC authors' release: ``Train/train`` and ``Test/test`` (with ``Test/test_label``)."""
    return (folder / "Train" / "train").is_dir() and (folder / "Test" / "test").is_dir()


def find_set(root: Path, name: str) -> Path | None:
    """Return the folder of BMAD set ``name`` under ``root`` (any of its folder names), or None.

    Parameters
    ----------
    root : Path
        A folder holding BMAD sets.
    name : str
        One of :data:`SUBSETS`.

    Returns
    -------
    Path or None
    """
    for alias in SUBSETS[name]:
        if _is_set(root / alias):
            return root / alias
    return None


def _test_groups(test_dir: Path, problems: list[str]) -> dict[str, tuple[Path, Path | None]]:
    """Map each label folder (``good``, ``Ungood``) of a test split to (image dir, mask dir)."""
    groups: dict[str, tuple[Path, Path | None]] = {}
    if (test_dir / "img").is_dir():  # test/{img,label}/{good,Ungood}
        for entry in sorted(test_dir.iterdir()):
            if entry.name not in ("img", "label"):
                problems.append(f"unexpected {'folder' if entry.is_dir() else 'file'} {entry}; ignored")
        for sub in sorted((test_dir / "img").iterdir()):
            if sub.is_dir():
                groups[sub.name] = (sub, test_dir / "label" / sub.name)
            else:
                problems.append(f"unexpected file {sub}; ignored")
        return groups
    for sub in sorted(test_dir.iterdir()):  # test/{good,Ungood}/{img,label}
        if not sub.is_dir():
            problems.append(f"unexpected file {sub}; ignored")
        elif (sub / "img").is_dir():
            for entry in sorted(sub.iterdir()):
                if entry.name not in ("img", "label"):
                    problems.append(f"unexpected {'folder' if entry.is_dir() else 'file'} {entry}; ignored")
            groups[sub.name] = (sub / "img", sub / "label")
        else:
            groups[sub.name] = (sub, None)
    return groups


def load_set(folder: Path, category: str, problems: list[str]) -> CategoryData:
    """Index one BMAD set with pixel masks as one category.

    Parameters
    ----------
    folder : Path
        The set's folder (holding ``train/`` and ``test/``).
    category : str
        The category name to give its samples.
    problems : list of str
        Receives every non-fatal finding, each naming its file.

    Returns
    -------
    CategoryData
    """
    release = _is_release(folder)
    for entry in sorted(folder.iterdir()):
        if entry.name not in (("Train", "Test", "Val", "Valid") if release else ("train", "test", "valid", "val")):
            problems.append(f"unexpected {'folder' if entry.is_dir() else 'file'} {entry}; ignored")
    train_good = (folder / "Train" / "train" / NORMAL) if release else folder / "train" / NORMAL
    train_dir = train_good / "img" if (train_good / "img").is_dir() else train_good
    if not train_dir.is_dir():
        problems.append(f"missing folder {train_good}: set {category} has no training images")
    train = [Sample(key(category, "train", NORMAL, s), category, "train", 0, NORMAL, p)
             for s, p in scan_images(train_dir, problems).items()]
    test: list[Sample] = []
    if release:
        groups = {sub.name: (sub, folder / "Test" / "test_label" / sub.name if sub.name != NORMAL else None)
                  for sub in sorted((folder / "Test" / "test").iterdir()) if sub.is_dir()}
    else:
        groups = _test_groups(folder / "test", problems)
    for label, (img_dir, mask_dir) in groups.items():
        images = scan_images(img_dir, problems)
        if label == NORMAL:
            test += [Sample(key(category, "test", NORMAL, s), category, "test", 0, NORMAL, p) for s, p in images.items()]
            continue
        if label.lower() != ANOMALOUS.lower():
            problems.append(f"unexpected folder {img_dir} (BMAD labels are good and Ungood); read as anomalous")
        mask_files = scan_images(mask_dir, problems) if mask_dir is not None else {}
        expected = str((mask_dir if mask_dir is not None else img_dir.parent / "label") / "{stem}.png")
        masks = pair_masks(images, mask_files, ("",), problems, expected)
        test += [Sample(key(category, "test", label, s), category, "test", 1, label, p,
                        masks[s]) for s, p in images.items()]
    return CategoryData(name=category, train=train, test=test)


def _single_loader(name: str):
    def load(root: Path | str | None, categories: Sequence[str] | None = None) -> DatasetIndex:
        root = Path(root) if root is not None else None
        if categories is not None and list(categories) != [name]:
            raise layout_error(name, root, SET_TREE, f"{name} has one category, {name!r}; got {list(categories)}")
        if root is None or not root.is_dir():
            raise layout_error(name, root, SET_TREE, "the folder does not exist" if root else "no dataset folder given")
        # Accept the set's own folder, or a folder holding it (the BMAD download holds all sets).
        folder = root if _is_set(root) else find_set(root, name)
        if folder is None:
            raise layout_error(name, root, SET_TREE, f"neither a BMAD set (train/ and test/) nor a folder holding one "
                                                     f"named {', '.join(SUBSETS[name])}")
        problems: list[str] = []
        return DatasetIndex(name=name, categories={name: load_set(folder, name, problems)}, root=folder,
                            problems=problems)
    load.__name__ = f"load_{name}"
    load.__doc__ = f"Index the BMAD set {name} (root: the set's folder or one holding it); see the module docstring."
    return load


load_brainmri = _single_loader("brainmri")
load_liverct = _single_loader("liverct")
load_resc = _single_loader("resc")


def load_medical(root: Path | str | None, categories: Sequence[str] | None = None) -> DatasetIndex:
    """Index the multi-class medical set: one category per BMAD set found under ``root``.

    Parameters
    ----------
    root : Path or str
        A folder holding the BMAD sets (``Brain/``, ``Liver/``, ``RESC/`` or their other names).
    categories : sequence of str, optional
        Sets to include (``brainmri``, ``liverct``, ``resc``); all present ones when ``None``.

    Returns
    -------
    DatasetIndex

    Raises
    ------
    DatasetError
        When ``root`` holds none of the sets; the message shows the expected layout.
    """
    root = Path(root) if root is not None else None
    problems: list[str] = []
    names = tuple(SUBSETS)
    # select_categories looks at root/<category>; the sets go by other folder names, so the
    # check is on the parent: "the category dir" is a stand-in resolved through find_set.
    chosen = select_categories("medical", root, names, categories, MEDICAL_TREE,
                               lambda d: find_set(d.parent, d.name) is not None, problems)
    assert root is not None
    check_root_extras(root, [a for aliases in SUBSETS.values() for a in aliases], problems)
    cats = {c: load_set(find_set(root, c), c, problems) for c in chosen}  # type: ignore[arg-type]
    return DatasetIndex(name="medical", categories=cats, root=root, problems=problems)


@hookimpl
def harness_datasets():
    """Register the three BMAD sets with masks and the multi-class medical set."""
    about = {"brainmri": "BMAD brain MRI (BraTS2021 slices)", "liverct": "BMAD liver CT (BTCV + LiTS slices)",
             "resc": "BMAD retinal OCT (RESC)"}
    loaders = {"brainmri": load_brainmri, "liverct": load_liverct, "resc": load_resc}
    specs = [DatasetSpec(name=n, categories=(n,), loader=loaders[n], find_root=env_root(n, f"HARNESS_DATA_{n.upper()}"),
                         description=about[n]) for n in SUBSETS]
    specs.append(DatasetSpec(name="medical", categories=tuple(SUBSETS), loader=load_medical,
                             find_root=env_root("medical", "HARNESS_DATA_MEDICAL"),
                             description="Medical (BMAD brainmri + liverct + resc), one category per set"))
    return specs
