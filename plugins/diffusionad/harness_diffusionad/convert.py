"""Load the authors' DiffusionAD weights: their state_dict layout mapped onto our networks.

The authors' code (HuiZhang0812/DiffusionAD) saves ``UNetModel.state_dict()`` and
``SegmentationSubNetwork.state_dict()``; the checkpoints their ``train.py`` writes (``params-best.pt``, one per
category) hold them under ``unet_model_state_dict`` and ``seg_model_state_dict``. No library
conversion exists for this layout (diffusers converts Stable Diffusion / ControlNet checkpoints,
not guided-diffusion UNets), so the map is derived here from the network configuration:

UNet (ours: a diffusers ``UNet2DModel``, :func:`harness_diffusionad.networks.build_denoiser`)
    ``time_embedding.{1,3}`` -> ``time_embedding.linear_{1,2}``; ``down.0.0`` -> ``conv_in``;
    then ``down.k`` walks the levels: per level ``layers_per_block`` blocks ``down.k.0`` (residual)
    and ``down.k.1`` (attention, where the level has it) -> ``down_blocks.L.resnets.j`` /
    ``attentions.j``, then the resampling residual block -> ``down_blocks.L.downsamplers.0``;
    ``middle.{0,1,2}`` -> ``mid_block.resnets.0``, ``attentions.0``, ``resnets.1``; ``up.k`` walks
    the levels from the deepest, ``layers_per_block + 1`` blocks each, the last one of every level
    but the first carrying the up-sampling residual block -> ``up_blocks.U.upsamplers.0``;
    ``out.{0,2}`` -> ``conv_norm_out`` / ``conv_out``.
    Inside a residual block: ``in_layers.{0,2}`` -> ``norm1`` / ``conv1``, ``embed_layers.1`` ->
    ``time_emb_proj``, ``out_layers.{0,3}`` -> ``norm2`` / ``conv2``, ``skip_connection`` ->
    ``conv_shortcut``. Inside an attention block: ``norm`` -> ``group_norm``; the fused
    ``to_qkv`` 1-D convolution (output channels ordered head by head, q, k, v within a head: the
    legacy ``QKVAttention`` split) is cut into ``to_q``, ``to_k``, ``to_v``; ``proj_out`` ->
    ``to_out.0`` (a 1x1 convolution becomes a linear layer).
Segmentation network (:class:`harness_diffusionad.networks.SegmentationSubNetwork`, depth 6)
    ``encoder_segment.blockN`` -> ``encoder.{N-1}``; ``decoder_segment.up_b`` / ``db_b`` ->
    ``ups.0`` / ``decoder.0``; ``upN`` / ``dbN`` -> ``ups.N`` / ``decoder.N``;
    ``fin_out.0`` -> ``head``. Layer indices inside each block are the same.

Every key of the authors' state_dict must be used and every key of ours filled (a mismatch
raises :class:`ConversionError` naming the keys), so a configuration that differs from the
checkpoint's is found at load time, not as wrong outputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from harness.errors import HarnessError

#: Keys of the two networks in the authors' checkpoints (``train.py``'s ``save``).
UNET_KEY, SEG_KEY = "unet_model_state_dict", "seg_model_state_dict"


class ConversionError(HarnessError):
    """An official state_dict does not fit the configured network; the message lists the keys."""


def _resblock(src: str, dst: str) -> dict[str, str]:
    pairs = {"in_layers.0": "norm1", "in_layers.2": "conv1", "embed_layers.1": "time_emb_proj",
             "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
    return {f"{src}.{a}": f"{dst}.{b}" for a, b in pairs.items()}


def _module_map(model: nn.Module) -> tuple[dict[str, str], dict[str, str]]:
    """(residual block prefixes, attention prefixes): official prefix -> our prefix."""
    down_blocks, up_blocks = model.down_blocks, model.up_blocks
    res: dict[str, str] = {}
    attn: dict[str, str] = {}
    k = 1
    for level, block in enumerate(down_blocks):
        has_attn = hasattr(block, "attentions") and len(block.attentions) > 0
        for j in range(len(block.resnets)):
            res[f"down.{k}.0"] = f"down_blocks.{level}.resnets.{j}"
            if has_attn:
                attn[f"down.{k}.1"] = f"down_blocks.{level}.attentions.{j}"
            k += 1
        if block.downsamplers:
            res[f"down.{k}.0"] = f"down_blocks.{level}.downsamplers.0"
            k += 1
    res["middle.0"] = "mid_block.resnets.0"
    attn["middle.1"] = "mid_block.attentions.0"
    res["middle.2"] = "mid_block.resnets.1"
    k = 0
    for u, block in enumerate(up_blocks):
        has_attn = hasattr(block, "attentions") and len(block.attentions) > 0
        n = len(block.resnets)
        for j in range(n):
            res[f"up.{k}.0"] = f"up_blocks.{u}.resnets.{j}"
            if has_attn:
                attn[f"up.{k}.1"] = f"up_blocks.{u}.attentions.{j}"
            if j == n - 1 and block.upsamplers:
                res[f"up.{k}.{2 if has_attn else 1}"] = f"up_blocks.{u}.upsamplers.0"
            k += 1
    return res, attn


def _finish(mapped: dict[str, torch.Tensor], used: set[str], official: Mapping[str, torch.Tensor],
            target: nn.Module, what: str) -> dict[str, torch.Tensor]:
    """Check that every official key was used and every target key filled, with matching shapes."""
    unused = sorted(set(official) - used)
    ours = target.state_dict()
    missing = sorted(set(ours) - set(mapped))
    extra = sorted(set(mapped) - set(ours))
    wrong = sorted(k for k in set(mapped) & set(ours) if tuple(mapped[k].shape) != tuple(ours[k].shape))
    problems = []
    if unused:
        problems.append(f"official keys without a place in our network: {unused[:8]}{' ...' if len(unused) > 8 else ''}")
    if missing:
        problems.append(f"our keys the official state does not fill: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if extra:
        problems.append(f"converted keys our network lacks: {extra[:8]}")
    if wrong:
        problems.append("shape mismatches: " + ", ".join(
            f"{k} {tuple(mapped[k].shape)} vs ours {tuple(ours[k].shape)}" for k in wrong[:8]))
    if problems:
        raise ConversionError(f"the official {what} state_dict does not fit the configured network (check "
                              "image_size, base_channels, channel_mults, layers_per_block, attention_resolutions, "
                              "seg_base_channels, seg_depth): " + "; ".join(problems))
    return {k: mapped[k] for k in ours}


def convert_unet_state(official: Mapping[str, torch.Tensor], model: nn.Module, num_heads: int) -> dict[str, torch.Tensor]:
    """The authors' ``UNetModel.state_dict()`` as a state_dict of our ``model``.

    Parameters
    ----------
    official : mapping
        Official key names (``down.1.0.in_layers.0.weight``, ...).
    model : diffusers.UNet2DModel
        Built by :func:`harness_diffusionad.networks.build_denoiser` with the checkpoint's
        configuration (any device, the meta device included).
    num_heads : int
        Attention heads (needed to split the fused q, k, v projection).

    Returns
    -------
    dict
        Ready for ``model.load_state_dict(..., strict=True)``.
    """
    res, attn = _module_map(model)
    direct = {"time_embedding.1": "time_embedding.linear_1", "time_embedding.3": "time_embedding.linear_2",
              "down.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}
    for src, dst in res.items():
        direct.update(_resblock(src, dst))
    mapped: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for key, value in official.items():
        prefix, _, leaf = key.rpartition(".")
        if prefix in direct:
            mapped[f"{direct[prefix]}.{leaf}"] = value
            used.add(key)
    for src, dst in attn.items():
        names = {f"{src}.{n}.{leaf}" for n in ("norm", "to_qkv", "proj_out") for leaf in ("weight", "bias")}
        if not names <= set(official):
            continue  # reported below as missing keys of ours
        mapped[f"{dst}.group_norm.weight"] = official[f"{src}.norm.weight"]
        mapped[f"{dst}.group_norm.bias"] = official[f"{src}.norm.bias"]
        qkv_w, qkv_b = official[f"{src}.to_qkv.weight"], official[f"{src}.to_qkv.bias"]
        channels = qkv_w.shape[1]
        if channels % num_heads:
            raise ConversionError(f"{src}: {channels} channels are not divisible by {num_heads} heads")
        head = channels // num_heads
        # Output channel order of the fused projection: head h's q, k, v are rows
        # [h*3*head, h*3*head + head), then k, then v (the legacy QKVAttention reshape).
        w = qkv_w.reshape(num_heads, 3, head, channels)
        b = qkv_b.reshape(num_heads, 3, head)
        for i, name in enumerate(("to_q", "to_k", "to_v")):
            mapped[f"{dst}.{name}.weight"] = w[:, i].reshape(channels, channels).contiguous()
            mapped[f"{dst}.{name}.bias"] = b[:, i].reshape(channels).contiguous()
        mapped[f"{dst}.to_out.0.weight"] = official[f"{src}.proj_out.weight"].reshape(channels, channels)
        mapped[f"{dst}.to_out.0.bias"] = official[f"{src}.proj_out.bias"]
        used |= names
    return _finish(mapped, used, official, model, "UNet")


def convert_seg_state(official: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """The authors' ``SegmentationSubNetwork.state_dict()`` as a state_dict of ours.

    Parameters
    ----------
    official : mapping
        Official key names (``encoder_segment.block1.0.weight``, ...), BatchNorm buffers included.
    model : SegmentationSubNetwork
        Ours, with ``depth=6`` (the authors' network has six stages).
    """
    depth = getattr(model, "depth", None)
    if depth != 6:
        raise ConversionError(f"the authors' segmentation network has 6 stages; ours is built with seg_depth={depth}")
    prefixes = {f"encoder_segment.block{n}": f"encoder.{n - 1}" for n in range(1, 7)}
    prefixes.update({"decoder_segment.up_b": "ups.0", "decoder_segment.db_b": "decoder.0",
                     "decoder_segment.fin_out.0": "head"})
    prefixes.update({f"decoder_segment.up{n}": f"ups.{n}" for n in range(1, 5)})
    prefixes.update({f"decoder_segment.db{n}": f"decoder.{n}" for n in range(1, 5)})
    mapped: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for key, value in official.items():
        for src, dst in prefixes.items():
            if key.startswith(src + "."):
                mapped[dst + key[len(src):]] = value
                used.add(key)
                break
    return _finish(mapped, used, official, model, "segmentation")


def _plain_dict(factory: Any = None) -> dict:
    """Stand-in for ``collections.defaultdict`` while unpickling: the authors' ``args`` become a dict."""
    return {}


def read_official_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read an authors' ``params-*.pt`` with ``torch.load(weights_only=True)``.

    The file also holds ``args``, a ``collections.defaultdict(str)`` of the training settings,
    which the weights-only unpickler cannot fill; that one global is read as a plain dict (no
    other code can run), and ``str`` is allowed as its default factory.

    Returns
    -------
    dict
        ``unet_model_state_dict``, ``seg_model_state_dict``, and ``n_epoch`` / ``args`` when present.

    Raises
    ------
    ConversionError
        When the file lacks either state_dict.
    """
    path = Path(path)
    with torch.serialization.safe_globals([(_plain_dict, "collections.defaultdict"), str]):
        data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, Mapping) or UNET_KEY not in data or SEG_KEY not in data:
        keys = list(data) if isinstance(data, Mapping) else type(data).__name__
        raise ConversionError(f"{path} is not an authors' DiffusionAD checkpoint: expected {UNET_KEY!r} and "
                              f"{SEG_KEY!r}, found {keys}")
    return dict(data)


def load_official(denoiser: nn.Module, segmenter: nn.Module, unet_state: Mapping[str, torch.Tensor],
                  seg_state: Mapping[str, torch.Tensor], num_heads: int) -> None:
    """Load official state_dicts into our networks (strict, shapes checked)."""
    denoiser.load_state_dict(convert_unet_state(unet_state, denoiser, num_heads), strict=True)
    segmenter.load_state_dict(convert_seg_state(seg_state, segmenter), strict=True)


__all__ = ["ConversionError", "convert_unet_state", "convert_seg_state", "read_official_checkpoint", "load_official",
           "UNET_KEY", "SEG_KEY"]
