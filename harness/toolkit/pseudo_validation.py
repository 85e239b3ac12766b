"""Pseudo-validation: choosing hyperparameters without test images.

A method that selects hyperparameters (LafitE's tau and K, AnomalySD's lambda) must not look at
test images. :func:`split_holdout` sets aside a seeded part of each category's training images,
which the method then uses for nothing else (not in its memory bank, not in its training set),
and :func:`make_pseudo_validation` turns held-out images into a validation set of normal images
and synthetic anomalies.

The synthesis follows LafitE (Section 3.4, inspired by CutPaste): "we first initiate multiple
masks of different shapes and sizes ... then randomly rotate and combine these masks to produce
a set of fragments from each normal sample ... and stick these extracted fragments to another
randomly selected normal sample; these fragments are labelled as anomalous regions". Here each
anomaly combines 2 to 4 masks (``masks_per_anomaly``), each of a random kind (ellipse,
rectangle, polygon or smooth blob), size (8-30 % of the side) and rotation (any angle); each
masked fragment is cut from one normal image (the donor) and pasted at a random place of another
normal image of the same category (the target). The union of the pasted regions is the ground
truth. The paper gives neither the number of masks nor where the fragments land (its Fig. 4
only shows examples): 2-4 masks and an independent random position per fragment are this
module's choices; a fragment pasted at its own place would be invisible on aligned objects.
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


def rotate_mask(mask: np.ndarray, angle: float) -> np.ndarray:
    """``mask`` rotated by ``angle`` degrees about its centroid (nearest neighbour, clipped at the border).

    Parameters
    ----------
    mask : numpy.ndarray
        (H, W) bool.
    angle : float
        Counter-clockwise, in degrees.

    Returns
    -------
    numpy.ndarray
        (H, W) bool; the input unchanged when it is empty or the rotation would leave nothing.
    """
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return mask
    centre = np.array([ys.mean(), xs.mean()])
    theta = np.deg2rad(float(angle))
    cos, sin = np.cos(theta), np.sin(theta)
    # affine_transform maps output coordinates to input ones: the inverse rotation about the centre.
    inverse = np.array([[cos, sin], [-sin, cos]])
    offset = centre - inverse @ centre
    rotated = ndimage.affine_transform(mask.astype(np.uint8), inverse, offset=offset, order=0, mode="constant",
                                       cval=0) > 0
    return rotated if rotated.any() else mask


def paste_fragment(target: np.ndarray, donor: np.ndarray, mask: np.ndarray, rng: np.random.Generator,
                   flip: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Cut ``donor[mask]`` and paste it onto ``target`` at a random offset.

    Parameters
    ----------
    target, donor : numpy.ndarray
        (3, H, W) float images.
    mask : numpy.ndarray
        (H, W) bool, the fragment's shape in the donor.
    rng : numpy.random.Generator
    flip : bool
        Mirror the fragment's pixels horizontally with probability 1/2 (the earlier synthesis;
        :func:`make_pseudo_validation` does not flip).

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
    if flip and rng.random() < 0.5:
        fragment = fragment[:, ::-1]
    out = target.copy()
    out[:, ys + dy, xs + dx] = fragment
    pasted = np.zeros((h, w), dtype=bool)
    pasted[ys + dy, xs + dx] = True
    return out, pasted


def synthesize_anomaly(target: np.ndarray, donor: np.ndarray, rng: np.random.Generator,
                       masks_per_anomaly: tuple[int, int] = (2, 4), rotate: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic anomaly as LafitE describes it (see the module docstring).

    Parameters
    ----------
    target, donor : numpy.ndarray
        (3, H, W) float images of the same category.
    rng : numpy.random.Generator
    masks_per_anomaly : (int, int)
        Inclusive range of the number of masks combined.
    rotate : bool
        Rotate every mask by a uniformly drawn angle.

    Returns
    -------
    image : numpy.ndarray
        ``target`` with the fragments pasted.
    mask : numpy.ndarray
        (H, W) bool, the union of the pasted regions.
    """
    low, high = int(masks_per_anomaly[0]), int(masks_per_anomaly[1])
    if not 1 <= low <= high:
        raise ValueError(f"masks_per_anomaly must be (low, high) with 1 <= low <= high, got {masks_per_anomaly!r}")
    image = target.copy()
    union = np.zeros(target.shape[1:], dtype=bool)
    for _ in range(int(rng.integers(low, high + 1))):
        shape = random_shape_mask(target.shape[1:], rng)
        if rotate:
            shape = rotate_mask(shape, float(rng.uniform(0.0, 360.0)))
        image, pasted = paste_fragment(image, donor, shape, rng, flip=False)
        union |= pasted
    return image, union


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


def make_pseudo_validation(train: TrainSet, n_per_category: int = 8, seed: int = 0, *,
                           masks_per_anomaly: tuple[int, int] = (2, 4), rotate: bool = True,
                           distinct_normals: bool = False) -> PseudoValidationSet:
    """Build a pseudo-validation set from (held-out) training images.

    Parameters
    ----------
    train : TrainSet
        Normal images only: the part :func:`split_holdout` held out, so that no image of the set
        is also used for fitting.
    n_per_category : int
        Images per category; half synthetic anomalies (at least one when the category has two or
        more images), the rest normal.
    seed : int
    masks_per_anomaly : (int, int)
        Range of the number of masks each anomaly combines (:func:`synthesize_anomaly`).
    rotate : bool
        Rotate the masks.
    distinct_normals : bool
        Never repeat a normal image: a category then contributes at most as many normal images
        as it has (the anomalies are still ``n_per_category // 2``). False draws the normal
        images with replacement (the earlier behaviour).

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
        if distinct_normals:
            normals = rng.permutation(indices)[:min(n_normal, len(indices))]
        else:
            normals = [rng.choice(indices) for _ in range(n_normal)]
        for index in normals:
            image, _ = train[int(index)]
            images.append(image.numpy()); masks.append(np.zeros(image.shape[1:], dtype=bool)); labels.append(0); cats.append(category)
        # Every image serves as a target in turn before any repeats; the donor is another image.
        targets = np.concatenate([rng.permutation(indices) for _ in range(-(-n_anomalous // len(indices)))]) \
            if n_anomalous else []
        for a in targets[:n_anomalous]:
            b = rng.choice([i for i in indices if i != a])
            edited, pasted = synthesize_anomaly(train[int(a)][0].numpy(), train[int(b)][0].numpy(), rng,
                                                masks_per_anomaly, rotate)
            images.append(edited); masks.append(pasted); labels.append(1); cats.append(category)
    if not images:
        raise ValueError("cannot build a pseudo-validation set from an empty training set")
    return PseudoValidationSet(
        images=torch.from_numpy(np.stack(images)).float(),
        masks=torch.from_numpy(np.stack(masks)),
        labels=torch.tensor(labels, dtype=torch.long),
        categories=cats,
    )
