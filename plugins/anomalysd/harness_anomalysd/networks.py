"""The Stable Diffusion inpainting networks of AnomalySD: architectures, loading, tokenizers.

Architectures (built from configurations only, so they can be created on the meta device):

``sd15-inpainting``
    Stable Diffusion v1.5 inpainting, from the shared configurations of
    :mod:`harness.toolkit.sd15` (one copy with DiAD): a ``UNet2DConditionModel`` with 9 input
    channels (noisy latent, downsampled mask, masked-image latent), the KL-f8 ``AutoencoderKL``
    and the CLIP ViT-L/14 text encoder with its BPE tokenizer (77 tokens).
``tiny``
    The same classes at toy width for CPU runs (see :data:`TINY`): a 2-level UNet, a 3-level
    autoencoder (f = 4), a 2-layer text encoder of width 32 and a character-level CLIP
    tokenizer whose vocabulary (the 256 byte symbols, each also as a word end, plus the two
    special tokens) is generated in memory, so no vocabulary file is needed.

Pretrained weights come from a diffusers inpainting folder (the declared
``stable-diffusion-v1-5/stable-diffusion-inpainting`` snapshot, or ``sd_path``), each network
read with its library's ``from_pretrained(..., local_files_only=True)`` and copied into the
profile's modules with a strict state-dict load. Nothing is downloaded. A tiny checkpoint
written with ``save_pretrained`` loads through exactly the same code (the tests do this).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from harness import WeightsNotFoundError
from harness.toolkit import sd15

#: Subfolders of a diffusers inpainting pipeline folder that AnomalySD reads.
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer")

#: The ``tiny`` architecture: a 2-level UNet (16/32 channels), a 3-level autoencoder (8/16/16
#: channels, f = 4, no mid-block attention) and a 2-layer text encoder of width 32.
TINY: Mapping[str, Mapping[str, Any]] = {
    "unet": dict(
        sample_size=16, in_channels=9, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    ),
    "vae": dict(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, sample_size=64,
        block_out_channels=(8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=4, scaling_factor=1.0,
        mid_block_add_attention=False,
    ),
    "text_encoder": dict(
        vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32,
        bos_token_id=512, eos_token_id=513, pad_token_id=513,
    ),
}

ARCHITECTURES = ("sd15-inpainting", "tiny")


def configs(architecture: str) -> Mapping[str, Mapping[str, Any]]:
    """Keyword arguments of the three networks of ``architecture``."""
    if architecture == "sd15-inpainting":
        return {"unet": sd15.unet_config(in_channels=9), "vae": sd15.vae_config(),
                "text_encoder": sd15.text_encoder_config()}
    if architecture == "tiny":
        return TINY
    raise ValueError(f"architecture must be one of {', '.join(ARCHITECTURES)}, not {architecture!r}")


@dataclass
class SDComponents:
    """The networks AnomalySD uses from a Stable Diffusion inpainting pipeline."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel


def build_components(architecture: str) -> SDComponents:
    """Randomly initialised networks of ``architecture`` (no file is read; draws from torch's RNG)."""
    cfg = configs(architecture)
    return SDComponents(
        unet=UNet2DConditionModel(**cfg["unet"]),
        vae=AutoencoderKL(**cfg["vae"]),
        text_encoder=CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])),
    )


def _byte_symbols() -> list[str]:
    """The 256 printable symbols byte-level BPE uses for the 256 byte values (GPT-2's mapping).

    Printable Latin-1 bytes stand for themselves; the others are shifted past 255 in order.
    """
    printable = (set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1))
                 | set(range(ord("®"), ord("ÿ") + 1)))
    symbols, shifted = [], 0
    for b in range(256):
        if b in printable:
            symbols.append(chr(b))
        else:
            symbols.append(chr(256 + shifted))
            shifted += 1
    return symbols


def character_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """A CLIP tokenizer with a 514-token character vocabulary and no merges (the ``tiny`` profile).

    Every byte symbol appears twice (inside a word and as a word end ``</w>``), followed by
    ``<|startoftext|>`` (512) and ``<|endoftext|>`` (513): CLIP's normalisation and
    pre-tokenisation are kept, each word is simply spelled out. Built in memory.
    """
    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": 256 + i for i, s in enumerate(symbols)})
    vocab.update({"<|startoftext|>": 512, "<|endoftext|>": 513})
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def check_sd_folder(folder: Path) -> Path:
    """``folder`` when it holds the ``unet``, ``vae``, ``text_encoder`` and ``tokenizer`` subfolders.

    Raises
    ------
    WeightsNotFoundError
        Naming the missing subfolders and how to make a complete folder.
    """
    folder = Path(folder)
    missing = [c for c in COMPONENTS if not (folder / c).is_dir()]
    if missing:
        raise WeightsNotFoundError(
            f"{folder} is not a complete diffusers inpainting folder: it lacks {', '.join(m + '/' for m in missing)}. "
            "Fetch the pinned snapshot with 'harness weights pull --methods anomalysd', or save a pipeline with "
            "StableDiffusionInpaintPipeline.save_pretrained; or use --weights random / the 'tiny' profile.")
    return folder


def load_components(folder: Path, into: SDComponents) -> None:
    """Read the pipeline's networks from ``folder`` and copy them into ``into``.

    Each network is read with its library's ``from_pretrained(local_files_only=True)`` (the
    code path real users take) and its weights are copied with a strict state-dict load, so a
    checkpoint whose architecture differs from the profile's is refused with the tensors named.

    Raises
    ------
    WeightsNotFoundError
        When the UNet is not a 9-channel inpainting UNet, or a network does not match.
    """
    folder = check_sd_folder(folder)
    loaded = {
        "unet": UNet2DConditionModel.from_pretrained(folder, subfolder="unet", local_files_only=True),
        "vae": AutoencoderKL.from_pretrained(folder, subfolder="vae", local_files_only=True),
        "text_encoder": CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", local_files_only=True),
    }
    if loaded["unet"].config.in_channels != 9:
        raise WeightsNotFoundError(
            f"{folder / 'unet'} has {loaded['unet'].config.in_channels} input channels; AnomalySD needs an "
            "inpainting UNet with 9 (latent, mask, masked-image latent), e.g. stable-diffusion-inpainting")
    for name, source in loaded.items():
        target = getattr(into, name)
        try:
            target.load_state_dict(source.state_dict(), strict=True)
        except RuntimeError as exc:
            raise WeightsNotFoundError(
                f"{folder / name} does not match the profile's {name} architecture (set 'architecture' to the "
                f"checkpoint's): {str(exc).splitlines()[0]}") from None
        if name == "vae":
            # The latent scaling factor is part of the checkpoint's config, not of its tensors.
            target.register_to_config(scaling_factor=source.config.scaling_factor)


def load_tokenizer(folder: Path) -> CLIPTokenizer:
    """The pipeline's CLIP tokenizer from ``folder/tokenizer`` (local files only)."""
    return CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True)


__all__ = ["ARCHITECTURES", "COMPONENTS", "TINY", "SDComponents", "build_components", "character_tokenizer",
           "check_sd_folder", "configs", "load_components", "load_tokenizer"]
