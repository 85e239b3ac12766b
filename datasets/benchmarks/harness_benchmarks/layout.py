"""Helpers shared by the dataset plugins: roots, folder scans, mask pairing, MVTec-style trees.

Every loader indexes files without decoding them. Findings that do not stop a run (a missing
mask, a stray file, a category folder that is absent) are appended to a ``problems`` list, each
naming the file concerned; only a root that cannot be the dataset raises
:class:`harness.errors.DatasetError`, with the expected layout in the message.

Images and masks are paired by their path relative to the category (defect folder and file
stem), never by position in a sorted listing: a single missing file would otherwise shift every
later pair.
"""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence


from harness import CategoryData, DatasetIndex, Sample
from harness.errors import DatasetError

#: File suffixes (lower case) read as images.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})

#: Names tolerated next to the category folders (licences and read-me files ship with the archives).
ROOT_EXTRAS = ("readme*", "license*", "*.txt", "*.md", "*.pdf")

NORMAL = "good"


def is_image(path: Path) -> bool:
    """Whether ``path`` has an image suffix (case-insensitive: DAGM uses ``.PNG``, VisA ``.JPG``)."""
    return path.suffix.lower() in IMAGE_SUFFIXES


def env_root(dataset: str, variable: str) -> Callable[[], Path | None]:
    """Build a ``find_root`` callable: ``$<variable>``, else ``$HARNESS_DATA/<dataset>`` if it exists.

    Parameters
    ----------
    dataset : str
        The dataset's name, used as the folder name under ``$HARNESS_DATA``.
    variable : str
        The dataset's own environment variable, e.g. ``HARNESS_DATA_MVTEC``.

    Returns
    -------
    callable
        Returns a :class:`~pathlib.Path` or ``None`` when neither is set.
    """
    def find_root() -> Path | None:
        if os.environ.get(variable):
            return Path(os.environ[variable])
        base = os.environ.get("HARNESS_DATA")
        if base and (Path(base) / dataset).is_dir():
            return Path(base) / dataset
        return None
    return find_root


def key(category: str, split: str, defect: str, stem: str) -> str:
    """The sample key ``<category>/<split>/<defect>/<stem>`` (see :class:`harness.Sample`)."""
    return f"{category}/{split}/{defect}/{stem}"


def _listing(folder: Path, limit: int = 8) -> str:
    try:
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    except OSError:
        return "(unreadable)"
    if not names:
        return "(empty)"
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def layout_error(dataset: str, root: Path | None, tree: str, reason: str) -> DatasetError:
    """A :class:`DatasetError` saying why ``root`` is not the dataset, with the expected tree.

    Parameters
    ----------
    dataset : str
        The dataset's name.
    root : Path or None
        The folder that was given.
    tree : str
        The expected layout, drawn as an indented ASCII tree.
    reason : str
        What is wrong, one sentence.

    Returns
    -------
    DatasetError
    """
    found = f"\nfound in {root}: {_listing(root)}" if root is not None and root.is_dir() else ""
    return DatasetError(f"{dataset}: {reason} (root given: {root}).{found}\n"
                        f"expected layout:\n{tree.rstrip()}\n"
                        f"Pass the folder that holds the category folders with --data-root (or --root).")


def select_categories(dataset: str, root: Path | None, all_categories: Sequence[str],
                      requested: Sequence[str] | None, tree: str, present: Callable[[Path], bool],
                      problems: list[str]) -> list[str]:
    """Check the root and decide which categories to index.

    Parameters
    ----------
    dataset : str
        The dataset's name (for messages).
    root : Path or None
        The dataset folder given by the user.
    all_categories : sequence of str
        Every official category, in the papers' order.
    requested : sequence of str or None
        Categories asked for; ``None`` for all of them.
    tree : str
        The expected layout, shown when the root is wrong.
    present : callable
        ``present(category_dir) -> bool``: whether a category folder looks like this dataset.
    problems : list of str
        Receives one entry per official category missing from the root (partial download).

    Returns
    -------
    list of str
        Categories present on disk, in the official order.

    Raises
    ------
    DatasetError
        When the root is missing, holds none of the categories, or lacks a requested category.
    """
    if root is None:
        raise layout_error(dataset, root, tree, "no dataset folder given")
    root = Path(root)
    if not root.is_dir():
        raise layout_error(dataset, root, tree, "the folder does not exist")
    unknown = [c for c in (requested or ()) if c not in all_categories]
    if unknown:
        raise DatasetError(f"{dataset}: unknown categories {unknown}; valid: {', '.join(all_categories)}")
    found = [c for c in all_categories if present(root / c)]
    if not found:
        hint = ""
        nested = [d for d in _subdirs(root) if any(present(d / c) for c in all_categories)]
        if nested:
            hint = f" The categories are one level down: did you mean {nested[0]}?"
        raise layout_error(dataset, root, tree, f"none of the {len(all_categories)} categories was found.{hint}")
    wanted = list(all_categories) if requested is None else list(requested)
    absent = [c for c in wanted if c not in found]
    if requested is not None and absent:
        raise layout_error(dataset, root, tree, f"requested categories {absent} are missing")
    for c in absent:
        problems.append(f"missing category folder {root / c} (partial download?); category skipped")
    return [c for c in wanted if c in found]


def _subdirs(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.is_dir())
    except OSError:
        return []


def check_root_extras(root: Path, expected_dirs: Iterable[str], problems: list[str],
                      extra_patterns: Sequence[str] = ROOT_EXTRAS) -> None:
    """Report entries at the root that are neither expected folders nor licence/read-me files.

    Parameters
    ----------
    root : Path
        The dataset root.
    expected_dirs : iterable of str
        Folder names that belong there (all official categories, ``split_csv``, ...).
    problems : list of str
        Receives one entry per unexpected entry.
    extra_patterns : sequence of str
        Case-insensitive glob patterns of files tolerated at the root.
    """
    expected = set(expected_dirs)
    for entry in sorted(root.iterdir()):
        if entry.name in expected:
            continue
        if entry.is_file() and any(fnmatch.fnmatch(entry.name.lower(), p) for p in extra_patterns):
            continue
        problems.append(f"unexpected {'folder' if entry.is_dir() else 'file'} {entry}; ignored")


def scan_images(folder: Path, problems: list[str], allowed_dirs: Iterable[str] = (),
                allowed_files: Iterable[str] = ()) -> dict[str, Path]:
    """Index the images directly inside ``folder`` by file stem.

    Parameters
    ----------
    folder : Path
        A leaf folder of images (missing is fine: returns ``{}``).
    problems : list of str
        Receives non-image files, unexpected sub-folders, and stems present twice.
    allowed_dirs : iterable of str
        Sub-folder names that are expected there and skipped silently.
    allowed_files : iterable of str
        Non-image file names that are expected there (e.g. DAGM's ``Labels.txt``).

    Returns
    -------
    dict of str to Path
        Stem to image path, sorted by stem.
    """
    out: dict[str, Path] = {}
    if not folder.is_dir():
        return out
    allowed, allowed_f = set(allowed_dirs), set(allowed_files)
    for entry in sorted(folder.iterdir()):
        if entry.name in allowed_f:
            continue
        if entry.is_dir():
            if entry.name not in allowed:
                problems.append(f"unexpected folder {entry}; ignored")
            continue
        if not is_image(entry):
            problems.append(f"unexpected file {entry} (not an image); ignored")
            continue
        if entry.stem in out:
            problems.append(f"two images with stem {entry.stem!r} in {folder}: {out[entry.stem].name} and {entry.name}; "
                            f"kept the first")
            continue
        out[entry.stem] = entry
    return out


def pair_masks(images: Mapping[str, Path], masks: Mapping[str, Path], suffixes: Sequence[str],
               problems: list[str], expected_hint: str) -> dict[str, Path | None]:
    """Pair anomalous images with their masks by file stem.

    A mask named ``<stem><suffix>.<ext>`` belongs to the image ``<stem>.<ext>`` for the first
    suffix in ``suffixes`` that names an existing image (``"_mask"`` for MVTec AD, ``""`` for VisA
    and BMAD, ``"_label"`` for DAGM).

    Parameters
    ----------
    images : mapping of str to Path
        Stem to image, for one defect folder.
    masks : mapping of str to Path
        Stem to mask file, for the matching mask folder.
    suffixes : sequence of str
        Candidate suffixes after the image stem in a mask's stem.
    problems : list of str
        Receives a missing mask per unmatched image and an orphan entry per unmatched mask.
    expected_hint : str
        Where the mask of an image was expected, with ``{stem}`` as placeholder (for messages).

    Returns
    -------
    dict of str to Path or None
        Image stem to mask path, ``None`` when the mask is missing.
    """
    paired: dict[str, Path | None] = {stem: None for stem in images}
    for mask_stem, mask_path in masks.items():
        target = None
        for suffix in suffixes:
            if suffix and not mask_stem.endswith(suffix):
                continue
            stem = mask_stem[:len(mask_stem) - len(suffix)] if suffix else mask_stem
            if stem in paired:
                target = stem
                break
        if target is None:
            problems.append(f"mask without image: {mask_path}; ignored")
        elif paired[target] is not None:
            problems.append(f"second mask for image {images[target]}: {mask_path}; ignored")
        else:
            paired[target] = mask_path
    for stem, mask in paired.items():
        if mask is None:
            problems.append(f"missing mask for anomalous image {images[stem]} (expected {expected_hint.format(stem=stem)}); "
                            f"pixel metrics of its category are undefined")
    return paired


def mvtec_category(cat_dir: Path, category: str, problems: list[str], mask_suffixes: Sequence[str] = ("_mask",),
                   mask_kind: Callable[[Path], object] | None = None, extra_dirs: Iterable[str] = (),
                   require_masks: bool | None = True) -> CategoryData:
    """Index one category laid out as MVTec AD does.

    ``<cat>/train/good/*``, ``<cat>/test/<defect|good>/*`` and
    ``<cat>/ground_truth/<defect>/<stem><suffix>.png``. A ``ground_truth/good`` folder (some
    conversions write all-zero masks there) is accepted and ignored.

    Parameters
    ----------
    cat_dir : Path
        The category folder.
    category : str
        Its name.
    problems : list of str
        Receives every non-fatal finding, each naming its file.
    mask_suffixes : sequence of str
        See :func:`pair_masks`.
    mask_kind : callable, optional
        Wraps a mask path into the sample's mask source; the path itself by default.
    extra_dirs : iterable of str
        Other folders expected in the category folder (skipped silently).
    require_masks : bool or None
        True: every anomalous image needs a mask. None: only when ``ground_truth`` exists
        (user folders without masks). False: masks are never looked for.

    Returns
    -------
    CategoryData
    """
    wrap = mask_kind or (lambda p: p)
    known = {"train", "test", "ground_truth", *extra_dirs}
    for entry in sorted(cat_dir.iterdir()):
        if entry.name not in known:
            problems.append(f"unexpected {'folder' if entry.is_dir() else 'file'} {entry}; ignored")

    train_dir = cat_dir / "train"
    if not (train_dir / NORMAL).is_dir():
        problems.append(f"missing folder {train_dir / NORMAL}: category {category} has no training images")
    for entry in sorted(train_dir.iterdir()) if train_dir.is_dir() else ():
        if entry.name != NORMAL:
            problems.append(f"unexpected {'folder' if entry.is_dir() else 'file'} {entry} (training images must be "
                            f"defect-free, in train/{NORMAL}); ignored")
    train = [Sample(key(category, "train", NORMAL, stem), category, "train", 0, NORMAL, path)
             for stem, path in scan_images(train_dir / NORMAL, problems).items()]

    test_dir, gt_dir = cat_dir / "test", cat_dir / "ground_truth"
    if require_masks is None:
        require_masks = gt_dir.is_dir()
    test: list[Sample] = []
    defects: list[str] = []
    if not test_dir.is_dir():
        problems.append(f"missing folder {test_dir}: category {category} has no test images")
    else:
        for entry in sorted(test_dir.iterdir()):
            if entry.is_dir():
                defects.append(entry.name)
            else:
                problems.append(f"unexpected file {entry} (test images go in test/<defect>/); ignored")
    for defect in defects:
        images = scan_images(test_dir / defect, problems)
        if defect == NORMAL:
            test += [Sample(key(category, "test", defect, s), category, "test", 0, defect, p) for s, p in images.items()]
            continue
        masks: dict[str, Path | None] = {s: None for s in images}
        if require_masks:
            hint = str(gt_dir / defect / f"{{stem}}{mask_suffixes[0]}.png")
            masks = pair_masks(images, scan_images(gt_dir / defect, problems), mask_suffixes, problems, hint)
        test += [Sample(key(category, "test", defect, s), category, "test", 1, defect, p,
                        wrap(masks[s]) if masks[s] is not None else None) for s, p in images.items()]
    if require_masks and gt_dir.is_dir():
        for entry in sorted(gt_dir.iterdir()):
            if entry.is_dir() and entry.name not in defects and entry.name != NORMAL:
                for orphan in scan_images(entry, problems).values():
                    problems.append(f"mask without image: {orphan} (no folder {test_dir / entry.name}); ignored")
            elif not entry.is_dir():
                problems.append(f"unexpected file {entry}; ignored")
    return CategoryData(name=category, train=train, test=test)


def counts_table(rows: Mapping[str, tuple[int, int, int]]) -> dict[str, dict[str, int]]:
    """Turn ``{category: (train, test_normal, test_anomalous)}`` into the spec's official counts.

    Parameters
    ----------
    rows : mapping of str to (int, int, int)

    Returns
    -------
    dict of str to dict
        ``{category: {"train": n, "test_normal": n, "test_anomalous": n}}``.
    """
    return {c: {"train": a, "test_normal": b, "test_anomalous": d} for c, (a, b, d) in rows.items()}


def load_mvtec_style(dataset: str, root: Path | None, categories: Sequence[str] | None,
                     all_categories: Sequence[str], tree: str, mask_suffixes: Sequence[str] = ("_mask",),
                     extra_dirs: Iterable[str] = (), root_dirs: Iterable[str] = ()) -> DatasetIndex:
    """Index a dataset whose categories all follow the MVTec AD layout (MVTec AD, MPDD, ...).

    Parameters
    ----------
    dataset : str
        The dataset's name.
    root : Path or None
        The folder holding the category folders.
    categories : sequence of str or None
        Categories to index; ``None`` for all of them.
    all_categories : sequence of str
        The official categories, in the papers' order.
    tree : str
        The expected layout, shown when the root is wrong.
    mask_suffixes : sequence of str
        See :func:`pair_masks`.
    extra_dirs : iterable of str
        Other folders expected inside a category folder.
    root_dirs : iterable of str
        Other folders expected at the root.

    Returns
    -------
    DatasetIndex

    Raises
    ------
    DatasetError
        When the root is not this dataset (see :func:`select_categories`).
    """
    problems: list[str] = []
    present = lambda d: (d / "train").is_dir() or (d / "test").is_dir()  # noqa: E731
    chosen = select_categories(dataset, root, all_categories, categories, tree, present, problems)
    root = Path(root)  # type: ignore[arg-type]
    check_root_extras(root, [*all_categories, *root_dirs], problems)
    cats = {c: mvtec_category(root / c, c, problems, mask_suffixes, extra_dirs=extra_dirs) for c in chosen}
    return DatasetIndex(name=dataset, categories=cats, root=root, problems=problems)
