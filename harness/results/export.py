"""Write any dataset index to disk in the MVTec-AD folder layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from harness.data import DatasetIndex, read_image, read_mask


def _save_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def write_mvtec_layout(index: DatasetIndex, out: Path) -> dict:
    """Write a dataset index as an MVTec-AD style tree of PNG files.

    The layout is ``<out>/<category>/train/good/000.png``, ``<out>/<category>/test/<defect>/000.png``
    and, for every anomalous test image with a mask, ``<out>/<category>/ground_truth/<defect>/000_mask.png``
    (``uint8``, 0 or 255). Numbering restarts at 000 in every folder and follows the order of the
    samples in the index, so a mask and its image share a stem.

    Parameters
    ----------
    index : DatasetIndex
        The dataset to write; images are read with :func:`harness.data.read_image`.
    out : Path
        Destination root; created if missing. Existing files with the same names are overwritten.

    Returns
    -------
    dict
        Per category, ``{"train": n, "test_good": n, "test_anomalous": n, "masks": n}``.
    """
    out = Path(out)
    counts: dict[str, dict[str, int]] = {}
    for name, cat in index.categories.items():
        root = out / name
        for i, sample in enumerate(cat.train):
            _save_png(read_image(sample.image), root / "train" / "good" / f"{i:03d}.png")
        tally = {"train": len(cat.train), "test_good": 0, "test_anomalous": 0, "masks": 0}
        per_folder: dict[str, int] = {}
        for sample in cat.test:
            # Normal images always go to "good", whatever their defect field says, as MVTec does.
            folder = sample.defect if sample.label == 1 else "good"
            stem = f"{per_folder.get(folder, 0):03d}"
            per_folder[folder] = per_folder.get(folder, 0) + 1
            image = read_image(sample.image)
            _save_png(image, root / "test" / folder / f"{stem}.png")
            if sample.label == 0:
                tally["test_good"] += 1
                continue
            tally["test_anomalous"] += 1
            if sample.mask is not None:
                mask = read_mask(sample.mask, image.shape[:2])
                _save_png(mask.astype(np.uint8) * 255, root / "ground_truth" / folder / f"{stem}_mask.png")
                tally["masks"] += 1
        counts[name] = tally
    return counts
