"""Small tensor operations several methods share (normalisation, smoothing, resizing, k-NN).

Constant tensors (normalisation vectors, Gaussian kernels, reflection indices) are built once
per device, dtype and size and kept: building them per call copied them from the host at every
``predict`` (a blocking copy on CUDA).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_normalize(images: torch.Tensor) -> torch.Tensor:
    """Normalise (B, 3, H, W) images in [0, 1] with the ImageNet mean and std."""
    mean, std = _imagenet_constants(images.device, images.dtype)
    return (images - mean) / std


@functools.lru_cache(maxsize=32)
def _imagenet_constants(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(IMAGENET_MEAN, device=device, dtype=dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device, dtype=dtype).view(1, 3, 1, 1)
    return mean, std


@functools.lru_cache(maxsize=64)
def _cached_kernel(sigma: float, truncate: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return gaussian_kernel1d(sigma, truncate, device=device, dtype=dtype)


@functools.lru_cache(maxsize=64)
def _reflect_index(size: int, radius: int, device: torch.device) -> torch.Tensor:
    # Reflect padding larger than the image is not supported by F.pad: fold indices instead.
    idx = torch.arange(-radius, size + radius, device=device)
    period = 2 * size
    idx = torch.remainder(idx, period)
    return torch.where(idx >= size, period - 1 - idx, idx)


def gaussian_kernel1d(sigma: float, truncate: float = 4.0, device=None, dtype=torch.float32) -> torch.Tensor:
    """Normalised 1-D Gaussian of radius ``int(truncate * sigma + 0.5)`` (SciPy's choice)."""
    radius = int(truncate * float(sigma) + 0.5)
    x = torch.arange(-radius, radius + 1, device=device, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / float(sigma)) ** 2)
    return (kernel / kernel.sum()).to(dtype)


def gaussian_blur(maps: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Separable Gaussian smoothing of anomaly maps, matching ``scipy.ndimage.gaussian_filter``.

    Borders use SciPy's default ``reflect`` mode (half-sample symmetric), so results agree with
    the reference implementations of the papers that smooth with SciPy.

    Parameters
    ----------
    maps : torch.Tensor of shape (B, H, W) or (B, 1, H, W)
    sigma : float
        Standard deviation in pixels; ``0`` returns the maps unchanged.
    truncate : float, default 4.0

    Returns
    -------
    torch.Tensor
        Same shape as ``maps``.
    """
    if sigma <= 0:
        return maps
    squeeze = maps.ndim == 3
    x = maps[:, None] if squeeze else maps
    kernel = _cached_kernel(float(sigma), float(truncate), x.device, x.dtype)
    radius = kernel.numel() // 2
    for dim in (2, 3):
        x = x.index_select(dim, _reflect_index(int(x.shape[dim]), radius, x.device))
        weight = kernel.view(1, 1, -1, 1) if dim == 2 else kernel.view(1, 1, 1, -1)
        channels = x.shape[1]
        x = F.conv2d(x, weight.expand(channels, 1, *weight.shape[2:]), groups=channels)
    return x[:, 0] if squeeze else x


def resize_maps(maps: torch.Tensor, size: tuple[int, int] | int, mode: str = "bilinear") -> torch.Tensor:
    """Resize (B, H, W) or (B, C, H, W) maps to ``size`` (``align_corners=False``)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    squeeze = maps.ndim == 3
    x = maps[:, None] if squeeze else maps
    kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    x = F.interpolate(x, size=size, mode=mode, **kwargs)
    return x[:, 0] if squeeze else x


def nearest_neighbour_distance(queries: torch.Tensor, bank: torch.Tensor, k: int = 1,
                               chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distances from each query row to its ``k`` nearest rows of ``bank``.

    Queries are processed in chunks so that the (chunk, K) distance matrix bounds the memory.

    Parameters
    ----------
    queries : torch.Tensor of shape (M, D)
    bank : torch.Tensor of shape (K, D)
    k : int, default 1
    chunk : int, default 4096

    Returns
    -------
    distances : torch.Tensor of shape (M, k), ascending
    indices : torch.LongTensor of shape (M, k)
    """
    k = min(k, bank.shape[0])
    dists, idxs = [], []
    for start in range(0, queries.shape[0], chunk):
        d = torch.cdist(queries[start:start + chunk], bank)
        values, indices = torch.topk(d, k, dim=1, largest=False)
        dists.append(values)
        idxs.append(indices)
    if not dists:
        return queries.new_zeros((0, k)), torch.zeros((0, k), dtype=torch.long, device=queries.device)
    return torch.cat(dists), torch.cat(idxs)

