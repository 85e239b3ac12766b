"""Centre crops, and anomaly maps of a crop put back on the full image.

Several methods look at a centre crop of the image their data pipeline resized (PatchCore's
256 -> 224, Dinomaly's and INP-Former's 448 -> 392), while the harness scores every pixel of the
image. One rule for all of them: the crop is taken with torchvision's ``CenterCrop`` rounding,
and its map is pasted back at the same place, the pixels outside it holding a fill value
(by default each image's lowest score, so the border ring never outranks anything the method saw).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch


class CropBox(NamedTuple):
    """Where a crop lies in its image: top-left corner and size, in pixels."""

    top: int
    left: int
    height: int
    width: int


def center_crop_box(image_size: Sequence[int], crop: int | Sequence[int]) -> CropBox:
    """The centre crop of an (H, W) image, as torchvision's ``CenterCrop`` places it.

    Parameters
    ----------
    image_size : (int, int)
        (H, W) of the image.
    crop : int or (int, int)
        Side (or (h, w)) of the crop; 0 or a crop not smaller than the image keeps all of it.
        A crop larger than the image along one axis keeps that axis whole (no padding).

    Returns
    -------
    CropBox
    """
    h, w = (int(v) for v in image_size)
    ch, cw = (int(crop), int(crop)) if isinstance(crop, (int, float)) else (int(crop[0]), int(crop[1]))
    if ch <= 0 or cw <= 0:
        return CropBox(0, 0, h, w)
    ch, cw = min(ch, h), min(cw, w)
    # torchvision rounds the offset of an odd difference half up: int(round((H - h) / 2.0)).
    return CropBox(int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0)), ch, cw)


def center_crop(images: torch.Tensor, box: CropBox) -> torch.Tensor:
    """The pixels of ``box`` of every image of a (..., H, W) tensor (a view, no copy)."""
    return images[..., box.top:box.top + box.height, box.left:box.left + box.width]


def paste_crop(maps: torch.Tensor, box: CropBox, image_size: Sequence[int], fill: str | float = "min") -> torch.Tensor:
    """Put (B, h, w) maps of a crop back into (B, H, W) maps of the full image.

    Parameters
    ----------
    maps : torch.Tensor
        (B, box.height, box.width) anomaly maps of the crop.
    box : CropBox
        Where the crop lies in the image.
    image_size : (int, int)
        (H, W) of the full image.
    fill : "min" or float
        Value outside the crop: ``"min"`` = each image's lowest score in its crop (the border is
        scored as the most normal thing seen), or a constant.

    Returns
    -------
    torch.Tensor
        (B, H, W); ``maps`` itself when the crop is the whole image.
    """
    h, w = (int(v) for v in image_size)
    if (box.top, box.left, box.height, box.width) == (0, 0, h, w):
        return maps
    if tuple(maps.shape[-2:]) != (box.height, box.width):
        raise ValueError(f"maps of shape {tuple(maps.shape[-2:])} do not fit a crop of {box.height} x {box.width}")
    b = maps.shape[0]
    if fill == "min":
        full = maps.flatten(1).amin(1).view(b, 1, 1).expand(b, h, w).clone()
    else:
        full = maps.new_full((b, h, w), float(fill))
    full[:, box.top:box.top + box.height, box.left:box.left + box.width] = maps
    return full
