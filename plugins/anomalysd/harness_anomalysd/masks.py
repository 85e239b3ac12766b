"""Mask proposals of AnomalySD: training masks, multi-scale grids, prototype-guided masks.

Conventions: a mask is a float tensor with 1 on the pixels to inpaint (``m`` in the paper) and 0
elsewhere; the masked image is ``(1 - m) ⊙ x``.

- :func:`random_training_mask` — Sec. 4.1 "Training Mask Design": random rectangles ``m_r`` kept
  when ``IoU(m_r, m_f) > γ`` with the object's foreground ``m_f``, ``γ`` drawn from {0, 0.2, 0.5};
- :func:`grid_masks` — Sec. 4.2, multi-scale masks ``M_ij^(k)``: the ``k × k`` patches of the
  image, each masked on its own;
- :func:`variance_threshold` and :func:`prototype_mask` — Eqs. 14–15 with the paper's threshold
  ``r = argmin_r Var{E ≥ r} + Var{E < r}``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from harness.toolkit.foreground import object_foreground


def grid_masks(height: int, width: int, k: int, device=None) -> torch.Tensor:
    """The ``k × k`` patch masks of one scale.

    Patch borders are ``round(i * H / k)``, so the patches tile the image exactly even when ``k``
    does not divide the side: every pixel lies in exactly one mask.

    Parameters
    ----------
    height, width : int
    k : int
        Patches per side (the paper uses 1, 2, 4, 8).

    Returns
    -------
    torch.Tensor
        (k*k, H, W) float, row-major patch order.
    """
    if k < 1 or k > min(height, width):
        raise ValueError(f"grid scale k={k} must be between 1 and the image side ({min(height, width)})")
    ys = [round(i * height / k) for i in range(k + 1)]
    xs = [round(j * width / k) for j in range(k + 1)]
    masks = torch.zeros(k * k, height, width, device=device)
    for i in range(k):
        for j in range(k):
            masks[i * k + j, ys[i]:ys[i + 1], xs[j]:xs[j + 1]] = 1.0
    return masks


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def random_rectangle(height: int, width: int, rng: np.random.Generator,
                     side_range: tuple[float, float] = (0.1, 1.0)) -> np.ndarray:
    """A random axis-aligned rectangle, sides a uniform fraction ``side_range`` of the image's."""
    h = max(1, int(round(rng.uniform(*side_range) * height)))
    w = max(1, int(round(rng.uniform(*side_range) * width)))
    y = int(rng.integers(0, height - h + 1))
    x = int(rng.integers(0, width - w + 1))
    rect = np.zeros((height, width), dtype=bool)
    rect[y:y + h, x:x + w] = True
    return rect


def random_training_mask(foreground: np.ndarray, rng: np.random.Generator, gammas=(0.0, 0.2, 0.5),
                         side_range: tuple[float, float] = (0.1, 1.0),
                         max_tries: int = 200) -> tuple[np.ndarray, float]:
    """A foreground-aware random rectangle: ``m ∈ {m_r | IoU(m_r, m_f) > γ}``.

    ``γ`` is drawn from ``gammas`` with equal probability (the paper: 0, 0.2, 0.5). Rectangles are
    drawn until one passes; after ``max_tries`` the best one seen is returned (a tiny foreground
    can make IoU > 0.5 unreachable for the rectangle sizes allowed).

    Parameters
    ----------
    foreground : numpy.ndarray
        (H, W) boolean foreground ``m_f``.
    rng : numpy.random.Generator
    gammas : sequence of float
    side_range : (float, float)
        Rectangle sides as fractions of the image's; the upper bound must allow IoU > 0.5 with a
        whole-image foreground (textures), i.e. rectangles of more than half the image.
    max_tries : int

    Returns
    -------
    mask : numpy.ndarray
        (H, W) boolean.
    gamma : float
        The threshold drawn.
    """
    height, width = foreground.shape
    gamma = float(gammas[int(rng.integers(len(gammas)))])
    best, best_iou = None, -1.0
    for _ in range(max_tries):
        rect = random_rectangle(height, width, rng, side_range)
        iou = mask_iou(rect, foreground)
        if iou > gamma:
            return rect, gamma
        if iou > best_iou:
            best, best_iou = rect, iou
    return best, gamma


def foreground_mask(image: np.ndarray, whole: bool = False, min_fraction: float = 0.02) -> np.ndarray:
    """The object's foreground ``m_f`` of an image (the paper does not say how it obtains it).

    Objects: :func:`harness.toolkit.foreground.object_foreground` (an Otsu split of the colour
    distance to the border's median colour, holes filled; the toolkit's one Otsu). Textures
    (``whole``; the dataset's texture categories) and images whose split is degenerate (less
    than ``min_fraction`` of the image on either side) are all foreground.

    Parameters
    ----------
    image : numpy.ndarray
        (3, H, W) float in [0, 1].
    whole : bool
        Treat the whole image as foreground (texture categories).
    min_fraction : float

    Returns
    -------
    numpy.ndarray
        (H, W) boolean.
    """
    _, height, width = image.shape
    if whole:
        return np.ones((height, width), dtype=bool)
    fg = object_foreground(image)
    fraction = float(fg.mean())
    if fraction < min_fraction or fraction > 1 - min_fraction:
        return np.ones((height, width), dtype=bool)
    return fg


def variance_threshold(values: torch.Tensor) -> torch.Tensor:
    """The paper's threshold: ``r = argmin_r Var{E ≥ r} + Var{E < r}`` (Sec. 4.2).

    The sum of the two (population) variances is unweighted, as the paper writes it (unlike
    Otsu's criterion, which weights each side by its size). Every split of the sorted values
    into two non-empty sets is tried; ``r`` is placed midway between the largest value below
    and the smallest value above the best split.

    Parameters
    ----------
    values : torch.Tensor
        Any shape; flattened.

    Returns
    -------
    torch.Tensor
        Scalar threshold ``r`` (the largest value when all values are equal).
    """
    v = values.detach().flatten().double().sort().values
    n = v.numel()
    if n < 2:
        return v[-1].to(values.dtype)
    csum = torch.cumsum(v, 0)
    csq = torch.cumsum(v * v, 0)
    # Split after position i-1: lower = v[:i], upper = v[i:], for i = 1 .. n-1.
    i = torch.arange(1, n, device=v.device, dtype=torch.double)
    lo_sum, lo_sq = csum[:-1], csq[:-1]
    hi_sum, hi_sq = csum[-1] - lo_sum, csq[-1] - lo_sq
    var_lo = lo_sq / i - (lo_sum / i) ** 2
    var_hi = hi_sq / (n - i) - (hi_sum / (n - i)) ** 2
    cost = var_lo + var_hi
    # A split between equal values is not a threshold: "E < r" would cut a tie in two.
    valid = v[1:] > v[:-1]
    cost = torch.where(valid, cost, torch.full_like(cost, float("inf")))
    # index_select with the argmin tensor (not int(argmin), nor v[tensor], which reads it on the
    # host) keeps this on the device.
    best = torch.argmin(cost).view(1)
    pair = v.index_select(0, torch.cat([best, best + 1]))
    # Midway between the two sets, so that {E >= r} and {E > r} (Eq. 15) are the same set.
    r = (pair[0] + pair[1]) / 2
    return torch.where(v[0] == v[-1], v[-1], r).to(values.dtype)


def prototype_mask(error: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Eq. 15: ``M^(p) = Upsample(1[E > r])`` with the variance threshold ``r`` of each map.

    Parameters
    ----------
    error : torch.Tensor
        (B, h, w) prototype error maps ``E``.
    size : (int, int)
        Image size (H, W).

    Returns
    -------
    torch.Tensor
        (B, H, W) float masks (nearest-neighbour upsampling keeps them binary).
    """
    binary = torch.stack([(e > variance_threshold(e)).float() for e in error])
    return F.interpolate(binary[:, None], size=tuple(size), mode="nearest")[:, 0]
