"""Heat overlays: an image, its ground-truth outline and an anomaly map blended on top.

The map is scaled to [0, 1] with a range given by the caller (in the report: one range per
method and category, the minimum and maximum over that method's saved maps of the category, so
a normal and an anomalous image of one method are on the same scale), coloured with a
perceptual colour map and blended over the image; the ground-truth defect regions are outlined
on top (one pixel, 8-connected boundary) so the map and the truth can be compared at a glance.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np
from scipy import ndimage

#: Colour map of the heat overlay and its opacity.
COLORMAP, ALPHA = "inferno", 0.55
#: Colour of the ground-truth outline (RGB).
OUTLINE = (0, 255, 120)


@lru_cache(maxsize=4)
def _lut(name: str) -> np.ndarray:
    """A 256-entry RGB lookup table of a matplotlib colour map."""
    import matplotlib

    cmap = matplotlib.colormaps[name]
    return (cmap(np.linspace(0.0, 1.0, 256))[:, :3] * 255.0 + 0.5).astype(np.uint8)


def heat(amap: np.ndarray, low: float, high: float, colormap: str = COLORMAP) -> np.ndarray:
    """The map coloured: RGB uint8 (H, W, 3), ``low`` → the first colour, ``high`` → the last."""
    span = float(high) - float(low)
    scaled = (np.asarray(amap, dtype=np.float64) - float(low)) / span if span > 0 else np.zeros(np.shape(amap))
    index = np.clip(np.round(scaled * 255.0), 0, 255).astype(np.uint8)
    return _lut(colormap)[index]


def outline(mask: np.ndarray) -> np.ndarray:
    """The boundary pixels of a boolean mask's regions (inside the regions, 8-connected)."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask
    inner = ndimage.binary_erosion(mask, structure=np.ones((3, 3), dtype=bool), border_value=0)
    return mask & ~inner


def draw_outline(image: np.ndarray, mask: np.ndarray, colour: Sequence[int] = OUTLINE) -> np.ndarray:
    """A copy of ``image`` with the mask's outline drawn in ``colour``."""
    out = np.array(image, dtype=np.uint8, copy=True)
    out[outline(mask)] = np.asarray(colour, dtype=np.uint8)
    return out


def overlay(image: np.ndarray, amap: np.ndarray, mask: np.ndarray | None, low: float, high: float,
            alpha: float = ALPHA) -> np.ndarray:
    """``image`` with the coloured map blended in and the ground truth outlined (RGB uint8).

    Parameters
    ----------
    image : uint8 array (H, W, 3)
        At the map's size.
    amap : array (H, W)
    mask : bool array (H, W) or None
    low, high : float
        The map values shown as the coldest and the hottest colour.
    alpha : float
        Opacity of the heat layer.
    """
    image = np.asarray(image, dtype=np.uint8)
    if image.shape[:2] != np.shape(amap):
        raise ValueError(f"image {image.shape[:2]} and map {np.shape(amap)} differ in size")
    blended = (1.0 - alpha) * image.astype(np.float64) + alpha * heat(amap, low, high).astype(np.float64)
    out = np.clip(blended + 0.5, 0, 255).astype(np.uint8)
    return draw_outline(out, mask) if mask is not None else out


def upscale(image: np.ndarray, side: int) -> np.ndarray:
    """Enlarge a small image by an integer factor (nearest neighbour) so its long side is about ``side``."""
    factor = max(1, int(side) // max(image.shape[:2]))
    if factor == 1:
        return image
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def save_png(image: np.ndarray, path) -> None:
    """Write an RGB uint8 image as PNG atomically."""
    from harness.engine.support.fsutil import atomic_writer
    from PIL import Image

    with atomic_writer(path) as handle:
        Image.fromarray(np.ascontiguousarray(image)).save(handle, format="PNG")


__all__ = ["ALPHA", "COLORMAP", "OUTLINE", "draw_outline", "heat", "outline", "overlay", "save_png", "upscale"]
