"""Anomaly synthesis for DiffusionAD training (Perlin masks x foreground, texture sources).

A synthetic anomaly is made in four steps, following the authors' data code
(HuiZhang0812/DiffusionAD, ``data/dataset_beta_thresh.py``):

1. **Foreground** ``F`` (where defects may go):

   - with the authors' precomputed masks (the ``foreground_root`` setting, their Google Drive
     download): ``<root>/<category>/DISthresh/good/<stem>.png`` for an object image (made with
     DIS), and for a texture a mask drawn at random from ``<root>/carpet/thresh/*.png`` (the
     authors use carpet's masks for every texture category, DAGM's included); masks are resized
     bilinearly and kept soft (values in [0, 1]), as theirs;
   - otherwise textures use the whole image and objects the Otsu foreground of
     :func:`harness.toolkit.foreground.object_foreground` (``foreground="auto"`` falls back to
     the whole image when that split is lopsided: more than 20 % of the border or less than 5 %
     or more than 95 % of the image; ``"otsu"`` never falls back; ``"whole"`` uses the whole
     image for every category).

   Textures are the dataset's texture categories (``DatasetSpec.textures``) plus
   ``extra_texture_categories`` (the authors add ``zipper``).
2. **Mask**: 2-D Perlin noise on a lattice of ``2**a`` by ``2**b`` cells (``a, b`` drawn once in
   ``[scale_exp[0], scale_exp[1])``), rotated by an angle in [-90, 90] degrees, thresholded at 0.5
   and multiplied by ``F``; redrawn (same lattice) up to 50 times until it hits the foreground.
   The image counts as anomalous only if the mask is not empty (as the authors' ``has_anomaly``).
3. **Source** ``A``: a texture image (DTD from ``dtd_root``, or a procedural texture when the user
   opted out with ``texture_source="procedural"``) after ``augmentations`` random photometric /
   geometric augmentations; for objects, with probability ``self_augment_probability``, the
   image itself after the same augmentations, cut into an 8 x 8 grid of cells put back in random
   order instead. Textures use external sources only.
4. **Blend** (the paper's Eq. 9) with opacity ``beta ~ U(beta_range)``:
   ``S = beta (M N) + (1 - beta) (M A) + (1 - M) N``.

Differences from the authors' code, all small: the augmentation pool is torchvision's versions of
their ten imgaug augmenters (gamma, brightness, sharpness, hue, solarize, posterize, invert,
autocontrast, equalize, rotation); the grid shuffle permutes the 64 cells uniformly (theirs
shuffles alternate strips); Perlin noise is our own implementation of the same classic
gradient noise.

**Data loading.** :class:`AnomalyTrainingSet` is a map-style dataset whose items are
``(index, epoch, position, synthetic)`` keys produced by :class:`EpochBatches`; every random draw
of an item comes from a generator seeded by ``(seed, epoch, position)`` only, so a batch is the
same whichever DataLoader worker makes it, whatever the number of workers, and after a resume.
The anomaly synthesis therefore runs in DataLoader worker processes (``synthesis_workers``), not
in the training step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from scipy import ndimage

from harness.errors import HarnessError
from harness.toolkit.foreground import object_foreground

#: Image suffixes accepted in a DTD or foreground folder.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
#: Where to download DTD (the error for a missing texture folder names it).
DTD_URL = "https://www.robots.ox.ac.uk/~vgg/data/dtd/"
#: Where the authors' foreground masks are published (their README).
FOREGROUND_URL = "https://drive.google.com/drive/folders/1goH-PqWD35jvXuZNcBlR6elKf7eBx8lY"
#: Foreground rules without the authors' mask files.
FOREGROUND_RULES = ("auto", "otsu", "whole")
#: How the synthetic half of a batch is chosen.
ANOMALY_SAMPLING = ("coin", "half")
#: How an epoch's images are drawn.
TRAIN_SAMPLING = ("replacement", "permutation")


class SynthesisSourceError(HarnessError):
    """A texture or foreground folder the settings ask for is missing or empty; the message says what to do."""


# -- Perlin masks --------------------------------------------------------------------------------

def perlin_noise(shape: tuple[int, int], cells: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Classic 2-D gradient (Perlin) noise.

    Parameters
    ----------
    shape : tuple of int
        (H, W) of the output.
    cells : tuple of int
        Lattice cells along (H, W); more cells give finer blobs. Need not divide ``shape``.
    rng : numpy.random.Generator

    Returns
    -------
    numpy.ndarray
        Float (H, W), roughly in [-1, 1].
    """
    h, w = shape
    ch, cw = cells
    angles = rng.uniform(0, 2 * np.pi, (ch + 1, cw + 1))
    grads = np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    y = np.arange(h) * ch / h
    x = np.arange(w) * cw / w
    yi, xi = np.floor(y).astype(int), np.floor(x).astype(int)
    fy, fx = (y - yi)[:, None], (x - xi)[None, :]

    def corner(dy: int, dx: int) -> np.ndarray:
        # Dot product of the corner's gradient with the offset from that corner.
        g = grads[(yi + dy)[:, None], (xi + dx)[None, :]]
        return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

    def fade(t: np.ndarray) -> np.ndarray:
        return t * t * t * (t * (t * 6 - 15) + 10)

    uy, ux = fade(fy), fade(fx)
    top = corner(0, 0) * (1 - ux) + corner(0, 1) * ux
    bottom = corner(1, 0) * (1 - ux) + corner(1, 1) * ux
    return np.sqrt(2) * (top * (1 - uy) + bottom * uy)


def perlin_cells(rng: np.random.Generator, scale_exp: tuple[int, int] = (0, 6)) -> tuple[int, int]:
    """Lattice cells per axis, ``2**k`` with ``k`` drawn in ``[scale_exp[0], scale_exp[1])``."""
    return 2 ** int(rng.integers(*scale_exp)), 2 ** int(rng.integers(*scale_exp))


def perlin_mask(shape: tuple[int, int], rng: np.random.Generator, scale_exp: tuple[int, int] = (0, 6),
                threshold: float = 0.5, cells: tuple[int, int] | None = None) -> np.ndarray:
    """A thresholded, randomly rotated Perlin-noise mask.

    Parameters
    ----------
    shape : tuple of int
        (H, W).
    rng : numpy.random.Generator
    scale_exp : tuple of int
        Range of the lattice exponents, used when ``cells`` is not given.
    threshold : float
        Noise level above which a pixel is anomalous.
    cells : tuple of int, optional
        The lattice (drawn by :func:`perlin_cells` when omitted).

    Returns
    -------
    numpy.ndarray of bool
        (H, W); may be empty.
    """
    cells = cells or perlin_cells(rng, scale_exp)
    noise = perlin_noise(shape, cells, rng)
    # Pixels rotated in from outside the lattice get -1: never above the threshold (the authors'
    # rotation fills them with 0, also below it).
    noise = ndimage.rotate(noise, float(rng.uniform(-90, 90)), reshape=False, order=1, mode="constant", cval=-1.0)
    return noise > threshold


# -- foregrounds ---------------------------------------------------------------------------------

def otsu_or_whole(image: np.ndarray, rule: str = "auto") -> np.ndarray:
    """The foreground of an object image without mask files (see the module docstring).

    Parameters
    ----------
    image : numpy.ndarray
        (3, H, W) float in [0, 1].
    rule : str
        ``"auto"``, ``"otsu"`` or ``"whole"``.

    Returns
    -------
    numpy.ndarray of bool
        (H, W).
    """
    if rule not in FOREGROUND_RULES:
        raise ValueError(f"unknown foreground rule {rule!r}; use one of {FOREGROUND_RULES}")
    whole = np.ones(image.shape[1:], dtype=bool)
    if rule == "whole":
        return whole
    fg = object_foreground(image)
    if rule == "auto":
        edge = np.concatenate([fg[0], fg[-1], fg[:, 0], fg[:, -1]])
        # An object lies on a background that the border shows; when much of the border counts as
        # foreground, or the split is lopsided, the image is a texture (or a frame-filling object).
        if edge.mean() > 0.2 or not 0.05 <= fg.mean() <= 0.95:
            return whole
    return fg


def _read_grey(path: Path, size: tuple[int, int]) -> np.ndarray:
    """A greyscale mask file resized bilinearly to ``size`` = (H, W), as float in [0, 1]."""
    with Image.open(path) as img:
        img = img.convert("L").resize((size[1], size[0]), Image.BILINEAR)
        return np.asarray(img, dtype=np.float32) / 255.0


class ForegroundMasks:
    """The authors' precomputed foreground masks (``foreground_root``), or nothing.

    Parameters
    ----------
    root : str or Path or None
        The folder of the authors' download: ``<root>/<category>/DISthresh/good/<stem>.png`` per
        object training image, ``<root>/carpet/thresh/*.png`` for textures. None or empty: no
        files (Otsu / whole image is used).
    size : tuple of int
        (H, W) masks are resized to.
    """

    def __init__(self, root: str | Path | None, size: tuple[int, int]) -> None:
        self.root = Path(root).expanduser() if root else None
        self.size = tuple(size)
        self.texture_paths: list[Path] = []
        if self.root is not None:
            if not self.root.is_dir():
                raise SynthesisSourceError(f"foreground_root {self.root} is not a folder; give the folder of the "
                                           f"authors' foreground masks ({FOREGROUND_URL}) or leave it empty to use "
                                           "Otsu foregrounds")
            folder = self.root / "carpet" / "thresh"
            if folder.is_dir():
                self.texture_paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)

    @property
    def enabled(self) -> bool:
        """Whether mask files are used."""
        return self.root is not None

    def object_path(self, category: str, key: str) -> Path:
        """The mask file of a training image (key ``<category>/train/good/<stem>``)."""
        return self.root / category / "DISthresh" / "good" / f"{key.rsplit('/', 1)[-1]}.png"

    def check(self, items: Sequence[tuple[str, str]], textures: frozenset[str]) -> None:
        """Raise :class:`SynthesisSourceError` naming the first missing mask of ``(category, key)`` items."""
        if not self.enabled:
            return
        if any(c in textures for c, _ in items) and not self.texture_paths:
            raise SynthesisSourceError(f"foreground_root {self.root}: no texture masks in {self.root / 'carpet' / 'thresh'} "
                                       "(the authors' texture foregrounds)")
        for category, key in items:
            if category not in textures and not self.object_path(category, key).is_file():
                raise SynthesisSourceError(f"foreground_root {self.root}: missing {self.object_path(category, key)} "
                                           f"(the DIS foreground of {key}); the layout is "
                                           "<root>/<category>/DISthresh/good/<image stem>.png")

    def mask(self, category: str, key: str, is_texture: bool, rng: np.random.Generator) -> np.ndarray:
        """(H, W) float mask in [0, 1]: the image's DIS mask, or a random texture mask."""
        if is_texture:
            return _read_grey(self.texture_paths[int(rng.integers(len(self.texture_paths)))], self.size)
        return _read_grey(self.object_path(category, key), self.size)


# -- texture sources -----------------------------------------------------------------------------

def procedural_texture(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A random texture image, for runs that opt out of DTD.

    Mixes a few families that resemble DTD's (stripes, checks, blobs, fractal noise, speckle),
    with random colours, so the segmentation network sees varied foreign patterns.

    Parameters
    ----------
    shape : tuple of int
        (H, W).
    rng : numpy.random.Generator

    Returns
    -------
    numpy.ndarray
        (3, H, W) float in [0, 1].
    """
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    kind = int(rng.integers(0, 5))
    if kind == 0:
        angle, freq = rng.uniform(0, np.pi), rng.uniform(3, 20)
        pattern = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (np.cos(angle) * yy + np.sin(angle) * xx) + rng.uniform(0, 6.3))
    elif kind == 1:
        freq = rng.uniform(2, 12)
        pattern = ((np.floor(yy * freq) + np.floor(xx * freq)) % 2).astype(float)
    elif kind == 2:
        pattern = ndimage.gaussian_filter(rng.random((h, w)), sigma=rng.uniform(1, 6))
    elif kind == 3:
        pattern = sum(0.5 ** o * perlin_noise(shape, (2 ** (o + 1), 2 ** (o + 1)), rng) for o in range(4))
    else:
        pattern = rng.random((h, w))
    pattern = (pattern - pattern.min()) / max(float(np.ptp(pattern)), 1e-6)
    colour_a, colour_b = rng.random(3), rng.random(3)
    return colour_a[:, None, None] * pattern + colour_b[:, None, None] * (1 - pattern)


class TextureSource:
    """External texture images: the DTD dataset from disk, or procedural textures.

    Parameters
    ----------
    dtd_root : str or Path or None
        A folder searched recursively for images (the DTD root, or its ``images/`` tree).
        None or empty: procedural textures.
    size : tuple of int
        (H, W) textures are resized to.
    max_cached : int
        Decoded DTD images kept in memory (per process: each DataLoader worker has its own).

    Raises
    ------
    SynthesisSourceError
        When ``dtd_root`` is given but is not a folder or holds no image.
    """

    def __init__(self, dtd_root: str | Path | None, size: tuple[int, int], max_cached: int = 2000) -> None:
        self.size = tuple(size)
        self.root = Path(dtd_root).expanduser() if dtd_root else None
        self.paths: list[Path] = []
        if self.root is not None:
            if not self.root.is_dir():
                raise SynthesisSourceError(f"dtd_root {self.root} is not a folder; download the Describable Textures "
                                           f"Dataset from {DTD_URL} and give its folder")
            self.paths = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            if not self.paths:
                raise SynthesisSourceError(f"dtd_root {self.root} holds no image; download the Describable Textures "
                                           f"Dataset from {DTD_URL} and give its folder (the one with images/)")
        self._cache: dict[int, np.ndarray] = {}
        self._max_cached = max_cached

    @property
    def kind(self) -> str:
        """``"dtd"`` when images come from disk, else ``"procedural"``."""
        return "dtd" if self.paths else "procedural"

    def sample(self, rng: np.random.Generator) -> np.ndarray:
        """Return one texture as a (3, H, W) float array in [0, 1]."""
        if not self.paths:
            return procedural_texture(self.size, rng)
        index = int(rng.integers(len(self.paths)))
        hit = self._cache.get(index)
        if hit is None:
            with Image.open(self.paths[index]) as img:
                img = img.convert("RGB").resize((self.size[1], self.size[0]), Image.BILINEAR)
                hit = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0
            if len(self._cache) < self._max_cached:
                self._cache[index] = hit
        return hit


# -- augmentations -------------------------------------------------------------------------------

def _photometric_ops(rng: np.random.Generator) -> list:
    """The pool of random augmentations (torchvision versions of the authors' ten), each ready to apply."""
    return [
        lambda x: TF.adjust_gamma(x, float(rng.uniform(0.5, 2.0))),
        lambda x: TF.adjust_brightness(x, float(rng.uniform(0.8, 1.2))),
        lambda x: TF.adjust_sharpness(x, float(rng.uniform(0.0, 2.0))),
        lambda x: TF.adjust_hue(x, float(rng.uniform(-0.2, 0.2))),
        lambda x: TF.solarize(x, float(rng.uniform(0.125, 0.5))),
        lambda x: TF.posterize((x * 255).to(torch.uint8), int(rng.integers(1, 8))).float() / 255,
        lambda x: TF.invert(x),
        lambda x: TF.autocontrast(x),
        lambda x: TF.equalize((x * 255).to(torch.uint8)).float() / 255,
        lambda x: TF.rotate(x, float(rng.uniform(-45, 45))),
    ]


def augment(image: np.ndarray, rng: np.random.Generator, n_ops: int = 3) -> np.ndarray:
    """Apply ``n_ops`` distinct augmentations, chosen at random, in random order.

    Parameters
    ----------
    image : numpy.ndarray
        (3, H, W) float in [0, 1].
    rng : numpy.random.Generator
    n_ops : int

    Returns
    -------
    numpy.ndarray
        (3, H, W) float in [0, 1].
    """
    ops = _photometric_ops(rng)
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).clamp(0, 1)
    for i in rng.choice(len(ops), size=min(n_ops, len(ops)), replace=False):
        x = ops[int(i)](x).clamp(0, 1)
    return x.numpy()


def grid_shuffle(image: np.ndarray, rng: np.random.Generator, grid: int = 8) -> np.ndarray:
    """Cut an image into ``grid`` x ``grid`` cells and put the cells back in random order.

    Parameters
    ----------
    image : numpy.ndarray
        (C, H, W); H and W are cropped to multiples of ``grid`` for the cells, and the uncovered
        border keeps its pixels.
    rng : numpy.random.Generator
    grid : int

    Returns
    -------
    numpy.ndarray
    """
    c, h, w = image.shape
    ch, cw = h // grid, w // grid
    cells = image[:, :ch * grid, :cw * grid].reshape(c, grid, ch, grid, cw).transpose(1, 3, 0, 2, 4).reshape(-1, c, ch, cw)
    cells = cells[rng.permutation(len(cells))]
    out = image.copy()
    out[:, :ch * grid, :cw * grid] = cells.reshape(grid, grid, c, ch, cw).transpose(2, 0, 3, 1, 4).reshape(c, ch * grid, cw * grid)
    return out


# -- one anomaly ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class SynthesisConfig:
    """The synthesis settings (see :mod:`harness_diffusionad.plugin` for each one's meaning)."""

    textures: frozenset[str] = frozenset()
    foreground: str = "auto"
    scale_exp: tuple[int, int] = (0, 6)
    threshold: float = 0.5
    beta_range: tuple[float, float] = (0.2, 0.8)
    augmentations: int = 3
    self_augment_probability: float = 0.5
    anomaly_probability: float = 0.5
    max_tries: int = 50


def synthesize_one(image: np.ndarray, foreground: np.ndarray, is_texture: bool, rng: np.random.Generator,
                   textures: TextureSource, config: SynthesisConfig = SynthesisConfig()
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Put one synthetic anomaly on ``image``.

    Parameters
    ----------
    image : numpy.ndarray
        (3, H, W) float in [0, 1].
    foreground : numpy.ndarray
        (H, W) bool or float in [0, 1]: where defects may go.
    is_texture : bool
        Textures take their anomaly appearance from the texture source only.
    rng : numpy.random.Generator
    textures : TextureSource
    config : SynthesisConfig

    Returns
    -------
    image : numpy.ndarray
        (3, H, W) float32 in [0, 1].
    mask : numpy.ndarray
        (H, W) float32 in [0, 1] (soft where the foreground is); all zero only if every try
        missed the foreground (the image is then left unchanged).
    """
    shape = image.shape[1:]
    fg = foreground.astype(np.float32)
    cells = perlin_cells(rng, config.scale_exp)
    mask = np.zeros(shape, dtype=np.float32)
    for _ in range(config.max_tries):
        mask = perlin_mask(shape, rng, threshold=config.threshold, cells=cells).astype(np.float32) * fg
        if mask.any():
            break
    if is_texture or rng.random() >= config.self_augment_probability:
        source = augment(textures.sample(rng), rng, config.augmentations)
    else:
        source = grid_shuffle(augment(image, rng, config.augmentations), rng)
    beta = float(rng.uniform(*config.beta_range))
    m = mask[None]
    out = image * (1 - m) + m * ((1 - beta) * source + beta * image)
    return out.astype(np.float32), mask


# -- the training data ---------------------------------------------------------------------------

def _item_rng(seed: int, epoch: int, position: int) -> np.random.Generator:
    """The generator of one item: a function of (seed, epoch, position in the epoch) only."""
    return np.random.default_rng((int(seed), 11, int(epoch), int(position)))


class EpochBatches(torch.utils.data.Sampler):
    """Batches of item keys for one epoch; set :attr:`epoch` and :attr:`start` before iterating.

    An epoch draws ``n`` images (``n`` = training images) either as a permutation or, as the
    authors' dataset (its ``__getitem__`` ignores the index and draws one at random), with
    replacement; the order depends only on ``(seed, epoch)``. Batches are full
    (``drop_last`` as the authors' loader): ``n // batch_size`` of them, or one batch of all
    images when there are fewer than ``batch_size``. Keys are ``(index, epoch, position,
    synthetic)`` with ``synthetic`` 1 or 0 (``"half"``: exactly half of each batch, rounded down,
    chosen at random) or -1 (``"coin"``: each item decides with its own generator).

    Parameters
    ----------
    n : int
    batch_size : int
    seed : int
    sampling : str
        ``"replacement"`` or ``"permutation"``.
    anomaly_sampling : str
        ``"coin"`` or ``"half"``.

    Attributes
    ----------
    epoch : int
    start : int
        Batches of :attr:`epoch` to skip (already consumed before a resume).
    """

    def __init__(self, n: int, batch_size: int, seed: int, sampling: str = "replacement",
                 anomaly_sampling: str = "coin") -> None:
        if sampling not in TRAIN_SAMPLING or anomaly_sampling not in ANOMALY_SAMPLING:
            raise ValueError(f"sampling must be in {TRAIN_SAMPLING} and anomaly_sampling in {ANOMALY_SAMPLING}")
        self.n, self.batch_size, self.seed = int(n), int(batch_size), int(seed)
        self.sampling, self.anomaly_sampling = sampling, anomaly_sampling
        self.epoch, self.start = 0, 0

    @property
    def size(self) -> int:
        """Images per batch."""
        return min(self.batch_size, self.n)

    def __len__(self) -> int:
        return max(self.n // self.size, 1) if self.n else 0

    def order(self, epoch: int) -> np.ndarray:
        """The epoch's image indices."""
        rng = np.random.default_rng((int(self.seed), 7, int(epoch)))
        if self.sampling == "replacement":
            return rng.integers(0, self.n, self.n)
        return rng.permutation(self.n)

    def __iter__(self) -> Iterator[list[tuple[int, int, int, int]]]:
        order = self.order(self.epoch)
        b = self.size
        for batch in range(self.start, len(self)):
            positions = range(batch * b, batch * b + b)
            if self.anomaly_sampling == "half":
                picked = set(np.random.default_rng((int(self.seed), 13, int(self.epoch), batch)).permutation(b)[: b // 2])
                flags = [int(i in picked) for i in range(b)]
            else:
                flags = [-1] * b
            yield [(int(order[p]), int(self.epoch), int(p), f) for p, f in zip(positions, flags)]


class AnomalyTrainingSet(torch.utils.data.Dataset):
    """Training images with synthetic anomalies made on the fly (in DataLoader workers).

    Parameters
    ----------
    images : numpy.ndarray
        (N, H, W, 3) uint8: the decoded training images (decoded once in the main process).
    categories, keys : sequence of str
        Each image's category and sample key.
    seed : int
        The job's seed; with the key's epoch and position it seeds every draw of an item.
    textures : TextureSource
    foregrounds : ForegroundMasks
    config : SynthesisConfig

    Items
    -----
    ``(image, mask, label)``: (3, H, W) float32 in [0, 1], (1, H, W) float32, and a float 1.0
    when an anomaly was synthesised (non-empty mask), else 0.0.
    """

    def __init__(self, images: np.ndarray, categories: Sequence[str], keys: Sequence[str], seed: int,
                 textures: TextureSource, foregrounds: ForegroundMasks, config: SynthesisConfig) -> None:
        self.images = images
        self.categories = list(categories)
        self.keys = list(keys)
        self.seed = int(seed)
        self.textures = textures
        self.foregrounds = foregrounds
        self.config = config

    def __len__(self) -> int:
        return len(self.images)

    def foreground(self, index: int, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The foreground of image ``index`` (see the module docstring)."""
        category = self.categories[index]
        is_texture = category in self.config.textures
        if self.foregrounds.enabled and self.config.foreground != "whole":
            return self.foregrounds.mask(category, self.keys[index], is_texture, rng)
        if is_texture:
            return np.ones(image.shape[1:], dtype=bool)
        return otsu_or_whole(image, self.config.foreground)

    def __getitem__(self, key: tuple[int, int, int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        index, epoch, position, synthetic = key
        rng = _item_rng(self.seed, epoch, position)
        image = self.images[index].transpose(2, 0, 1).astype(np.float32) / 255.0
        if synthetic < 0:
            synthetic = int(rng.random() < self.config.anomaly_probability)
        mask = np.zeros(image.shape[1:], dtype=np.float32)
        if synthetic:
            fg = self.foreground(index, image, rng)
            is_texture = self.categories[index] in self.config.textures
            image, mask = synthesize_one(image, fg, is_texture, rng, self.textures, self.config)
        label = float(mask.any())
        return torch.from_numpy(np.ascontiguousarray(image)), torch.from_numpy(mask[None].copy()), torch.tensor(label)


__all__ = ["perlin_noise", "perlin_cells", "perlin_mask", "otsu_or_whole", "ForegroundMasks", "procedural_texture",
           "TextureSource", "augment", "grid_shuffle", "SynthesisConfig", "synthesize_one", "EpochBatches",
           "AnomalyTrainingSet", "SynthesisSourceError", "DTD_URL", "FOREGROUND_URL", "FOREGROUND_RULES",
           "ANOMALY_SAMPLING", "TRAIN_SAMPLING"]
