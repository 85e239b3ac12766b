"""What a dataset loader returns, and how images reach a method.

A loader (see :class:`harness.specs.DatasetSpec`) indexes a dataset into :class:`Sample` objects
without decoding anything. The core decodes and resizes lazily, at the size the method asks for,
and keeps decoded images in a :class:`ImageCache` so that epochs and repeated jobs do not decode
the same file twice.

Conventions
-----------
- Images are RGB ``uint8`` arrays of shape (H, W, 3) after reading; greyscale files are
  converted to RGB.
- Masks are boolean arrays of shape (H, W): a pixel is defective when its stored value is > 0
  (any colour channel; an alpha channel is ignored). Masks with values other than 0 and 255
  (class indices, anti-aliased edges) are binarised the same way; ``harness data summary``
  notes them. Loaders whose masks use another encoding pass a callable.
- Tensors given to methods are ``float32`` in [0, 1], shape (N, 3, H, W), not normalised: each
  method applies its own normalisation, as its paper does.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence, Union

import numpy as np
import torch
from PIL import Image

from harness.errors import DatasetError

#: Either a file on disk or a callable producing the decoded array (generated data).
ImageSource = Union[Path, Callable[[], np.ndarray]]


@dataclass(frozen=True)
class Sample:
    """One image of a dataset, indexed but not decoded.

    Attributes
    ----------
    key : str
        Identifier unique within the dataset, shaped like the relative path
        ``<category>/<split>/<defect>/<stem>``; used to pair maps with masks and to seed draws.
    category : str
        The category (class) the image belongs to.
    split : str
        ``"train"`` or ``"test"``.
    label : int
        0 for normal, 1 for anomalous.
    defect : str
        ``"good"`` for normal images, else the defect type (the test folder's name).
    image : ImageSource
        Where the pixels come from.
    mask : ImageSource or None
        Ground-truth mask, ``None`` for normal images (an all-zero mask is implied) and for
        datasets without masks.
    """

    key: str
    category: str
    split: str
    label: int
    defect: str
    image: ImageSource = field(repr=False, compare=False)
    mask: ImageSource | None = field(default=None, repr=False, compare=False)
    #: Ground truth kept as separate masks (MVTec LOCO AD: one file per annotated defect, which may
    #: overlap); ``mask`` is then their union. Metrics that score each defect on its own (sPRO)
    #: read these; empty for datasets with one mask per image.
    channels: tuple["MaskChannel", ...] = field(default=(), repr=False, compare=False)


@dataclass(frozen=True)
class MaskChannel:
    """One annotated defect of an image, as its own mask, with the saturation rule of its type.

    Attributes
    ----------
    source : ImageSource
        The mask file: one positive pixel value (the defect type's) on zeros.
    saturation : mapping of int to (float, bool)
        The category's defect types by pixel value: ``(saturation_threshold,
        relative_saturation)`` from the dataset's ``defects_config.json``.
    """

    source: ImageSource
    saturation: Mapping[int, tuple[float, bool]] = field(default_factory=dict, compare=False)


@dataclass
class CategoryData:
    """Train and test samples of one category."""

    name: str
    train: list[Sample]
    test: list[Sample]
    #: Normal images set aside by the dataset's authors for choosing thresholds and settings
    #: (MVTec AD 2, MVTec LOCO AD); never trained on, never scored.
    validation: list[Sample] = field(default_factory=list)
    #: Test images without public ground truth (MVTec AD 2's private sets): predicted and exported
    #: for the authors' evaluation server, never scored here.
    unscored: list[Sample] = field(default_factory=list)

    @property
    def has_masks(self) -> bool:
        """Whether every anomalous test image has a ground-truth mask."""
        return all(s.mask is not None for s in self.test if s.label == 1)


@dataclass
class DatasetIndex:
    """Everything a loader found: categories with their samples, and problems it noticed.

    Attributes
    ----------
    name : str
        The dataset's name.
    categories : dict of str to CategoryData
        In the dataset's canonical order.
    root : Path or None
        Where it was read from.
    problems : list of str
        Non-fatal findings, each naming the file it concerns (shown by ``harness data summary``).
    """

    name: str
    categories: dict[str, CategoryData]
    root: Path | None = None
    problems: list[str] = field(default_factory=list)


def _to_rgb8(img: "Image.Image") -> np.ndarray:
    """Pixels of an opened image as RGB ``uint8``, whatever its mode.

    - EXIF orientation is applied (the image as every viewer shows it; masks get the same
      treatment, so image and mask stay aligned);
    - 16- and 32-bit greyscale (``I;16``, ``I``) is scaled to 8 bits by its bit depth (not clipped,
      which would saturate nearly every pixel); float images (``F``) are taken as [0, 1] when
      their maximum is at most 1, else as 8-bit values;
    - palette, CMYK, YCbCr and greyscale become RGB; an alpha channel is dropped (anomaly data is
      opaque; transparent pixels keep their colour).
    """
    from PIL import ImageOps

    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        array = np.asarray(img).astype(np.float64)
        depth = 16 if img.mode.startswith("I;16") or array.max(initial=0) <= 65535 else 32
        gray = np.clip(array / (2 ** depth - 1) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if img.mode == "F":
        array = np.asarray(img).astype(np.float64)
        scale = 255.0 if np.nanmax(array, initial=0) <= 1.0 else 1.0
        gray = np.clip(np.nan_to_num(array) * scale + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return np.asarray(img.convert("RGB"))


def read_image(source: ImageSource) -> np.ndarray:
    """Decode an image as an RGB ``uint8`` array of shape (H, W, 3).

    Any mode Pillow reads is accepted (see :func:`_to_rgb8`: EXIF rotation applied, 16-bit
    scaled, palette / CMYK / alpha converted).

    Parameters
    ----------
    source : Path or callable
        A file readable by Pillow, or a callable returning an (H, W, 3) or (H, W) array.

    Returns
    -------
    numpy.ndarray

    Raises
    ------
    DatasetError
        When the file is missing, unreadable or truncated; the message names the file.
    """
    if callable(source):
        array = np.asarray(source())
    else:
        try:
            with Image.open(source) as img:
                img.load()
                array = _to_rgb8(img)
        except (OSError, ValueError, SyntaxError) as exc:
            raise DatasetError(f"cannot read image {source}: {exc}. Re-extract it from the dataset archive, or "
                               "remove it.") from exc
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim == 3 and array.shape[2] == 4:
        array = array[:, :, :3]
    if array.dtype != np.uint8:
        array = np.clip(array, 0, 255).astype(np.uint8)
    return array


def read_mask(source: ImageSource | None, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Decode a ground-truth mask as a boolean (H, W) array, defect where the value is > 0.

    Parameters
    ----------
    source : Path, callable or None
        The mask; ``None`` gives an all-false mask of ``shape``.
    shape : tuple of int, optional
        Needed when ``source`` is None.

    Returns
    -------
    numpy.ndarray of bool
    """
    if source is None:
        if shape is None:
            raise ValueError("read_mask(None) needs a shape")
        return np.zeros(shape, dtype=bool)
    if callable(source):
        array = np.asarray(source())
    else:
        try:
            from PIL import ImageOps

            with Image.open(source) as img:
                img.load()
                img = ImageOps.exif_transpose(img)
                if img.mode in ("P", "PA") and "transparency" not in img.info:
                    img = img.convert("L")
                # An alpha channel says nothing about defects (BMAD's masks are opaque RGBA).
                if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
                    img = img.convert("RGB" if img.mode.startswith("R") else "L")
                array = np.asarray(img.convert("L") if img.mode in ("P", "CMYK", "YCbCr") else img)
        except (OSError, ValueError, SyntaxError) as exc:
            raise DatasetError(f"cannot read mask {source}: {exc}. Re-extract it from the dataset archive, or "
                               "remove it.") from exc
    if array.ndim == 3:
        array = array.max(axis=2)
    return array > 0


#: Pillow filters by the names of the ``interpolation`` setting.
RESAMPLING = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST,
              "lanczos": Image.LANCZOS}
#: OpenCV's ``cv2.resize`` flags for the same names (used when ``antialias`` is false).
CV2_INTERPOLATION = {"bilinear": 1, "bicubic": 2, "nearest": 0, "lanczos": 4}
#: How an image is brought to a method's size: ``square`` (both sides, the aspect ratio changes) or
#: ``shorter_side`` (the shorter side to the size, the aspect ratio kept: torchvision's ``Resize(int)``).
RESIZE_MODES = ("square", "shorter_side")


def resized_shape(shape: Sequence[int], size: Sequence[int], mode: str = "square") -> tuple[int, int]:
    """(H, W) an image of ``shape`` = (H, W, ...) gets when resized to ``size`` = (H, W) by ``mode``.

    ``shorter_side`` scales the shorter side to ``size[0]`` and the longer one to
    ``int(size[0] * long / short)`` (truncated, as torchvision's ``Resize`` with an int size).
    """
    if mode == "square":
        return int(size[0]), int(size[1])
    if mode != "shorter_side":
        raise ValueError(f"unknown resize mode {mode!r}; use one of {', '.join(RESIZE_MODES)}")
    h, w = int(shape[0]), int(shape[1])
    side = int(size[0])
    if h <= w:
        return side, int(side * w / h)
    return int(side * h / w), side


def resize_image(array: np.ndarray, size: tuple[int, int], interpolation: str = "bicubic", antialias: bool = True,
                 mode: str = "square") -> np.ndarray:
    """Resize an RGB ``uint8`` image to ``size`` = (H, W) as a method declares.

    Parameters
    ----------
    array : numpy.ndarray
        (H, W, 3) ``uint8``.
    size : tuple of int
        Target (H, W); with ``mode="shorter_side"`` only ``size[0]`` is used (see :func:`resized_shape`).
    interpolation : str
        A filter name of :data:`RESAMPLING`.
    antialias : bool
        True: Pillow's filter, which antialiases when shrinking (its support grows with the scale),
        like torchvision's ``Resize`` on PIL images. False: OpenCV's ``cv2.resize`` with the same
        filter name, which does not antialias (a fixed 2 x 2 / 4 x 4 support, fixed-point
        arithmetic for ``uint8``), as the code of papers that load images with OpenCV.
    mode : str
        ``square`` or ``shorter_side`` (:data:`RESIZE_MODES`).
    """
    if interpolation not in RESAMPLING:
        raise ValueError(f"unknown interpolation {interpolation!r}; use one of {', '.join(RESAMPLING)}")
    target = resized_shape(array.shape, size, mode)
    if array.shape[:2] == target:
        return array
    if not antialias:
        import cv2

        return cv2.resize(np.ascontiguousarray(array), (target[1], target[0]),
                          interpolation=CV2_INTERPOLATION[interpolation])
    img = Image.fromarray(array)
    return np.asarray(img.resize((target[1], target[0]), RESAMPLING[interpolation]))


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a boolean mask to ``size`` = (H, W) with nearest-neighbour interpolation.

    Masks are binarised (> 0) before resizing, so nearest-neighbour keeps them binary without a
    second threshold that would grow or shrink the defects.
    """
    if mask.shape == tuple(size):
        return mask
    img = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(img.resize((size[1], size[0]), Image.NEAREST)) > 0


class ImageCache:
    """Decoded, resized images kept in memory per (dataset, sample key, size, resize rule).

    Decoding a JPEG and resizing it costs more than a forward pass of a small network, and every
    training epoch and every job on the same dataset asks for the same images again. The cache
    is thread-safe and holds at most ``max_bytes`` of pixels: when full, the least recently used
    images are dropped (and decoded again if asked for), so VisA at 512 px or native sizes cannot
    exhaust the memory. ``max_bytes=0`` disables caching.

    Parameters
    ----------
    max_bytes : int
        Bound on the cached pixels (default 4 GiB, or ``$HARNESS_IMAGE_CACHE_MB``).
    """

    def __init__(self, max_bytes: int | None = None) -> None:
        if max_bytes is None:
            env = os.environ.get("HARNESS_IMAGE_CACHE_MB")
            max_bytes = int(float(env) * 2**20) if env else 4 << 30
        self._store: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._bytes = 0
        self.max_bytes = int(max_bytes)
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        """Bytes of pixels held now (never above ``max_bytes``)."""
        return self._bytes

    def image(self, dataset: str, sample: Sample, size: tuple[int, int], interpolation: str = "bicubic",
              antialias: bool = True, mode: str = "square") -> np.ndarray:
        """Return ``sample``'s image as (H, W, 3) ``uint8`` resized to ``size`` (see :func:`resize_image`)."""
        key = (dataset, sample.key, tuple(size), interpolation, bool(antialias), mode)
        with self._lock:
            hit = self._store.get(key)
            if hit is not None:
                self._store.move_to_end(key)
                self.hits += 1
                return hit
            self.misses += 1
        array = resize_image(read_image(sample.image), size, interpolation, antialias, mode)
        if array.nbytes > self.max_bytes:
            return array
        with self._lock:
            if key not in self._store:
                self._store[key] = array
                self._bytes += array.nbytes
                while self._bytes > self.max_bytes:
                    _, dropped = self._store.popitem(last=False)
                    self._bytes -= dropped.nbytes
        return array


def same_shape_runs(items: Sequence[Any]) -> list[list[int]]:
    """Indices of ``items`` cut into consecutive runs whose ``.shape`` is the same."""
    runs: list[list[int]] = []
    for i, item in enumerate(items):
        if runs and tuple(items[runs[-1][0]].shape) == tuple(item.shape):
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def to_tensor(arrays: Sequence[np.ndarray]) -> torch.Tensor:
    """Stack (H, W, 3) ``uint8`` arrays into a float32 (N, 3, H, W) tensor in [0, 1]."""
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return batch.float().div_(255.0)


class TrainSet(torch.utils.data.Dataset):
    """Normal training images of the categories in a job, as a map-style torch dataset.

    Items are ``(image, category)`` with ``image`` a float32 (3, H, W) tensor in [0, 1] at the
    method's input size. It never holds test images.

    Attributes
    ----------
    samples : list of Sample
        The training samples.
    categories : list of str
        Categories present, in dataset order.
    size : tuple of int
        (H, W) the images are resized to (with ``mode="shorter_side"``: ``size[0]`` is the shorter
        side and images keep their aspect ratio, so their shapes may differ).
    interpolation, antialias, mode
        How images are resized (see :func:`resize_image`).
    """

    def __init__(self, dataset: str, samples: Sequence[Sample], size: tuple[int, int], cache: ImageCache,
                 interpolation: str = "bicubic", antialias: bool = True, mode: str = "square") -> None:
        bad = [s.key for s in samples if s.split != "train" or s.label != 0]
        if bad:
            raise ValueError(f"training set contains non-training or anomalous samples: {bad[:3]}")
        self.dataset = dataset
        self.samples = list(samples)
        self.size = tuple(size)
        self.interpolation = interpolation
        self.antialias = bool(antialias)
        self.mode = mode
        self._cache = cache
        seen: dict[str, None] = {}
        for s in self.samples:
            seen.setdefault(s.category, None)
        self.categories = list(seen)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        sample = self.samples[index]
        array = self._cache.image(self.dataset, sample, self.size, self.interpolation, self.antialias, self.mode)
        return to_tensor([array])[0], sample.category

    def subset(self, indices: Sequence[int]) -> "TrainSet":
        """A training set of the samples at ``indices`` (same size, cache and resize rule)."""
        return TrainSet(self.dataset, [self.samples[int(i)] for i in indices], self.size, self._cache,
                        self.interpolation, self.antialias, self.mode)

    def images(self) -> Iterator[tuple[torch.Tensor, str]]:
        """Iterate over all items in order."""
        for i in range(len(self)):
            yield self[i]

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0) -> Iterator[tuple[torch.Tensor, list[str]]]:
        """Yield ``(images, categories)`` batches; shuffled reproducibly by ``seed`` if asked.

        Images of different shapes (``mode="shorter_side"`` on a dataset of mixed aspect ratios)
        cannot be stacked: such a batch is yielded as consecutive runs of equal shape.
        """
        order = np.arange(len(self))
        if shuffle:
            order = np.random.default_rng(seed).permutation(len(self))
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            items = [self[int(i)] for i in idx]
            for run in same_shape_runs([x for x, _ in items]):
                yield torch.stack([items[i][0] for i in run]), [items[i][1] for i in run]

    def by_category(self) -> Mapping[str, list[int]]:
        """Indices of the samples of each category."""
        out: dict[str, list[int]] = {c: [] for c in self.categories}
        for i, s in enumerate(self.samples):
            out[s.category].append(i)
        return out


def load_index(spec: Any, root: Any, categories: Sequence[str] | None = None,
               options: Mapping[str, str] | None = None) -> DatasetIndex:
    """Index a dataset through its spec's loader, with the loader options given on the command line.

    Parameters
    ----------
    spec : DatasetSpec
    root : path or None
    categories : sequence of str, optional
    options : mapping of str to str, optional
        ``--data-option KEY=VALUE`` pairs; each key must be one of ``spec.options``.

    Returns
    -------
    DatasetIndex

    Raises
    ------
    DatasetError
        When an option is not one the dataset declares (the message lists those it takes).
    """
    options = dict(options or {})
    unknown = [k for k in options if k not in spec.options]
    if unknown:
        takes = ", ".join(f"{k} ({h})" for k, h in spec.options.items()) or "none"
        raise DatasetError(f"dataset {spec.name!r} takes no --data-option {', '.join(unknown)}; its options: {takes}")
    return spec.loader(root, categories, **options) if options else spec.loader(root, categories)


def parse_data_options(items: Sequence[str] | None) -> dict[str, str]:
    """``["KEY=VALUE", ...]`` (repeated ``--data-option``) as a dict; a malformed item is a DatasetError."""
    out: dict[str, str] = {}
    for item in items or ():
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise DatasetError(f"--data-option {item!r}: expected KEY=VALUE, e.g. --data-option resolution=512")
        out[name.strip()] = value.strip()
    return out
