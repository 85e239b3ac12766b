"""What a dataset loader found: counts per category, image sizes, and every problem.

Used by ``harness data summary``. The loader's index (see :mod:`harness.data`) gives the counts
and the problems noticed while walking the tree; this module adds what indexing skips for speed:
an integrity check of every image and mask file (header, then checksums, then a full decode
when a file looks truncated), a comparison of mask and image sizes, and a comparison of the
counts with the ones published for the dataset (``DatasetSpec.official_counts``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from PIL import Image

from harness.data import CategoryData, DatasetIndex, ImageSource, Sample

#: Count fields compared with the published ones, in table order.
COUNT_FIELDS = ("train", "test_normal", "test_anomalous", "validation")

#: Bytes at the end of a JPEG searched for its end-of-image marker (some writers pad after it).
_JPEG_TAIL = 64


def source_path(source: ImageSource | None) -> Path | None:
    """The file behind an image or mask source, or None for generated data.

    Callables that read a file expose it as ``.path`` (e.g. the alpha-dropping BMAD masks).
    """
    if source is None:
        return None
    if isinstance(source, (str, Path)):
        return Path(source)
    path = getattr(source, "path", None)
    return Path(path) if path is not None else None


def category_counts(cat: CategoryData) -> dict[str, int]:
    """Counts of one category: train, test_normal, test_anomalous, masks.

    Parameters
    ----------
    cat : CategoryData

    Returns
    -------
    dict of str to int
    """
    return {"train": len(cat.train),
            "test_normal": sum(s.label == 0 for s in cat.test),
            "test_anomalous": sum(s.label == 1 for s in cat.test),
            "masks": sum(s.mask is not None for s in cat.test),
            # Only datasets that have them (MVTec AD 2, MVTec LOCO AD) show these two.
            **({"validation": len(cat.validation)} if cat.validation else {}),
            **({"test_unscored": len(cat.unscored)} if cat.unscored else {}),
            **({"mask_channels": sum(len(s.channels) for s in cat.test)} if any(s.channels for s in cat.test) else {})}


def _looks_truncated(path: Path) -> bool:
    """Cheap tail test: JPEGs end with FFD9, PNGs with an IEND chunk; other formats get a full decode."""
    suffix = path.suffix.lower()
    try:
        with open(path, "rb") as handle:
            handle.seek(0, 2)
            size = handle.tell()
            handle.seek(max(0, size - _JPEG_TAIL))
            tail = handle.read()
    except OSError:
        return True
    if suffix in (".jpg", ".jpeg"):
        return b"\xff\xd9" not in tail
    if suffix == ".png":
        return b"IEND" not in tail
    return True


def inspect_file(path: Path) -> tuple[tuple[int, int] | None, str | None]:
    """Read an image file's size from its header and check that the file is whole.

    ``Image.verify`` checks the structure (and PNG checksums) without decoding; a file whose
    end is missing is then decoded in full, which is what fails on a truncated download.

    Parameters
    ----------
    path : Path

    Returns
    -------
    (size, problem)
        ``size`` as (width, height) or None when unreadable; ``problem`` a message naming the
        file, or None.
    """
    try:
        with Image.open(path) as img:
            size = img.size
            img.verify()
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for broken files
        return None, f"unreadable image {path}: {type(exc).__name__}: {exc}"
    if _looks_truncated(path):
        try:
            with Image.open(path) as img:
                img.load()
        except Exception as exc:  # noqa: BLE001
            return size, f"truncated or corrupt image {path}: {exc}"
    return size, None


def check_files(samples: Iterable[Sample]) -> tuple[dict[Path, tuple[int, int]], list[str]]:
    """Check every image and mask file of ``samples``; compare each mask's size with its image's.

    Parameters
    ----------
    samples : iterable of Sample

    Returns
    -------
    (sizes, problems)
        ``sizes`` maps each readable image file to (width, height); ``problems`` names every
        unreadable or truncated file and every mask whose size differs from its image.
    """
    sizes: dict[Path, tuple[int, int]] = {}
    problems: list[str] = []
    for sample in samples:
        image = source_path(sample.image)
        image_size = None
        if image is not None:
            image_size, problem = inspect_file(image)
            if problem:
                problems.append(problem)
            if image_size is not None:
                sizes[image] = image_size
        mask = source_path(sample.mask)
        if mask is None:
            continue
        mask_size, problem = inspect_file(mask)
        if problem:
            problems.append(problem.replace("image", "mask", 1))
        elif image_size is not None and mask_size != image_size:
            problems.append(f"mask {mask} is {mask_size[0]}x{mask_size[1]} but its image {image} is "
                            f"{image_size[0]}x{image_size[1]}")
    return sizes, problems


#: Image modes that reading converts, with what happens to them (see :func:`harness.data.read_image`).
CONVERTED_MODES = {
    "I;16": "16-bit greyscale, scaled to 8 bits", "I;16B": "16-bit greyscale, scaled to 8 bits",
    "I": "32-bit integer greyscale, scaled to 8 bits", "F": "floating-point greyscale, scaled to 8 bits",
    "P": "palette colours, converted to RGB", "CMYK": "CMYK, converted to RGB", "RGBA": "with alpha, alpha dropped",
    "LA": "greyscale with alpha, alpha dropped", "PA": "palette with alpha, alpha dropped",
}


def conversion_notes(samples: Iterable[Sample]) -> list[str]:
    """What reading does to images that are not plain 8-bit RGB or greyscale (one line per kind).

    Reads headers only: the mode, and the EXIF orientation (images stored rotated are turned
    upright, and so are their masks).
    """
    found: dict[str, list[Path]] = {}
    for sample in samples:
        path = source_path(sample.image)
        if path is None:
            continue
        try:
            with Image.open(path) as img:
                mode, orientation = img.mode, img.getexif().get(0x0112, 1)
        except Exception:  # noqa: BLE001 - unreadable files are reported by check_files
            continue
        if mode in CONVERTED_MODES:
            found.setdefault(CONVERTED_MODES[mode], []).append(path)
        if orientation not in (None, 1):
            found.setdefault("stored rotated (EXIF orientation), turned upright", []).append(path)
    return [f"{len(paths)} image(s) {what}, e.g. {paths[0]}" for what, paths in found.items()]


def header_sizes(samples: Iterable[Sample]) -> list[str]:
    """Distinct image sizes of ``samples`` as ``"WxH"`` strings, read from file headers only.

    Generated images (callables) are decoded, since they have no header.
    """
    from harness.data import read_image

    found: set[tuple[int, int]] = set()
    for sample in samples:
        path = source_path(sample.image)
        try:
            if path is not None:
                with Image.open(path) as img:
                    found.add(img.size)
            else:
                h, w = read_image(sample.image).shape[:2]
                found.add((w, h))
        except Exception:  # noqa: BLE001 - unreadable files are reported by check_files
            continue
    return [f"{w}x{h}" for w, h in sorted(found)]


def compare_official(category: str, counts: Mapping[str, int], official: Mapping[str, int] | None) -> list[str]:
    """Warnings for each count that differs from the published one.

    Parameters
    ----------
    category : str
    counts : mapping
        What was found (see :func:`category_counts`).
    official : mapping or None
        The published counts of that category.

    Returns
    -------
    list of str
    """
    if not official:
        return []
    diffs = [f"{f} {counts.get(f, 0)} (official {official[f]})" for f in COUNT_FIELDS if f in official and counts.get(f, 0) != official[f]]
    if not diffs:
        return []
    hint = " partial download?" if any(counts.get(f, 0) < official[f] for f in COUNT_FIELDS if f in official) else ""
    return [f"{category}: {', '.join(diffs)};{hint or ' extra files?'}"]


def summarize(index: DatasetIndex, official_counts: Mapping[str, Mapping[str, int]] | None = None,
              check: bool = True) -> dict[str, Any]:
    """Summarise a loaded dataset index.

    Parameters
    ----------
    index : DatasetIndex
        What the loader returned.
    official_counts : mapping, optional
        Published counts per category (``DatasetSpec.official_counts``).
    check : bool
        Check every file's integrity and the mask sizes (reads every file's header and
        checksums; set False for a quick count).

    Returns
    -------
    dict
        ``{"dataset", "root", "categories": [{"category", "train", "test_normal",
        "test_anomalous", "masks", "image_sizes", "official"}], "problems", "warnings", "notes"}``;
        ``notes`` say which files reading converts (16-bit, palette, CMYK, alpha, EXIF rotation).
    """
    official_counts = official_counts or {}
    rows, warnings, notes = [], [], []
    problems = list(index.problems)
    for name, cat in index.categories.items():
        counts = category_counts(cat)
        samples: Sequence[Sample] = [*cat.train, *cat.test, *cat.validation, *cat.unscored]
        if check:
            sizes, found = check_files(samples)
            problems += found
            notes += [f"{name}: {note}" for note in conversion_notes(samples)]
            generated = [s for s in samples if source_path(s.image) is None]
            image_sizes = sorted({f"{w}x{h}" for w, h in sizes.values()} | set(header_sizes(generated)),
                                 key=lambda t: tuple(int(v) for v in t.split("x")))
        else:
            image_sizes = header_sizes(samples)
        official = official_counts.get(name)
        warnings += compare_official(name, counts, official)
        rows.append({"category": name, **counts, "image_sizes": image_sizes,
                     "official": dict(official) if official else None})
    return {"dataset": index.name, "root": str(index.root) if index.root is not None else None,
            "categories": rows, "problems": problems, "warnings": warnings, "notes": notes}


def format_summary(summary: Mapping[str, Any]) -> str:
    """Render a :func:`summarize` result as a text table followed by warnings and problems.

    Parameters
    ----------
    summary : mapping

    Returns
    -------
    str
    """
    from tabulate import tabulate

    # Splits only some datasets have (validation, test sets without ground truth) get columns there.
    extra = [f for f in ("validation", "test_unscored") if any(f in row for row in summary["categories"])]
    rows = []
    for row in summary["categories"]:
        official = row["official"]
        ref = "/".join(str(official[f]) for f in COUNT_FIELDS if f in official) if official else "-"
        rows.append([row["category"], row["train"], row["test_normal"], row["test_anomalous"], row["masks"],
                     *(row.get(f, 0) for f in extra), ", ".join(row["image_sizes"]), ref])
    n = 4 + len(extra)
    totals = ["total", *(sum(r[i] for r in rows) for i in range(1, n + 1)), "", ""]
    official_title = "official train/normal/anomalous" + ("/validation" if "validation" in extra else "")
    headers = ["category", "train", "test normal", "test anomalous", "masks",
               *(f.replace("_", " ") for f in extra), "image sizes", official_title]
    lines = [f"{summary['dataset']} at {summary['root']}", tabulate([*rows, totals], headers=headers, tablefmt="simple")]
    lines += [f"note: {n}" for n in summary.get("notes", [])]
    lines += [f"warning: {w}" for w in summary["warnings"]]
    lines += [f"problem: {p}" for p in summary["problems"]]
    if not summary["problems"]:
        lines.append("no problems found")
    return "\n".join(lines)
