"""Saved anomaly maps: what ``harness run --save-maps none|sample|all`` keeps next to each record.

Layout
------
Beside a record ``<results>/records/<dataset>/<protocol>/<method>/<stem>.json`` the job leaves
one folder ``<stem>.maps/`` (nothing when ``--save-maps none``)::

    <stem>.maps/sample.safetensors      the gallery: a few maps per category, with their images
    <stem>.maps/curves.safetensors      the exact ROC/PR/PRO curves of every category, thinned
    <stem>.maps/all/NNN-BBBBB.safetensors   (--save-maps all) every map, one file per batch

Everything is safetensors (tensors + a JSON string in the header's metadata), so nothing is
ever unpickled. Files are written atomically into a temporary folder that replaces
``<stem>.maps`` when the job finishes, so a folder is always one job's complete set; a job that
dies leaves only a temporary folder, removed by the next run of that job. The record's
``artifacts["maps"]`` says what was saved (paths relative to the record's folder). No file in
the folder ends in ``.json``: every ``*.json`` under ``records/`` is read as a record.

What is saved
-------------
- ``sample`` (the default): for every category, the maps of a fixed set of test images,
  :data:`SAMPLE_NORMAL` normal and :data:`SAMPLE_ANOMALOUS` anomalous, drawn from the sorted test
  keys with a seed made from (:data:`SAMPLE_SEED`, dataset, category) only: the same images for
  every method, seed and protocol, so a report can put them side by side. Plus each method's
  worst false positive (the normal image it scores highest) and worst false negative (the
  anomalous image it scores lowest). Each comes with its image at the evaluation size (PNG),
  its mask at the evaluation size and the method's image score. Maps are float32 at the
  evaluation size (what the metrics saw).
- ``all``: the sample and curves, plus every test map at full float32 precision, its mask, its
  image (PNG) and its score: everything ``harness export-maps`` needs to write the official
  MVTec evaluation layout without the dataset.
- Both modes keep the exact curves of every category (:mod:`harness.metrics.curves`), thinned
  for plotting; they are computed from the engine's sorted data, so they cost no second sort.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from harness.errors import HarnessError
from harness.engine.support.fsutil import atomic_write, ensure_dir, fsync_dir

#: Normal and anomalous test images per category in the fixed sample.
SAMPLE_NORMAL, SAMPLE_ANOMALOUS = 2, 4
#: Seed of the fixed sample (combined with the dataset and category names, never the job's seed).
SAMPLE_SEED = 0
#: Format tag in every file's metadata.
FORMAT = "harness-saved-maps"
FORMAT_VERSION = "1"
#: Roles of a saved map.
SAMPLE, WORST_FP, WORST_FN = "sample", "worst_false_positive", "worst_false_negative"


class SavedMapsError(HarnessError):
    """Saved maps are missing or unreadable; the message names the file."""


def artifacts_folder(record_path: Path) -> Path:
    """``<stem>.maps`` next to the record ``<stem>.json``."""
    record_path = Path(record_path)
    return record_path.with_name(record_path.stem + ".maps")


def sample_keys(dataset: str, category: str, keys_and_labels: Sequence[tuple[str, int]]) -> list[str]:
    """The fixed sample of one category: the same keys for every method, seed and protocol.

    Parameters
    ----------
    dataset, category : str
    keys_and_labels : sequence of (key, label)
        The category's test images.

    Returns
    -------
    list of str
        Up to :data:`SAMPLE_NORMAL` normal keys, then up to :data:`SAMPLE_ANOMALOUS` anomalous
        ones, each group in key order.
    """
    digest = hashlib.sha256(f"{SAMPLE_SEED}/{dataset}/{category}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    chosen: list[str] = []
    for label, count in ((0, SAMPLE_NORMAL), (1, SAMPLE_ANOMALOUS)):
        keys = sorted(k for k, lab in keys_and_labels if int(lab) == label)
        if keys:
            picked = rng.choice(len(keys), size=min(count, len(keys)), replace=False)
            chosen += [keys[i] for i in sorted(picked)]
    return chosen


# -- encoding ---------------------------------------------------------------------------------

def encode_png(image: np.ndarray) -> np.ndarray:
    """An RGB or greyscale uint8 image as PNG bytes in a 1-D uint8 array."""
    from PIL import Image

    buffer = io.BytesIO()
    # zlib level 1: five times faster than the default 6 for 10 % more bytes (every job saves a sample).
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG", compress_level=1)
    return np.frombuffer(buffer.getvalue(), dtype=np.uint8).copy()


def decode_png(data: np.ndarray) -> np.ndarray:
    """Inverse of :func:`encode_png` (RGB uint8)."""
    from PIL import Image

    with Image.open(io.BytesIO(np.asarray(data, dtype=np.uint8).tobytes())) as img:
        return np.asarray(img.convert("RGB"))


def pack_mask(mask: np.ndarray) -> np.ndarray:
    """A boolean (..., H, W) mask as packed bits (..., H, ceil(W / 8))."""
    return np.packbits(np.asarray(mask, dtype=bool), axis=-1)


def unpack_mask(packed: np.ndarray, width: int) -> np.ndarray:
    """Inverse of :func:`pack_mask`."""
    return np.unpackbits(np.asarray(packed, dtype=np.uint8), axis=-1, count=int(width)).astype(bool)


def _save(path: Path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, Any]) -> None:
    from safetensors.numpy import save

    header = {"format": FORMAT, "version": FORMAT_VERSION, **{k: json.dumps(v) for k, v in metadata.items()}}
    atomic_write(path, save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata=header))


def _load(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Tensors and decoded metadata of one saved-maps file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            header = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as exc:  # noqa: BLE001 - any decoding failure is the file's problem
        raise SavedMapsError(f"saved maps {path} cannot be read: {exc}") from exc
    if header.get("format") != FORMAT:
        raise SavedMapsError(f"{path} is not a harness saved-maps file")
    meta = {k: json.loads(v) for k, v in header.items() if k not in ("format", "version")}
    return tensors, meta


# -- the sink ---------------------------------------------------------------------------------

@dataclass
class _Kept:
    """One map kept for the gallery."""

    category: str
    key: str
    label: int
    defect: str
    score: float
    amap: np.ndarray
    sample: Any
    roles: list[str] = field(default_factory=list)


class SavedMapsSink:
    """A :class:`harness.engine.inference.evaluation.MapSink` writing a job's saved maps (see the module docstring).

    Parameters
    ----------
    planned : harness.engine.planning.PlannedJob
        The job; its test sets decide the fixed sample, its record path the folder.
    mode : {"sample", "all"}
    """

    def __init__(self, planned: Any, mode: str) -> None:
        if mode not in ("sample", "all"):
            raise ValueError(f"save-maps mode {mode!r}: expected 'sample' or 'all'")
        self.mode = mode
        self.dataset = planned.job.dataset
        self.eval_size = planned.eval_size
        self.grid = getattr(planned, "grid", None)
        self.record_path = Path(planned.record_path)
        self.folder = artifacts_folder(self.record_path)
        self.tests = planned.tests
        self._sample: dict[str, set[str]] = {}
        self._kept: dict[tuple[str, str], _Kept] = {}
        self._worst: dict[tuple[str, str], _Kept] = {}
        self._curves: dict[str, dict[str, Any]] = {}
        self._categories: list[str] = []
        self._batches: dict[str, int] = {}
        self._n_all = 0
        self._clean_stale()
        self._tmp = self.folder.with_name(f"{self.folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")

    def _clean_stale(self) -> None:
        """Remove what a job that died left (temporary folders and a half-swapped old folder)."""
        parent = self.folder.parent
        if not parent.is_dir():
            return
        for stale in parent.glob(f"{self.folder.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        for stale in parent.glob(f"{self.folder.name}.old-*"):
            shutil.rmtree(stale, ignore_errors=True)

    def _sample_of(self, category: str) -> set[str]:
        if category not in self._sample:
            tests = self.tests.get(category, [])
            self._sample[category] = set(sample_keys(self.dataset, category, [(s.key, s.label) for s in tests]))
            self._categories.append(category)
        return self._sample[category]

    def add(self, category: str, samples: Sequence[Any], maps: Sequence[np.ndarray], scores: np.ndarray) -> None:
        """Take one checked batch (maps at the evaluation size)."""
        chosen = self._sample_of(category)
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        for sample, amap, score in zip(samples, maps, scores):
            if sample.key in chosen:
                self._keep(category, sample, amap, float(score), SAMPLE)
            # Worst false positive: the highest-scoring normal image; false negative: the lowest anomalous.
            role = WORST_FP if sample.label == 0 else WORST_FN
            current = self._worst.get((category, role))
            if current is None or (score > current.score if role == WORST_FP else score < current.score):
                self._worst[(category, role)] = _Kept(category, sample.key, int(sample.label), sample.defect,
                                                      float(score), np.array(amap, dtype=np.float32), sample)
        if self.mode == "all":
            self._write_batch(category, samples, maps, scores)

    def _keep(self, category: str, sample: Any, amap: np.ndarray, score: float, role: str) -> None:
        kept = self._kept.get((category, sample.key))
        if kept is None:
            kept = _Kept(category, sample.key, int(sample.label), sample.defect, score,
                         np.array(amap, dtype=np.float32), sample)
            self._kept[(category, sample.key)] = kept
        if role not in kept.roles:
            kept.roles.append(role)

    def _write_batch(self, category: str, samples: Sequence[Any], maps: Sequence[np.ndarray], scores: np.ndarray) -> None:
        from harness.engine.inference.evaluation import ground_truth

        stacked = np.stack([np.asarray(m, dtype=np.float32) for m in maps])
        masks = np.stack([ground_truth(s, self.eval_size, self.grid) for s in samples])
        tensors: dict[str, np.ndarray] = {"maps": stacked, "masks": pack_mask(masks), "scores": scores}
        for row, sample in enumerate(samples):
            tensors[f"image_png/{row}"] = encode_png(_image_at(sample, stacked.shape[1:]))
        index = self._categories.index(category)
        batch = self._batches.get(category, 0)
        self._batches[category] = batch + 1
        entries = [{"key": s.key, "label": int(s.label), "defect": s.defect} for s in samples]
        _save(ensure_dir(self._tmp / "all") / f"{index:03d}-{batch:05d}.safetensors", tensors,
              {"category": category, "entries": entries, "width": int(stacked.shape[2])})
        self._n_all += len(samples)

    def category_finished(self, category: str, accumulator: Any) -> None:
        """Keep the category's exact curves, thinned for plotting."""
        from harness.metrics.curves import category_curves

        self._sample_of(category)
        self._curves[category] = {name: curve.thinned() for name, curve in category_curves(accumulator).items()}

    def close(self) -> dict[str, Any]:
        """Write the sample and the curves, put the folder in place, and describe it for the record."""
        for (category, role), kept in self._worst.items():
            self._keep(category, kept.sample, kept.amap, kept.score, role)
        ensure_dir(self._tmp)
        self._write_sample()
        self._write_curves()
        self._swap_in()
        rel = self.folder.name
        info: dict[str, Any] = {
            "save_maps": self.mode, "folder": rel, "format": "safetensors", "eval_size": self.eval_size or "native",
            "sample": f"{rel}/sample.safetensors", "n_sample": len(self._kept), "curves": f"{rel}/curves.safetensors",
            "sample_rule": f"{SAMPLE_NORMAL} normal + {SAMPLE_ANOMALOUS} anomalous test images per category, drawn "
                           f"with seed {SAMPLE_SEED} from the dataset and category names (the same for every method), "
                           "plus this method's worst false positive and false negative",
        }
        if self.mode == "all":
            info.update({"all": f"{rel}/all", "n_all": self._n_all})
        return {"maps": info}

    def _write_sample(self) -> None:
        tensors: dict[str, np.ndarray] = {}
        entries = []
        ordered = sorted(self._kept.values(), key=lambda k: (self._categories.index(k.category), k.key))
        for index, kept in enumerate(ordered):
            mask = _mask_of(kept.sample, self.eval_size, kept.amap.shape, self.grid)
            tensors[f"{index}/map"] = kept.amap
            tensors[f"{index}/mask"] = pack_mask(mask)
            tensors[f"{index}/image_png"] = encode_png(_image_at(kept.sample, kept.amap.shape))
            entries.append({"index": index, "category": kept.category, "key": kept.key, "label": kept.label,
                            "defect": kept.defect, "score": kept.score, "roles": kept.roles,
                            "shape": list(kept.amap.shape)})
        _save(self._tmp / "sample.safetensors", tensors, {"entries": entries, "dataset": self.dataset})

    def _write_curves(self) -> None:
        tensors: dict[str, np.ndarray] = {}
        entries = []
        for category in self._categories:
            for name, curve in self._curves.get(category, {}).items():
                index = len(entries)
                tensors[f"{index}/x"] = curve.x
                tensors[f"{index}/y"] = curve.y
                entries.append({"index": index, "category": category, "curve": name, "metric": curve.metric,
                                "value": curve.value, "n_exact": curve.n_exact})
        _save(self._tmp / "curves.safetensors", tensors, {"entries": entries, "categories": self._categories})

    def _swap_in(self) -> None:
        """Replace ``<stem>.maps`` by the finished temporary folder (old one removed afterwards)."""
        old = None
        if self.folder.exists():
            old = self.folder.with_name(f"{self.folder.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            os.replace(self.folder, old)
        os.replace(self._tmp, self.folder)
        fsync_dir(self.folder.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _image_at(sample: Any, shape: Sequence[int]) -> np.ndarray:
    """The sample's RGB image resized (bilinear) to ``shape`` (H, W), for display."""
    from PIL import Image

    from harness.data import read_image

    image = read_image(sample.image)
    if image.shape[:2] == tuple(shape):
        return image
    return np.asarray(Image.fromarray(image).resize((int(shape[1]), int(shape[0])), Image.BILINEAR))


def _mask_of(sample: Any, eval_size: int | None, shape: Sequence[int], grid: Any = None) -> np.ndarray:
    from harness.engine.inference.evaluation import ground_truth

    mask = ground_truth(sample, eval_size, grid)
    return mask if mask.shape == tuple(shape) else np.zeros(tuple(shape), dtype=bool)


def saved_maps_sinks(options: Any):
    """The ``sinks`` factory of :class:`harness.engine.runner.JobRunner` for ``options.save_maps``.

    Returns None for ``none``; else a callable ``sinks(planned) -> [SavedMapsSink]``.
    """
    mode = getattr(options, "save_maps", "sample") or "none"
    if mode == "none":
        return None
    return lambda planned: [SavedMapsSink(planned, mode)]


# -- reading ----------------------------------------------------------------------------------

@dataclass
class SavedMap:
    """One saved map with what goes with it.

    Attributes
    ----------
    category, key, defect : str
    label : int
    score : float
        The method's image score.
    amap : numpy.ndarray of float32 (H, W)
        At the evaluation size.
    mask : numpy.ndarray of bool (H, W)
    image : numpy.ndarray of uint8 (H, W, 3) or None
    roles : tuple of str
        ``sample``, ``worst_false_positive``, ``worst_false_negative`` (for maps of the sample).
    """

    category: str
    key: str
    label: int
    defect: str
    score: float
    amap: np.ndarray
    mask: np.ndarray
    image: np.ndarray | None = None
    roles: tuple[str, ...] = ()


def maps_info(record: Any) -> dict[str, Any] | None:
    """``artifacts["maps"]`` of a record (a :class:`harness.results.records.Record` or its dict), or None."""
    artifacts = record.get("artifacts") if isinstance(record, Mapping) else getattr(record, "artifacts", None)
    info = (artifacts or {}).get("maps")
    return dict(info) if isinstance(info, Mapping) else None


def _artifact_path(record_path: Path, relative: str) -> Path:
    parts = Path(relative).parts
    if Path(relative).is_absolute() or ".." in parts:
        raise SavedMapsError(f"record {record_path}: artifact path {relative!r} leaves the record's folder")
    return Path(record_path).parent / relative


def read_sample(record_path: Path, record: Any) -> list[SavedMap]:
    """The gallery maps saved with a record (empty when none were saved)."""
    info = maps_info(record)
    if not info or not info.get("sample"):
        return []
    path = _artifact_path(record_path, info["sample"])
    if not path.is_file():
        raise SavedMapsError(f"record {record_path} lists saved maps {path}, which is missing")
    tensors, meta = _load(path)
    out = []
    try:
        for entry in meta.get("entries", []):
            i = entry["index"]
            shape = entry["shape"]
            out.append(SavedMap(entry["category"], entry["key"], int(entry["label"]), entry["defect"],
                                float(entry["score"]), tensors[f"{i}/map"], unpack_mask(tensors[f"{i}/mask"], shape[1]),
                                decode_png(tensors[f"{i}/image_png"]), tuple(entry.get("roles", ()))))
    except Exception as exc:  # noqa: BLE001 - a file that decodes but does not hold what it says is damaged
        raise SavedMapsError(f"saved maps {path} are damaged: {type(exc).__name__}: {exc}") from exc
    return out


def read_curves(record_path: Path, record: Any) -> dict[str, dict[str, Any]]:
    """``{category: {curve name: Curve}}`` saved with a record (thinned; values exact)."""
    from harness.metrics.curves import Curve

    info = maps_info(record)
    if not info or not info.get("curves"):
        return {}
    path = _artifact_path(record_path, info["curves"])
    if not path.is_file():
        raise SavedMapsError(f"record {record_path} lists curves {path}, which is missing")
    tensors, meta = _load(path)
    out: dict[str, dict[str, Any]] = {c: {} for c in meta.get("categories", [])}
    for entry in meta.get("entries", []):
        i = entry["index"]
        out.setdefault(entry["category"], {})[entry["curve"]] = Curve(
            entry["curve"], tensors[f"{i}/x"], tensors[f"{i}/y"], entry["metric"], float(entry["value"]),
            int(entry["n_exact"]))
    return out


def iter_all_maps(record_path: Path, record: Any, with_images: bool = False) -> Iterator[SavedMap]:
    """Every map saved with ``--save-maps all``, category by category, in test order.

    Raises
    ------
    SavedMapsError
        When the record has no ``all`` maps, or their files are missing or incomplete.
    """
    info = maps_info(record)
    if not info or not info.get("all"):
        raise SavedMapsError(f"record {record_path} has no saved maps of every test image (run with --save-maps all)")
    folder = _artifact_path(record_path, info["all"])
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    count = 0
    for path in files:
        tensors, meta = _load(path)
        masks = unpack_mask(tensors["masks"], meta["width"])
        for row, entry in enumerate(meta["entries"]):
            image = decode_png(tensors[f"image_png/{row}"]) if with_images else None
            yield SavedMap(meta["category"], entry["key"], int(entry["label"]), entry["defect"],
                           float(tensors["scores"][row]), tensors["maps"][row], masks[row], image)
            count += 1
    expected = info.get("n_all")
    if expected is not None and count != int(expected):
        raise SavedMapsError(f"record {record_path}: {count} saved maps found in {folder}, the record lists {expected}")


__all__ = ["SAMPLE_ANOMALOUS", "SAMPLE_NORMAL", "SAMPLE_SEED", "SavedMap", "SavedMapsError", "SavedMapsSink",
           "artifacts_folder", "iter_all_maps", "maps_info", "read_curves", "read_sample", "sample_keys",
           "saved_maps_sinks"]
