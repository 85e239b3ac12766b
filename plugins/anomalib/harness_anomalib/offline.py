"""Pretrained weights for anomalib's models, from disk only.

anomalib's models fetch their pretrained backbones while they are constructed (``timm.create_model(...,
pretrained=True)`` downloads from the Hugging Face hub). The harness never downloads during a run,
so the adapter builds every model inside :func:`weights_from_disk`:

- without files (the factory, ``tiny`` profiles, ``--weights random``) every ``timm.create_model``
  call gets ``pretrained=False``: the architecture only, randomly initialised;
- with files (a ``paper`` fit) each pretrained request is answered with the local file the method
  declared for that timm name (``pretrained_cfg_overlay={"file": path}``); a request for a name
  nobody declared is an error, never a download. ``HF_HUB_OFFLINE`` is set meanwhile, so a
  code path this module does not know fails instead of fetching.

torchvision backbones (CS-Flow's EfficientNet-B5, UniNet's teachers) are handled the same way:
without files ``WeightsEnum.verify`` answers None, so every torchvision builder builds a random
network; with files ``torch.hub.load_state_dict_from_url`` reads the declared file whose name is
the URL's last part (torchvision's names carry the first digits of the file's sha256). WinCLIP's
open_clip model gets ``pretrained=None`` (random) or the declared file's path.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping


class UndeclaredWeightsError(RuntimeError):
    """anomalib asked for pretrained weights that the method did not declare."""


@contextmanager
def weights_from_disk(files: Mapping[str, Path] | None) -> Iterator[list[str]]:
    """Build anomalib models with ``timm`` weights from ``files`` (timm name -> local file), or none.

    Parameters
    ----------
    files : mapping or None
        ``{timm model name: file}``; None or empty: every backbone is built randomly initialised.

    Yields
    ------
    list of str
        Filled with one line per ``timm.create_model`` call (name and what it got), for the record.
    """
    import timm
    import timm.models

    original = timm.create_model
    calls: list[str] = []

    def create_model(model_name, pretrained=False, *args, **kwargs):
        name = str(model_name)
        if not pretrained:
            calls.append(f"{name}: random init (anomalib asked for none)")
            return original(model_name, False, *args, **kwargs)
        if not files:
            calls.append(f"{name}: random init")
            return original(model_name, False, *args, **kwargs)
        path = files.get(name) or files.get(name.split(".")[0])
        if path is None:
            raise UndeclaredWeightsError(
                f"anomalib asked for pretrained weights of timm model {name!r}, which the method does not declare "
                f"(declared: {', '.join(files)}); nothing is downloaded at run time")
        calls.append(f"{name}: {path}")
        overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {}, file=str(path))
        kwargs.pop("pretrained_cfg", None)
        return original(model_name, True, *args, pretrained_cfg_overlay=overlay, **kwargs)

    import torch
    import torch.hub
    import torchvision.models._api as tv_api
    from torchvision.models._api import WeightsEnum

    original_verify = WeightsEnum.__dict__["verify"]
    original_url = torch.hub.load_state_dict_from_url
    original_tv_url = tv_api.load_state_dict_from_url

    def verify(cls, obj):
        if obj is None or files:
            return original_verify.__func__(cls, obj)
        calls.append(f"torchvision {cls.__name__}: random init")
        return None

    def load_state_dict_from_url(url, *args, **kwargs):
        name = str(url).rsplit("/", 1)[-1]
        path = (files or {}).get(name)
        if path is None:
            raise UndeclaredWeightsError(f"anomalib asked for {url}, which the method does not declare; nothing is "
                                         "downloaded at run time")
        calls.append(f"torchvision {name}: {path}")
        return torch.load(path, map_location="cpu", weights_only=True)

    clip_module, original_clip = _open_clip()

    def create_model_and_transforms(model_name, pretrained=None, *args, **kwargs):
        path = (files or {}).get("clip")
        if pretrained and path is None and files:
            raise UndeclaredWeightsError(f"anomalib asked for open_clip {model_name} ({pretrained}), which the method "
                                         "does not declare; nothing is downloaded at run time")
        calls.append(f"open_clip {model_name}: {path if path else 'random init'}")
        return original_clip(model_name, str(path) if path else None, *args, **kwargs)

    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    timm.create_model = create_model
    timm.models.create_model = create_model
    WeightsEnum.verify = classmethod(verify)
    torch.hub.load_state_dict_from_url = load_state_dict_from_url
    tv_api.load_state_dict_from_url = load_state_dict_from_url
    if clip_module is not None:
        clip_module.create_model_and_transforms = create_model_and_transforms
    try:
        yield calls
    finally:
        timm.create_model = original
        timm.models.create_model = original
        WeightsEnum.verify = original_verify
        torch.hub.load_state_dict_from_url = original_url
        tv_api.load_state_dict_from_url = original_tv_url
        if clip_module is not None:
            clip_module.create_model_and_transforms = original_clip
        if previous is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous


def _open_clip():
    """open_clip and its ``create_model_and_transforms`` (WinCLIP's backbone), if installed."""
    try:
        import open_clip
    except ImportError:
        return None, None
    return open_clip, open_clip.create_model_and_transforms
