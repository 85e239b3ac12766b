"""Conformance checks a plugin author runs in their own tests (scikit-learn's ``check_estimator``).

::

    from harness.testing import check_method, check_dataset
    from harness_mymethod.plugin import harness_methods

    def test_my_method_follows_the_contract(tmp_path):
        (spec,) = harness_methods()
        check_method(spec, profile="tiny", workdir=tmp_path)

:func:`check_method` raises :class:`ConformanceError` (an ``AssertionError``) naming what is
wrong; :func:`check_dataset` does the same for a dataset spec and a root folder.
:func:`fit_context` builds the :class:`harness.FitContext` a test needs to call ``fit`` directly.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from harness.data import CategoryData, DatasetIndex, ImageCache, Sample, TrainSet, read_image, read_mask, to_tensor
from harness.method import FitContext, Method, Prediction
from harness.engine.support.progress import Progress
from harness.settings import SettingError, check_profiles
from harness.specs import PROTOCOLS, DatasetSpec, MethodSpec


class ConformanceError(AssertionError):
    """A plugin breaks the contract; the message says what and where."""


def _fail(where: str, message: str) -> ConformanceError:
    return ConformanceError(f"{where}: {message}")


# -- a tiny in-memory dataset -------------------------------------------------------------------

def _tiny_image(seed: int, base: tuple[int, int, int], size: int, defect: bool) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    stripes = (np.sin(xx / max(size / 16, 1.0)) * 20)[..., None]
    image = np.clip(np.array(base)[None, None] + stripes + rng.normal(0, 6, (size, size, 3)), 0, 255)
    mask = np.zeros((size, size), dtype=bool)
    if defect:
        side = max(size // 6, 2)
        y, x = rng.integers(1, size - side - 1, 2)
        image[y:y + side, x:x + side] = 255 - image[y:y + side, x:x + side]
        mask[y:y + side, x:x + side] = True
    return image.astype(np.uint8), mask


def tiny_dataset(size: int = 64, n_train: int = 6, n_test: int = 4, name: str = "conformance") -> DatasetIndex:
    """Two categories of striped noise; anomalies are inverted squares (with masks)."""
    categories = {}
    for c, (category, base) in enumerate({"alpha": (150, 90, 60), "beta": (60, 110, 160)}.items()):
        train = [Sample(f"{category}/train/good/{i:03d}", category, "train", 0, "good",
                        image=lambda s=100 * c + i, b=base: _tiny_image(s, b, size, False)[0]) for i in range(n_train)]
        test = []
        for i in range(n_test):
            anomalous = i >= n_test // 2
            seed = 1000 + 100 * c + i
            defect = "square" if anomalous else "good"
            test.append(Sample(f"{category}/test/{defect}/{i:03d}", category, "test", int(anomalous), defect,
                               image=lambda s=seed, b=base, a=anomalous: _tiny_image(s, b, size, a)[0],
                               mask=(lambda s=seed, b=base: _tiny_image(s, b, size, True)[1]) if anomalous else None))
        categories[category] = CategoryData(category, train, test)
    return DatasetIndex(name, categories)


def fit_context(settings: Mapping[str, Any], workdir: Path | str, *, seed: int = 0, profile: str = "tiny",
                device: str | torch.device = "cpu", weights_dir: Path | None = None, fast_dev_run: bool = False,
                random_weights: bool = False, textures: Sequence[str] = (), checkpoint_interval: float | None = None,
                train: TrainSet | None = None) -> FitContext:
    """A :class:`harness.FitContext` for calling ``fit`` in a test (no progress bars, a private folder).

    ``checkpoint_interval`` enables mid-fit checkpoints in ``<workdir>/checkpoints``.
    """
    from harness.engine.support.checkpoint import TrainingCheckpoint
    from harness.engine.weights import WeightsResolver

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoint = TrainingCheckpoint(workdir / "checkpoints" if checkpoint_interval is not None else None,
                                    checkpoint_interval or 0.0)

    job_seed = seed

    def pseudo_validation(n: int = 8, seed: int | None = None):
        from harness.toolkit.pseudo_validation import make_pseudo_validation

        if train is None:
            raise ValueError("fit_context(train=...) is needed for pseudo_validation")
        return make_pseudo_validation(train, n, job_seed if seed is None else seed)

    return FitContext(device=torch.device(device), seed=job_seed, profile=profile, settings=settings, cache_dir=workdir,
                      weights=WeightsResolver(weights_dir or workdir / "no-weights"), progress=Progress(False),
                      pseudo_validation=pseudo_validation, checkpoint=checkpoint, fast_dev_run=fast_dev_run,
                      random_weights=random_weights, textures=frozenset(textures), dataset="conformance",
                      protocol="multiclass")


def _train_set(index: DatasetIndex, method: Method) -> TrainSet:
    samples = [s for c in index.categories.values() for s in c.train]
    return TrainSet(index.name, samples, method.input_size, ImageCache(), **method.resize_rule())


def _predict_all(method: Method, index: DatasetIndex) -> list[tuple[np.ndarray, np.ndarray]]:
    cache = ImageCache()
    out = []
    method.eval()
    with torch.no_grad():
        for category in index.categories.values():
            samples = category.test
            for start in range(0, len(samples), method.eval_batch_size):
                batch = samples[start:start + method.eval_batch_size]
                images = to_tensor([cache.image(index.name, s, method.input_size, **method.resize_rule())
                                    for s in batch]).to(method.device)
                prediction = method.predict(images, [s.category for s in batch])
                out.append(_check_output(prediction, len(batch), f"predict on {batch[0].key}"))
    return out


def _check_output(prediction: Any, n: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    from harness.method import as_numpy

    if not isinstance(prediction, Prediction):
        raise _fail(where, f"returned {type(prediction).__name__}; return harness.Prediction(anomaly_maps, image_scores)")
    maps, scores = as_numpy(prediction.anomaly_maps), as_numpy(prediction.image_scores).reshape(-1)
    if maps.ndim == 4 and maps.shape[1] == 1:
        maps = maps[:, 0]
    if maps.ndim != 3 or maps.shape[0] != n:
        raise _fail(where, f"anomaly maps have shape {tuple(maps.shape)} for {n} images; expected ({n}, H, W)")
    if scores.shape != (n,):
        raise _fail(where, f"{scores.size} image scores for {n} images; expected one per image")
    if not np.isfinite(maps).all() or not np.isfinite(scores).all():
        raise _fail(where, "NaN or inf in the anomaly maps or image scores")
    return maps, scores


def _same(a: list[tuple[np.ndarray, np.ndarray]], b: list[tuple[np.ndarray, np.ndarray]]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1]) for x, y in zip(a, b))


def check_spec(spec: MethodSpec) -> None:
    """The spec alone: fields, protocols, typed settings with help, valid profiles."""
    where = f"method spec {getattr(spec, 'name', '?')!r}"
    if not isinstance(spec, MethodSpec):
        raise _fail(where, f"is a {type(spec).__name__}, not a harness.MethodSpec")
    if not spec.name or not re.fullmatch(r"[a-z][a-z0-9_-]*", spec.name):
        raise _fail(where, "name must be lower case letters, digits, '-' or '_' (it is typed on the command line)")
    if not spec.paper or not spec.paper.title:
        raise _fail(where, "paper needs at least a title (harness.PaperRef)")
    if not spec.protocols or any(p not in PROTOCOLS for p in spec.protocols):
        raise _fail(where, f"protocols {spec.protocols!r} must be a non-empty subset of {PROTOCOLS}")
    if spec.paper_protocol and spec.paper_protocol not in PROTOCOLS:
        raise _fail(where, f"paper_protocol {spec.paper_protocol!r} is not one of {PROTOCOLS}")
    if not spec.profiles:
        raise _fail(where, "declares no profile")
    if not callable(spec.factory):
        raise _fail(where, "factory is not callable")
    try:
        schema = spec.schema
    except (SettingError, TypeError, ValueError) as exc:
        raise _fail(where, f"settings are invalid: {exc}") from None
    problems = check_profiles(schema, spec.profiles)
    if problems:
        raise _fail(where, "; ".join(problems))
    if not schema.inferred:
        undocumented = [s.name for s in schema if not s.help]
        if undocumented:
            raise _fail(where, f"settings without help text: {', '.join(undocumented)}")


def check_method(spec: MethodSpec, profile: str | None = None, overrides: Mapping[str, Any] | None = None,
                 workdir: Path | str | None = None, fast_dev_run: bool = True, image_size: int | None = None) -> None:
    """Check that a method follows the contract; raise :class:`ConformanceError` naming what is wrong.

    1. The spec is complete and every profile valid (:func:`check_spec`).
    2. Every profile builds on the meta device (no file read, no memory), with parameters counted.
    3. ``profile`` (default ``tiny``, else the first) fits and predicts on a tiny in-memory
       dataset (:func:`tiny_dataset`), with random weights, giving maps (B, H, W) and scores (B,)
       without NaN.
    4. ``state_dict()``, written to a safetensors state file and read back (no pickle), loaded
       into a fresh instance with ``load_state_dict``, reproduces the predictions exactly.
    5. A second fit with the same seed gives the same predictions.

    Parameters
    ----------
    spec : MethodSpec
    profile : str, optional
    overrides : mapping, optional
        Setting overrides that make the profile small enough for a test.
    workdir : path, optional
        Scratch folder (a temporary one by default).
    fast_dev_run : bool
        Fit as ``--fast-dev-run`` does (one epoch, a few steps per stage).
    image_size : int, optional
        Side of the test images (default: the method's input size, at most 64).
    """
    from harness.engine.support.environment import seed_everything
    from harness.engine.support.state_io import load_state, save_state

    check_spec(spec)
    for name in spec.profiles:
        settings = spec.resolve(name)
        try:
            with torch.device("meta"):
                method = spec.factory(settings)
            counts = method.parameter_count()
        except Exception as exc:  # noqa: BLE001 - any failure to build is the finding
            raise _fail(f"{spec.name}/{name}", f"does not build on the meta device: {type(exc).__name__}: {exc} "
                        "(build the architecture only in the factory; load weights in fit)") from exc
        if not isinstance(method, Method):
            raise _fail(f"{spec.name}/{name}", f"factory returned {type(method).__name__}, not a harness.Method")
        if not all(isinstance(v, int) for v in counts.values()):
            raise _fail(f"{spec.name}/{name}", "parameter_count() must map network names to ints")
    profile = profile or ("tiny" if "tiny" in spec.profiles else next(iter(spec.profiles)))
    settings = spec.resolve(profile, overrides or {})
    workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix=f"check-{spec.name}-"))
    probe = spec.factory(settings)
    size = image_size or min(64, max(probe.input_size))
    index = tiny_dataset(size)
    where = f"{spec.name}/{profile}"

    def fit_once(tag: str) -> tuple[Method, list]:
        seed_everything(0)
        method = spec.factory(settings)
        method.to("cpu")
        train = _train_set(index, method)
        context = fit_context(settings, workdir / tag, profile=profile, fast_dev_run=fast_dev_run,
                              random_weights=True, train=train)
        try:
            method.fit(train, context)
        except Exception as exc:  # noqa: BLE001
            raise _fail(where, f"fit failed on the tiny dataset: {type(exc).__name__}: {exc}") from exc
        try:
            return method, _predict_all(method, index)
        except ConformanceError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise _fail(where, f"predict failed on the tiny dataset: {type(exc).__name__}: {exc}") from exc

    method, first = fit_once("fit-1")
    state_file = workdir / "state.safetensors"
    try:
        save_state(state_file, {"state": method.state_dict()})
        state, _ = load_state(state_file)
    except Exception as exc:  # noqa: BLE001
        raise _fail(where, f"state_dict() cannot be stored without pickle: {exc}") from exc
    fresh = spec.factory(settings)
    fresh.to("cpu")
    try:
        fresh.load_state_dict(state["state"])
    except Exception as exc:  # noqa: BLE001
        raise _fail(where, f"load_state_dict(state_dict()) failed on a fresh instance: {type(exc).__name__}: {exc}") \
            from exc
    fresh.to("cpu")
    if not _same(first, _predict_all(fresh, index)):
        raise _fail(where, "a fresh instance given load_state_dict(state_dict()) predicts differently: some state "
                    "that predict uses is missing from state_dict()")
    _, second = fit_once("fit-2")
    if not _same(first, second):
        raise _fail(where, "two fits with the same seed predict differently: seed every random draw from "
                    "context.seed (or the global generators the runner seeds)")


def check_dataset(spec: DatasetSpec, root: Any = None, categories: Sequence[str] | None = None,
                  max_images: int = 8) -> DatasetIndex:
    """Check that a dataset plugin reads ``root`` into a valid index; return the index.

    Checks: the spec's fields; the loader returns a :class:`harness.DatasetIndex` whose categories
    are among the declared ones (when declared), each with normal training images and labelled
    test images; sample keys are unique and shaped ``<category>/<split>/<defect>/<stem>``;
    ``textures`` and ``official_counts`` name declared categories; the first ``max_images`` images
    of every category decode to RGB ``uint8`` and every mask among them has its image's size.
    """
    where = f"dataset {getattr(spec, 'name', '?')!r}"
    if not isinstance(spec, DatasetSpec):
        raise _fail(where, f"is a {type(spec).__name__}, not a harness.DatasetSpec")
    if not callable(spec.loader):
        raise _fail(where, "loader is not callable")
    unknown = [c for c in spec.textures if spec.categories and c not in spec.categories]
    if unknown:
        raise _fail(where, f"textures name unknown categories {unknown}")
    unknown = [c for c in spec.official_counts if spec.categories and c not in spec.categories]
    if unknown:
        raise _fail(where, f"official_counts name unknown categories {unknown}")
    index = spec.loader(root, categories)
    if not isinstance(index, DatasetIndex):
        raise _fail(where, f"loader returned {type(index).__name__}, not a harness.DatasetIndex")
    if not index.categories:
        raise _fail(where, f"loader found no category under {root}")
    keys: set[str] = set()
    for name, category in index.categories.items():
        w = f"{where}, category {name!r}"
        if spec.categories and name not in spec.categories:
            raise _fail(w, f"is not one of the declared categories {spec.categories}")
        if not category.train:
            raise _fail(w, "has no training image")
        for sample in category.train + category.test:
            if sample.key in keys:
                raise _fail(w, f"sample key {sample.key!r} appears twice")
            keys.add(sample.key)
            if not sample.key.startswith(f"{name}/{sample.split}/"):
                raise _fail(w, f"sample key {sample.key!r} is not shaped '<category>/<split>/<defect>/<stem>'")
        bad = [s.key for s in category.train if s.split != "train" or s.label != 0]
        if bad:
            raise _fail(w, f"training samples must be normal with split 'train': {bad[:3]}")
        if any(s.label not in (0, 1) for s in category.test):
            raise _fail(w, "test labels must be 0 (normal) or 1 (anomalous)")
        for sample in (category.train[:max_images // 2] + category.test[:max_images // 2]):
            image = read_image(sample.image)
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                raise _fail(w, f"{sample.key} decodes to {image.dtype} {image.shape}, not RGB uint8")
            if sample.mask is not None:
                mask = read_mask(sample.mask)
                if mask.shape != image.shape[:2]:
                    raise _fail(w, f"the mask of {sample.key} is {mask.shape}, its image {image.shape[:2]}")
    return index


__all__ = ["ConformanceError", "check_spec", "check_method", "check_dataset", "fit_context", "tiny_dataset"]
