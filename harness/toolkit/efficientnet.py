"""EfficientNet-b4 as UniAD loads it: the pinned weight file and its tensors renamed for timm.

UniAD (zhiyuanyou/UniAD, ``models/backbones/efficientnet``) builds its own copy of
EfficientNet-PyTorch 0.7.1 (lukemelas) and loads ``efficientnet-b4-6ed6700e.pth``, the
TensorFlow EfficientNet-b4 ImageNet checkpoint ported to PyTorch (its MVTec-AD config:
``pretrained: True``, the ``efficientnet-b4`` entry of its ``model_urls``). timm's
``tf_efficientnet_b4`` is the same network with other parameter names:
:func:`convert_efficientnet_pytorch` renames the file's tensors. UniAD and LafitE both use it,
through :class:`harness.toolkit.multiscale.MultiScaleFeatures`.

Importing this module is cheap (no torch, no timm), so a plugin module may name the weight file.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

from harness import WeightFile

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

#: The EfficientNet-b4 ImageNet weights UniAD loads (``pretrained_model`` in its MVTec-AD config,
#: the ``efficientnet-b4`` entry of its ``model_urls``): EfficientNet-PyTorch's port of the
#: TensorFlow checkpoint. The hex digits in the name are not a sha256 prefix (unlike
#: torchvision's), so nothing is pinned; the record lists the file's sha256.
UNIAD_EFFICIENTNET_B4 = WeightFile(
    key="backbone", what="EfficientNet-b4 ImageNet weights as UniAD loads them (EfficientNet-PyTorch 1.0 release, "
                         "TensorFlow port)",
    filenames=("efficientnet-b4-6ed6700e.pth",),
    url="https://github.com/lukemelas/EfficientNet-PyTorch/releases/download/1.0/efficientnet-b4-6ed6700e.pth",
    setting="backbone_weights_file",
)

def multiscale_backbone_files(settings) -> list[WeightFile]:
    """The pinned ImageNet file of a UniAD-style feature extractor: UniAD's EfficientNet-b4 file for
    ``tf_efficientnet_b4``, any other timm backbone's own file, none when ``backbone_pretrained`` is off.

    UniAD and LafitE both declare their weights with it (``settings.backbone``,
    ``settings.backbone_pretrained``).
    """
    from harness.toolkit.weightfiles import timm_backbone_file

    if not settings.backbone_pretrained:
        return []
    if settings.backbone == "tf_efficientnet_b4":
        return [UNIAD_EFFICIENTNET_B4]
    return [timm_backbone_file(settings.backbone)]


#: EfficientNet-PyTorch names inside a block -> timm names, for blocks with an expansion
#: convolution (timm ``InvertedResidual``) and without one (timm ``DepthwiseSeparableConv``).
_EXPANDED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand", "_project_conv": "conv_pwl",
             "_bn2": "bn3"}
_DEPTHWISE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_se_reduce": "se.conv_reduce",
              "_se_expand": "se.conv_expand", "_project_conv": "conv_pw", "_bn2": "bn2"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def is_efficientnet_pytorch_state(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether a state dict uses EfficientNet-PyTorch's (and UniAD's) names (``_conv_stem``, ``_blocks.N``)."""
    return "_conv_stem.weight" in state and any(k.startswith("_blocks.") for k in state)


def convert_efficientnet_pytorch(state: Mapping[str, torch.Tensor], target: nn.Module) -> dict[str, torch.Tensor]:
    """Rename an EfficientNet-PyTorch state dict for a timm ``tf_efficientnet_*`` network.

    EfficientNet-PyTorch numbers its blocks in one flat list; timm nests them by stage. The
    flat index is mapped onto ``target.blocks`` stage by stage (blocks ``target`` does not have,
    e.g. the ones :func:`drop_unused_blocks` removed, are left out, as are the classifier head's
    tensors when ``target`` has none). Shapes are checked, so a file for another width fails here.

    Parameters
    ----------
    state : mapping
        The file's tensors (``_conv_stem.weight``, ``_blocks.0._depthwise_conv.weight``, ...).
    target : torch.nn.Module
        The timm network (full or ``features_only``) the result is loaded into.

    Returns
    -------
    dict
        timm-named tensors.

    Raises
    ------
    ValueError
        When a tensor's shape differs from the target's.
    """
    flat = [f"blocks.{s}.{j}" for s, stage in enumerate(target.blocks) for j in range(len(stage))]
    wanted = target.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head == "_blocks":
            index, _, inner = rest.partition(".")
            if int(index) >= len(flat):
                continue
            module, _, leaf = inner.partition(".")
            expanded = f"_blocks.{index}._expand_conv.weight" in state
            names = _EXPANDED if expanded else _DEPTHWISE
            if module not in names:
                raise ValueError(f"unknown EfficientNet-PyTorch tensor {key}")
            name = f"{flat[int(index)]}.{names[module]}.{leaf}"
        elif head in _TOP:
            name = f"{_TOP[head]}.{rest}"
        else:
            raise ValueError(f"unknown EfficientNet-PyTorch tensor {key}")
        if name not in wanted:
            continue
        if tuple(wanted[name].shape) != tuple(value.shape):
            raise ValueError(f"{key} has shape {tuple(value.shape)}, but {name} of the network is "
                             f"{tuple(wanted[name].shape)}: the file is for another EfficientNet")
        out[name] = value
    return out
