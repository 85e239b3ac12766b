"""Reading Stable Diffusion v1.5, the authors' checkpoints and the LPIPS trunk into DiAD's networks.

Stable Diffusion is read from the file the spec declares (:mod:`harness_diad.weightfiles`,
resolved by ``context.weights``; nothing is downloaded):

- a single-file checkpoint (``v1-5-pruned.ckpt``, the authors' choice) through the converter of
  :mod:`harness_diad.convert` (diffusers' own LDM conversion functions), which takes the
  non-EMA weights as the authors' ``build_model.py`` does;
- a diffusers folder (``sd_path``) with ``from_pretrained(local_files_only=True)``.

Every network is then filled with a strict load, so a checkpoint of another architecture is
refused with the tensors named.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from harness_diad.architectures import CLIP_BOS, CLIP_EOS, CLIP_LENGTH, Architecture
from harness_diad.convert import AuthorsState, ConversionError, convert_authors_state, load_strict, read_checkpoint

#: Subfolders of a diffusers folder that DiAD reads.
COMPONENTS = ("unet", "vae", "text_encoder")


@dataclass
class SDWeights:
    """Stable Diffusion's UNet, autoencoder and text encoder state, and where they came from."""

    unet: dict
    vae: dict
    text_encoder: CLIPTextModel
    source: Path
    layout: str
    schedule: dict


def read_sd(path: Path, arch: Architecture) -> SDWeights:
    """Read SD v1.5 from a single file or a diffusers folder (see the module docstring)."""
    path = Path(path)
    if path.is_dir():
        missing = [c for c in COMPONENTS if not (path / c).is_dir()]
        if missing:
            raise ConversionError(f"{path} is not a complete diffusers Stable Diffusion folder: it lacks "
                                  f"{', '.join(missing)}/ (or set sd_path to v1-5-pruned.ckpt)")
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", local_files_only=True)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", local_files_only=True)
        text = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", local_files_only=True)
        return SDWeights(unet.state_dict(), vae.state_dict(), text, path, "folder", {})
    converted = convert_authors_state(read_checkpoint(path), arch)
    if converted.unet is None or converted.vae is None or converted.text_encoder is None:
        raise ConversionError(f"{path} is not a Stable Diffusion v1 checkpoint: it lacks the UNet, the autoencoder "
                              "or the CLIP text encoder (model.diffusion_model.*, first_stage_model.*, "
                              "cond_stage_model.transformer.*)")
    return SDWeights(converted.unet, converted.vae, text_encoder(arch, converted), path, "single_file",
                     converted.schedule)


def text_encoder(arch: Architecture, converted: AuthorsState) -> CLIPTextModel:
    """The CLIP text encoder of a converted checkpoint (strict)."""
    if arch.text_encoder is None:
        raise ConversionError("this architecture has no text encoder (its context is given directly)")
    model = CLIPTextModel(CLIPTextConfig(**arch.text_encoder))
    load_strict(model, converted.text_encoder, "the checkpoint's CLIP text encoder (cond_stage_model.transformer.*)")
    return model


@torch.no_grad()
def empty_prompt_context(text: CLIPTextModel) -> torch.Tensor:
    """The text encoder's last hidden state for the empty prompt, (1, 77, D).

    The ids are CLIP's start-of-text token followed by end-of-text tokens (SD v1's tokenizer pads
    with end-of-text), i.e. what ``tokenizer("", padding="max_length")`` gives, which the
    authors' ``FrozenCLIPEmbedder`` encodes.
    """
    ids = torch.full((1, CLIP_LENGTH), CLIP_EOS, dtype=torch.long)
    ids[0, 0] = CLIP_BOS
    text.eval()
    return text(input_ids=ids.to(text.device)).last_hidden_state


def random_text_encoder(arch: Architecture, seed: int) -> CLIPTextModel:
    """A seeded, randomly initialised text encoder of ``arch``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return CLIPTextModel(CLIPTextConfig(**arch.text_encoder))


def lpips_vgg(vgg_state: dict[str, Any] | None, pretrained_heads: bool = True) -> torch.nn.Module:
    """LPIPS-VGG (the ``lpips`` package, equal to taming's ``LPIPS``) with its VGG-16 trunk from ``vgg_state``.

    ``vgg_state`` is torchvision's VGG-16 state dict; None keeps a random trunk (``--weights
    random``), and ``pretrained_heads=False`` random linear heads too, so no file is read.
    """
    import lpips

    model = lpips.LPIPS(net="vgg", pretrained=pretrained_heads, pnet_rand=True, verbose=False)
    if vgg_state is not None:
        # LPIPS splits torchvision's vgg16.features into slices that keep the layer indices as names.
        mapped = {}
        for name, module in model.net.named_children():
            for index, _ in module.named_children():
                for suffix in ("weight", "bias"):
                    key = f"features.{index}.{suffix}"
                    if key in vgg_state:
                        mapped[f"{name}.{index}.{suffix}"] = vgg_state[key]
        load_strict(model.net, mapped, "the VGG-16 weights (LPIPS trunk)")
    return model.eval().requires_grad_(False)


__all__ = ["SDWeights", "read_sd", "text_encoder", "empty_prompt_context", "random_text_encoder", "lpips_vgg",
           "COMPONENTS"]
