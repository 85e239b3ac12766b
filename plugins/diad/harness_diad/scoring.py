"""DiAD's scoring: feature distances between input and reconstruction, and the image score.

Anomaly map (the authors' ``test.py`` with ``cal_anomaly_map(..., amap_mode='a')``)
    The input and its reconstruction pass through the same ImageNet ResNet-50 (timm's
    ``resnet50.a1_in1k``); at each chosen stage (f2-f4: 64 x 64, 32 x 32, 16 x 16 for a 256 x 256
    input) the map is one minus the channel-wise cosine similarity, upsampled bilinearly
    (``align_corners=True``) to the input size; the maps are summed and smoothed with a Gaussian
    of sigma 5 px (SciPy's filter).
Image score (paper, "8 rounds of ... average pooling with a size of 8 x 8")
    The smoothed map is average-pooled 8 times with an 8 x 8 window at stride 1 (a 256 map
    shrinks to 200 x 200; the appendix ablation notes that its best settings all end at that
    size, which only stride 1 gives) and the maximum is taken:
    :func:`harness.toolkit.scoring.pooled_max`, the harness's one implementation (the authors'
    ``EvalImageMax`` in ``utils/eval_helper.py``).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def feature_distance_map(inputs: Sequence[torch.Tensor], recons: Sequence[torch.Tensor],
                         size: tuple[int, int]) -> torch.Tensor:
    """Sum over feature levels of ``1 - cos`` between input and reconstruction features.

    Parameters
    ----------
    inputs, recons : sequence of torch.Tensor
        Features (B, C_l, h_l, w_l) of the inputs and of their reconstructions, level by level.
    size : (int, int)
        Output size (the input image's).

    Returns
    -------
    torch.Tensor
        (B, H, W).
    """
    if len(inputs) != len(recons):
        raise ValueError(f"got {len(inputs)} input and {len(recons)} reconstruction feature levels")
    total = None
    for f_in, f_out in zip(inputs, recons):
        distance = 1 - F.cosine_similarity(f_in, f_out, dim=1)
        distance = F.interpolate(distance[:, None], size=size, mode="bilinear", align_corners=True)[:, 0]
        total = distance if total is None else total + distance
    return total


__all__ = ["feature_distance_map"]
