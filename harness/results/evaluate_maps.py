"""``harness evaluate``: score anomaly maps produced by another codebase with the exact engine.

Layout (the one the official MVTec AD evaluation expects): one map per test image, mirroring the
dataset's test tree::

    <maps>/<category>/test/<defect>/<stem>.tiff     (also .tif or .npy)

A map is a 2-D array (higher = more anomalous; a singleton channel is dropped). It is scored
against the dataset's ground truth at the mask's own resolution, as the official evaluation
does; a map of another size is an error naming the file, unless ``eval_size`` is given, in which
case maps are resized bilinearly and masks by nearest neighbour to ``eval_size`` x ``eval_size``
(the runner's convention). The image score is the map's maximum (the official evaluation's
rule); the image label is the test folder's.

A test image without a map is an error naming the file (a partial evaluation would not be
comparable); a map file that matches no test image is reported as a warning and ignored.

A method's own image scores may come with the maps: ``<maps>/<category>/image_scores.csv``
(columns ``file`` = ``test/<defect>/<stem>`` and ``score``, as ``harness export-maps`` writes it)
is used instead of the map maximum for that category; it must list every test image.

The result is one record per call, shaped like a run's (see :mod:`harness.results.records`), with
``method`` = the given name and ``profile`` = ``"maps"``, so ``harness leaderboard`` lists it
beside the methods run here.
"""

from __future__ import annotations

import datetime as _dt
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from harness.data import DatasetIndex, Sample, read_mask, resize_mask
from harness.errors import UsageError
from harness.engine.jobs import Job
from harness.results.record_parts import Efficiency, Environment
from harness.results.records import Record

#: Map file suffixes, in the order they are looked for.
MAP_SUFFIXES = (".tiff", ".tif", ".npy")
#: ``profile`` of the records written by ``harness evaluate``.
EVALUATE_PROFILE = "maps"
#: Optional per-category file of the method's own image scores.
IMAGE_SCORES_FILE = "image_scores.csv"
_BATCH = 16


class MapError(UsageError):
    """A map file is missing, unreadable, or does not fit its ground truth."""


@dataclass
class MapsEvaluation:
    """What ``harness evaluate`` found and computed.

    Attributes
    ----------
    metrics : dict
        ``{category: {metric: value}}``.
    extra_files : list of Path
        Map files that match no test image (ignored).
    n_maps : int
        Maps scored.
    score_files : list of Path
        The ``image_scores.csv`` files used (categories without one use the map maximum).
    """

    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    extra_files: list[Path] = field(default_factory=list)
    n_maps: int = 0
    score_files: list[Path] = field(default_factory=list)


def map_path(maps_dir: Path, sample: Sample, root: Path | None = None) -> Path | None:
    """The map file of ``sample`` under ``maps_dir``, or None when there is none.

    Looked for at the sample's key, then (with ``root``) at the image's own path in the dataset
    tree: MVTec AD 2's ``<category>/test_public/bad/<stem>`` or a validation image.

    Parameters
    ----------
    maps_dir : Path
    sample : Sample
        A test sample; its key is ``<category>/test/<defect>/<stem>``.
    root : Path, optional
        The dataset root, for the second place.

    Returns
    -------
    Path or None
    """
    bases = [Path(maps_dir) / sample.key]
    if root is not None and isinstance(sample.image, (str, Path)):
        try:
            bases.append(Path(maps_dir) / Path(sample.image).relative_to(root).with_suffix(""))
        except ValueError:
            pass
    for base in bases:
        for suffix in MAP_SUFFIXES:
            candidate = base.with_name(base.name + suffix)
            if candidate.is_file():
                return candidate
    return None


def read_map(path: Path) -> np.ndarray:
    """Read one anomaly map (TIFF or NPY) as a 2-D float array.

    Raises
    ------
    MapError
        When the file cannot be read or is not one 2-D map; the message names the file.
    """
    path = Path(path)
    try:
        if path.suffix.lower() == ".npy":
            array = np.load(path, allow_pickle=False)
        else:
            import tifffile

            array = tifffile.imread(path)
    except Exception as exc:  # noqa: BLE001 - any decoding failure is the file's problem
        raise MapError(f"cannot read anomaly map {path}: {exc}") from exc
    array = np.asarray(array)
    if array.ndim == 3 and 1 in (array.shape[0], array.shape[-1]):
        array = array.reshape(array.shape[1:] if array.shape[0] == 1 else array.shape[:-1])
    if array.ndim != 2:
        raise MapError(f"anomaly map {path} has shape {array.shape}; expected one 2-D map (H, W)")
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise MapError(f"anomaly map {path} has dtype {array.dtype}; expected real numbers")
    return array


def _image_size(sample: Sample) -> tuple[int, int]:
    from harness.engine.runner import native_size

    return native_size(sample)


def _resize_map(amap: np.ndarray, size: int) -> np.ndarray:
    from harness.engine.runner import resize_map

    return resize_map(amap.astype(np.float32), (size, size))


def _ground_truth(sample: Sample, amap: np.ndarray, path: Path, eval_size: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(map, mask) of one test image at the evaluation size."""
    if sample.mask is not None:
        mask = read_mask(sample.mask)
    else:
        mask = np.zeros(_image_size(sample), dtype=bool)
    if eval_size:
        return _resize_map(amap, eval_size), resize_mask(mask, (eval_size, eval_size))
    if amap.shape != mask.shape:
        raise MapError(f"anomaly map {path} is {amap.shape[1]}x{amap.shape[0]} (WxH) but its ground truth is "
                       f"{mask.shape[1]}x{mask.shape[0]}; write maps at the image's resolution, or pass "
                       f"--eval-size N to resize both to NxN")
    return amap, mask


def read_image_scores(maps_dir: Path, category: str) -> dict[str, float] | None:
    """``{test/<defect>/<stem>: score}`` from ``<maps>/<category>/image_scores.csv``, or None without one.

    Raises
    ------
    MapError
        When the file cannot be parsed; the message names it.
    """
    import csv

    path = Path(maps_dir) / category / IMAGE_SCORES_FILE
    if not path.is_file():
        return None
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        scores = {row["file"]: float(row["score"]) for row in rows}
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise MapError(f"image scores {path} cannot be read (expected columns file,score): {exc}") from exc
    bad = [name for name, value in scores.items() if not np.isfinite(value)]
    if bad:
        raise MapError(f"image scores {path}: NaN or inf for {', '.join(bad[:5])}")
    return scores


def find_extra_files(maps_dir: Path, categories: Iterable[str], expected: set[Path]) -> list[Path]:
    """Map files under the categories' ``test`` folders that match no test image."""
    extra = []
    for category in categories:
        folder = Path(maps_dir) / category / "test"
        if folder.is_dir():
            extra += [p for p in sorted(folder.rglob("*")) if p.suffix.lower() in MAP_SUFFIXES
                      and p.is_file() and p not in expected]
    return extra


def evaluate_maps(maps_dir: Path, index: DatasetIndex, categories: Sequence[str] | None = None,
                  eval_size: int | None = None, metrics: Sequence[Any] = ()) -> MapsEvaluation:
    """Score the maps under ``maps_dir`` against ``index``'s test ground truth, per category.

    Parameters
    ----------
    maps_dir : Path
        Folder in the layout of the module docstring.
    index : DatasetIndex
        The dataset, as a dataset plugin's loader returns it.
    categories : sequence of str, optional
        Categories to score (default: every category with test images).
    eval_size : int, optional
        Resize maps and masks to this square size; default: the masks' own size.
    metrics : sequence of MetricSpec, optional
        The dataset's metric specs (``registry.metric_specs(dataset)``). Besides the seven, those
        that need no maps (``needs_maps=False``: per-group and sample-level AUROC, DICE) are
        computed from the image scores, keys and samples; ``pixel_aupro_fpr<limit>`` from the
        streamed curves; ``pixel_segf1`` at the threshold of the validation maps, when the maps
        folder has them (``<maps>/<category>/validation/good/<stem>.tiff``; NaN with a warning
        otherwise). Other metrics that need the maps are not computed here.

    A category whose samples carry mask channels (MVTec LOCO AD) also gets the sPRO metrics of
    :func:`harness.metrics.spro.spro_metrics`, computed from the same maps.

    Returns
    -------
    MapsEvaluation

    Raises
    ------
    MapError
        When maps are missing (all of them are named, up to 20), unreadable, or of a size other
        than their mask's.
    """
    from harness.metrics import MetricAccumulator
    from harness.metrics.spro import SproAccumulator, read_channel, spro_metrics
    from harness.metrics.segf1 import THRESHOLD_METRICS, SegF1Counter

    maps_dir = Path(maps_dir)
    if not maps_dir.is_dir():
        raise MapError(f"--maps {maps_dir}: no such folder")
    names = list(categories) if categories else [c for c, data in index.categories.items() if data.test]
    unknown = [c for c in names if c not in index.categories]
    if unknown:
        raise UsageError(f"category {', '.join(unknown)} is not in dataset {index.name!r}; "
                         f"it has {', '.join(index.categories)}")
    paths: dict[str, list[tuple[Sample, Path]]] = {}
    missing: list[str] = []
    for category in names:
        pairs = []
        for sample in index.categories[category].test:
            path = map_path(maps_dir, sample, index.root)
            if path is None:
                missing.append(str(maps_dir / sample.key) + ".tiff")
            else:
                pairs.append((sample, path))
        paths[category] = pairs
    if missing:
        shown = "\n  ".join(missing[:20]) + (f"\n  ... and {len(missing) - 20} more" if len(missing) > 20 else "")
        raise MapError(f"{len(missing)} test image(s) have no anomaly map (looked for "
                       f"{', '.join(MAP_SUFFIXES)}):\n  {shown}")
    result = MapsEvaluation()
    expected = {p for pairs in paths.values() for _, p in pairs}
    result.extra_files = find_extra_files(maps_dir, names, expected)
    for category in names:
        accumulator = MetricAccumulator(name=category)
        pairs = paths[category]
        own = read_image_scores(maps_dir, category)
        if own is not None:
            result.score_files.append(maps_dir / category / IMAGE_SCORES_FILE)
            unlisted = [s.key for s, _ in pairs if s.key.partition("/")[2] not in own]
            if unlisted:
                raise MapError(f"{maps_dir / category / IMAGE_SCORES_FILE} has no score for {len(unlisted)} test "
                               f"image(s): {', '.join(unlisted[:5])}")
        spro = SproAccumulator() if any(s.channels for s, _ in pairs) else None
        segf1 = None
        if any(m.name in THRESHOLD_METRICS for m in metrics):
            threshold = validation_threshold(maps_dir, index, category, eval_size)
            segf1 = SegF1Counter(threshold) if threshold is not None else None
        image_scores: list[float] = []
        for start in range(0, len(pairs), _BATCH):
            batch = pairs[start:start + _BATCH]
            maps, masks = [], []
            for sample, path in batch:
                amap, mask = _ground_truth(sample, read_map(path), path, eval_size)
                maps.append(amap)
                masks.append(mask)
                if segf1 is not None:
                    segf1.update(amap, mask)
                if spro is not None:
                    try:
                        channels = [read_channel(c.source, c.saturation, amap.shape) for c in sample.channels]
                        spro.update(amap, channels, part=sample.defect if sample.label else "good")
                    except ValueError as exc:
                        raise MapError(f"{path}: {exc}") from exc
            scores = None if own is None else [own[s.key.partition("/")[2]] for s, _ in batch]
            image_scores += scores if scores is not None else [float(np.max(m)) for m in maps]
            try:
                accumulator.update(maps, masks, image_scores=scores, labels=[s.label for s, _ in batch],
                                   names=[str(p) for _, p in batch])
            except ValueError as exc:
                raise MapError(str(exc)) from exc
        result.metrics[category] = accumulator.compute()
        if spro is not None:
            result.metrics[category].update(spro_metrics(spro))
        result.metrics[category].update(_dataset_metrics(metrics, result.metrics[category], accumulator, segf1,
                                                         [s for s, _ in pairs], image_scores, category))
        result.n_maps += len(pairs)
    return result


def validation_threshold(maps_dir: Path, index: DatasetIndex, category: str, eval_size: int | None) -> float | None:
    """mean + 3 std of a category's validation maps (:mod:`harness.metrics.segf1`), None without them.

    Raises
    ------
    MapError
        When some validation images have a map and others not (the threshold would be biased).
    """
    from harness.metrics.segf1 import RunningMoments

    samples = index.categories[category].validation
    found = [(s, map_path(maps_dir, s, index.root)) for s in samples]
    missing = [s for s, p in found if p is None]
    if not samples or len(missing) == len(samples):
        return None
    if missing:
        raise MapError(f"{len(missing)} of {len(samples)} validation images of {category} have no map (e.g. "
                       f"{Path(maps_dir) / missing[0].key}.tiff); give all of them or none")
    moments = RunningMoments()
    for sample, path in found:
        amap = read_map(path)
        moments.update(_resize_map(amap, eval_size) if eval_size else amap)
    return moments.threshold()


def _dataset_metrics(specs: Sequence[Any], computed: dict[str, float], accumulator: Any, segf1: Any,
                     samples: Sequence[Sample], image_scores: Sequence[float], category: str) -> dict[str, float]:
    """The dataset's own metrics that streamed data give (see :func:`evaluate_maps`)."""
    import warnings

    from harness.metrics import CategoryScores, UndefinedMetricWarning
    from harness.metrics.engine import pixel_metrics
    from harness.metrics.segf1 import THRESHOLD_METRICS

    scores = CategoryScores(np.asarray(image_scores), np.array([s.label for s in samples]), name=category,
                            keys=[s.key for s in samples], standard=computed, samples=list(samples))
    out: dict[str, float] = {}
    for spec in specs:
        if spec.name in computed:
            continue  # the seven, and sPRO (computed from the mask channels)
        if spec.name.startswith("pixel_aupro_fpr"):
            limit = float(spec.name.removeprefix("pixel_aupro_fpr"))
            out[spec.name] = pixel_metrics(accumulator.pixel_curves(), limit)["pixel_aupro"]
        elif spec.name in THRESHOLD_METRICS:
            if segf1 is None:
                warnings.warn(f"{spec.name} of {category} needs the maps of its validation images "
                              f"(<maps>/{category}/validation/good/<stem>.tiff); returning NaN", UndefinedMetricWarning,
                              stacklevel=3)
                out[spec.name] = float("nan")
            else:
                out[spec.name] = segf1.value()
        elif not spec.needs_maps:
            out[spec.name] = float(spec.compute(scores))
    return out


def evaluation_record(evaluation: MapsEvaluation, *, name: str, dataset: str, protocol: str, shots: int | None,
                      maps_dir: Path, eval_size: int | None, started: str) -> tuple[Job, Record]:
    """The job and record of an evaluation, shaped like the runner's."""
    from harness import __version__
    from harness.metrics import mean_over_categories

    job = Job(method=name, dataset=dataset, protocol=protocol, shots=shots, seed=0, profile=EVALUATE_PROFILE)
    record = Record(
        job=job, status="ok", metrics=evaluation.metrics, mean=mean_over_categories(evaluation.metrics),
        efficiency=Efficiency(n_test_images=evaluation.n_maps),
        method_info={"source": "harness evaluate", "maps_dir": str(Path(maps_dir).resolve()),
                     "image_score": ("the method's own (image_scores.csv)" if evaluation.score_files
                                     else "maximum of the anomaly map"),
                     "eval_size": eval_size or "native (mask resolution)",
                     "extra_map_files_ignored": len(evaluation.extra_files)},
        environment=Environment(harness=__version__, python=platform.python_version(), numpy=np.__version__,
                                platform=platform.platform()),
        started=started, finished=_now(),
    )
    return job, record


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def format_table(metrics: dict[str, dict[str, float]]) -> str:
    """Per-category values and their mean, in percent, as a Markdown table."""
    from tabulate import tabulate

    from harness.metrics import METRIC_LABELS, METRIC_NAMES, mean_over_categories

    def pct(value: float | None) -> str:
        return "—" if value is None or value != value else f"{100 * value:.2f}"

    # Dataset-specific metrics (sPRO, per-group AUROC) follow the seven, in the order computed.
    extra = list(dict.fromkeys(m for v in metrics.values() for m in v if m not in METRIC_NAMES))
    rows = [[c] + [pct(v.get(m)) for m in METRIC_NAMES] + [""] + [pct(v.get(m)) for m in extra]
            for c, v in metrics.items()]
    mean = mean_over_categories(metrics)
    rows.append(["**mean**"] + [pct(mean.get(m)) for m in METRIC_NAMES] + [pct(mean.get("mad"))]
                + [pct(mean.get(m)) for m in extra])
    headers = ["category"] + [METRIC_LABELS[m] for m in METRIC_NAMES] + [METRIC_LABELS["mad"]] + extra
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def now() -> str:
    """The current UTC time, ISO format (records' ``started``/``finished``)."""
    return _now()
