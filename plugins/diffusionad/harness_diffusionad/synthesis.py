"""Anomaly synthesis for DiffusionAD training (Perlin masks x foreground, texture sources).

A synthetic anomaly is made in four steps, following the authors' code:

1. **Mask**: 2-D Perlin noise at a random lattice scale (``2**a`` by ``2**b`` cells, ``a, b`` drawn
   in ``[scale_exp[0], scale_exp[1])``), rotated by a random angle in [-90, 90] degrees,
   thresholded (``> 0.5``), and intersected with the foreground. Empty masks are redrawn.
2. **Foreground** (the ``foreground`` setting):

   - ``"whole"``: every pixel.
   - ``"otsu"``: pixels whose colour differs from the background colour (the median of the
     image border) by more than an Otsu threshold on that distance, slightly closed and filled.
     The authors ship precomputed foreground masks per image instead; this rule needs no files.
   - ``"auto"`` (default): ``"whole"`` for categories named in ``texture_categories``, and
     whenever the Otsu foreground covers more than 20 % of the border pixels or less than 5 % or
     more than 95 % of the image (a texture, or an object filling the frame); ``"otsu"``
     otherwise.
3. **Source**: an external texture (an image from the DTD folder given as ``dtd_root``, or, when
   none is given, a procedurally generated texture) after three random photometric
   augmentations, or, for objects with probability 1/2, the image itself after the same kind of
   augmentation and shuffled on an 8x8 grid of cells. Textures use external sources only.
4. **Blend** inside the mask with opacity ``beta ~ U(0.2, 0.8)``:
   ``x' = x (1 - m) + m ((1 - beta) source + beta x)``.

:func:`synthesize_batch` makes exactly half of a batch (rounded down) synthetic and leaves the
other half normal, instead of the authors' independent coin per image, so every batch trains both
the noise loss (normal half) and the segmentation of defects (synthetic half).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from scipy import ndimage

#: Image suffixes accepted in a DTD folder.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


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


def perlin_mask(shape: tuple[int, int], rng: np.random.Generator, scale_exp: tuple[int, int] = (0, 6),
                threshold: float = 0.5) -> np.ndarray:
    """A thresholded, randomly scaled and rotated Perlin-noise mask.

    Parameters
    ----------
    shape : tuple of int
        (H, W).
    rng : numpy.random.Generator
    scale_exp : tuple of int
        Lattice cells per axis are ``2**k`` with ``k`` drawn in ``[scale_exp[0], scale_exp[1])``.
    threshold : float
        Noise level above which a pixel is anomalous.

    Returns
    -------
    numpy.ndarray of bool
        (H, W); may be empty.
    """
    cells = (2 ** int(rng.integers(*scale_exp)), 2 ** int(rng.integers(*scale_exp)))
    noise = perlin_noise(shape, cells, rng)
    noise = ndimage.rotate(noise, float(rng.uniform(-90, 90)), reshape=False, order=1, mode="constant", cval=-1.0)
    return noise > threshold


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold: the cut that maximises the between-class variance of ``values``.

    Parameters
    ----------
    values : numpy.ndarray
        Any shape; flattened.
    bins : int
        Histogram bins.

    Returns
    -------
    float
    """
    hist, edges = np.histogram(values.ravel(), bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    s0 = np.cumsum(hist * centres)
    with np.errstate(divide="ignore", invalid="ignore"):
        between = w0 * w1 * (s0 / w0 - (s0[-1] - s0) / w1) ** 2
    between = np.nan_to_num(between[:-1], nan=-1.0)
    return float(edges[int(np.argmax(between)) + 1])


def otsu_foreground(image: np.ndarray) -> np.ndarray:
    """Foreground of an object image: colours far from the border's median colour.

    Parameters
    ----------
    image : numpy.ndarray
        (3, H, W) float in [0, 1].

    Returns
    -------
    numpy.ndarray of bool
        (H, W).
    """
    border = np.concatenate([image[:, 0, :], image[:, -1, :], image[:, :, 0], image[:, :, -1]], axis=1)
    background = np.median(border, axis=1)
    distance = np.sqrt(((image - background[:, None, None]) ** 2).sum(0))
    if float(distance.max() - distance.min()) < 1e-6:
        return np.ones(distance.shape, dtype=bool)
    fg = distance > otsu_threshold(distance)
    # Closing and hole filling keep dark or flat parts inside an object in its foreground.
    fg = ndimage.binary_closing(fg, iterations=2)
    return ndimage.binary_fill_holes(fg)


def foreground_mask(image: np.ndarray, category: str, rule: str = "auto",
                    texture_categories: Sequence[str] = ()) -> np.ndarray:
    """Where synthetic defects may be placed (see the module docstring for the rules).

    Parameters
    ----------
    image : numpy.ndarray
        (3, H, W) float in [0, 1].
    category : str
    rule : str
        ``"auto"``, ``"otsu"`` or ``"whole"``.
    texture_categories : sequence of str
        Categories that ``"auto"`` treats as textures.

    Returns
    -------
    numpy.ndarray of bool
        (H, W).
    """
    whole = np.ones(image.shape[1:], dtype=bool)
    if rule == "whole" or (rule == "auto" and category in set(texture_categories)):
        return whole
    if rule not in ("auto", "otsu"):
        raise ValueError(f"unknown foreground rule {rule!r}; use 'auto', 'otsu' or 'whole'")
    fg = otsu_foreground(image)
    if rule == "auto":
        edge = np.concatenate([fg[0], fg[-1], fg[:, 0], fg[:, -1]])
        # An object lies on a background that the border shows; when much of the border counts as
        # foreground, or the split is lopsided, the image is a texture (or a frame-filling object).
        if edge.mean() > 0.2 or not 0.05 <= fg.mean() <= 0.95:
            return whole
    return fg


def procedural_texture(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A random texture image when no DTD folder is available.

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
        A folder searched recursively for images (the DTD ``images/`` tree, or its parent).
        ``None``, an empty string or a folder without images gives procedural textures.
    size : tuple of int
        (H, W) textures are resized to.
    max_cached : int
        Decoded DTD images kept in memory.
    """

    def __init__(self, dtd_root: str | Path | None, size: tuple[int, int], max_cached: int = 2000) -> None:
        self.size = tuple(size)
        self.paths: list[Path] = []
        if dtd_root:
            root = Path(dtd_root).expanduser()
            if not root.is_dir():
                raise FileNotFoundError(f"dtd_root {root} is not a folder; give the DTD images folder or leave it empty "
                                        "to use procedural textures")
            self.paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        self._cache: dict[int, np.ndarray] = {}
        self._max_cached = max_cached

    @property
    def kind(self) -> str:
        """``"dtd"`` when images were found on disk, else ``"procedural"``."""
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


def _photometric_ops(rng: np.random.Generator) -> list:
    """The pool of random photometric augmentations (torchvision), each ready to apply."""
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
    """Apply ``n_ops`` distinct photometric augmentations, chosen at random, in random order.

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


def synthesize_one(image: np.ndarray, category: str, rng: np.random.Generator, textures: TextureSource,
                   foreground: str = "auto", texture_categories: Sequence[str] = (),
                   scale_exp: tuple[int, int] = (0, 6), threshold: float = 0.5,
                   beta_range: tuple[float, float] = (0.2, 0.8), max_tries: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """Put one synthetic anomaly on ``image``.

    Parameters
    ----------
    image : numpy.ndarray
        (3, H, W) float in [0, 1].
    category : str
    rng : numpy.random.Generator
    textures : TextureSource
    foreground, texture_categories
        See :func:`foreground_mask`.
    scale_exp, threshold
        See :func:`perlin_mask`.
    beta_range : tuple of float
        Range of the opacity with which the normal image shows through the anomaly.
    max_tries : int
        Perlin masks drawn until one hits the foreground.

    Returns
    -------
    image : numpy.ndarray
        (3, H, W) float in [0, 1].
    mask : numpy.ndarray of bool
        (H, W), inside the foreground; empty only if every try missed it.
    """
    shape = image.shape[1:]
    fg = foreground_mask(image, category, foreground, texture_categories)
    mask = np.zeros(shape, dtype=bool)
    for _ in range(max_tries):
        mask = perlin_mask(shape, rng, scale_exp, threshold) & fg
        if mask.any():
            break
    is_texture = bool(fg.all())
    if is_texture or rng.random() < 0.5:
        source = augment(textures.sample(rng), rng)
    else:
        source = grid_shuffle(augment(image, rng), rng)
    beta = float(rng.uniform(*beta_range))
    m = mask[None].astype(np.float32)
    out = image * (1 - m) + m * ((1 - beta) * source + beta * image)
    return out.astype(np.float32), mask


def synthesize_batch(images: torch.Tensor, categories: Sequence[str], rng: np.random.Generator,
                     textures: TextureSource, **kwargs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Make half of a batch (rounded down, chosen at random) synthetic anomalies.

    Parameters
    ----------
    images : torch.Tensor
        (B, 3, H, W) float in [0, 1].
    categories : sequence of str
    rng : numpy.random.Generator
    textures : TextureSource
    **kwargs
        Passed to :func:`synthesize_one`.

    Returns
    -------
    images : torch.Tensor
        (B, 3, H, W), on the input's device.
    masks : torch.Tensor
        (B, 1, H, W) float in {0, 1}.
    labels : torch.Tensor
        (B,) long, 1 where an anomaly was synthesised (its mask may, rarely, be empty).
    """
    b = images.shape[0]
    src = images.detach().cpu().float().numpy()
    out = src.copy()
    masks = np.zeros((b, 1) + src.shape[2:], dtype=np.float32)
    labels = np.zeros(b, dtype=np.int64)
    for i in rng.permutation(b)[: b // 2]:
        out[i], mask = synthesize_one(src[i], categories[i], rng, textures, **kwargs)
        masks[i, 0] = mask
        labels[i] = 1
    device = images.device
    return torch.from_numpy(out).to(device), torch.from_numpy(masks).to(device), torch.from_numpy(labels).to(device)
