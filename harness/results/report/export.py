"""``harness export-maps``: saved maps in the official MVTec AD evaluation layout.

For a record run with ``--save-maps all``, every test map is written as a float32 TIFF::

    DIR/<category>/test/<defect>/<stem>.tiff

at the evaluation size the record's metrics were computed at (256 x 256 by default, or the
images' own size with ``--eval-size native``), values untouched. Beside them,
``DIR/<category>/image_scores.csv`` holds the method's own image scores, which ``harness
evaluate`` uses instead of the map maximum, so that both its image and pixel metrics equal the
record's. With ``--ground-truth`` the folder becomes a complete MVTec-layout dataset at the
evaluation size as well: the test images ``DIR/<category>/test/<defect>/<stem>.png`` and the
masks ``DIR/<category>/ground_truth/<defect>/<stem>_mask.png`` (0/255), so the official MVTec AD
evaluation script can be pointed at it (``--dataset_base_dir DIR --anomaly_maps_dir DIR``).
The official script takes the maximum of each map as the image score, so its image AUROC
equals the record's only for methods whose image score is the map maximum; its pixel metrics
and AU-PRO always do.

Which records: the ``ok`` records of ``--method`` (optionally only of ``--dataset``, ``--protocol``,
``--profile``, ``--seed``). One record is exported into ``DIR`` itself; several go into one
sub-folder each, ``DIR/<dataset>/<protocol>/<profile>-seed<seed>[-<overrides hash>]``.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from harness.errors import UsageError
from harness.engine.support.fsutil import atomic_write, atomic_writer
from harness.results.records import Record, scan_records
from harness.results.report.maps import SavedMapsError, iter_all_maps, maps_info

#: File of the image scores in each category folder.
SCORES_FILE = "image_scores.csv"


@dataclass
class ExportedRecord:
    """One record's export.

    Attributes
    ----------
    record_path : Path
    folder : Path
        Where its layout was written.
    counts : dict of str to int
        Maps written per category.
    eval_size : int or str
        The evaluation size of the maps (``native`` when the images' own).
    """

    record_path: Path
    folder: Path
    counts: dict[str, int] = field(default_factory=dict)
    eval_size: int | str = "native"
    dataset: str = ""
    #: Maps of test images without public ground truth, per category (MVTec AD 2's private sets),
    #: copied into ``folder`` in the layout of MVTec's evaluation server (:mod:`harness.engine.inference.unscored`).
    unscored: dict[str, int] = field(default_factory=dict)

    def evaluate_command(self) -> str:
        """The ``harness evaluate`` call that scores this export to the record's numbers."""
        size = f" --eval-size {self.eval_size}" if self.eval_size != "native" else ""
        return f"harness evaluate --maps {self.folder} --dataset {self.dataset} --root DATASET_ROOT{size}"


def _selected(results_dir: Path, method: str, datasets: Sequence[str], protocol: str | None, profile: str | None,
              seed: int | None, warn: Callable[[str], None] | None) -> list[tuple[Path, Record]]:
    scan = scan_records(results_dir)
    for line in scan.warnings():
        if warn is not None:
            warn(line)
    chosen = []
    for path, record in scan.records:
        job = record.job
        if job.method != method or not record.ok:
            continue
        if datasets and job.dataset not in datasets:
            continue
        if protocol and job.protocol != protocol:
            continue
        if profile and job.profile != profile:
            continue
        if seed is not None and job.seed != seed:
            continue
        chosen.append((path, record))
    return chosen


def write_tiff(path: Path, amap: np.ndarray) -> None:
    """One map as a float32 TIFF, atomically."""
    import tifffile

    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.ascontiguousarray(amap, dtype=np.float32))
    atomic_write(path, buffer.getvalue())


def _write_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    with atomic_writer(path) as handle:
        Image.fromarray(np.ascontiguousarray(array)).save(handle, format="PNG")


def export_record(record_path: Path, record: Record, out: Path, ground_truth: bool = False) -> ExportedRecord:
    """Write one record's saved maps (``--save-maps all``) into ``out`` (see the module docstring).

    Raises
    ------
    SavedMapsError
        When the record has no saved map of every test image, or they are incomplete.
    """
    info = maps_info(record) or {}
    exported = ExportedRecord(Path(record_path), Path(out), eval_size=info.get("eval_size", "native"),
                              dataset=record.job.dataset)
    exported.unscored = _copy_unscored(record_path, record, Path(out))
    scores: dict[str, list[tuple[str, float]]] = {}
    saved_maps = iter_all_maps(record_path, record, with_images=ground_truth) if info.get("all") else ()
    for saved in saved_maps:
        category, _, rest = saved.key.partition("/")
        if category != saved.category or not rest.startswith("test/"):
            raise SavedMapsError(f"saved map key {saved.key!r} is not <category>/test/<defect>/<stem>")
        write_tiff(Path(out) / f"{saved.key}.tiff", saved.amap)
        scores.setdefault(category, []).append((rest, saved.score))
        exported.counts[category] = exported.counts.get(category, 0) + 1
        if ground_truth:
            _write_png(Path(out) / f"{saved.key}.png", saved.image)
            if saved.label == 1:
                defect, stem = Path(rest).parent.name, Path(rest).name
                mask_path = Path(out) / category / "ground_truth" / defect / f"{stem}_mask.png"
                _write_png(mask_path, saved.mask.astype(np.uint8) * 255)
    for category, rows in scores.items():
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["file", "score"])
        for rest, score in rows:
            writer.writerow([rest, repr(float(score))])
        atomic_write(Path(out) / category / SCORES_FILE, buffer.getvalue())
    return exported


def _unscored(record: Record) -> dict:
    return record.artifacts.get("unscored_maps") or {}


def _copy_unscored(record_path: Path, record: Record, out: Path) -> dict[str, int]:
    """Copy a record's unscored maps (server layout) into ``out``; their counts per category."""
    import shutil

    from harness.engine.inference.unscored import unscored_folder

    info = _unscored(record)
    if not info:
        return {}
    source = unscored_folder(record_path)
    if not source.is_dir():
        raise SavedMapsError(f"record {record_path} lists unscored maps but {source} is missing; rerun it with --force")
    shutil.copytree(source, out, dirs_exist_ok=True)
    return {c: int(n) for c, n in info.get("counts", {}).items()}


def export_maps(results_dir: Path | str, method: str, out: Path | str, datasets: Sequence[str] = (),
                protocol: str | None = None, profile: str | None = None, seed: int | None = None,
                ground_truth: bool = False, warn: Callable[[str], None] | None = None) -> list[ExportedRecord]:
    """Export the saved maps of ``method``'s records under ``results_dir`` into ``out``.

    Returns
    -------
    list of ExportedRecord

    Raises
    ------
    UsageError
        When no record matches, or a matching record has no saved maps of every image.
    """
    results_dir, out = Path(results_dir), Path(out)
    chosen = _selected(results_dir, method, list(datasets), protocol, profile, seed, warn)
    if not chosen:
        what = f"method {method!r}" + (f" on {', '.join(datasets)}" if datasets else "")
        raise UsageError(f"no finished record of {what} under {results_dir / 'records'}; see harness leaderboard "
                         f"--results-dir {results_dir}")
    lacking = [str(p) for p, r in chosen if not (maps_info(r) or {}).get("all") and not _unscored(r)]
    if lacking:
        raise UsageError("these records have no saved map of every test image (rerun them with --save-maps all "
                         "--force):\n  " + "\n  ".join(lacking))
    exported = []
    for path, record in chosen:
        target = out
        if len(chosen) > 1:
            stem = record.job.relative_path()
            target = out / stem.parent.parent / stem.stem
        try:
            exported.append(export_record(path, record, target, ground_truth))
        except SavedMapsError as exc:
            raise UsageError(str(exc)) from exc
    return exported


__all__ = ["SCORES_FILE", "ExportedRecord", "export_maps", "export_record", "write_tiff"]
