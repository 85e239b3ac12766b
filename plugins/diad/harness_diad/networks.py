"""DiAD's latent denoiser: the SD UNet, the Semantic-Guided (SG) network and the SFF block.

The SG network is diffusers' ``ControlNetModel``: a trainable copy of the UNet's input
convolution, time embedding, encoder (down) blocks and middle block, fed the noisy latent plus
the input image passed through a stack of conv-SiLU layers whose last convolution is
zero-initialised (Eq. 7), and joined to the UNet through zero-initialised 1 x 1 projections.
diffusers' conditioning embedding with channels (16, 32, 96, 256) is, layer for layer, the
authors' ``input_hint_block``.

The SFF block (Fig. 3, the authors' ``down11`` ... ``down33``) fuses the SG encoder's
second-to-last block (block 3 in SD, the outputs 6-8, at twice the resolution) into its last
block (block 4, outputs 9-11): every layer of the last block receives, from every layer of the
block before, a zero-initialised bias-free 3 x 3 stride-2 convolution, Instance Norm and SiLU;
the sum passes through one more SiLU. The authors' ``down{i}{j}`` reads output ``5 + i`` and
feeds output ``8 + j``; here it is ``sff.paths[j - 1][i - 1]``.

Which SG outputs reach the SD decoder (the authors' ``only_mid_control``): with ``True`` (what
their ``train.py`` and ``test.py`` set) the middle-block output and the three fused block-4
outputs, i.e. the skip connections of SD decoder block 1; with ``False`` (the value in their
``models/diad.yaml``, overridden by both scripts) all 13, as ControlNet.

Frozen / trained (the authors' ``configure_optimizers`` and ``ControlledUnetModel``): the SD
UNet's input convolution, time embedding, encoder and middle block run frozen; the SG network
(with the SFF block), the SD decoder blocks and the SD output layers (norm, conv) are trained.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from diffusers import ControlNetModel, UNet2DConditionModel
from torch import nn

#: ControlNetModel arguments that have the same name and meaning in UNet2DConditionModel.
_SHARED_CONFIG = ("in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "only_cross_attention",
                  "block_out_channels", "layers_per_block", "downsample_padding", "mid_block_scale_factor",
                  "act_fn", "norm_num_groups", "norm_eps", "cross_attention_dim", "attention_head_dim",
                  "use_linear_projection", "upcast_attention", "transformer_layers_per_block", "num_attention_heads")

#: UNet parts that stay frozen while DiAD trains (the authors run them under ``no_grad``).
FROZEN_UNET_PARTS = ("conv_in", "time_proj", "time_embedding", "down_blocks", "mid_block")
#: UNet parts DiAD trains (the authors' ``output_blocks`` and ``out``).
TRAINED_UNET_PARTS = ("up_blocks", "conv_norm_out", "conv_out")

def residual_channels(unet_config: Mapping[str, Any]) -> list[int]:
    """Channels of the UNet encoder's skip outputs, in order (input conv, then per level).

    Each level adds ``layers_per_block`` outputs at its width, then (except the last level) the
    downsampler's output, which keeps the width. SD v1.5: 12 outputs.
    """
    widths = list(unet_config["block_out_channels"])
    n = int(unet_config["layers_per_block"])
    out = [widths[0]]
    for level, width in enumerate(widths):
        out += [width] * n
        if level < len(widths) - 1:
            out.append(width)
    return out


class SFFBlock(nn.Module):
    """Spatial-aware Feature Fusion: fuse the SG encoder's block ``L-1`` into its block ``L``.

    Parameters
    ----------
    in_channels : sequence of int
        Channels of each layer output of the higher-resolution block (SD: 640, 1280, 1280).
    out_channels : sequence of int
        Channels of each layer output of the last block (SD: 1280, 1280, 1280).

    Every (input layer, output layer) pair has its own path: a bias-free 3 x 3 stride-2
    convolution initialised to zero, Instance Norm (no affine parameters, per image, as the
    paper argues for multi-class data) and SiLU. At initialisation every path outputs zero, so the
    block starts as a SiLU on the last block's outputs (which are zero too: ControlNet's zero
    projections), and the SD network is unchanged.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: Sequence[int]) -> None:
        super().__init__()
        self.paths = nn.ModuleList(
            nn.ModuleList(self._path(c_in, c_out) for c_in in in_channels) for c_out in out_channels)

    @staticmethod
    def _path(c_in: int, c_out: int) -> nn.Sequential:
        conv = nn.Conv2d(c_in, c_out, kernel_size=3, stride=2, padding=1, bias=False)
        nn.init.zeros_(conv.weight)
        return nn.Sequential(conv, nn.InstanceNorm2d(c_out), nn.SiLU())

    def forward(self, higher: Sequence[torch.Tensor], last: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Fuse.

        Parameters
        ----------
        higher : sequence of torch.Tensor
            The higher-resolution block's outputs, (B, C_i, 2h, 2w) each.
        last : sequence of torch.Tensor
            The last block's outputs, (B, C_j, h, w) each.

        Returns
        -------
        list of torch.Tensor
            ``SiLU(last_j + sum_i path_ji(higher_i))``, shaped like ``last``.
        """
        if len(higher) != len(self.paths[0]) or len(last) != len(self.paths):
            raise ValueError(f"SFF block expects {len(self.paths[0])} higher-resolution and {len(self.paths)} "
                             f"last-block features, got {len(higher)} and {len(last)}")
        return [F.silu(out + sum(path(h) for path, h in zip(paths, higher))) for paths, out in zip(self.paths, last)]


class SemanticGuidedNetwork(nn.Module):
    """The SG network: a ControlNet copy of the UNet encoder with the SFF block.

    Parameters
    ----------
    unet_config : mapping
        The SD UNet's constructor arguments (the SG copy mirrors them).
    hint_channels : sequence of int
        Widths of the conv-SiLU stack applied to the input image; one stride-2 convolution per
        entry after the first, so the image arrives at the latent resolution.
    only_mid_control : bool
        The authors' switch (see the module docstring).
    """

    def __init__(self, unet_config: Mapping[str, Any], hint_channels: Sequence[int],
                 only_mid_control: bool = True) -> None:
        super().__init__()
        if len(unet_config["block_out_channels"]) < 2:
            raise ValueError("the SFF block needs a UNet with at least two levels")
        kwargs = {k: unet_config[k] for k in _SHARED_CONFIG if k in unet_config}
        self.controlnet = ControlNetModel(conditioning_embedding_out_channels=tuple(hint_channels), **kwargs)
        self.block_size = int(unet_config["layers_per_block"]) + 1
        channels = residual_channels(unet_config)
        b = self.block_size
        self.sff = SFFBlock(channels[-2 * b:-b], channels[-b:])
        self.only_mid_control = bool(only_mid_control)

    def copy_unet_encoder(self, unet: UNet2DConditionModel) -> None:
        """Initialise the copy from the SD UNet (the authors' ``build_model.py``): input conv,
        time embedding, encoder blocks and middle block. The hint stack, the zero projections and
        the SFF block keep their initialisation."""
        for part in ("conv_in", "time_embedding", "down_blocks", "mid_block"):
            getattr(self.controlnet, part).load_state_dict(getattr(unet, part).state_dict())

    @torch.no_grad()
    def reset_new_parts(self, seed: int) -> None:
        """Seeded fresh initialisation of what is not copied from SD (the authors' ``scratch_dict``):
        the hint stack (default init, its last convolution zero), the zero projections and the SFF
        block (zero)."""
        embedding = self.controlnet.controlnet_cond_embedding
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            for conv in [embedding.conv_in, *embedding.blocks]:
                conv.reset_parameters()
        zero = [embedding.conv_out, *self.controlnet.controlnet_down_blocks, self.controlnet.controlnet_mid_block]
        zero += [path[0] for paths in self.sff.paths for path in paths]
        for module in zero:
            for p in module.parameters():
                p.zero_()

    def controls(self, latents: torch.Tensor, hint: torch.Tensor, timesteps: torch.Tensor,
                 context: torch.Tensor) -> list[torch.Tensor]:
        """The 13 control tensors in the authors' order (12 encoder outputs, SFF-fused, then the middle block).

        Parameters
        ----------
        latents : torch.Tensor
            Noisy latents (B, 4, h, w).
        hint : torch.Tensor
            The input image (B, 3, H, W), H = h times the autoencoder's downsampling factor.
        timesteps : torch.Tensor
            (B,) diffusion steps.
        context : torch.Tensor
            Cross-attention context (B, 77, D).
        """
        down, mid = self.controlnet(latents, timesteps, encoder_hidden_states=context, controlnet_cond=hint,
                                    return_dict=False)
        down = list(down)
        b = self.block_size
        down[-b:] = self.sff(down[-2 * b:-b], down[-b:])
        return down + [mid]

    def residuals(self, controls: Sequence[torch.Tensor], only_mid_control: bool | None = None
                  ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The controls as ``UNet2DConditionModel`` residuals, zero where not connected.

        Returns
        -------
        (list of torch.Tensor, torch.Tensor)
            For ``down_block_additional_residuals`` and ``mid_block_additional_residual``.
        """
        only_mid = self.only_mid_control if only_mid_control is None else bool(only_mid_control)
        down, mid = list(controls[:-1]), controls[-1]
        if only_mid:
            b = self.block_size
            # Zeros instead of absent tensors: diffusers adds every residual; x + 0 is exact.
            down[:-b] = [torch.zeros_like(d) for d in down[:-b]]
        return down, mid

    def forward(self, latents: torch.Tensor, hint: torch.Tensor, timesteps: torch.Tensor,
                context: torch.Tensor, only_mid_control: bool | None = None
                ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Residuals for the SD UNet: :meth:`controls` passed through :meth:`residuals`."""
        return self.residuals(self.controls(latents, hint, timesteps, context), only_mid_control)


def trained_unet_parts(unet: UNet2DConditionModel) -> nn.ModuleDict:
    """The UNet parts DiAD trains, as one module (what a training checkpoint keeps of the UNet)."""
    return nn.ModuleDict({part: getattr(unet, part) for part in TRAINED_UNET_PARTS})


def freeze_unet_encoder(unet: UNet2DConditionModel) -> list[nn.Parameter]:
    """Freeze the UNet parts DiAD does not train and return the parameters it does train."""
    for part in FROZEN_UNET_PARTS:
        getattr(unet, part).requires_grad_(False)
    params = []
    for part in TRAINED_UNET_PARTS:
        module = getattr(unet, part)
        module.requires_grad_(True)
        params += list(module.parameters())
    return params


class PromptContext(nn.Module):
    """The cross-attention context: the text encoder's output for the empty prompt, kept as a buffer.

    The authors condition on the prompt ``""`` only (and their classifier-free guidance pairs it
    with the same empty prompt), so the context is one constant tensor, computed once in ``fit``.
    """

    def __init__(self, length: int, width: int) -> None:
        super().__init__()
        self.register_buffer("embedding", torch.zeros(1, length, width))

    def forward(self, batch: int) -> torch.Tensor:
        """The context repeated for ``batch`` images, (B, length, width)."""
        return self.embedding.expand(batch, -1, -1)


__all__ = ["SFFBlock", "SemanticGuidedNetwork", "PromptContext", "freeze_unet_encoder", "trained_unet_parts",
           "residual_channels", "FROZEN_UNET_PARTS", "TRAINED_UNET_PARTS"]
