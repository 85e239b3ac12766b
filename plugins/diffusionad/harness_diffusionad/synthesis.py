"""Anomaly synthesis for DiffusionAD training (Perlin masks x foreground, texture sources).

A synthetic anomaly is made in four steps, following the authors' data code
(HuiZhang0812/DiffusionAD, ``data/dataset_beta_thresh.py``):

1. **Foreground** ``F`` (where defects may go):

   - with the authors' precomputed masks (the ``foreground_root`` setting, their Google Drive
     download): ``<root>/<category>/DISthresh/good/<stem>.png`` for an object image (made with
     DIS), and for a texture a mask drawn at random from ``<root>/carpet/thresh/*.png`` (the
     authors use carpet's masks for every texture category, DAGM's included); masks are resized
     bilinearly (``cv2.resize``, as theirs, unless ``antialias``) and kept soft (values in [0, 1]);
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
   opted out with ``texture_source="procedural"``) after ``augmentations`` random augmentations
   drawn without replacement from ``augmentation_pool`` (``code``: the authors' ten imgaug
   augmenters, each written here from imgaug's definition on ``uint8`` images; ``paper``: the
   paper's seven); for objects, with probability ``self_augment_probability``, the image itself
   after the same augmentations, rearranged on an 8 x 8 grid instead (``grid_shuffle``:
   ``strips``, the code's alternate-strip shuffle, or ``cells``, the text's uniform order).
   Textures use external sources only. Textures and foreground masks are resized with
   ``cv2.resize`` as the authors' (``antialias=False``), or Pillow's filter.
4. **Blend** (the paper's Eq. 9) with opacity ``beta ~ U(beta_range)``:
   ``S = beta (M N) + (1 - beta) (M A) + (1 - M) N``.

Differences from the authors' code: the random numbers (NumPy generators seeded per item, not
imgaug's and Python's global ones); Perlin noise is our own implementation of the same classic
gradient noise, and the Perlin mask is rotated with SciPy (theirs with imgaug's ``Affine``).

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
from PIL import Image
from scipy import ndimage
import cv2

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


def _resize_rgb_or_grey(array: np.ndarray, size: tuple[int, int], antialias: bool) -> np.ndarray:
    """``uint8`` image resized bilinearly to ``size`` = (H, W): ``cv2.resize`` (the authors', no
    antialiasing) or Pillow's antialiased filter."""
    if array.shape[:2] == tuple(size):
        return array
    if not antialias:
        return cv2.resize(np.ascontiguousarray(array), (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    return np.asarray(Image.fromarray(array).resize((size[1], size[0]), Image.BILINEAR))


def _read_grey(path: Path, size: tuple[int, int], antialias: bool = False) -> np.ndarray:
    """A greyscale mask file resized bilinearly to ``size`` = (H, W), as float in [0, 1]."""
    with Image.open(path) as img:
        grey = np.asarray(img.convert("L"))
    return _resize_rgb_or_grey(grey, size, antialias).astype(np.float32) / 255.0


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
    antialias : bool
        False: ``cv2.resize`` (the authors'); True: Pillow's antialiased bilinear filter.
    """

    def __init__(self, root: str | Path | None, size: tuple[int, int], antialias: bool = False) -> None:
        self.root = Path(root).expanduser() if root else None
        self.size = tuple(size)
        self.antialias = bool(antialias)
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
            return _read_grey(self.texture_paths[int(rng.integers(len(self.texture_paths)))], self.size, self.antialias)
        return _read_grey(self.object_path(category, key), self.size, self.antialias)


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
    antialias : bool
        False: ``cv2.resize`` (the authors' bilinear, no antialiasing); True: Pillow's filter.

    Raises
    ------
    SynthesisSourceError
        When ``dtd_root`` is given but is not a folder or holds no image.
    """

    def __init__(self, dtd_root: str | Path | None, size: tuple[int, int], max_cached: int = 2000,
                 antialias: bool = False) -> None:
        self.size = tuple(size)
        self.antialias = bool(antialias)
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
        """Return one texture as an (H, W, 3) ``uint8`` RGB array (the authors augment ``uint8`` images)."""
        if not self.paths:
            texture = procedural_texture(self.size, rng)
            return np.clip(np.round(texture.transpose(1, 2, 0) * 255), 0, 255).astype(np.uint8)
        index = int(rng.integers(len(self.paths)))
        hit = self._cache.get(index)
        if hit is None:
            with Image.open(self.paths[index]) as img:
                hit = _resize_rgb_or_grey(np.asarray(img.convert("RGB")), self.size, self.antialias)
            if len(self._cache) < self._max_cached:
                self._cache[index] = hit
        return hit


# -- augmentations -------------------------------------------------------------------------------
#
# The authors' augmenters are imgaug's (0.4.0), applied to ``uint8`` RGB images. imgaug needs NumPy
# < 2 and is unmaintained, so each one is written here from imgaug's definition, on ``uint8`` arrays
# with OpenCV and Pillow as imgaug uses them; tests/test_golden_diffusionad.py compares every one
# with imgaug's own output at fixed parameters (tests/golden/diffusionad/).

def gamma_contrast(image: np.ndarray, gammas: Sequence[float]) -> np.ndarray:
    """imgaug ``GammaContrast``: per channel ``c`` a table ``int(255 (v / 255) ** gamma_c)`` (float32)."""
    levels = np.linspace(0, 1.0, num=256, dtype=np.float32)
    out = np.empty_like(image)
    for c, gamma in enumerate(gammas):
        table = np.clip(levels ** np.float32(gamma) * 255, 0, 255).astype(np.uint8)
        out[..., c] = table[image[..., c]]
    return out


#: imgaug ``WithBrightnessChannels``: colour space -> (OpenCV codes there and back, brightness channel).
BRIGHTNESS_SPACES = {
    "YCrCb": (cv2.COLOR_RGB2YCrCb, cv2.COLOR_YCrCb2RGB, 0), "HSV": (cv2.COLOR_RGB2HSV, cv2.COLOR_HSV2RGB, 2),
    "HLS": (cv2.COLOR_RGB2HLS, cv2.COLOR_HLS2RGB, 1), "Lab": (cv2.COLOR_RGB2Lab, cv2.COLOR_Lab2RGB, 0),
    "Luv": (cv2.COLOR_RGB2Luv, cv2.COLOR_Luv2RGB, 0), "YUV": (cv2.COLOR_RGB2YUV, cv2.COLOR_YUV2RGB, 0),
}


def multiply_and_add_to_brightness(image: np.ndarray, mul: float, add: float, space: str,
                                   add_first: bool = False) -> np.ndarray:
    """imgaug ``MultiplyAndAddToBrightness``: in colour ``space``, the brightness channel is multiplied
    (table ``int(v * mul)``) and shifted by ``round(add)`` (clipped to [0, 255]), in either order."""
    to_space, back, channel = BRIGHTNESS_SPACES[space]
    converted = cv2.cvtColor(np.ascontiguousarray(image), to_space)
    levels = np.arange(256, dtype=np.float32)
    mul_table = np.clip(levels * np.float32(mul), 0, 255).astype(np.uint8)
    add_table = np.clip(np.arange(256, dtype=np.int16) + int(np.clip(np.round(add), -255, 255)), 0, 255).astype(np.uint8)
    values = converted[..., channel]
    for table in ((add_table, mul_table) if add_first else (mul_table, add_table)):
        values = table[values]
    converted[..., channel] = values
    return cv2.cvtColor(converted, back)


def enhance_sharpness(image: np.ndarray, factor: float) -> np.ndarray:
    """imgaug ``pillike.EnhanceSharpness`` = Pillow's ``ImageEnhance.Sharpness``."""
    from PIL import ImageEnhance

    return np.asarray(ImageEnhance.Sharpness(Image.fromarray(image)).enhance(float(factor)))


def add_to_hue_and_saturation(image: np.ndarray, hue: int, saturation: int) -> np.ndarray:
    """imgaug ``AddToHueAndSaturation``: in OpenCV's HSV, hue += ``int(hue / 255 * 180)`` modulo 180 and
    saturation += ``saturation`` (clipped); ``hue`` and ``saturation`` in [-255, 255]."""
    hsv = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2HSV)
    shift = int(np.int32(np.float32(hue) / np.float32(255.0) * np.float32(180)))
    levels = np.arange(256, dtype=np.int16)
    hsv[..., 0] = np.mod(levels + shift, 180).astype(np.uint8)[hsv[..., 0]]
    hsv[..., 1] = np.clip(levels + int(saturation), 0, 255).astype(np.uint8)[hsv[..., 1]]
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def solarize(image: np.ndarray, threshold: float) -> np.ndarray:
    """imgaug ``Solarize`` (an ``Invert`` above a threshold): ``255 - v`` where ``v >= int(threshold)``
    (imgaug's ``uint8`` table truncates the threshold)."""
    return np.where(image >= int(threshold), 255 - image, image).astype(np.uint8)


def posterize(image: np.ndarray, bits: int) -> np.ndarray:
    """imgaug ``Posterize``: keep the ``bits`` highest bits (``floor(v / 2**(8-bits)) * 2**(8-bits)``)."""
    return image & np.uint8((0xFF << (8 - int(bits))) & 0xFF)


def invert(image: np.ndarray) -> np.ndarray:
    """imgaug ``Invert``: ``255 - v``."""
    return (255 - image).astype(np.uint8)


def autocontrast(image: np.ndarray, cutoff: int) -> np.ndarray:
    """imgaug ``pillike.Autocontrast`` = Pillow's ``ImageOps.autocontrast(cutoff)``."""
    from PIL import ImageOps

    return np.asarray(ImageOps.autocontrast(Image.fromarray(image), cutoff=int(cutoff)))


def equalize(image: np.ndarray) -> np.ndarray:
    """imgaug ``pillike.Equalize`` = Pillow's ``ImageOps.equalize``."""
    from PIL import ImageOps

    return np.asarray(ImageOps.equalize(Image.fromarray(image)))


def rotate(image: np.ndarray, degrees: float) -> np.ndarray:
    """imgaug ``Affine(rotate=degrees)``: about the centre ``(W/2 - 0.5, H/2 - 0.5)``, bilinear
    (``cv2.warpAffine``), black outside."""
    h, w = image.shape[:2]
    cx, cy = w / 2.0 - 0.5, h / 2.0 - 0.5
    angle = np.deg2rad(float(degrees))
    cos, sin = np.cos(angle), np.sin(angle)
    matrix = np.array([[cos, -sin, cx - cos * cx + sin * cy], [sin, cos, cy - sin * cx - cos * cy]])
    return cv2.warpAffine(np.ascontiguousarray(image), matrix, (w, h), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))


#: The authors' ten augmenters (``randAugmenter``), each drawing its parameters as imgaug does.
CODE_AUGMENTATIONS = {
    "gamma": lambda x, rng: gamma_contrast(x, rng.uniform(0.5, 2.0, size=x.shape[-1])),
    "brightness": lambda x, rng: multiply_and_add_to_brightness(
        x, rng.uniform(0.8, 1.2), rng.uniform(-30, 30), list(BRIGHTNESS_SPACES)[int(rng.integers(6))],
        add_first=bool(rng.integers(2))),
    "sharpness": lambda x, rng: enhance_sharpness(x, rng.uniform(0.0, 2.0)),
    "hue_saturation": lambda x, rng: add_to_hue_and_saturation(x, int(rng.integers(-50, 51)), int(rng.integers(-50, 51))),
    "solarize": lambda x, rng: solarize(x, rng.uniform(32, 128)) if rng.random() < 0.5 else x,
    "posterize": lambda x, rng: posterize(x, int(rng.integers(1, 9))),
    "invert": lambda x, rng: invert(x),
    "autocontrast": lambda x, rng: autocontrast(x, int(rng.integers(0, 21))),
    "equalize": lambda x, rng: equalize(x),
    "rotate": lambda x, rng: rotate(x, rng.uniform(-45, 45)),
}
#: The paper's seven ("equalize, sharpness, auto-contrast, solarize, posterize, invert, gamma-contrast").
PAPER_AUGMENTATIONS = ("equalize", "sharpness", "autocontrast", "solarize", "posterize", "invert", "gamma")
#: ``augmentation_pool`` values.
AUGMENTATION_POOLS = {"code": tuple(CODE_AUGMENTATIONS), "paper": PAPER_AUGMENTATIONS}


def augment(image: np.ndarray, rng: np.random.Generator, n_ops: int = 3, pool: str = "code") -> np.ndarray:
    """Apply ``n_ops`` distinct augmentations of ``pool``, drawn without replacement, in the drawn order.

    Parameters
    ----------
    image : numpy.ndarray
        (H, W, 3) ``uint8`` RGB.
    rng : numpy.random.Generator
    n_ops : int
        3 in the authors' code, 2 in the paper's text.
    pool : str
        ``code`` (the authors' ten imgaug augmenters) or ``paper`` (the paper's seven).

    Returns
    -------
    numpy.ndarray
        (H, W, 3) ``uint8``.
    """
    names = AUGMENTATION_POOLS[pool]
    x = np.ascontiguousarray(image, dtype=np.uint8)
    for i in rng.choice(len(names), size=min(n_ops, len(names)), replace=False):
        x = np.ascontiguousarray(CODE_AUGMENTATIONS[names[int(i)]](x, rng), dtype=np.uint8)
    return x


def grid_shuffle(image: np.ndarray, rng: np.random.Generator, grid: int = 8, mode: str = "strips") -> np.ndarray:
    """Rearrange an (H, W, C) image on a ``grid`` x ``grid`` grid.

    ``mode="strips"`` is the authors' code: the image is cut into vertical strips ``W // grid``
    wide (a narrower last one when ``grid`` does not divide ``W``); the even-numbered strips are
    shuffled among themselves and put first, then the odd-numbered ones, shuffled; then the same
    with horizontal strips, after one shuffle of all of them. ``mode="cells"`` is the paper's text
    ("divided into an 8 x 8 grid and randomly rearranged"): the 64 cells in a uniformly random order
    (a border that the grid does not cover keeps its pixels).
    """
    if mode == "cells":
        h, w, c = image.shape
        ch, cw = h // grid, w // grid
        cells = image[:ch * grid, :cw * grid].reshape(grid, ch, grid, cw, c).transpose(0, 2, 1, 3, 4).reshape(-1, ch, cw, c)
        cells = cells[rng.permutation(len(cells))]
        out = image.copy()
        out[:ch * grid, :cw * grid] = cells.reshape(grid, grid, ch, cw, c).transpose(0, 2, 1, 3, 4).reshape(
            ch * grid, cw * grid, c)
        return out
    if mode != "strips":
        raise ValueError(f"grid_shuffle mode must be 'strips' or 'cells', not {mode!r}")

    def shuffled(parts: list) -> list:
        return [parts[int(i)] for i in rng.permutation(len(parts))]

    def alternate(parts: list, axis: int) -> np.ndarray:
        return np.concatenate((np.concatenate(shuffled(parts[::2]), axis=axis),
                               np.concatenate(shuffled(parts[1::2]), axis=axis)), axis=axis)

    h, w = image.shape[:2]
    step_w, step_h = max(int(w / grid), 1), max(int(h / grid), 1)
    columns = alternate(np.split(image, range(step_w, w, step_w), axis=1), axis=1)
    rows = shuffled(np.split(columns, range(step_h, h, step_h), axis=0))
    return alternate(rows, axis=0)


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
    augmentation_pool: str = "code"
    grid_shuffle: str = "strips"
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
        source = augment(textures.sample(rng), rng, config.augmentations, config.augmentation_pool)
    else:
        # The authors augment the uint8 image and shuffle its grid (self-augmentation).
        own = np.clip(np.round(image.transpose(1, 2, 0) * 255), 0, 255).astype(np.uint8)
        source = grid_shuffle(augment(own, rng, config.augmentations, config.augmentation_pool), rng,
                              mode=config.grid_shuffle)
    source = source.transpose(2, 0, 1).astype(np.float32) / 255.0
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
           "TextureSource", "augment", "grid_shuffle", "gamma_contrast", "multiply_and_add_to_brightness",
           "enhance_sharpness", "add_to_hue_and_saturation", "solarize", "posterize", "invert", "autocontrast",
           "equalize", "rotate", "CODE_AUGMENTATIONS", "PAPER_AUGMENTATIONS", "AUGMENTATION_POOLS",
           "BRIGHTNESS_SPACES", "SynthesisConfig", "synthesize_one", "EpochBatches",
           "AnomalyTrainingSet", "SynthesisSourceError", "DTD_URL", "FOREGROUND_URL", "FOREGROUND_RULES",
           "ANOMALY_SAMPLING", "TRAIN_SAMPLING"]
