"""Evaluation: predict every test image, check the output, resize, and score each category.

For each category of a fit unit, test images go to ``predict`` in batches of the method's
``eval_batch_size`` (or the largest that fits the device, ``--eval-batch-size auto``), each with
one seed per image (:func:`harness.method.image_seed`), so predictions do not depend on the batch
size. The clock runs only around ``predict``, by one protocol for every method
(:mod:`harness.engine.inference.efficiency`): the first call at each input shape is a warm-up, FPS and its spread
come from the warm calls (the largest batch is repeated when the test set leaves fewer than
``min_calls``), latency from warm batch-1 calls after the batch-1 call that counts FLOPs. Each
batch's output is checked (:func:`check_prediction`: type, shapes, NaN/inf, naming the images),
its maps are resized bilinearly to the evaluation grid and streamed with the ground-truth masks
into the exact metric engine (:class:`harness.metrics.MetricAccumulator`), so the maps are not
kept — unless a metric plugin other than the standard seven needs them, or a *map sink* (saved
maps for the report and ``export-maps``) takes them.

The grid (:class:`harness.EvalGrid`, ``--eval-grid``)
    ``harness`` (the default, one rule for every method): ``eval_size`` x ``eval_size`` over the
    whole image; the binary mask resized by nearest neighbour (so it stays binary, no second
    threshold grows or shrinks a defect); the method's map, which covers the whole image at its
    input size, resized bilinearly (``align_corners=False``). ``paper``: the grid the method's
    spec declares (``MethodSpec.paper_grid``): the 0/255 mask is resized as the authors' loader
    resizes it (nearest or bilinear, Pillow or ``cv2.resize``, square or shorter side, then a
    centre crop), binarised by their rule (> 0, or ``int(value / 255)``), and the map is resized
    to the same resized image and cropped alike. The record says which grid was used
    (``run.eval_grid``).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from harness.data import (ImageCache, Sample, read_image, read_mask, resize_mask, resized_shape, same_shape_runs,
                          to_tensor)
from harness.engine.inference.efficiency import PredictTimer, count_flops
from harness.errors import HarnessError, MethodOutputError
from harness.method import Method, Prediction, as_numpy, call_predict, image_seed
from harness.metrics import CategoryScores, MetricAccumulator
from harness.metrics.builtin import STANDARD_METRICS
from harness.engine.support.progress import Progress
from harness.specs import EvalGrid, MetricSpec, harness_grid
from harness.toolkit.crops import CropBox, center_crop_box


class MapSink(Protocol):
    """Receives every checked batch of maps at the evaluation size (e.g. to save some of them).

    ``close()`` (optional) is called once after the job's last category and returns a mapping
    that goes into the record's ``artifacts``. ``category_finished(category, accumulator)``
    (optional) is called after each category with its :class:`harness.metrics.MetricAccumulator`,
    already computed (e.g. to keep the exact curves, :mod:`harness.metrics.curves`).
    """

    def add(self, category: str, samples: Sequence[Sample], maps: Sequence[np.ndarray],
            scores: np.ndarray) -> None:
        """Take one batch: samples, their maps (H, W) at the evaluation size and image scores."""


def native_size(sample: Sample) -> tuple[int, int]:
    """(H, W) of a sample's image, reading only the header when it is a file."""
    if callable(sample.image):
        return read_image(sample.image).shape[:2]
    from PIL import Image

    with Image.open(sample.image) as img:
        return img.height, img.width


def resize_map(amap: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinearly resize one anomaly map to ``shape`` (no-op when it already has that shape)."""
    if amap.shape == tuple(shape):
        return amap.astype(np.float32, copy=False)
    tensor = torch.from_numpy(np.ascontiguousarray(amap, dtype=np.float32))[None, None]
    return F.interpolate(tensor, size=tuple(shape), mode="bilinear", align_corners=False)[0, 0].numpy()


def _grid_shape(native: tuple[int, int], grid: EvalGrid) -> tuple[tuple[int, int], CropBox]:
    """(resized shape, crop box in it) of an image of ``native`` (H, W) on ``grid``."""
    resized = resized_shape(native, (grid.size, grid.size), grid.resize_mode) if grid.size else tuple(native)
    return resized, center_crop_box(resized, grid.crop)


def grid_mask(mask: np.ndarray, grid: EvalGrid) -> np.ndarray:
    """A native boolean mask on ``grid`` (see the module docstring)."""
    resized, box = _grid_shape(mask.shape, grid)
    if grid.mask_interpolation == "nearest" and grid.mask_binarize == "nonzero":
        out = resize_mask(mask, resized)
    elif mask.shape == tuple(resized):
        out = mask
    else:
        u8 = mask.astype(np.uint8) * 255
        if grid.mask_antialias:
            from PIL import Image

            filt = Image.NEAREST if grid.mask_interpolation == "nearest" else Image.BILINEAR
            values = np.asarray(Image.fromarray(u8).resize((resized[1], resized[0]), filt))
        else:
            import cv2

            flag = cv2.INTER_NEAREST if grid.mask_interpolation == "nearest" else cv2.INTER_LINEAR
            values = cv2.resize(u8, (resized[1], resized[0]), interpolation=flag)
        # int(value / 255) keeps only pixels that stayed 255; > 0 keeps every touched pixel.
        out = values >= 255 if grid.mask_binarize == "truncate" else values > 0
    return out[box.top:box.top + box.height, box.left:box.left + box.width]


def grid_map(amap: np.ndarray, native: tuple[int, int], grid: EvalGrid) -> np.ndarray:
    """A whole-image map onto ``grid`` for an image of ``native`` (H, W): resized, then cropped."""
    resized, box = _grid_shape(native, grid)
    out = resize_map(amap, resized)
    return out[box.top:box.top + box.height, box.left:box.left + box.width]


def ground_truth(sample: Sample, eval_size: int | None, grid: EvalGrid | None = None) -> np.ndarray:
    """The mask on the evaluation grid (all false for normal images and missing masks).

    ``grid`` (default: the harness grid at ``eval_size``) says how the mask is resized.
    """
    grid = grid or harness_grid(eval_size)
    if sample.mask is None:
        if grid.size is None:
            return np.zeros(native_size(sample), dtype=bool)
        if grid.resize_mode == "square" and not grid.crop:
            return np.zeros((grid.size, grid.size), dtype=bool)
        resized, box = _grid_shape(native_size(sample), grid)
        return np.zeros((box.height, box.width), dtype=bool)
    return grid_mask(read_mask(sample.mask), grid)


def check_prediction(prediction: Prediction, batch: Sequence[Sample]) -> tuple[np.ndarray, np.ndarray]:
    """Validate ``predict``'s output for ``batch`` and return (maps (B,h,w), scores (B,)) as NumPy.

    Raises
    ------
    MethodOutputError
        On a wrong type or shape, or NaN/inf values; the message names the images concerned.
    """
    if not isinstance(prediction, Prediction):
        raise MethodOutputError(f"predict returned {type(prediction).__name__}, expected harness.Prediction")
    n = len(batch)
    maps = as_numpy(prediction.anomaly_maps)
    scores = as_numpy(prediction.image_scores).reshape(-1)
    if maps.ndim == 4 and maps.shape[1] == 1:
        maps = maps[:, 0]
    if maps.ndim != 3 or maps.shape[0] != n or min(maps.shape[1:], default=0) < 1:
        raise MethodOutputError(f"predict returned anomaly maps of shape {tuple(maps.shape)} for a batch of {n} images; "
                                "expected (B, H, W)")
    if scores.shape != (n,):
        raise MethodOutputError(f"predict returned {scores.size} image scores for a batch of {n} images")
    bad = [s.key for s, m, v in zip(batch, maps, scores) if not (np.isfinite(m).all() and np.isfinite(v))]
    if bad:
        raise MethodOutputError(f"predict returned NaN or inf for {len(bad)} image(s): {', '.join(bad[:5])}")
    return maps, scores


class Evaluator:
    """Scores one job's fitted methods category by category.

    Parameters
    ----------
    dataset : str
        The dataset's name (for the image cache and metric applicability).
    metrics : sequence of MetricSpec
        Metrics computed per category.
    eval_size : int or None
        Evaluation grid side; None keeps each image's resolution.
    device : torch.device
    images : ImageCache
    progress : Progress
    latency_repeats : int
        Warm batch-1 calls timed for the latency figure.
    sinks : sequence of MapSink
        Receive every batch of checked, resized maps.
    grid : EvalGrid, optional
        The pixel grid (default: the harness grid at ``eval_size``).
    seed : int
        The job's seed; with each image's key it gives the image's inference seed.
    min_calls : int
        Warm calls the FPS figure needs; the largest batch is repeated to reach them.
    """

    def __init__(self, dataset: str, metrics: Sequence[MetricSpec], eval_size: int | None, device: torch.device,
                 images: ImageCache, progress: Progress, latency_repeats: int = 5,
                 sinks: Sequence[MapSink] = (), grid: EvalGrid | None = None, seed: int = 0,
                 min_calls: int = 5) -> None:
        self.dataset = dataset
        self.metrics = list(metrics)
        self.eval_size = eval_size
        self.grid = grid or harness_grid(eval_size)
        self.device = device
        self.images = images
        self.progress = progress
        self.latency_repeats = latency_repeats
        self.sinks = list(sinks)
        self.seed = int(seed)
        self.min_calls = int(min_calls)
        self.timer = PredictTimer(device)
        self.flops_per_image: int | None = None
        self._latency_done = False
        self._largest: tuple[list[Sample], torch.Tensor] | None = None
        #: Called with the error of a failed ``predict``; True means "retry" (the compile fallback).
        self.fallback: Callable[[BaseException], bool] | None = None
        # The standard seven are streamed; maps are kept only for a metric plugin that may read them.
        self.keep_maps = any(spec not in STANDARD_METRICS and getattr(spec, "needs_maps", True) for spec in self.metrics)

    def _tensor(self, method: Method, samples: Sequence[Sample]) -> torch.Tensor:
        arrays = [self.images.image(self.dataset, s, method.input_size, **method.resize_rule()) for s in samples]
        return to_tensor(arrays).to(self.device)

    def _groups(self, method: Method, samples: Sequence[Sample]) -> list[tuple[list[Sample], torch.Tensor]]:
        """A batch as (samples, images) runs of one input shape (``resize_mode="shorter_side"`` keeps
        each image's aspect ratio, so a batch of mixed shapes goes to ``predict`` run by run)."""
        arrays = [self.images.image(self.dataset, s, method.input_size, **method.resize_rule()) for s in samples]
        return [([samples[i] for i in run], to_tensor([arrays[i] for i in run]).to(self.device))
                for run in same_shape_runs(arrays)]

    def predict(self, method: Method, batch: Sequence[Sample], images: torch.Tensor, scored: bool = True) -> Prediction:
        """One timed ``predict`` call on ``batch`` (seeded per image), filed by the timing protocol."""
        seeds = [image_seed(self.seed, s.key) for s in batch]
        categories = [s.category for s in batch]
        try:
            return self.timer.time(lambda: call_predict(method, images, categories, seeds), len(batch),
                                   shape=tuple(images.shape), scored=scored)
        except Exception as exc:  # noqa: BLE001 - a compiled call may fail where eager works
            if self.fallback is None or not self.fallback(exc):
                raise
            self.timer.new_method()
            return self.timer.time(lambda: call_predict(method, images, categories, seeds), len(batch),
                                   shape=tuple(images.shape), scored=scored)

    def measure_latency(self, method: Method, sample: Sample) -> None:
        """Batch 1: one untimed call under the flop counter (it also warms that shape), then the
        timed latency calls."""
        image = self._tensor(method, [sample])
        seeds = [image_seed(self.seed, sample.key)]
        _, self.flops_per_image = count_flops(lambda: call_predict(method, image, [sample.category], seeds))
        for _ in range(self.latency_repeats):
            self.timer.latency(lambda: call_predict(method, image, [sample.category], seeds))
        self._latency_done = True

    def top_up(self, method: Method) -> None:
        """Repeat the largest batch (outputs discarded) until the timer has ``min_calls`` warm calls."""
        if self._largest is None:
            return
        batch, images = self._largest
        while self.timer.warm_calls < self.min_calls:
            self.predict(method, batch, images, scored=False)

    def auto_batch_size(self, method: Method, sample: Sample, limit: int) -> int:
        """The largest batch (doubling from the method's, at most ``limit``) that ``predict`` fits on the device.

        On the CPU, memory is not the limit and larger batches do not pay: the method's own batch
        size stays. On CUDA, a batch that runs out of memory ends the search.
        """
        size = max(1, int(method.eval_batch_size))
        if self.device.type != "cuda":
            return min(size, max(1, limit))
        image = self._tensor(method, [sample])
        best, trial = 0, min(size, limit)
        while trial <= limit:
            try:
                with torch.no_grad():
                    call_predict(method, image.expand(trial, *image.shape[1:]).contiguous(), [sample.category] * trial,
                                 list(range(trial)))
                torch.cuda.synchronize(self.device)
                best = trial
            except torch.cuda.OutOfMemoryError:
                break
            finally:
                torch.cuda.empty_cache()
            if trial == limit:
                break
            trial = min(trial * 2, limit)
        return max(best, 1)

    def predict_unscored(self, method: Method, samples: Sequence[Sample]) -> Iterator[tuple[Sample, np.ndarray, float]]:
        """Predict images outside the scored test set (validation, private test sets), untimed.

        Yields each sample with its checked map, at the method's output size, and its image
        score; nothing reaches the metrics or the map sinks.
        """
        with torch.no_grad():
            for start in range(0, len(samples), method.eval_batch_size):
                for batch, images in self._groups(method, list(samples[start:start + method.eval_batch_size])):
                    seeds = [image_seed(self.seed, s.key) for s in batch]
                    maps, scores = check_prediction(call_predict(method, images, [s.category for s in batch], seeds),
                                                    batch)
                    yield from zip(batch, maps, (float(v) for v in scores))

    def on_grid(self, sample: Sample, amap: np.ndarray) -> np.ndarray:
        """A map of ``sample`` on the evaluation grid (as the test maps are scored)."""
        if self.grid.name == "harness":
            return resize_map(amap, ground_truth(sample, self.eval_size, self.grid).shape)
        return grid_map(amap, native_size(sample), self.grid)

    def validation_threshold(self, method: Method, samples: Sequence[Sample]) -> float | None:
        """mean + 3 std of the validation maps' pixel scores on the evaluation grid (:mod:`harness.metrics.segf1`)."""
        from harness.metrics.segf1 import RunningMoments

        moments = RunningMoments()
        for sample, amap, _ in self.predict_unscored(method, samples):
            moments.update(self.on_grid(sample, amap))
        return moments.threshold()

    def evaluate(self, method: Method, tests: dict[str, Sequence[Sample]], label: str = "",
                 thresholds: dict[str, float | None] | None = None) -> dict[str, dict[str, float]]:
        """Metrics per category of ``tests`` (``{category: samples}``) for a fitted ``method``.

        ``thresholds`` (``{category: t}``, from :meth:`validation_threshold`) reach threshold
        metrics as ``CategoryScores.validation_threshold``.
        """
        out: dict[str, dict[str, float]] = {}
        total = sum(len(s) for s in tests.values())
        self.timer.new_method()
        self._largest = None
        first: Sample | None = None
        with torch.no_grad(), self.progress.bar(total=total, desc=f"{label} test".strip(), unit="img") as bar:
            for category, samples in tests.items():
                if not samples:
                    continue
                first = first or samples[0]
                scores = self.score_category(method, category, samples, bar)
                scores.validation_threshold = (thresholds or {}).get(category)
                out[category] = {m.name: float(m.compute(scores)) for m in self.metrics}
            self.top_up(method)
            if first is not None and not self._latency_done:
                self.measure_latency(method, first)
        self._largest = None
        return out

    def score_category(self, method: Method, category: str, samples: Sequence[Sample], bar: Any) -> CategoryScores:
        """Predict, check, resize and accumulate one category's test images."""
        accumulator = MetricAccumulator(name=category)
        maps, masks, image_scores, shapes = [], [], [], set()
        runs = (run for start in range(0, len(samples), method.eval_batch_size)
                for run in self._groups(method, samples[start:start + method.eval_batch_size]))
        for batch, images in runs:
            prediction = self.predict(method, batch, images)
            if self._largest is None or len(batch) > len(self._largest[0]):
                self._largest = (list(batch), images)
            batch_maps, batch_scores = check_prediction(prediction, batch)
            batch_masks = [ground_truth(sample, self.eval_size, self.grid) for sample in batch]
            if self.grid.name == "harness":
                resized = [resize_map(amap, mask.shape) for amap, mask in zip(batch_maps, batch_masks)]
            else:
                resized = [grid_map(amap, native_size(sample), self.grid) for amap, sample in zip(batch_maps, batch)]
            shapes.update(m.shape for m in batch_masks)
            if len(shapes) > 1:
                raise HarnessError(f"{self.dataset}/{category}: test images have different sizes {sorted(shapes)}; "
                                   "use --eval-size N to evaluate on a common grid")
            accumulator.update(resized, batch_masks, image_scores=batch_scores,
                               labels=[s.label for s in batch], names=[s.key for s in batch])
            for sink in self.sinks:
                sink.add(category, batch, resized, batch_scores)
            if self.keep_maps:
                maps.extend(resized)
                masks.extend(batch_masks)
            image_scores.append(batch_scores)
            bar.update(len(batch))
        standard = accumulator.compute()
        for sink in self.sinks:
            # A sink that draws the category's curves reuses the engine's sorted data.
            finished = getattr(sink, "category_finished", None)
            if finished is not None:
                finished(category, accumulator)
        return CategoryScores(
            image_scores=np.concatenate(image_scores), labels=np.array([s.label for s in samples]),
            maps=np.stack(maps) if self.keep_maps else None, masks=np.stack(masks) if self.keep_maps else None,
            name=category, keys=[s.key for s in samples], standard=standard, samples=list(samples),
        )

    def efficiency(self) -> dict[str, Any]:
        """The timing protocol's figures, FLOPs, peak memory and prediction time of everything evaluated."""
        memory, kind = self.timer.peak_memory()
        out = self.timer.summary()
        out.update(flops_per_image=self.flops_per_image, peak_memory_mb=memory, peak_memory_kind=kind,
                   device=str(self.device), min_timed_calls=self.min_calls)
        return out
