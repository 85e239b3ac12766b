"""Anomaly scoring of AnomalySD (Sec. 4.3): LPIPS distance maps and their fusion.

- :func:`build_lpips` — the ``lpips`` package's AlexNet LPIPS, built with a *random* trunk so that
  construction never asks torchvision to download anything; :func:`load_alexnet_trunk` then
  copies ImageNet AlexNet weights from a file on disk into it (the ``paper`` profile). The
  linear calibration weights ``w^(l)`` ship with the package and are always loaded.
- :func:`distance_map` — Eqs. 16–17: ``D(x, x̂) = Σ_l Upsample(D^(l))`` with
  ``D^(l)_{h,w} = Σ_c w_c^(l) (φ̂_c^(l)(x) − φ̂_c^(l)(x̂))²`` on unit-normalised features (the
  package's ``spatial=True`` output; the paper writes the weight inside the square, as the LPIPS
  paper does, while both implementations weight the squared difference);
- :func:`scale_map` (Eq. 18), :func:`harmonic_mean` (Eq. 19), :func:`fuse` (Eq. 21).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from harness.toolkit.backbones import read_state


#: The torchvision ImageNet AlexNet file (its name carries the first 8 hex digits of its sha256).
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
ALEXNET_SHA256_PREFIX = "7be5be79"


def build_lpips() -> torch.nn.Module:
    """AlexNet LPIPS (v0.1) with spatial output and a randomly initialised trunk.

    ``pnet_rand=True`` makes the package call ``torchvision.models.alexnet`` without weights, so
    nothing is downloaded; the package's own linear weights (``weights/v0.1/alex.pth``) are read
    from the installed package. Works under ``torch.device("meta")`` (then nothing is loaded).
    """
    import lpips

    with warnings.catch_warnings():
        # torchvision's deprecated ``pretrained=`` argument, and meta-device no-op copies.
        warnings.simplefilter("ignore")
        model = lpips.LPIPS(net="alex", version="0.1", spatial=True, pnet_rand=True, verbose=False)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def lpips_linear_weights() -> Path:
    """The LPIPS v0.1 AlexNet calibration weights ``w^(l)`` shipped inside the ``lpips`` package."""
    import lpips

    return Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth"


def load_alexnet_trunk(model: torch.nn.Module, path: Path) -> None:
    """Copy torchvision ImageNet AlexNet weights (``features.i.*``) into an LPIPS trunk.

    The package splits ``alexnet().features`` into ``slice1 .. slice5`` keeping the layer
    indices, so ``features.3.weight`` goes to ``slice2.3.weight``.

    Raises
    ------
    ValueError
        When the file lacks a convolution of the trunk (not an AlexNet checkpoint).
    """
    state = read_state(Path(path))
    trunk = model.net
    target = trunk.state_dict()
    mapped = {}
    for key in target:
        _slice, index, leaf = key.split(".", 2)
        source = f"features.{index}.{leaf}"
        if source not in state:
            raise ValueError(f"{path} is not a torchvision AlexNet checkpoint: it has no {source!r}")
        mapped[key] = state[source]
    trunk.load_state_dict(mapped, strict=True)


def lpips_features(lpips_model: torch.nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """Unit-normalised AlexNet features ``φ̂^(l)`` of images in [0, 1], one tensor per layer.

    Computed once per test image and reused for each of its inpaintings.
    """
    import lpips

    outs = lpips_model.net(lpips_model.scaling_layer(images * 2 - 1))
    return [lpips.normalize_tensor(o) for o in outs]


def feature_distance(lpips_model: torch.nn.Module, feats_x: list[torch.Tensor], feats_y: list[torch.Tensor],
                     size: tuple[int, int]) -> torch.Tensor:
    """Eq. 17 from precomputed features: ``Σ_l Upsample(lin_l((φ̂(x) − φ̂(x̂))²))``, (B, H, W)."""
    total = 0
    for lin, fx, fy in zip(lpips_model.lins, feats_x, feats_y):
        layer = lin((fx - fy) ** 2)
        total = total + F.interpolate(layer, size=tuple(size), mode="bilinear", align_corners=False)
    return total[:, 0]


def distance_map(lpips_model: torch.nn.Module, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Eq. 17: LPIPS feature distance between images and their inpaintings, at image size.

    Equal to the package's ``LPIPS(spatial=True)(x, x_hat, normalize=True)``.

    Parameters
    ----------
    lpips_model : torch.nn.Module
        From :func:`build_lpips`.
    x, x_hat : torch.Tensor
        (B, 3, H, W) in [0, 1].

    Returns
    -------
    torch.Tensor
        (B, H, W).
    """
    return feature_distance(lpips_model, lpips_features(lpips_model, x), lpips_features(lpips_model, x_hat),
                            x.shape[-2:])


def scale_map(masks: torch.Tensor, distances: torch.Tensor) -> torch.Tensor:
    """Eq. 18: ``S^(k) = Σ_ij M_ij^(k) ⊙ D(x, x̂_ij^(k))``.

    Parameters
    ----------
    masks : torch.Tensor
        (n, H, W): the scale's masks.
    distances : torch.Tensor
        (B, n, H, W): the distance map of each image's inpainting under each mask.

    Returns
    -------
    torch.Tensor
        (B, H, W).
    """
    return (masks[None] * distances).sum(1)


def harmonic_mean(maps: Sequence[torch.Tensor], eps: float = 1e-8) -> torch.Tensor:
    """Eq. 19: ``S_ms = |K| (Σ_k 1 / S^(k))^-1``, pixel-wise.

    ``eps`` keeps a pixel where one scale's distance is exactly zero finite (it then tends to 0,
    which is what the harmonic mean does in the limit).
    """
    stack = torch.stack(list(maps))
    return stack.shape[0] / (1.0 / stack.clamp_min(eps)).sum(0)


def fuse(multi_scale: torch.Tensor, prototype: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """Eq. 21: ``S_map = (1 − α) S_ms + α S_pg``; ``S_ms`` alone when there is no prototype map.

    Zero-shot has no normal image to build prototypes from, so only the multi-scale map exists.
    """
    if prototype is None:
        return multi_scale
    return (1.0 - alpha) * multi_scale + alpha * prototype
