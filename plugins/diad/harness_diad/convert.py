"""The authors' checkpoint layout (LDM / ControlNet key names) converted to our networks.

The authors' ``DiAD`` is an LDM ``LatentDiffusion`` with a ControlNet-style ``control_model``,
so its ``state_dict`` (what ``build_model.py`` writes and Lightning saves after ``train.py``)
holds:

================================  ===================================================================
``model.diffusion_model.*``       the SD UNet -> ``UNet2DConditionModel``, by diffusers'
                                  ``convert_ldm_unet_checkpoint``
``control_model.*``               the SG network: its ControlNet part -> ``ControlNetModel`` by
                                  diffusers' ``convert_controlnet_checkpoint``; its SFF block
                                  ``down{i}{j}.0.weight`` -> ``sff.paths[j-1][i-1].0.weight`` (the
                                  only key map written here: diffusers does not know DiAD's block)
``first_stage_model.*``           the KL autoencoder -> ``AutoencoderKL``, by
                                  ``convert_ldm_vae_checkpoint``
``cond_stage_model.transformer.*``  CLIP's text encoder -> ``CLIPTextModel``, by
                                  ``convert_ldm_clip_checkpoint``
``betas``, ``alphas_cumprod``...  the noise schedule: compared with ours, not loaded
================================  ===================================================================

``model_ema.*`` (LDM's EMA copies; the authors read the non-EMA weights) is ignored; ``loss.*``
(the autoencoder's training loss: LPIPS, the patch discriminator, the log-variance) is kept apart
(:attr:`AuthorsState.loss`, prefix removed): the fine-tuning starts its discriminator from it,
as the authors' non-strict load does. Any other key is an error, so nothing is dropped silently. The same converter reads Stable Diffusion's own
``v1-5-pruned.ckpt`` (no ``control_model``), LDM autoencoder checkpoints (``kl-f8``'s
``model.ckpt``, the authors' ``mvtecad_fs.ckpt``: keys without the ``first_stage_model.`` prefix)
and the authors' trained checkpoints; every network is then loaded with ``strict=True``.
Files are read with diffusers' ``load_single_file_checkpoint`` (safetensors, or
``torch.load(weights_only=True)``, which runs no code: a Lightning ``.ckpt`` such as the authors'
``mvtecad_fs.ckpt`` holds its weights under ``state_dict`` beside plain values, epoch, global
step, callback and optimiser states, and loads so; a file that needs any other class to unpickle
is refused). LDM's ``kl-f8.zip`` (the archive the authors download) is read through the
``.ckpt`` inside it, extracted next to the archive once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from harness import WeightsNotFoundError
from harness_diad.architectures import Architecture

#: Prefixes of the authors' layout.
UNET_PREFIX, CONTROL_PREFIX, VAE_PREFIX, CLIP_PREFIX = ("model.diffusion_model.", "control_model.",
                                                        "first_stage_model.", "cond_stage_model.transformer.")
#: LDM's schedule buffers (``register_schedule``) and the loss weights it registers.
SCHEDULE_KEYS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                 "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                 "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                 "posterior_mean_coef1", "posterior_mean_coef2", "logvar", "scale_factor")
#: Prefixes that are not networks DiAD runs.
#: The autoencoder's training loss in an LDM checkpoint (kept apart, see :attr:`AuthorsState.loss`).
LOSS_PREFIX = "loss."
IGNORED_PREFIXES = ("model_ema.", "cond_stage_model.transformer.text_model.embeddings.position_ids",
                    "cond_stage_model.transformer.embeddings.position_ids")
_SFF_KEY = re.compile(r"^down([1-9])([1-9])\.0\.weight$")
_AE_KEYS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


class ConversionError(WeightsNotFoundError):
    """A checkpoint does not fit the networks; the message names the tensors."""


@dataclass
class AuthorsState:
    """A checkpoint of the authors' layout, converted to our module names.

    Attributes
    ----------
    unet, controlnet, sff, vae, text_encoder : dict or None
        State dicts for ``UNet2DConditionModel``, the SG network's ``ControlNetModel`` and
        ``SFFBlock``, ``AutoencoderKL`` and ``CLIPTextModel``; None where the checkpoint has none.
    schedule : dict
        LDM's schedule buffers as found (float64 NumPy).
    ignored : list of str
        Keys deliberately not used (EMA copies).
    loss : dict
        The autoencoder loss's tensors (``loss.`` removed: ``discriminator.*``,
        ``perceptual_loss.*``, ``logvar``); empty when the checkpoint has none.
    """

    unet: dict | None = None
    controlnet: dict | None = None
    sff: dict | None = None
    vae: dict | None = None
    text_encoder: dict | None = None
    schedule: dict[str, np.ndarray] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    loss: dict[str, torch.Tensor] = field(default_factory=dict)


def _unzipped(path: Path) -> Path:
    """The ``.ckpt`` inside an archive such as LDM's ``kl-f8.zip`` (extracted beside it once), or ``path``.

    A ``torch.save`` file is itself a zip; it is recognised by its ``data.pkl`` entry and returned as is.
    """
    import zipfile

    if path.suffix.lower() != ".zip" or not zipfile.is_zipfile(path):
        return path
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        if any(n.endswith("data.pkl") for n in names):
            return path
        members = [n for n in names if n.lower().endswith((".ckpt", ".safetensors", ".pt", ".pth"))]
        if len(members) != 1:
            raise ConversionError(f"{path}: expected one checkpoint inside the archive, found {members or names[:5]}")
        target = path.with_name(f"{path.stem}.{Path(members[0]).name}")
        if not target.is_file() or target.stat().st_size != archive.getinfo(members[0]).file_size:
            partial = target.with_name(target.name + ".part")
            with archive.open(members[0]) as source, open(partial, "wb") as sink:
                while chunk := source.read(1 << 24):
                    sink.write(chunk)
            partial.replace(target)
        return target


def read_checkpoint(path: Path | str) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors (a Lightning ``state_dict`` is unwrapped), read without running code."""
    from diffusers.loaders.single_file_utils import load_single_file_checkpoint

    try:
        state = load_single_file_checkpoint(str(_unzipped(Path(path))), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling refusals, truncated files: all mean "not readable"
        raise ConversionError(f"{path} cannot be read as a checkpoint ({type(exc).__name__}: {exc})") from exc
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _storages(tensors: Mapping[str, torch.Tensor]) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors.values() if isinstance(t, torch.Tensor) and t.numel()}


def convert_authors_state(state: Mapping[str, torch.Tensor], arch: Architecture) -> AuthorsState:
    """Convert a checkpoint of the authors' layout (see the module docstring).

    Raises
    ------
    ConversionError
        When keys are left that belong to no network, naming them.
    """
    from diffusers.loaders.single_file_utils import (convert_controlnet_checkpoint, convert_ldm_clip_checkpoint,
                                                     convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint)

    state = dict(state)
    out = AuthorsState()
    if any(k.startswith(UNET_PREFIX) for k in state):
        out.unet = convert_ldm_unet_checkpoint(state, dict(arch.unet))
    if any(k.startswith(CONTROL_PREFIX) for k in state):
        control = {k: v for k, v in state.items() if k.startswith(CONTROL_PREFIX)
                   and not _SFF_KEY.match(k[len(CONTROL_PREFIX):])}
        out.controlnet = convert_controlnet_checkpoint(control, dict(arch.unet))
        out.sff = {}
        for key, value in state.items():
            match = _SFF_KEY.match(key[len(CONTROL_PREFIX):]) if key.startswith(CONTROL_PREFIX) else None
            if match:
                source, target = int(match.group(1)), int(match.group(2))
                out.sff[f"paths.{target - 1}.{source - 1}.0.weight"] = value
    if any(k.startswith(VAE_PREFIX) for k in state):
        out.vae = convert_ldm_vae_checkpoint(state, dict(arch.vae))
    elif any(k.startswith(_AE_KEYS) for k in state):
        # A stand-alone LDM autoencoder (kl-f8 model.ckpt, the authors' fine-tuned mvtecad_fs.ckpt).
        out.vae = convert_ldm_vae_checkpoint({k: v for k, v in state.items() if k.startswith(_AE_KEYS)},
                                             dict(arch.vae))
    if any(k.startswith(CLIP_PREFIX) and "position_ids" not in k for k in state):
        text = convert_ldm_clip_checkpoint({k: v for k, v in state.items() if "position_ids" not in k})
        # transformers >= 5.6 flattened CLIPTextModel (no ``text_model.`` level), as diffusers handles it.
        out.text_encoder = {k.removeprefix("text_model."): v for k, v in text.items()} if not _clip_wrapped() else text
    out.schedule = {k: state[k].double().cpu().numpy() for k in SCHEDULE_KEYS if k in state}
    used = set()
    for part in (out.unet, out.controlnet, out.sff, out.vae, out.text_encoder):
        if part:
            used |= _storages(part)
    out.loss = {k[len(LOSS_PREFIX):]: v for k, v in state.items() if k.startswith(LOSS_PREFIX)}
    for key, value in state.items():
        if key in SCHEDULE_KEYS or key.startswith(LOSS_PREFIX):
            continue
        if key.startswith(IGNORED_PREFIXES) or (key.startswith(CLIP_PREFIX) and "position_ids" in key):
            out.ignored.append(key)
            continue
        if value.numel() and value.untyped_storage().data_ptr() not in used:
            raise ConversionError(f"checkpoint tensor {key} {tuple(value.shape)} belongs to no network DiAD builds "
                                  "(the architecture or the converter does not cover it)")
    return out


def _clip_wrapped() -> bool:
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        model = CLIPTextModel(CLIPTextConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                             num_attention_heads=1, max_position_embeddings=4, vocab_size=8))
    return hasattr(model, "text_model")


def load_strict(module: torch.nn.Module, state: Mapping[str, torch.Tensor] | None, where: str) -> None:
    """Load ``state`` into ``module`` with ``strict=True``; a mismatch is a :class:`ConversionError`."""
    if state is None:
        raise ConversionError(f"{where}: the checkpoint holds no tensors for this network")
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("with another shape", wrong)):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})")
        raise ConversionError(f"{where} does not fit the architecture: " + "; ".join(parts))
    module.load_state_dict(dict(state), strict=True)


def check_schedule(found: Mapping[str, np.ndarray], alphas_cumprod: np.ndarray, where: str) -> None:
    """Compare a checkpoint's ``alphas_cumprod`` with ours (the settings must describe its schedule)."""
    theirs = found.get("alphas_cumprod")
    if theirs is None:
        return
    if theirs.shape != alphas_cumprod.shape or not np.allclose(theirs, alphas_cumprod, rtol=1e-6, atol=1e-7):
        raise ConversionError(f"{where}: its noise schedule differs from the settings' (T, beta_start, beta_end, "
                              "beta_schedule); set them to the checkpoint's")


__all__ = ["AuthorsState", "ConversionError", "read_checkpoint", "convert_authors_state", "load_strict",
           "check_schedule", "UNET_PREFIX", "CONTROL_PREFIX", "VAE_PREFIX", "CLIP_PREFIX"]
