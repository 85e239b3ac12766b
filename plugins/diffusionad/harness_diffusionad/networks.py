"""The two sub-networks of DiffusionAD, laid out exactly as the authors' code builds them.

- :func:`build_denoiser`: the pixel-space noise predictor, a diffusers ``UNet2DModel`` configured
  as the authors' guided-diffusion style ``UNetModel`` (HuiZhang0812/DiffusionAD,
  ``models/Recon_subnetwork.py``): a 3x3 input convolution, per level ``layers_per_block``
  residual blocks (each followed by self-attention at the listed feature sides), a *residual
  block that resamples* between levels (the authors' ``biggan_updown=True``: average pooling or
  nearest up-sampling inside the block), a middle block (residual, attention, residual), an up
  path with one more residual block per level on the concatenated skips, and GroupNorm, SiLU,
  3x3 convolution at the end. The time embedding is the authors' sinusoid (sine half first),
  two linear layers with SiLU, and is *added* to every residual block's features
  (``time_conditioning="additive"``). For 256 px and the authors' sizes the network has
  131,654,403 parameters, like theirs. Initialisation (``init="zero_out"``, the authors'):
  PyTorch's default for every layer, then the layers the authors wrap in ``zero_module`` are set
  to zero (:func:`zero_output_layers`): the last convolution of every residual block (``conv2``:
  their ``out_layers.3``, resampling blocks included), the output projection of every attention
  layer (``to_out.0``: their ``proj_out``) and the final convolution (``conv_out``: their
  ``out.2``). So a fresh UNet predicts zero noise and every block starts as the identity.
  ``init="default"`` keeps diffusers' initialisation (nothing zeroed).
- :class:`SegmentationSubNetwork`: the authors' discriminative U-Net (``models/Seg_subnetwork.py``)
  generalised to ``depth`` stages; at ``depth=6`` it is theirs, layer for layer.

:mod:`harness_diffusionad.convert` maps the authors' state_dicts onto these networks. Both are
built from layers only: no file is read, so they can be created on the meta device.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from diffusers import UNet2DModel
from diffusers.models.attention_processor import Attention
from torch import nn

#: ``resample`` values: ``resnet`` (residual resampling blocks, the authors') or ``conv``.
RESAMPLES = ("resnet", "conv")
#: ``time_conditioning`` values and what diffusers calls them.
TIME_CONDITIONINGS = {"additive": "default", "scale_shift": "scale_shift"}
#: ``init`` values: the authors' zeroed output layers, or diffusers' default initialisation.
INITS = ("zero_out", "default")


class SinusoidalTimesteps(nn.Module):
    """The authors' timestep embedding: ``[sin(t f), cos(t f)]``, ``f = exp(-ln(10000) i / (dim/2))``.

    diffusers' ``Timesteps`` gives the same values with ``flip_sin_to_cos=False`` up to float
    rounding of the frequencies (about 1e-5 at t = 999); this module computes them in the
    authors' order of operations, so that the golden test matches at 1e-4 with room to spare.

    Parameters
    ----------
    dim : int
        Embedding width (the UNet's base channels); even.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"the timestep embedding width must be even, got {dim}")
        self.dim = dim

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        """(B,) timesteps -> (B, dim) float32 embedding."""
        half = self.dim // 2
        step = math.log(10000) / half
        freqs = torch.exp(torch.arange(half, device=timesteps.device) * -step)
        args = torch.outer(timesteps.float(), freqs)
        return torch.cat((args.sin(), args.cos()), dim=-1)


def level_widths(base_channels: int, channel_mults: Sequence[float]) -> tuple[int, ...]:
    """Channels of each UNet level: ``base_channels * mult``."""
    return tuple(int(base_channels * m) for m in channel_mults)


def attention_levels(image_size: int, channel_mults: Sequence[float], attention_resolutions: Sequence[int]) -> list[bool]:
    """Whether each level has self-attention: its feature side ``image_size / 2**level`` is listed.

    The authors list resolutions as downsampling factors ``image_size // r``; the feature side at
    such a level is ``r``, so listing sides is the same rule.
    """
    sides = {int(r) for r in attention_resolutions}
    return [image_size // (2 ** level) in sides for level in range(len(channel_mults))]


def build_denoiser(image_size: int, base_channels: int = 128, channel_mults: Sequence[float] = (1, 1, 2, 2, 4, 4),
                   layers_per_block: int = 2, attention_resolutions: Sequence[int] = (32, 16, 8), num_heads: int = 4,
                   time_conditioning: str = "additive", resample: str = "resnet", norm_groups: int = 32,
                   dropout: float = 0.0, init: str = "zero_out") -> UNet2DModel:
    """Build the noise-prediction UNet.

    Parameters
    ----------
    image_size : int
        Side of the (square) input; level ``i`` works at ``image_size / 2**i`` pixels.
    base_channels : int
        Channels of the input convolution and of the time embedding's sinusoid (the time MLP
        is 4x as wide).
    channel_mults : sequence of float
        One multiplier per resolution level; the first must be 1 (as in every configuration of
        the authors' code that runs: their input convolution has ``base_channels`` outputs).
    layers_per_block : int
        Residual blocks per level on the way down (one more on the way up).
    attention_resolutions : sequence of int
        Feature-map sides (pixels) at which a self-attention layer follows each residual block.
        The middle block always has attention, as the authors'.
    num_heads : int
        Attention heads at every attention layer, whatever its width (the authors'
        ``n_heads=4, n_head_channels=-1``).
    time_conditioning : str
        ``"additive"`` (the authors' ``ResBlock``: the projected embedding is added) or
        ``"scale_shift"`` (FiLM, as in improved DDPM's ``use_scale_shift_norm``).
    resample : str
        ``"resnet"``: every level changes resolution with a residual block that average-pools or
        up-samples (nearest) inside (the authors' ``biggan_updown=True``, at every level);
        ``"conv"``: strided 3x3 convolution down, nearest up-sampling + 3x3 convolution up.
    norm_groups : int
        Groups of every GroupNorm (the authors' ``GroupNorm32``: 32); must divide every width.
    dropout : float
        Dropout in the residual blocks (the authors' ``args1.json``: 0).
    init : str
        ``"zero_out"``: the authors' ``zero_module`` layers start at zero
        (:func:`zero_output_layers`); ``"default"``: diffusers' initialisation.

    Returns
    -------
    diffusers.UNet2DModel
        ``model(x_t, t).sample`` is the predicted noise, same shape as ``x_t``.
    """
    if resample not in RESAMPLES:
        raise ValueError(f"resample must be one of {RESAMPLES}, not {resample!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, not {init!r}")
    if time_conditioning not in TIME_CONDITIONINGS:
        raise ValueError(f"time_conditioning must be one of {tuple(TIME_CONDITIONINGS)}, not {time_conditioning!r}")
    if float(channel_mults[0]) != 1.0:
        raise ValueError(f"channel_mults must start with 1 (got {tuple(channel_mults)}): the input convolution and "
                         "the time embedding have base_channels channels")
    widths = level_widths(base_channels, channel_mults)
    bad = [w for w in widths if w % norm_groups]
    if bad:
        raise ValueError(f"norm_groups={norm_groups} does not divide the level widths {bad}")
    attn = attention_levels(image_size, channel_mults, attention_resolutions)
    # diffusers' DownBlock2D / UpBlock2D ignore downsample_type / upsample_type and resample with
    # convolutions; the Resnet*sampleBlock2D variants resample with a residual block, like the
    # authors' BigGAN-style blocks. Attention levels use AttnDown/UpBlock2D with the type given.
    plain_down = "ResnetDownsampleBlock2D" if resample == "resnet" else "DownBlock2D"
    plain_up = "ResnetUpsampleBlock2D" if resample == "resnet" else "UpBlock2D"
    down = tuple("AttnDownBlock2D" if a else plain_down for a in attn)
    up = tuple("AttnUpBlock2D" if a else plain_up for a in reversed(attn))
    model = UNet2DModel(
        sample_size=image_size, in_channels=3, out_channels=3, block_out_channels=widths,
        layers_per_block=layers_per_block, down_block_types=down, up_block_types=up,
        # A head width of 1 makes every attention layer exactly as wide as its input; the head
        # count is then set to num_heads (set_attention_heads), as the authors fix the count.
        attention_head_dim=1, resnet_time_scale_shift=TIME_CONDITIONINGS[time_conditioning],
        norm_num_groups=norm_groups, norm_eps=1e-5, downsample_type=resample, upsample_type=resample,
        add_attention=True, time_embedding_type="positional", flip_sin_to_cos=False, freq_shift=0,
        dropout=float(dropout),
    )
    model.time_proj = SinusoidalTimesteps(widths[0])
    set_attention_heads(model, num_heads)
    if init == "zero_out":
        zero_output_layers(model)
    return model


def zero_output_layers(model: UNet2DModel) -> list[str]:
    """Set to zero the layers the authors build with ``zero_module``; return their names.

    They are, in our module names, every residual block's ``conv2`` (the authors' ResBlock
    ``out_layers.3``, in the resampling blocks too), every attention layer's ``to_out.0`` (their
    ``AttentionBlock.proj_out``) and ``conv_out`` (their ``out.2``); weights and biases alike.
    The other layers keep PyTorch's default initialisation, as theirs.

    Parameters
    ----------
    model : diffusers.UNet2DModel
        Built by :func:`build_denoiser` (any device but ``meta``, where there is nothing to set).

    Returns
    -------
    list of str
        The prefixes of the zeroed modules.
    """
    from diffusers.models.resnet import ResnetBlock2D

    zeroed = []
    for name, module in model.named_modules():
        target = None
        if isinstance(module, ResnetBlock2D):
            target, suffix = module.conv2, "conv2"
        elif isinstance(module, Attention):
            target, suffix = module.to_out[0], "to_out.0"
        if target is not None:
            _zero(target)
            zeroed.append(f"{name}.{suffix}")
    _zero(model.conv_out)
    zeroed.append("conv_out")
    return zeroed


@torch.no_grad()
def _zero(module: nn.Module) -> None:
    for p in module.parameters():
        p.zero_()


def set_attention_heads(model: nn.Module, num_heads: int) -> None:
    """Give every attention layer of ``model`` exactly ``num_heads`` heads.

    The authors use a fixed head count (4) at every width, while diffusers' ``UNet2DModel`` fixes
    the head *width*. The projections do not depend on the head count, so only the split changes
    (scaled dot-product attention takes its scale, 1/sqrt(head width), from the split).

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
    """Bilinear x2 up-sampling (corners aligned) followed by a 3x3 conv + BatchNorm + ReLU."""
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
        nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
    )


class SegmentationSubNetwork(nn.Module):
    """Discriminative U-Net mapping (query, reconstruction) to an anomaly map.

    The encoder has ``depth`` double-conv stages separated by 2x max-pooling; stage ``i`` has
    ``base_channels * min(2**i, 8)`` channels (for ``depth=6``: 1, 2, 4, 8, 8, 8 times the base, as
    in the authors' network). Each decoder stage up-samples (bilinear) while narrowing to the
    width of the stage two levels up, concatenates the encoder feature of the same size and
    applies a double conv of that width, back to full resolution; a 3x3 conv and a sigmoid give
    the map.

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
        if depth < 2:
            raise ValueError(f"the segmentation network needs at least 2 stages, got depth={depth}")
        widths = [base_channels * min(2 ** i, 8) for i in range(depth)]
        self.widths = widths
        self.depth = depth
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


__all__ = ["build_denoiser", "zero_output_layers", "INITS", "set_attention_heads", "SegmentationSubNetwork", "SinusoidalTimesteps", "level_widths",
           "attention_levels", "RESAMPLES", "TIME_CONDITIONINGS"]
