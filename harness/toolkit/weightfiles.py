"""The pinned weight file of a timm backbone, declared the same way by every method.

A method whose backbone is any timm model names its ImageNet weights with
:func:`timm_backbone_file`: the file as the Hugging Face hub serves it (``timm/NAME``,
``model.safetensors``), found on disk as ``NAME.safetensors`` or ``NAME.pth`` and fetched only by
``harness weights pull``. Methods that need one particular file (torchvision's WideResNet-50-2 V1,
UniAD's EfficientNet-b4) declare that file themselves and use this for every other backbone.

:func:`sha256_file` is the digest the resolver checks pinned files with (cached by path, size
and modification time), for a method that checks a file it reads by the digest in its name.

Importing this module is cheap (no torch, no timm), so a plugin module may call it.
"""

from __future__ import annotations

from harness import WeightFile
from harness.engine.weights import sha256_file

__all__ = ["timm_backbone_file", "sha256_file"]


def timm_backbone_file(name: str, *, key: str = "backbone", setting: str = "backbone_weights_file",
                       suffixes: tuple[str, ...] = (".safetensors", ".pth")) -> WeightFile:
    """The ImageNet weights of timm model ``name``, as a :class:`harness.WeightFile`.

    Parameters
    ----------
    name : str
        timm's model name (``resnet18``, ``wide_resnet50_2``, ...); the hub repository is ``timm/NAME``.
    key : str
        The file's key in the record's weights block.
    setting : str
        The setting that points at a file elsewhere on disk.
    suffixes : tuple of str
        The on-disk names accepted, ``NAME`` + each suffix, in order of preference.
    """
    return WeightFile(key=key, what=f"ImageNet weights of {name} (timm)",
                      filenames=tuple(f"{name}{suffix}" for suffix in suffixes),
                      repo_id=f"timm/{name}", filename="model.safetensors", setting=setting)
