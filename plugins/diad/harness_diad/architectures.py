"""Network configurations of DiAD's Stable Diffusion parts, and their original (LDM) form.

``sd15``
    Stable Diffusion v1.5 as the authors' ``models/diad.yaml`` builds it: the latent UNet
    (320/640/1280/1280 channels, two residual blocks per level, cross-attention at the first three
    levels with 8 heads, context width 768), the KL-f8 autoencoder (128/256/512/512 channels,
    4 latent channels, scaling factor 0.18215) and the CLIP ViT-L/14 text encoder whose output
    for the empty prompt is the UNet's cross-attention context.
``tiny``
    The same classes at toy width for CPU runs: a two-level UNet (32/64 channels, attention at
    the second level), a three-level autoencoder (32/64/64 channels, f = 4) and a two-layer text encoder.

:func:`ldm_config` writes an architecture in the layout of the original LDM YAML
(``v1-inference.yaml``), which diffusers' ``from_single_file(original_config=...)`` reads, so a
single-file checkpoint is converted without fetching any configuration from the Hub.
"""

from __future__ import annotations

from typing import Any, Mapping

#: Token ids of the empty prompt for every CLIP BPE vocabulary (SD v1.x tokenizer): the
#: start-of-text token, then end-of-text, which is also the padding token, up to 77 tokens.
#: The authors' prompt is always ``""``, so the tokenizer itself is not needed.
CLIP_BOS, CLIP_EOS, CLIP_LENGTH = 49406, 49407, 77

ARCHITECTURES: Mapping[str, Mapping[str, Mapping[str, Any]]] = {
    "sd15": {
        "unet": dict(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
        ),
        "vae": dict(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=256,
            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, scaling_factor=0.18215,
        ),
        "text_encoder": dict(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
            bos_token_id=CLIP_BOS, eos_token_id=CLIP_EOS, pad_token_id=CLIP_EOS,
        ),
        # ControlNet's hint stack (Eq. 7): 3 -> 16 -> 32 -> 96 -> 256 -> model channels, 3 stride-2 convs.
        "hint_channels": (16, 32, 96, 256),
    },
    "tiny": {
        "unet": dict(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
        ),
        # 32 GroupNorm groups everywhere: the LDM layout has no group count, and diffusers' single-file
        # conversion assumes 32, so the tiny checkpoint converts like the real one.
        "vae": dict(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, sample_size=64,
            block_out_channels=(32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=32, scaling_factor=1.0,
        ),
        "text_encoder": dict(
            vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32,
            bos_token_id=CLIP_BOS, eos_token_id=CLIP_EOS, pad_token_id=CLIP_EOS,
        ),
        # Two stride-2 convs: the tiny autoencoder downsamples by 4, not 8.
        "hint_channels": (16, 32, 32),
    },
}


def architecture(name: str) -> Mapping[str, Any]:
    """The configuration dictionaries of architecture ``name``.

    Raises
    ------
    ValueError
        For an unknown name, listing the known ones.
    """
    if name not in ARCHITECTURES:
        raise ValueError(f"setting 'architecture' must be one of {sorted(ARCHITECTURES)}, not {name!r}")
    return ARCHITECTURES[name]


def ldm_config(arch: Mapping[str, Any]) -> dict[str, Any]:
    """The architecture as the original LDM YAML describes it (for single-file checkpoints).

    Only the fields diffusers' ``create_unet_diffusers_config_from_ldm`` and
    ``create_vae_diffusers_config_from_ldm`` read are filled in; the values are those of the
    authors' ``models/diad.yaml`` for ``sd15`` (linear schedule 0.00085 to 0.012, scale factor
    0.18215).
    """
    unet, vae = arch["unet"], arch["vae"]
    base = unet["block_out_channels"][0]
    levels = len(unet["block_out_channels"])
    # LDM names attention levels by their downsampling factor (1, 2, 4, ...).
    attention = [2 ** i for i, kind in enumerate(unet["down_block_types"]) if kind.startswith("CrossAttn")]
    heads = unet["attention_head_dim"]
    return {"model": {"params": {
        "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000, "scale_factor": vae["scaling_factor"],
        "image_size": unet["sample_size"], "channels": unet["in_channels"],
        "unet_config": {"params": {
            "image_size": unet["sample_size"], "in_channels": unet["in_channels"],
            "out_channels": unet["out_channels"], "model_channels": base,
            "attention_resolutions": attention, "num_res_blocks": unet["layers_per_block"],
            "channel_mult": [c // base for c in unet["block_out_channels"]][:levels],
            "num_heads": heads, "use_spatial_transformer": True, "transformer_depth": 1,
            "context_dim": unet["cross_attention_dim"], "legacy": False,
        }},
        "first_stage_config": {"params": {"embed_dim": vae["latent_channels"], "ddconfig": {
            "double_z": True, "z_channels": vae["latent_channels"], "resolution": vae["sample_size"],
            "in_channels": vae["in_channels"], "out_ch": vae["out_channels"], "ch": vae["block_out_channels"][0],
            "ch_mult": [c // vae["block_out_channels"][0] for c in vae["block_out_channels"]],
            "num_res_blocks": vae["layers_per_block"], "attn_resolutions": [], "dropout": 0.0,
        }}},
    }}}


__all__ = ["ARCHITECTURES", "architecture", "ldm_config", "CLIP_BOS", "CLIP_EOS", "CLIP_LENGTH"]
