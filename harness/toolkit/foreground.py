"""Otsu thresholding and the foreground of an object image (where synthetic defects may go).

One Otsu implementation for every method: the split of a 256-bin histogram that maximises the
between-class variance, returned as the *upper edge* of the last bin of the lower class, so that
``values > threshold`` is exactly the upper class (returning the bin centre, as some
implementations do, moves the values of that bin above the centre into the upper class).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of ``values`` (any shape, flattened).

    Parameters
    ----------
    values : numpy.ndarray
    bins : int
        Histogram bins over the values' range.

    Returns
    -------
    float
        ``t`` such that ``values > t`` is Otsu's upper class; the maximum value when all values
        are equal (then nothing is above it).
    """
    flat = np.asarray(values, dtype=np.float64).ravel()
    if flat.size == 0 or flat.min() == flat.max():
        return float(flat.max()) if flat.size else 0.0
    hist, edges = np.histogram(flat, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    s0 = np.cumsum(hist * centres)
    with np.errstate(divide="ignore", invalid="ignore"):
        between = w0 * w1 * (s0 / w0 - (s0[-1] - s0) / w1) ** 2
    between = np.nan_to_num(between[:-1], nan=-1.0)
    return float(edges[int(np.argmax(between)) + 1])


def border_distance(image: np.ndarray) -> np.ndarray:
    """Colour distance of every pixel to the median colour of the image border.

    Parameters
    ----------
    image : numpy.ndarray
        (3, H, W) float in [0, 1].

    Returns
    -------
    numpy.ndarray
        (H, W) float.
    """
    border = np.concatenate([image[:, 0, :], image[:, -1, :], image[:, :, 0], image[:, :, -1]], axis=1)
    background = np.median(border, axis=1)
    return np.sqrt(((image - background[:, None, None]) ** 2).sum(0))


def object_foreground(image: np.ndarray, fill: bool = True) -> np.ndarray:
    """The object in an image of an object on a plain background.

    A pixel is foreground when its colour distance to the border's median colour is above the
    Otsu threshold of those distances; with ``fill``, a closing and hole filling keep dark or
    flat parts inside the object in it. An image of one flat colour is all foreground.

    Parameters
    ----------
    image : numpy.ndarray
        (3, H, W) float in [0, 1].
    fill : bool

    Returns
    -------
    numpy.ndarray of bool
        (H, W).
    """
    distance = border_distance(image)
    if float(distance.max() - distance.min()) < 1e-6:
        return np.ones(distance.shape, dtype=bool)
    fg = distance > otsu_threshold(distance)
    if fill:
        fg = ndimage.binary_fill_holes(ndimage.binary_closing(fg, iterations=2))
    return fg


__all__ = ["otsu_threshold", "border_distance", "object_foreground"]
