"""Test images without public ground truth (MVTec AD 2's private sets): predicted, written, never scored.

MVTec's evaluation server scores the private test sets from files uploaded to it. The harness
writes them, per record, in the layout the server takes::

    <record>.unscored/anomaly_images/<category>/<split>/<stem>.tiff              float16 map
    <record>.unscored/anomaly_images_thresholded/<category>/<split>/<stem>.png   0/255

``<split>`` is ``test_private`` or ``test_private_mixed``. Maps are at the image's own
resolution (resized bilinearly from the method's output), values untouched except the float16
cast. The thresholded maps use the threshold chosen on the category's validation images
(:mod:`harness.metrics.segf1`); without one they are not written. ``harness export-maps``
copies the tree into its ``--out`` folder. No metric is ever computed on these images.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from harness.data import Sample
from harness.engine.support.fsutil import atomic_write

#: Suffix of the folder next to a record (``<stem>.unscored``) that holds its unscored maps; apart
#: from the ``.maps`` folder, which the saved-maps sink replaces as a whole when a job ends.
UNSCORED_SUFFIX = ".unscored"
MAPS, THRESHOLDED = "anomaly_images", "anomaly_images_thresholded"


def unscored_folder(record_path: Path) -> Path:
    """The folder of a record's unscored maps: ``<stem>.unscored`` next to ``<stem>.json``."""
    return Path(record_path).with_name(Path(record_path).stem + UNSCORED_SUFFIX)


def unscored_path(root: Path, sample: Sample, thresholded: bool = False) -> Path:
    """Where one sample's map goes: ``<root>/<anomaly_images[_thresholded]>/<category>/<split>/<stem>``."""
    stem = sample.key.rsplit("/", 1)[-1]
    return Path(root) / (THRESHOLDED if thresholded else MAPS) / sample.category / sample.split / (
        stem + (".png" if thresholded else ".tiff"))


def write_maps(root: Path, sample: Sample, amap: np.ndarray, threshold: float | None) -> None:
    """Write one map (float16 TIFF) and, with a threshold, its binary PNG (``>= threshold`` is 255)."""
    import tifffile
    from PIL import Image

    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.ascontiguousarray(amap, dtype=np.float16))
    atomic_write(unscored_path(root, sample), buffer.getvalue())
    if threshold is not None:
        buffer = io.BytesIO()
        Image.fromarray((np.asarray(amap) >= threshold).astype(np.uint8) * 255).save(buffer, format="PNG")
        atomic_write(unscored_path(root, sample, thresholded=True), buffer.getvalue())


def write_unscored(evaluator: Any, method: Any, samples: Mapping[str, Sequence[Sample]],
                   thresholds: Mapping[str, float | None], record_path: Path) -> dict[str, Any]:
    """Predict every unscored sample and write its maps next to the record.

    Parameters
    ----------
    evaluator : harness.engine.inference.evaluation.Evaluator
    method : Method
        Fitted.
    samples : mapping of str to sequence of Sample
        Per category.
    thresholds : mapping of str to float or None
        Per category, the validation threshold of the thresholded maps.
    record_path : Path

    Returns
    -------
    dict
        The record's ``artifacts`` entry ``unscored_maps``: folder, counts, thresholds, format.
    """
    from harness.engine.inference.evaluation import native_size, resize_map

    root = unscored_folder(record_path)
    counts: dict[str, int] = {}
    for category, items in samples.items():
        threshold = thresholds.get(category)
        for sample, amap, _ in evaluator.predict_unscored(method, items):
            write_maps(root, sample, resize_map(amap, native_size(sample)), threshold)
            counts[category] = counts.get(category, 0) + 1
    return {"unscored_maps": {"folder": str(root), "counts": counts,
                              "thresholds": {c: thresholds.get(c) for c in samples},
                              "format": f"{MAPS}/<category>/<split>/<stem>.tiff (float16, native resolution); "
                                        f"{THRESHOLDED}/<category>/<split>/<stem>.png (>= validation threshold)"}}


def reset_unscored(record_path: Path) -> None:
    """Remove the unscored maps a previous run of the job left (a rerun writes them all again)."""
    import shutil

    shutil.rmtree(unscored_folder(record_path), ignore_errors=True)


def add_unscored(artifacts: dict[str, Any], new: Mapping[str, Any]) -> None:
    """Merge one fit unit's ``unscored_maps`` into the record's artifacts (oneclass: a unit per category)."""
    info = new["unscored_maps"]
    current = artifacts.get("unscored_maps")
    if current is None:
        artifacts["unscored_maps"] = info
        return
    current["counts"].update(info["counts"])
    current["thresholds"].update(info["thresholds"])


__all__ = ["MAPS", "THRESHOLDED", "UNSCORED_SUFFIX", "add_unscored", "reset_unscored", "unscored_folder", "unscored_path", "write_maps",
           "write_unscored"]
