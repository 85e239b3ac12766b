"""The two sub-networks of DiffusionAD.

- :func:`build_denoiser`: the pixel-space noise predictor, a diffusers ``UNet2DModel`` laid out
  like the authors' guided-diffusion style UNet (for 256 px: base 128 channels, multipliers
  (1, 1, 2, 2, 4, 4), two residual blocks per level, self-attention at 32, 16 and 8 px with 4
  heads, residual blocks for down- and up-sampling as the authors' ``biggan_updown=True``).
- :class:`SegmentationSubNetwork`: a DRAEM-style discriminative U-Net that takes the query image
  concatenated with its one-step reconstruction (6 channels) and returns a one-channel map in
  [0, 1].

Both are built from layers only: no file is read, so they can be created on the meta device.
"""

from __future__ import annotations

from typing import Sequence

import torch
from diffusers import UNet2DModel
from diffusers.models.attention_processor import Attention
from torch import nn


def build_denoiser(image_size: int, base_channels: int = 128, channel_mults: Sequence[float] = (1, 1, 2, 2, 4, 4),
                   layers_per_block: int = 2, attention_resolutions: Sequence[int] = (32, 16, 8), num_heads: int = 4,
                   time_conditioning: str = "scale_shift", resample: str = "resnet",
                   norm_groups: int = 32) -> UNet2DModel:
    """Build the noise-prediction UNet.

    Parameters
    ----------
    image_size : int
        Side of the (square) input; level ``i`` works at ``image_size / 2**i`` pixels.
    base_channels : int
        Channels of the first level; level ``i`` has ``base_channels * channel_mults[i]``.
    channel_mults : sequence of float
        One multiplier per resolution level.
    layers_per_block : int
        Residual blocks per level on the way down (one more on the way up, as usual).
    attention_resolutions : sequence of int
        Feature-map sides (in pixels) at which a self-attention layer follows each residual block.
        The bottleneck always has attention, like the authors' middle block.
    num_heads : int
        Attention heads at every attention layer, whatever its width.
    time_conditioning : str
        ``"scale_shift"`` (FiLM-like, the issue's choice) or ``"default"`` (additive, what the
        authors' ``ResBlock`` does); passed to diffusers as ``resnet_time_scale_shift``.
    resample : str
        ``"resnet"`` (residual blocks that resample, the authors' BigGAN-style up/down) or
        ``"conv"`` (strided / nearest + conv).
    norm_groups : int
        Groups of every GroupNorm; must divide every level's width.

    Returns
    -------
    diffusers.UNet2DModel
        ``model(x_t, t).sample`` is the predicted noise, same shape as ``x_t``.
    """
    widths = tuple(int(base_channels * m) for m in channel_mults)
    attn = set(int(r) for r in attention_resolutions)
    down, up = [], []
    for level in range(len(widths)):
        side = image_size // (2 ** level)
        down.append("AttnDownBlock2D" if side in attn else "DownBlock2D")
    for level in reversed(range(len(widths))):
        side = image_size // (2 ** level)
        up.append("AttnUpBlock2D" if side in attn else "UpBlock2D")
    model = UNet2DModel(
        sample_size=image_size, in_channels=3, out_channels=3, block_out_channels=widths,
        layers_per_block=layers_per_block, down_block_types=tuple(down), up_block_types=tuple(up),
        # diffusers derives heads from one head width; the head count is reset below.
        attention_head_dim=max(1, widths[-1] // num_heads), resnet_time_scale_shift=time_conditioning,
        norm_num_groups=norm_groups, downsample_type=resample, upsample_type=resample,
        add_attention=True, time_embedding_type="positional", flip_sin_to_cos=True, freq_shift=0,
    )
    set_attention_heads(model, num_heads)
    return model


def set_attention_heads(model: nn.Module, num_heads: int) -> None:
    """Give every attention layer of ``model`` exactly ``num_heads`` heads.

    The authors use a fixed head count (4) at every width, while diffusers' ``UNet2DModel`` fixes
    the head *width*. The projections do not depend on the head count, so only the split changes
    (scaled dot-product attention takes its scale from the head width).

    Parameters
    ----------
    model : torch.nn.Module
    num_heads : int
    """
    for module in model.modules():
        if isinstance(module, Attention):
            inner = module.to_q.out_features
            if inner % num_heads:
                raise ValueError(f"attention width {inner} is not divisible by {num_heads} heads")
            module.heads = num_heads
            module.scale = (inner // num_heads) ** -0.5


def _double_conv(c_in: int, c_out: int) -> nn.Sequential:
    """Two 3x3 conv + BatchNorm + ReLU layers, the unit of the segmentation U-Net."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
    )


def _up_conv(c_in: int, c_out: int) -> nn.Sequential:
    """Bilinear x2 up-sampling followed by a 3x3 conv + BatchNorm + ReLU."""
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
        nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
    )


class SegmentationSubNetwork(nn.Module):
    """Discriminative U-Net mapping (query, reconstruction) to an anomaly map.

    The encoder has ``depth`` double-conv stages separated by 2x max-pooling; stage ``i`` has
    ``base_channels * min(2**i, 8)`` channels (for ``depth=6``: 1, 2, 4, 8, 8, 8 times the base, as
    in the authors' network). The decoder up-samples, concatenates the encoder feature of the same
    size, and applies a double conv whose width is that of the next shallower stage, back to full
    resolution; a 3x3 conv and a sigmoid give the map.

    Parameters
    ----------
    in_channels : int
        6: the query and its reconstruction, stacked.
    out_channels : int
        1: the anomaly map.
    base_channels : int
        Width of the first stage (64 in the authors' network).
    depth : int
        Number of encoder stages (6 in the authors' network); the input side must be divisible
        by ``2 ** (depth - 1)``.
    """

    def __init__(self, in_channels: int = 6, out_channels: int = 1, base_channels: int = 64, depth: int = 6) -> None:
        super().__init__()
        widths = [base_channels * min(2 ** i, 8) for i in range(depth)]
        self.widths = widths
        self.encoder = nn.ModuleList()
        c_prev = in_channels
        for w in widths:
            self.encoder.append(_double_conv(c_prev, w))
            c_prev = w
        self.pool = nn.MaxPool2d(2)
        self.ups = nn.ModuleList()
        self.decoder = nn.ModuleList()
        c_prev = widths[-1]
        for level in reversed(range(depth - 1)):
            # Like the authors' decoder, each stage already narrows to the width one level further
            # down while up-sampling, so the concatenation is (narrower, skip) rather than (skip, skip).
            out = widths[max(level - 1, 0)]
            self.ups.append(_up_conv(c_prev, out))
            self.decoder.append(_double_conv(out + widths[level], out))
            c_prev = out
        self.head = nn.Conv2d(widths[0], out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the anomaly map, shape (B, out_channels, H, W), values in (0, 1).

        Parameters
        ----------
        x : torch.Tensor
            (B, in_channels, H, W).
        """
        skips = []
        h = x
        for i, stage in enumerate(self.encoder):
            if i:
                h = self.pool(h)
            h = stage(h)
            skips.append(h)
        for up, dec, skip in zip(self.ups, self.decoder, reversed(skips[:-1])):
            h = dec(torch.cat([up(h), skip], dim=1))
        return torch.sigmoid(self.head(h))
