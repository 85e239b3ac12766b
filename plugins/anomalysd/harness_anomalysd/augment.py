"""Photometric and geometric augmentation of the few shots (Sec. 5.1: contrast, brightness,
scaling and rotation). The paper gives no magnitudes; they are settings."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def augment(images: torch.Tensor, generator: torch.Generator, brightness: float = 0.2, contrast: float = 0.2,
            scale: tuple[float, float] = (0.9, 1.1), rotation: float = 15.0) -> torch.Tensor:
    """Randomly jitter brightness and contrast, then scale and rotate each image.

    Parameters
    ----------
    images : torch.Tensor
        (B, 3, H, W) in [0, 1].
    generator : torch.Generator
        Source of the random draws (on the CPU).
    brightness, contrast : float
        Multiplicative factors drawn from ``[1 - v, 1 + v]``; contrast scales around each image's mean.
    scale : (float, float)
        Range of the zoom factor.
    rotation : float
        Maximum absolute rotation angle in degrees.

    Returns
    -------
    torch.Tensor
        (B, 3, H, W) in [0, 1]; borders uncovered by the transform are filled by reflection.
    """
    b = images.shape[0]

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return (torch.rand(b, generator=generator) * (hi - lo) + lo).to(images.device, images.dtype)

    x = images * uniform(1 - brightness, 1 + brightness).view(b, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * uniform(1 - contrast, 1 + contrast).view(b, 1, 1, 1) + mean).clamp(0, 1)
    angle = uniform(-rotation, rotation) * (math.pi / 180.0)
    zoom = uniform(*scale)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    zeros = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zeros], 1), torch.stack([sin, cos, zeros], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
