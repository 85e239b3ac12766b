"""Run jobs: fit, predict, measure, evaluate, and record, one job at a time.

Guarantees
----------
- A job's fit sees only the training samples its protocol allows (:mod:`harness.protocols`);
  test images reach the method only through ``predict``.
- Each job ends with one record written atomically (:mod:`harness.records`). A job that raises,
  or whose method returns NaN/inf or wrongly shaped maps, is recorded as failed with the phase,
  the error and the metrics of the categories finished before; the run goes on.
- A rerun skips jobs whose record says ``ok`` (``force`` redoes them); failed jobs are retried.
  A finished fit is cached (``state_dict``), so a job interrupted during prediction resumes
  without training again.
- Ctrl-C stops the run between two statements; every record already written stays valid.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import random
import subprocess
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from harness import __version__
from harness.data import DatasetIndex, ImageCache, Sample, TrainSet, read_image, read_mask, resize_mask, to_tensor
from harness.efficiency import PredictTimer, count_flops
from harness.errors import HarnessError, MethodOutputError, UsageError
from harness.jobs import Job
from harness.method import FitContext, Method, Prediction, as_numpy
from harness.metrics import CategoryScores, MetricAccumulator, mean_over_categories
from harness.metrics.builtin import STANDARD_METRICS
from harness.progress import Progress
from harness.protocols import FitUnit, plan_fit_units
from harness.pseudo_validation import make_pseudo_validation
from harness.records import SCHEMA_VERSION, read_record, write_record
from harness.registry import Registry
from harness.specs import MethodSpec
from harness.weights import WeightsResolver


@dataclass
class RunOptions:
    """Options shared by every job of a run.

    Attributes
    ----------
    results_dir : Path
        Records go to ``<results_dir>/records``.
    cache_dir : Path
        Cached fits go to ``<cache_dir>/fits``.
    device : str
        ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"auto"`` (CUDA when available).
    eval_size : int or None
        Side of the square evaluation grid for pixel metrics; None keeps each dataset's size.
    data_roots : mapping of str to Path
        Root folder per dataset name.
    force : bool
        Redo jobs that already have an ``ok`` record (and ignore cached fits).
    fit_cache : bool
        Store each finished fit.
    weights_dir : Path or None
    progress : bool or None
        Progress bars; None shows them on a terminal only.
    latency_repeats : int
        Single-image calls used for the latency figure.
    """

    results_dir: Path = Path("results")
    cache_dir: Path = Path(".harness-cache")
    device: str = "auto"
    eval_size: int | None = 256
    data_roots: Mapping[str, Path] = field(default_factory=dict)
    force: bool = False
    fit_cache: bool = True
    weights_dir: Path | None = None
    progress: bool | None = None
    latency_repeats: int = 3

    def torch_device(self) -> torch.device:
        """Resolve ``device`` (``auto`` picks CUDA when available)."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {self.device}: CUDA is not available on this machine; use --device cpu")
        return device


@dataclass
class JobOutcome:
    """What happened to one job in this run."""

    job: Job
    status: str  # "ok", "failed" or "skipped"
    record_path: Path
    record: dict[str, Any] | None = None
    message: str = ""


@dataclass
class RunSummary:
    """Outcome of a run."""

    outcomes: list[JobOutcome] = field(default_factory=list)
    interrupted: bool = False

    @property
    def failed(self) -> list[JobOutcome]:
        """Jobs that failed in this run."""
        return [o for o in self.outcomes if o.status == "failed"]

    def describe(self) -> str:
        """A short multi-line report of the run for the terminal."""
        counts = {s: sum(o.status == s for o in self.outcomes) for s in ("ok", "skipped", "failed")}
        lines = [f"{counts['ok']} job(s) finished, {counts['skipped']} skipped (already finished), {counts['failed']} failed"
                 + (" — interrupted, rerun the same command to resume" if self.interrupted else "")]
        for outcome in self.failed:
            lines.append(f"  FAILED {outcome.job.label}: {outcome.message}")
            lines.append(f"         record: {outcome.record_path}")
        return "\n".join(lines)


def resolve_settings(spec: MethodSpec, profile: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The settings of ``profile`` with the user's ``overrides`` applied.

    Raises
    ------
    UsageError
        For an unknown profile or a setting the profile does not define.
    """
    if profile not in spec.profiles:
        raise UsageError(f"method {spec.name!r} has no profile {profile!r}; profiles: {', '.join(spec.profiles)}")
    settings = dict(spec.profiles[profile])
    unknown = [k for k in overrides if k not in settings]
    if unknown:
        raise UsageError(f"--set {', '.join(unknown)}: not a setting of {spec.name!r}; settings: {', '.join(settings)}")
    settings.update(overrides)
    return settings


def environment(device: torch.device) -> dict[str, Any]:
    """Versions, platform, device and git revision, stored in every record."""
    env = {
        "harness": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "numpy": np.__version__, "platform": platform.platform(), "processor": platform.machine(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(device),
    }
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=5)
        env["git_revision"] = rev.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["git_revision"] = None
    return env


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class _JobFailure(Exception):
    """Carries the phase in which a job failed."""

    def __init__(self, phase: str, error: BaseException) -> None:
        super().__init__(str(error))
        self.phase = phase
        self.error = error


class Runner:
    """Runs jobs with the plugins of a :class:`Registry`.

    Parameters
    ----------
    registry : Registry
    options : RunOptions
    """

    def __init__(self, registry: Registry, options: RunOptions) -> None:
        self.registry = registry
        self.options = options
        self.device = options.torch_device()
        self.progress = Progress(options.progress)
        self.cache = ImageCache()
        self.weights = WeightsResolver(options.weights_dir)
        self._indexes: dict[str, DatasetIndex] = {}
        self._env: dict[str, Any] | None = None

    # -- datasets ---------------------------------------------------------------------------
    def dataset_index(self, name: str) -> DatasetIndex:
        """Load (once per run) the index of dataset ``name``."""
        if name not in self._indexes:
            spec = self.registry.dataset(name)
            root = self.options.data_roots.get(name)
            if root is None and spec.find_root is not None:
                root = spec.find_root()
            if root is None and spec.needs_root:
                raise UsageError(f"dataset {name!r} needs its folder: pass --data-root PATH "
                                 f"(or --data-root {name}=PATH when running several datasets)")
            self._indexes[name] = spec.loader(root, None)
        return self._indexes[name]

    # -- the run ----------------------------------------------------------------------------
    def run(self, jobs: Sequence[Job]) -> RunSummary:
        """Run ``jobs`` in order; returns what happened to each. Ctrl-C ends the run cleanly."""
        summary = RunSummary()
        for name in dict.fromkeys(j.dataset for j in jobs):
            self.dataset_index(name)  # a wrong root fails here, before any work is done
        self.registry.call_reporters("harness_run_started", jobs=list(jobs), options=vars(self.options))
        try:
            with self.progress.bar(total=len(jobs), desc="jobs", unit="job", leave=True) as bar:
                for job in jobs:
                    bar.set_postfix_str(f"{job.method} {job.dataset} {job.protocol_label} s{job.seed}")
                    summary.outcomes.append(self.run_job(job))
                    bar.update(1)
        except KeyboardInterrupt:
            summary.interrupted = True
        finally:
            records = [o.record for o in summary.outcomes if o.record is not None]
            self.registry.call_reporters("harness_run_finished", records=records, interrupted=summary.interrupted)
        return summary

    def run_job(self, job: Job) -> JobOutcome:
        """Run one job (or skip it when an ``ok`` record exists) and write its record."""
        path = job.record_path(self.options.results_dir)
        existing = read_record(path) if path.exists() else None
        if existing is not None and existing.get("status") == "ok" and not self.options.force:
            return JobOutcome(job, "skipped", path, existing)

        self.registry.call_reporters("harness_job_started", job=job)
        if self._env is None:
            self._env = environment(self.device)
        record: dict[str, Any] = {
            "schema": SCHEMA_VERSION, "job": job.as_dict(), "status": "running", "error": None,
            "metrics": {}, "mean": {}, "efficiency": {}, "method_info": {}, "settings": {},
            "environment": self._env, "started": _now(), "finished": None,
        }
        seed_everything(job.seed)
        try:
            self._execute(job, record)
            record["status"] = "ok"
            message = ""
        except _JobFailure as failure:
            err = failure.error
            record["status"] = "failed"
            record["error"] = {"phase": failure.phase, "type": type(err).__name__, "message": str(err),
                               "traceback": "".join(traceback.format_exception(type(err), err, err.__traceback__))}
            message = f"{failure.phase}: {type(err).__name__}: {err}"
        record["mean"] = mean_over_categories(record["metrics"]) if record["metrics"] else {}
        record["finished"] = _now()
        write_record(path, record)
        self.registry.call_reporters("harness_job_finished", job=job, record=record)
        return JobOutcome(job, record["status"], path, record, message)

    # -- one job ----------------------------------------------------------------------------
    def _execute(self, job: Job, record: dict[str, Any]) -> None:
        phase = "build"
        try:
            spec = self.registry.method(job.method)
            if job.protocol not in spec.protocols:
                raise UsageError(f"method {job.method!r} does not support the {job.protocol} protocol "
                                 f"(it supports {', '.join(spec.protocols)})")
            settings = resolve_settings(spec, job.profile, dict(job.overrides))
            record["settings"] = settings
            index = self.dataset_index(job.dataset)
            units = plan_fit_units(index, job.protocol, job.shots, job.seed)
            timer = PredictTimer(self.device)
            eff: dict[str, Any] = {"train_seconds": 0.0, "flops_per_image": None, "params": 0, "params_by_network": {}}
            for unit in units:
                phase = "build"
                method = spec.factory(settings)
                method.to(self.device)
                counts = method.parameter_count()
                eff["params_by_network"] = counts
                eff["params"] = sum(counts.values())
                eff["eval_batch_size"] = method.eval_batch_size
                eff["input_size"] = list(method.input_size)
                phase = "fit"
                self._fit(job, unit, method, settings, index, record, eff)
                phase = "predict"
                method.eval()
                self._evaluate_unit(job, unit, method, index, record, timer, eff)
            mem, kind = timer.peak_memory()
            eff.update({"fps": timer.fps, "latency_ms": timer.latency_ms, "predict_seconds": timer.seconds,
                        "n_test_images": timer.images, "peak_memory_mb": mem, "peak_memory_kind": kind,
                        "device": str(self.device)})
            record["efficiency"] = eff
        except KeyboardInterrupt:
            raise
        except _JobFailure:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure of a job is recorded, the run goes on
            raise _JobFailure(phase, exc) from exc

    def _fit_cache_path(self, job: Job, unit: FitUnit) -> Path:
        rel = job.relative_path().with_suffix("")
        return self.options.cache_dir / "fits" / rel / f"{unit.name}.pt"

    def _fit(self, job: Job, unit: FitUnit, method: Method, settings: Mapping[str, Any], index: DatasetIndex,
             record: dict[str, Any], eff: dict[str, Any]) -> None:
        cache_path = self._fit_cache_path(job, unit)
        if self.options.fit_cache and cache_path.exists() and not self.options.force:
            saved = torch.load(cache_path, map_location=self.device, weights_only=False)
            method.load_state_dict(saved["state"])
            method.to(self.device)
            eff["train_seconds"] += saved.get("train_seconds", 0.0)
            record["method_info"].update(saved.get("info", {}))
            record["method_info"]["fit_restored_from"] = str(cache_path)
            return
        train = TrainSet(index.name, unit.train, method.input_size, self.cache)
        job_cache = self.options.cache_dir / "jobs" / job.relative_path().with_suffix("") / unit.name
        job_cache.mkdir(parents=True, exist_ok=True)
        context = FitContext(
            device=self.device, seed=job.seed, profile=job.profile, settings=settings, cache_dir=job_cache,
            weights=self.weights, progress=self.progress,
            pseudo_validation=lambda n=8, seed=None: make_pseudo_validation(train, n, job.seed if seed is None else seed),
        )
        start = time.perf_counter()
        method.fit(train, context)
        seconds = time.perf_counter() - start
        eff["train_seconds"] += seconds
        record["method_info"].update(context.info)
        if self.options.fit_cache:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_path.with_suffix(".tmp")
            torch.save({"state": method.state_dict(), "train_seconds": seconds, "info": context.info}, tmp)
            os.replace(tmp, cache_path)

    def _evaluate_unit(self, job: Job, unit: FitUnit, method: Method, index: DatasetIndex, record: dict[str, Any],
                       timer: PredictTimer, eff: dict[str, Any]) -> None:
        metric_specs = self.registry.metric_specs()
        # The standard seven are streamed; maps are kept only for a metric plugin that may read them.
        keep_maps = any(spec not in STANDARD_METRICS for spec in metric_specs)
        warmed = False
        total = sum(len(index.categories[c].test) for c in unit.test_categories)
        with torch.no_grad(), self.progress.bar(total=total, desc=f"{job.method} test", unit="img") as bar:
            for category in unit.test_categories:
                samples = index.categories[category].test
                if not samples:
                    continue
                if not warmed:
                    eff["flops_per_image"] = self._warm_up(method, index.name, samples[0], timer)
                    warmed = True
                scores = self._predict_category(method, index.name, category, samples, timer, bar, keep_maps)
                record["metrics"][category] = {m.name: float(m.compute(scores)) for m in metric_specs}

    def _warm_up(self, method: Method, dataset: str, sample: Sample, timer: PredictTimer) -> int | None:
        """One untimed call (with the flop counter), then the single-image latency calls."""
        image = to_tensor([self.cache.image(dataset, sample, method.input_size)]).to(self.device)
        _, flops = count_flops(lambda: method.predict(image, [sample.category]))
        for _ in range(self.options.latency_repeats):
            timer.latency(lambda: method.predict(image, [sample.category]))
        return flops

    def _predict_category(self, method: Method, dataset: str, category: str, samples: Sequence[Sample],
                          timer: PredictTimer, bar: Any, keep_maps: bool = False) -> CategoryScores:
        accumulator = MetricAccumulator(name=category)
        maps, masks, image_scores, shapes = [], [], [], set()
        for start in range(0, len(samples), method.eval_batch_size):
            batch = samples[start:start + method.eval_batch_size]
            images = to_tensor([self.cache.image(dataset, s, method.input_size) for s in batch]).to(self.device)
            prediction = timer.time(lambda: method.predict(images, [s.category for s in batch]), len(batch))
            batch_maps, batch_scores = check_prediction(prediction, batch)
            batch_masks = [self._mask(sample) for sample in batch]
            resized = [resize_map(amap, mask.shape) for amap, mask in zip(batch_maps, batch_masks)]
            shapes.update(m.shape for m in batch_masks)
            if len(shapes) > 1:
                raise HarnessError(f"{dataset}/{category}: test images have different sizes {sorted(shapes)}; "
                                   "use --eval-size N to evaluate on a common grid")
            accumulator.update(resized, batch_masks, image_scores=batch_scores,
                               labels=[s.label for s in batch], names=[s.key for s in batch])
            if keep_maps:
                maps.extend(resized)
                masks.extend(batch_masks)
            image_scores.append(batch_scores)
            bar.update(len(batch))
        return CategoryScores(
            image_scores=np.concatenate(image_scores), labels=np.array([s.label for s in samples]),
            maps=np.stack(maps) if keep_maps else None, masks=np.stack(masks) if keep_maps else None,
            name=category, keys=[s.key for s in samples], standard=accumulator.compute(),
        )

    def _mask(self, sample: Sample) -> np.ndarray:
        """Ground truth at the evaluation size (all false for normal images and missing masks)."""
        size = self.options.eval_size
        if sample.mask is None:
            shape = (size, size) if size else native_size(sample)
            return np.zeros(shape, dtype=bool)
        mask = read_mask(sample.mask)
        return resize_mask(mask, (size, size)) if size else mask


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
