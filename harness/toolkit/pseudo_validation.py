"""Pseudo-validation: choosing hyperparameters without test images.

A method that selects hyperparameters (LafitE's tau and K, AnomalySD's lambda) must not look at
test images. :func:`split_holdout` sets aside a seeded part of each category's training images,
which the method then uses for nothing else (not in its memory bank, not in its training set),
and :func:`make_pseudo_validation` turns held-out images into a validation set: half stay
normal, half get a synthetic anomaly — a fragment cut from one normal image with a mask of
random shape (ellipse, rectangle, polygon or smooth blob), optionally flipped, pasted at another
place of another normal image of the same category. The pasted region is the ground truth.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw
from scipy import ndimage

from harness.data import TrainSet


@dataclass
class PseudoValidationSet:
    """Synthetic validation data.

    Attributes
    ----------
    images : torch.Tensor
        Float32 (N, 3, H, W) in [0, 1], like the images ``predict`` receives.
    masks : torch.Tensor
        Bool (N, H, W); all false for normal images.
    labels : torch.Tensor
        Int64 (N,): 1 for images with a pasted fragment.
    categories : list of str
    """

    images: torch.Tensor
    masks: torch.Tensor
    labels: torch.Tensor
    categories: list[str]

    def __len__(self) -> int:
        return len(self.labels)


def random_shape_mask(size: tuple[int, int], rng: np.random.Generator, min_frac: float = 0.08, max_frac: float = 0.3) -> np.ndarray:
    """A boolean mask holding one shape of random kind, size and position.

    Parameters
    ----------
    size : tuple of int
        (H, W).
    rng : numpy.random.Generator
    min_frac, max_frac : float
        Bounds of the shape's extent as a fraction of the image side.
    """
    h, w = size
    extent_h = max(2, int(rng.uniform(min_frac, max_frac) * h))
    extent_w = max(2, int(rng.uniform(min_frac, max_frac) * w))
    top = int(rng.integers(0, h - extent_h + 1))
    left = int(rng.integers(0, w - extent_w + 1))
    box = (left, top, left + extent_w - 1, top + extent_h - 1)
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    kind = rng.integers(0, 4)
    if kind == 0:
        draw.ellipse(box, fill=255)
    elif kind == 1:
        draw.rectangle(box, fill=255)
    elif kind == 2:
        n = int(rng.integers(3, 8))
        xs = rng.uniform(box[0], box[2], n)
        ys = rng.uniform(box[1], box[3], n)
        order = np.argsort(np.arctan2(ys - ys.mean(), xs - xs.mean()))
        draw.polygon([(float(xs[i]), float(ys[i])) for i in order], fill=255)
    else:
        # A thresholded smoothed noise field gives an irregular, blob-like region.
        noise = ndimage.gaussian_filter(rng.standard_normal((extent_h, extent_w)), sigma=max(1.0, min(extent_h, extent_w) / 6))
        blob = noise > np.quantile(noise, 0.5)
        patch = np.zeros((h, w), dtype=bool)
        patch[top:top + extent_h, left:left + extent_w] = blob
        if patch.any():
            return patch
        draw.ellipse(box, fill=255)
    return np.asarray(canvas) > 0


def paste_fragment(target: np.ndarray, donor: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Cut ``donor[mask]`` and paste it onto ``target`` at a random offset.

    Parameters
    ----------
    target, donor : numpy.ndarray
        (3, H, W) float images.
    mask : numpy.ndarray
        (H, W) bool, the fragment's shape in the donor.

    Returns
    -------
    image : numpy.ndarray
        The edited copy of ``target``.
    pasted : numpy.ndarray
        (H, W) bool, where the fragment landed.
    """
    _, h, w = target.shape
    ys, xs = np.nonzero(mask)
    dy = int(rng.integers(-ys.min(), h - ys.max()))
    dx = int(rng.integers(-xs.min(), w - xs.max()))
    fragment = donor[:, ys, xs]
    if rng.random() < 0.5:
        fragment = fragment[:, ::-1]
    out = target.copy()
    out[:, ys + dy, xs + dx] = fragment
    pasted = np.zeros((h, w), dtype=bool)
    pasted[ys + dy, xs + dx] = True
    return out, pasted


def split_holdout(train: TrainSet, fraction: float, seed: int, min_fit: int = 1, min_holdout: int = 2
                  ) -> tuple[TrainSet, TrainSet]:
    """Split each category's training images into a fit part and a held-out part, by seed.

    Parameters
    ----------
    train : TrainSet
        The job's training set.
    fraction : float
        Share of each category's images held out (rounded, at least ``min_holdout``, and never
        so many that fewer than ``min_fit`` remain; a category with fewer than ``min_fit + 1``
        images keeps them all for fitting).
    seed : int
        The draw depends on it and on the sorted sample keys only, so it is the same for every
        method and every run.
    min_fit, min_holdout : int

    Returns
    -------
    (fit, holdout) : tuple of TrainSet
        Disjoint, together the whole of ``train``; each in the original order.
    """
    held: set[int] = set()
    for category, indices in train.by_category().items():
        ordered = sorted(indices, key=lambda i: train.samples[i].key)
        n = len(ordered)
        k = max(int(round(fraction * n)), min_holdout) if fraction > 0 else 0
        k = min(k, n - min_fit)
        if k <= 0:
            continue
        rng = np.random.default_rng([int(seed), _stable(category)])
        held.update(ordered[i] for i in rng.choice(n, size=k, replace=False))
    fit = [i for i in range(len(train)) if i not in held]
    return train.subset(fit), train.subset(sorted(held))


def _stable(text: str) -> int:
    import zlib

    return zlib.crc32(text.encode("utf-8"))


def make_pseudo_validation(train: TrainSet, n_per_category: int = 8, seed: int = 0) -> PseudoValidationSet:
    """Build a pseudo-validation set from training images.

    Parameters
    ----------
    train : TrainSet
        The job's training set (normal images only).
    n_per_category : int
        Images per category; half normal, half anomalous (at least one of each when the category
        has two or more training images).
    seed : int

    Returns
    -------
    PseudoValidationSet
    """
    rng = np.random.default_rng(seed)
    images, masks, labels, cats = [], [], [], []
    for category, indices in train.by_category().items():
        if not indices:
            continue
        n_anomalous = max(1, n_per_category // 2) if len(indices) >= 2 else 0
        n_normal = max(1, n_per_category - n_anomalous)
        for _ in range(n_normal):
            image, _ = train[int(rng.choice(indices))]
            images.append(image.numpy()); masks.append(np.zeros(image.shape[1:], dtype=bool)); labels.append(0); cats.append(category)
        for _ in range(n_anomalous):
            a, b = rng.choice(indices, size=2, replace=False)
            target = train[int(a)][0].numpy()
            donor = train[int(b)][0].numpy()
            shape = random_shape_mask(target.shape[1:], rng)
            edited, pasted = paste_fragment(target, donor, shape, rng)
            images.append(edited); masks.append(pasted); labels.append(1); cats.append(category)
    if not images:
        raise ValueError("cannot build a pseudo-validation set from an empty training set")
    return PseudoValidationSet(
        images=torch.from_numpy(np.stack(images)).float(),
        masks=torch.from_numpy(np.stack(masks)),
        labels=torch.tensor(labels, dtype=torch.long),
        categories=cats,
    )
