"""Anomaly maps and image scores from a reconstruction (LafitE, Eq. 12 and the text after it).

- map: squared L2 distance between the reconstructed and the original feature slices at every
  position, upsampled bilinearly to the image size, smoothed with a Gaussian (sigma = 4 px);
- image score: the maximum of the map after average pooling (:func:`image_scores`, the toolkit's
  :func:`harness.toolkit.scoring.pooled_max`, one round). The paper does not give the pooling
  window; it follows UniAD, whose evaluation ("max" with ``avgpool_size: [16, 16]``, stride 1) is
  used here: a 16 x 16 window, a setting (``score_pool_size``).
"""

from __future__ import annotations

import torch

from harness.toolkit.ops import gaussian_blur, resize_maps
from harness.toolkit.scoring import pooled_max


def reconstruction_maps(original: torch.Tensor, reconstruction: torch.Tensor, size: tuple[int, int],
                        sigma: float) -> torch.Tensor:
    """Pixel-level anomaly maps (Eq. 12).

    Parameters
    ----------
    original, reconstruction : torch.Tensor
        (B, C, h, w) feature tensors x_0 and x_0^rec.
    size : tuple of int
        (H, W) of the images.
    sigma : float
        Gaussian smoothing in pixels (0: none).

    Returns
    -------
    torch.Tensor
        (B, H, W), float32.
    """
    error = ((reconstruction.float() - original.float()) ** 2).sum(dim=1)
    return gaussian_blur(resize_maps(error, tuple(size)), float(sigma))


def image_scores(maps: torch.Tensor, pool: int) -> torch.Tensor:
    """Image scores: the maximum of the maps after one ``pool`` x ``pool`` average pooling (stride 1)."""
    return pooled_max(maps, int(pool), rounds=1)
