"""Image scores computed from anomaly maps."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pooled_max(maps: torch.Tensor, kernel: int, rounds: int = 1) -> torch.Tensor:
    """Image scores: the maximum after ``rounds`` successive ``kernel`` x ``kernel`` average poolings.

    Each pooling has stride 1 and no padding, so a map of side ``S`` shrinks to ``S - kernel + 1``
    per round (DiAD's 8 rounds of 8 x 8 take a 256 map to 200; UniAD's and LafitE's single
    16 x 16 round takes 224 to 209). A window larger than the map is clipped to the map, and the
    rounds stop once the map is a single value.

    Parameters
    ----------
    maps : torch.Tensor
        (B, H, W) anomaly maps.
    kernel : int
        Window side in pixels; 1 (or less) leaves the map as it is.
    rounds : int
        Number of successive poolings.

    Returns
    -------
    torch.Tensor
        (B,) float32.
    """
    x = maps[:, None].float()
    k = max(int(kernel), 1)
    for _ in range(int(rounds)):
        if k == 1 or x.shape[-1] * x.shape[-2] == 1:
            break
        x = F.avg_pool2d(x, kernel_size=(min(k, x.shape[-2]), min(k, x.shape[-1])), stride=1)
    return x.flatten(1).amax(dim=1)


__all__ = ["pooled_max"]
