"""timm backbones built without weights, and their pretrained weights loaded from disk only.

Methods build backbones with ``pretrained=False`` in their factory (so ``harness describe`` can
build them on the meta device) and, in ``fit``, load the file their spec declares with
:func:`load_weights` (a :class:`harness.WeightFile` resolved through the job's
:class:`harness.WeightFinder`, ``context.weights``; nothing is downloaded). :func:`read_state` reads
safetensors files directly and PyTorch files only with ``torch.load(weights_only=True)``, which
cannot run code. A randomly initialised backbone gets its BatchNorm statistics re-estimated on
the training images (:func:`recalibrate_batchnorm`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import timm
import torch

from harness.errors import WeightsNotFoundError
from harness.method import WeightFinder

if TYPE_CHECKING:  # pragma: no cover
    from harness.engine.weights import WeightsResolver
    from harness.specs import WeightFile

#: File names under which users commonly have each backbone's ImageNet weights, and the timm
#: Hugging Face repository of the same weights.
KNOWN_WEIGHTS: Mapping[str, tuple[Sequence[str], str]] = {
    "wide_resnet50_2": (("wide_resnet50_2.safetensors", "wide_resnet50_2.pth", "wide_resnet50_2-95faca4d.pth",
                         "wide_resnet50_2-9ba9bcbe.pth"), "timm/wide_resnet50_2.tv_in1k"),
    "resnet50": (("resnet50.safetensors", "resnet50.pth", "resnet50-19c8e357.pth", "resnet50-0676ba61.pth",
                  "resnet50-11ad3fa6.pth"), "timm/resnet50.tv_in1k"),
    "resnet18": (("resnet18.safetensors", "resnet18.pth", "resnet18-5c106cde.pth", "resnet18-f37072fd.pth"),
                 "timm/resnet18.tv_in1k"),
    "efficientnet_b4": (("efficientnet_b4.safetensors", "efficientnet_b4.pth"), "timm/efficientnet_b4.ra2_in1k"),
    "tf_efficientnet_b6": (("tf_efficientnet_b6.safetensors", "tf_efficientnet_b6.pth"),
                           "timm/tf_efficientnet_b6.ns_jft_in1k"),
}


def create_features(name: str, out_indices: Sequence[int]) -> torch.nn.Module:
    """A timm ``features_only`` backbone returning the stages ``out_indices``, randomly initialised."""
    return timm.create_model(name, pretrained=False, features_only=True, out_indices=tuple(out_indices))


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file, a PyTorch file (``weights_only=True``) or a timm folder.

    Nested ``state_dict`` / ``model`` entries of training checkpoints are unwrapped.
    """
    path = Path(path)
    if path.is_dir():
        for candidate in ("model.safetensors", "pytorch_model.bin"):
            if (path / candidate).is_file():
                return read_state(path / candidate)
        raise WeightsNotFoundError(f"{path} holds neither model.safetensors nor pytorch_model.bin")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


def find_weights(name: str, weights: "WeightsResolver", file: str | None = None) -> Path:
    """Where the ImageNet weights of backbone ``name`` are on disk.

    Parameters
    ----------
    name : str
        timm model name.
    weights : harness.engine.weights.WeightsResolver
        The engine's resolver (searching by file name is wider than :class:`harness.WeightFinder`;
        kept for plugins of the first API, which named backbones instead of declaring files).
    file : str, optional
        An explicit file (a setting), tried first.

    Raises
    ------
    WeightsNotFoundError
        Naming the files looked for and where, and the ``tiny`` profile.
    """
    names, repo = KNOWN_WEIGHTS.get(name, ((f"{name}.safetensors", f"{name}.pth"), f"timm/{name}"))
    try:
        return weights.find_file(names, f"ImageNet weights of {name}", extra=[Path(file)] if file else [])
    except WeightsNotFoundError as first:
        try:
            return weights.find_hf_model(repo, f"ImageNet weights of {name}")
        except WeightsNotFoundError:
            raise first from None


def load_pretrained(model: torch.nn.Module, name: str, weights: "WeightsResolver", file: str | None = None) -> Path:
    """Load ImageNet weights into a backbone built by :func:`create_features` (or a full model).

    Classifier weights in the file are ignored; every parameter of ``model`` must be found,
    otherwise the file is not the backbone it claims to be and an error says so.

    Returns
    -------
    Path
        The file (or folder) the weights came from, for the record.
    """
    path = find_weights(name, weights, file)
    state = read_state(path)
    missing, _unexpected = model.load_state_dict(state, strict=False)
    if missing:
        raise WeightsNotFoundError(f"{path} does not fit backbone {name}: {len(missing)} missing tensors, "
                                   f"e.g. {', '.join(missing[:3])}")
    return path


def load_weights(model: torch.nn.Module, file: "WeightFile", weights: WeightFinder, settings=None,
                 prefix: str = "") -> Path:
    """Resolve a declared weight file and load it into ``model`` (every parameter must be found).

    Parameters
    ----------
    model : torch.nn.Module
    file : harness.WeightFile
        The file the method's spec declares (its ``setting`` may name an explicit path).
    weights : harness.WeightFinder
        The job's resolver (``context.weights``); it remembers the file and its sha256.
    settings : mapping, optional
        The job's settings (for the explicit path).
    prefix : str
        Keep only the entries under this prefix, with the prefix removed.

    Returns
    -------
    Path
        The file read.

    Raises
    ------
    WeightsNotFoundError
        When the file is missing, or does not fit the model (it is not the backbone it claims).
    """
    path = weights.resolve(file, settings)
    state = read_state(path)
    if prefix:
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    missing, _unexpected = model.load_state_dict(state, strict=False)
    if missing:
        raise WeightsNotFoundError(f"{path} does not fit {file.what}: {len(missing)} missing tensors, "
                                   f"e.g. {', '.join(missing[:3])}")
    return path


@torch.no_grad()
def recalibrate_batchnorm(model: torch.nn.Module, batches) -> None:
    """Re-estimate BatchNorm running statistics from ``batches`` (cumulative average, no gradients).

    A randomly initialised backbone has BatchNorm statistics of N(0, 1) inputs; re-estimating
    them on the training images keeps every layer's activations in range, which makes random
    features far more useful for nearest-neighbour scoring (the ``tiny`` profiles rely on it).
    """
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    saved = [(m.momentum, m.training) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    for batch in batches:
        model(batch)
    for m, (momentum, training) in zip(norms, saved):
        m.momentum = momentum
        m.train(training)
