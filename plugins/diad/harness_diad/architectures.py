"""Network configurations of DiAD's Stable Diffusion parts.

``sd15``
    Stable Diffusion v1.5 as the authors' ``models/diad.yaml`` builds it, taken from
    :mod:`harness.toolkit.sd15`: the latent UNet (320/640/1280/1280 channels, two residual blocks
    per level, cross-attention at the first three levels with 8 heads, context width 768), the
    KL-f8 autoencoder (128/256/512/512 channels, 4 latent channels, scaling factor 0.18215) and
    the CLIP ViT-L/14 text encoder whose output for the empty prompt is the cross-attention
    context. The SG network's hint stack is the authors' ``input_hint_block``:
    3 -> 16 -> 32 -> 96 -> 256 -> model channels with three stride-2 convolutions.
``tiny``
    The same classes at toy width for CPU runs: a two-level UNet (32/64 channels, attention at
    the second level), a three-level autoencoder (32/64/64 channels, f = 4), a two-layer text
    encoder and a hint stack with two stride-2 convolutions.

:func:`from_ldm_config` reads an architecture from the authors' own configuration (the
``model`` section of ``models/diad.yaml``, as a mapping) with diffusers' conversion helpers
``create_unet_diffusers_config_from_ldm`` / ``create_vae_diffusers_config_from_ldm``: the golden
tests build the authors' tiny configuration this way, and a user can point it at another
``diad.yaml``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Mapping

from harness.toolkit import sd15

#: Token ids of the empty prompt (SD v1.x tokenizer): start-of-text, then end-of-text (also the
#: padding token) up to 77 tokens. The authors' prompt is always ``""``.
CLIP_BOS, CLIP_EOS, CLIP_LENGTH = sd15.CLIP_BOS, sd15.CLIP_EOS, sd15.CLIP_LENGTH
#: Widths of the authors' ``input_hint_block`` (ControlNet's), before the last zero convolution.
HINT_CHANNELS = (16, 32, 96, 256)


@dataclass(frozen=True)
class Architecture:
    """Constructor arguments of DiAD's networks.

    Attributes
    ----------
    name : str
        ``sd15``, ``tiny`` or where a configuration came from.
    unet : dict
        ``UNet2DConditionModel`` keyword arguments (the SG network mirrors its encoder).
    vae : dict
        ``AutoencoderKL`` keyword arguments.
    text_encoder : dict or None
        ``CLIPTextConfig`` keyword arguments; None when the context is given directly (golden tests).
    hint_channels : tuple of int
        Widths of the SG network's hint stack (one stride-2 convolution per entry after the first).
    """

    name: str
    unet: dict = field(default_factory=dict)
    vae: dict = field(default_factory=dict)
    text_encoder: dict | None = None
    hint_channels: tuple[int, ...] = HINT_CHANNELS

    @property
    def context_dim(self) -> int:
        """Width of the cross-attention context."""
        return int(self.unet["cross_attention_dim"])


def _tiny() -> Architecture:
    return Architecture(
        name="tiny",
        unet=dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                  cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32),
        # 32 GroupNorm groups everywhere: the LDM layout has no group count, and diffusers' conversion
        # assumes 32, so a tiny checkpoint in the authors' layout converts like the real one.
        vae=dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, sample_size=64,
                 block_out_channels=(32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 3,
                 up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=32, scaling_factor=1.0),
        text_encoder=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=CLIP_LENGTH, hidden_act="quick_gelu",
                          projection_dim=32, bos_token_id=CLIP_BOS, eos_token_id=CLIP_EOS, pad_token_id=CLIP_EOS),
        # Two stride-2 convolutions: the tiny autoencoder downsamples by 4, not 8.
        hint_channels=(16, 32, 32),
    )


def _sd15() -> Architecture:
    return Architecture(name="sd15", unet=sd15.unet_config(4), vae=sd15.vae_config(256),
                        text_encoder=sd15.text_encoder_config(), hint_channels=HINT_CHANNELS)


#: The architectures the ``architecture`` setting names.
ARCHITECTURES = ("sd15", "tiny")


def architecture(name: str) -> Architecture:
    """The configuration of architecture ``name`` (see the module docstring).

    Raises
    ------
    ValueError
        For an unknown name, listing the known ones.
    """
    if name == "sd15":
        return _sd15()
    if name == "tiny":
        return _tiny()
    raise ValueError(f"setting 'architecture' must be one of {ARCHITECTURES}, not {name!r}")


#: UNet parameters the SG network must share with the SD UNet (it is built as a copy of its encoder).
_SHARED_LDM_PARAMS = ("in_channels", "model_channels", "attention_resolutions", "num_res_blocks", "channel_mult",
                      "num_heads", "num_head_channels", "use_spatial_transformer", "transformer_depth", "context_dim",
                      "legacy", "use_linear_in_transformer")


def from_ldm_config(config: Mapping[str, Any], name: str = "ldm-config") -> Architecture:
    """The architecture of an authors' configuration (``models/diad.yaml`` as a mapping).

    The UNet and autoencoder arguments come from diffusers' ``create_unet_diffusers_config_from_ldm``
    and ``create_vae_diffusers_config_from_ldm`` (the functions diffusers' single-file loading uses).
    The SG network (``control_stage_config``) must repeat the UNet's encoder parameters: our SG
    network is built as a copy of the UNet's encoder, as the authors' is.

    Raises
    ------
    ValueError
        When the configuration asks for something these networks cannot express, naming it.
    """
    from diffusers.loaders.single_file_utils import (create_unet_diffusers_config_from_ldm,
                                                     create_vae_diffusers_config_from_ldm)

    config = copy.deepcopy(dict(config))
    params = config["model"]["params"]
    unet_params = params["unet_config"]["params"]
    control = params.get("control_stage_config", {}).get("params", {})
    for key in _SHARED_LDM_PARAMS:
        if control and control.get(key) != unet_params.get(key):
            raise ValueError(f"the SG network's {key}={control.get(key)!r} differs from the UNet's "
                             f"{unet_params.get(key)!r}; DiAD's SG network is a copy of the UNet encoder")
    if control and control.get("hint_channels", 3) != 3:
        raise ValueError(f"hint_channels={control.get('hint_channels')} (the hint is the RGB input image: 3)")
    mults = list(unet_params["channel_mult"])
    if len(mults) < 2:
        raise ValueError("the SFF block needs a UNet with at least two levels")
    # Without checkpoint keys diffusers assumes Stable Diffusion v1 for the sample size (which no layer uses).
    probe: dict = {}
    unet = create_unet_diffusers_config_from_ldm(config, probe)
    vae = create_vae_diffusers_config_from_ldm(config, probe, scaling_factor=params.get("scale_factor"))
    unet.update(norm_num_groups=32)
    vae.update(norm_num_groups=32)
    for cfg in (unet, vae):
        for key in [k for k, v in cfg.items() if v is None]:
            del cfg[key]
        for key, value in list(cfg.items()):
            if isinstance(value, list):
                cfg[key] = tuple(value)
    cond = params.get("cond_stage_config", {}).get("target", "")
    text = sd15.text_encoder_config() if cond.endswith("FrozenCLIPEmbedder") else None
    return Architecture(name=name, unet=unet, vae=vae, text_encoder=text, hint_channels=HINT_CHANNELS)


__all__ = ["Architecture", "ARCHITECTURES", "architecture", "from_ldm_config", "HINT_CHANNELS", "CLIP_BOS",
           "CLIP_EOS", "CLIP_LENGTH"]
