"""Choosing the noise strength λ of each category without test images (Sec. 5.1: "the noise strength
λ is specified for each category"; the paper does not say how it was chosen).

Where the pseudo-validation images come from (``lambda_selection``)
-------------------------------------------------------------------
``holdout`` (the ``paper`` value)
    :func:`harness.toolkit.pseudo_validation.split_holdout` sets aside ``lambda_holdout_fraction``
    of each category's shots (at least one, and never the last one: a category needs a shot to
    be fine-tuned on and to build its prototype bank). The model that scores the candidates is
    fine-tuned on the remaining shots only and its prototype banks hold only them, so the held
    out images are new to it, as test images are. With ``lambda_refit`` the final model is then
    fine-tuned again, from the same initial weights, on all k shots with the chosen λ (the
    usual "select on a held-out split, refit on everything"), so a k-shot result still uses k
    shots. A 1-shot category has nothing to hold out: it falls back to ``augmented`` (recorded
    per category as ``seen``).
``augmented``
    Pseudo-validation images are made from augmented copies of the shots the model was
    fine-tuned on. Cheap (one fit), but the model has seen their content, which favours large
    λ (a memorised shot is reproduced even from much noise, unlike an unseen normal image).
``fixed``
    No selection: ``noise_strength`` (and ``noise_strength_per_category``) for every category.

In every mode the validation images of a category are ``lambda_val_per_category`` augmented
copies (the fine-tuning augmentation, drawn with their own seed) of its source images; half
receive a synthetic anomaly by :func:`harness.toolkit.pseudo_validation.make_pseudo_validation`
(a randomly shaped fragment of another copy pasted elsewhere). A category whose source is a
single image still gets distinct normal copies and anomalies, because the copies differ.

Criterion: per category and candidate, the mean of the image AUROC (max of the smoothed map,
the rule ``predict`` uses) and the pixel AUROC of the pseudo-validation set; the pixel AUROC
over all pixels is much less coarse than an image AUROC over a handful of images. Ties go to
the candidate closest to ``noise_strength``, then to the smaller λ.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from harness import Sample, TrainSet
from harness.data import ImageCache
from harness.metrics import auroc
from harness.toolkit.pseudo_validation import PseudoValidationSet, make_pseudo_validation

SELECTION_MODES = ("holdout", "augmented", "fixed")


def augmented_copies(images: torch.Tensor, categories: Sequence[str], copies: int, seed: int,
                     augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor]) -> TrainSet:
    """``copies`` augmented versions per category of the given images, as an in-memory training set.

    Parameters
    ----------
    images : torch.Tensor
        (N, 3, H, W) in [0, 1].
    categories : sequence of str
        The category of each image.
    copies : int
        Copies per category (the category's images are cycled through).
    seed : int
    augment : callable
        ``augment(batch, generator)``, the fine-tuning augmentation.

    Returns
    -------
    TrainSet
        Keys ``<category>/train/good/copy-<i>``; images quantised to ``uint8`` like decoded ones.
    """
    by_category: dict[str, list[int]] = {}
    for i, c in enumerate(categories):
        by_category.setdefault(c, []).append(i)
    generator = torch.Generator().manual_seed(int(seed))
    samples = []
    for c, indices in by_category.items():
        order = [indices[j % len(indices)] for j in range(copies)]
        batch = augment(images[order].detach().cpu().float(), generator)
        arrays = (batch.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        for j, array in enumerate(arrays):
            samples.append(Sample(f"{c}/train/good/copy-{j:03d}", c, "train", 0, "good",
                                  image=lambda a=array: a))
    size = tuple(images.shape[-2:])
    return TrainSet("anomalysd-pseudo-validation", samples, size, ImageCache(max_bytes=0))


def pseudo_validation(images: torch.Tensor, categories: Sequence[str], per_category: int, seed: int,
                      augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor]) -> PseudoValidationSet:
    """The pseudo-validation set of the module docstring (half normal, half with a pasted fragment)."""
    copies = augmented_copies(images, categories, max(int(per_category), 2), seed, augment)
    return make_pseudo_validation(copies, int(per_category), seed)


def criterion(maps: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor) -> dict[str, float]:
    """Image AUROC, pixel AUROC and their mean for one category's pseudo-validation images."""
    image = auroc(scores.double().cpu().numpy(), labels.cpu().numpy())
    pixel = auroc(maps.double().flatten().cpu().numpy(), masks.flatten().cpu().numpy())
    return {"image_auroc": float(image), "pixel_auroc": float(pixel), "criterion": float((image + pixel) / 2)}


def choose(results: Mapping[float, Mapping[str, float]], default: float) -> float:
    """The best candidate by ``criterion``; ties to the one closest to ``default``, then the smaller."""
    def key(lam: float):
        value = results[lam]["criterion"]
        return (-(value if np.isfinite(value) else -1.0), abs(lam - default), lam)

    return min(results, key=key)


__all__ = ["SELECTION_MODES", "augmented_copies", "choose", "criterion", "pseudo_validation"]
