"""Finding and reading Stable Diffusion v1.5 (UNet, autoencoder, text encoder) from disk.

Three layouts are accepted, tried in this order:

1. the ``sd_path`` setting: a diffusers folder or a single checkpoint file;
2. a diffusers folder (``unet/``, ``vae/``, ``text_encoder/``): ``<weights dir>/stable-diffusion-v1-5``
   or the Hugging Face cache snapshot of ``stable-diffusion-v1-5/stable-diffusion-v1-5`` (or the
   older ``runwayml/stable-diffusion-v1-5``);
3. the original single-file checkpoint ``v1-5-pruned.ckpt`` (the file the authors'
   ``build_model.py`` reads; ``.safetensors`` and the ``-emaonly`` variants too) in the weights
   directory or the torch hub cache.

A folder is read with ``from_pretrained(local_files_only=True)``; a single file with diffusers'
``from_single_file`` given the architecture's original LDM configuration
(:func:`harness_diad.architectures.ldm_config`), so no configuration is fetched from the Hub. The
CLIP text encoder of a single file is read from its ``cond_stage_model.transformer.`` tensors.
The weights are then copied into the profile's networks with strict state-dict loads, so a
checkpoint of another architecture is refused with the tensors named. Nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from harness import WeightsNotFoundError
from harness.weights import WeightsResolver
from harness_diad.architectures import CLIP_BOS, CLIP_EOS, CLIP_LENGTH, ldm_config

#: Hugging Face repositories holding SD v1.5 in the diffusers layout (current name first).
SD_REPOS = ("stable-diffusion-v1-5/stable-diffusion-v1-5", "runwayml/stable-diffusion-v1-5")
#: File names of the original single-file checkpoint.
SD_FILES = ("v1-5-pruned.ckpt", "v1-5-pruned.safetensors", "v1-5-pruned-emaonly.ckpt",
            "v1-5-pruned-emaonly.safetensors")
#: Subfolders of a diffusers folder that DiAD reads.
COMPONENTS = ("unet", "vae", "text_encoder")
#: Prefix of the CLIP text encoder's tensors in an LDM checkpoint.
CLIP_PREFIX = "cond_stage_model.transformer."


@dataclass
class SDWeights:
    """The three SD networks read from disk, and where they came from."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    source: Path
    layout: str


def find_sd(resolver: WeightsResolver, sd_path: str | None = None) -> tuple[Path, str]:
    """Where SD v1.5 is on disk: ``(path, "folder" | "single_file")``.

    Raises
    ------
    WeightsNotFoundError
        Naming every place searched, the files expected and the ``tiny`` profile; or, for a
        folder that lacks a component, the missing subfolders.
    """
    if sd_path:
        path = Path(sd_path).expanduser()
        if path.is_file():
            return path, "single_file"
        if path.is_dir():
            return _check_folder(path), "folder"
        raise WeightsNotFoundError(f"setting 'sd_path' names {path}, which does not exist: give a diffusers "
                                   f"folder of Stable Diffusion v1.5 or the file v1-5-pruned.ckpt")
    errors = []
    for repo in SD_REPOS:
        try:
            return _check_folder(resolver.find_hf_model(repo, f"Stable Diffusion v1.5 ({repo})")), "folder"
        except WeightsNotFoundError as exc:
            errors.append(str(exc).split("\n")[0])
    try:
        return resolver.find_file(SD_FILES, "Stable Diffusion v1.5 single-file checkpoint"), "single_file"
    except WeightsNotFoundError as exc:
        raise WeightsNotFoundError(
            "Stable Diffusion v1.5 weights not found. Tried the diffusers folders:\n  - " + "\n  - ".join(errors)
            + f"\nand the single file: {exc}\nSet 'sd_path' (--set sd_path=...) to a folder or file elsewhere.") from None


def _check_folder(folder: Path) -> Path:
    missing = [c for c in COMPONENTS if not (folder / c).is_dir()]
    if missing:
        raise WeightsNotFoundError(
            f"{folder} is not a complete diffusers Stable Diffusion folder: it lacks {', '.join(missing)}/. "
            "Save it with StableDiffusionPipeline.save_pretrained or put v1-5-pruned.ckpt in the weights "
            "directory; or use --profile tiny.")
    return folder


def read_sd(path: Path, layout: str, arch: Mapping[str, Any]) -> SDWeights:
    """Read the UNet, autoencoder and text encoder from ``path`` (see :func:`find_sd`).

    Parameters
    ----------
    path : Path
    layout : str
        ``"folder"`` or ``"single_file"``.
    arch : mapping
        The profile's architecture (:data:`harness_diad.architectures.ARCHITECTURES`); a single
        file is converted with its LDM configuration.
    """
    if layout == "folder":
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", local_files_only=True)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", local_files_only=True)
        text = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", local_files_only=True)
        return SDWeights(unet, vae, text, path, layout)
    from diffusers.loaders.single_file_utils import load_single_file_checkpoint

    checkpoint = load_single_file_checkpoint(str(path), local_files_only=True)
    checkpoint = checkpoint.get("state_dict", checkpoint)
    original = ldm_config(arch)
    unet = UNet2DConditionModel.from_single_file(checkpoint, original_config=original, local_files_only=True)
    vae = AutoencoderKL.from_single_file(checkpoint, original_config=original, local_files_only=True)
    clip = {k[len(CLIP_PREFIX):]: v for k, v in checkpoint.items() if k.startswith(CLIP_PREFIX)}
    if not clip:
        raise WeightsNotFoundError(f"{path} holds no CLIP text encoder ({CLIP_PREFIX}*): is it a Stable "
                                   "Diffusion v1 checkpoint?")
    text = CLIPTextModel(CLIPTextConfig(**arch["text_encoder"]))
    clip.pop("text_model.embeddings.position_ids", None)  # a buffer some exports carry, not a weight
    _strict_copy(text, clip, f"{path} ({CLIP_PREFIX}*)")
    return SDWeights(unet, vae, text, path, layout)


def _strict_copy(target: torch.nn.Module, state: Mapping[str, torch.Tensor], where: str) -> None:
    own = target.state_dict()
    state = {k: v for k, v in state.items() if not (k.endswith("position_ids") and k not in own)}
    try:
        target.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsNotFoundError(f"{where} does not match the profile's architecture (set 'architecture' to "
                                   f"the checkpoint's): {str(exc).splitlines()[0]}") from None


def copy_into(weights: SDWeights, unet: UNet2DConditionModel, vae: AutoencoderKL) -> None:
    """Copy the read UNet and autoencoder into the profile's networks (strictly)."""
    _strict_copy(unet, weights.unet.state_dict(), f"{weights.source} (UNet)")
    _strict_copy(vae, weights.vae.state_dict(), f"{weights.source} (autoencoder)")


@torch.no_grad()
def empty_prompt_context(text_encoder: CLIPTextModel) -> torch.Tensor:
    """The text encoder's last hidden state for the empty prompt, (1, 77, D).

    The ids are CLIP's start-of-text token followed by end-of-text tokens (SD v1's tokenizer pads
    with end-of-text), i.e. what ``tokenizer("", padding="max_length")`` gives.
    """
    ids = torch.full((1, CLIP_LENGTH), CLIP_EOS, dtype=torch.long)
    ids[0, 0] = CLIP_BOS
    text_encoder.eval()
    return text_encoder(input_ids=ids.to(text_encoder.device)).last_hidden_state


def random_text_encoder(arch: Mapping[str, Any], seed: int) -> CLIPTextModel:
    """A seeded, randomly initialised text encoder of ``arch`` (the ``tiny`` profile's context source)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return CLIPTextModel(CLIPTextConfig(**arch["text_encoder"]))


__all__ = ["SDWeights", "find_sd", "read_sd", "copy_into", "empty_prompt_context", "random_text_encoder",
           "SD_REPOS", "SD_FILES", "COMPONENTS"]
