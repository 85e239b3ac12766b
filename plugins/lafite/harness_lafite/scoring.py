"""Anomaly maps and image scores from a reconstruction (LafitE, Eq. 12 and the text after it).

- map: squared L2 distance between the reconstructed and the original feature slices at every
  position, upsampled bilinearly to the image size, smoothed with a Gaussian (sigma = 4 px);
- image score: the maximum of the map after average pooling. The paper does not give the
  pooling window; it follows UniAD, whose evaluation ("max" with ``avgpool_size: [16, 16]``,
  stride 1) is used here: a 16 x 16 window, a setting (``score_pool_size``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from harness.ops import gaussian_blur, resize_maps


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


def pooled_max(maps: torch.Tensor, pool: int) -> torch.Tensor:
    """Image scores: maximum of the maps after a ``pool`` x ``pool`` average pooling (stride 1).

    Parameters
    ----------
    maps : torch.Tensor
        (B, H, W).
    pool : int
        Window side in pixels, clipped to the map size; 1 (or less) takes the plain maximum.

    Returns
    -------
    torch.Tensor
        (B,).
    """
    pool_h, pool_w = min(max(int(pool), 1), maps.shape[-2]), min(max(int(pool), 1), maps.shape[-1])
    pooled = F.avg_pool2d(maps[:, None], kernel_size=(pool_h, pool_w), stride=1)
    return pooled.flatten(1).amax(dim=1)
