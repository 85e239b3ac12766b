"""Stable Diffusion v1.5 network configurations, as diffusers / transformers keyword arguments.

The values are those of the released ``stable-diffusion-v1-5`` folders (``unet/config.json``,
``vae/config.json``, ``text_encoder/config.json``) and of the original LDM ``v1-inference.yaml``:
a latent UNet with 320/640/1280/1280 channels, two residual blocks per level, cross-attention
(8 heads, context width 768) at the first three levels; the KL-f8 autoencoder (128/256/512/512
channels, 4 latent channels, scaling factor 0.18215); the CLIP ViT-L/14 text encoder (12 layers,
width 768, 77 tokens). The inpainting UNet is the same with 9 input channels (noisy latent,
mask, masked-image latent). Building from these needs no file, so the networks can be created on
the meta device.
"""

from __future__ import annotations

from typing import Any

#: Token ids of CLIP's BPE vocabulary (SD v1.x tokenizer): start and end of text (also padding).
CLIP_BOS, CLIP_EOS, CLIP_LENGTH = 49406, 49407, 77
#: The autoencoder's latent scaling factor.
VAE_SCALING_FACTOR = 0.18215
#: The training schedule of SD v1.x (LDM's "linear" is diffusers' "scaled_linear").
SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def unet_config(in_channels: int = 4) -> dict[str, Any]:
    """``UNet2DConditionModel`` keyword arguments of SD v1.5 (9 input channels: inpainting)."""
    return dict(
        sample_size=64, in_channels=in_channels, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
    )


def vae_config(sample_size: int = 512) -> dict[str, Any]:
    """``AutoencoderKL`` keyword arguments of SD v1.5 (``sample_size`` only affects tiling)."""
    return dict(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=sample_size,
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, scaling_factor=VAE_SCALING_FACTOR,
    )


def text_encoder_config() -> dict[str, Any]:
    """``CLIPTextConfig`` keyword arguments of SD v1.5's text encoder (CLIP ViT-L/14)."""
    return dict(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=CLIP_LENGTH, hidden_act="quick_gelu", projection_dim=768,
        # As in the released text_encoder/config.json (the pooled output is not used here).
        bos_token_id=0, eos_token_id=2, pad_token_id=1,
    )


__all__ = ["CLIP_BOS", "CLIP_EOS", "CLIP_LENGTH", "VAE_SCALING_FACTOR", "SCHEDULE", "unet_config", "vae_config",
           "text_encoder_config"]
