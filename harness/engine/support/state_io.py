"""Save and load nested state (what ``state_dict()`` returns) without pickle.

A state is a tree of mappings, lists and tuples whose leaves are tensors, NumPy arrays, numbers,
strings, booleans or None: a method's ``state_dict()``, an optimiser's (whose ``state`` is keyed
by int), a NumPy ``Generator``'s ``bit_generator.state``, ``random.getstate()``. It is written as
one safetensors file: every tensor (and NumPy array) is a tensor of the file, named by its path
in the tree, and the tree itself, with references in place of the tensors, is JSON in the file's
metadata. Loading reads tensors with safetensors and structure with ``json``: nothing in the file
can run code, whoever wrote it. A leaf of any other type is refused when saving, naming its path.

Files are written atomically (:mod:`harness.engine.support.fsutil`). A file that is truncated or otherwise
unreadable raises :class:`DamagedStateError` naming it, so callers can move it aside.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from harness.errors import HarnessError
from harness.engine.support.fsutil import atomic_write_with

#: Metadata key holding the JSON tree.
TREE_KEY = "harness.state_tree"
#: Metadata key holding free-form JSON the caller attaches (e.g. the step of a checkpoint).
INFO_KEY = "harness.state_info"
FORMAT_KEY = "harness.state_format"
FORMAT = "harness-state/1"


class DamagedStateError(HarnessError):
    """A state file is truncated, not a harness state file, or inconsistent."""


class UnsupportedStateError(HarnessError, TypeError):
    """A state holds a value that cannot be stored without pickle; the message names its path."""


def _encode(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        key = path or "root"
        tensor = value.detach()
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        tensors[key] = tensor
        return {"__tensor__": key}
    if isinstance(value, np.ndarray):
        key = path or "root"
        tensors[key] = torch.from_numpy(np.ascontiguousarray(value))
        return {"__ndarray__": key}
    if isinstance(value, np.generic):
        return _encode(value.item(), path, tensors)
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return {"__float__": repr(value)}
    if isinstance(value, torch.Size):
        return {"__tuple__": [int(v) for v in value]}
    if isinstance(value, torch.dtype):
        return {"__dtype__": str(value).removeprefix("torch.")}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        if all(isinstance(k, str) for k in value) and not any(k.startswith("__") and k.endswith("__") for k in value):
            return {k: _encode(v, f"{path}/{k}" if path else k, tensors) for k, v in value.items()}
        items = []
        for k, v in value.items():
            if not isinstance(k, (str, int, bool)) and k is not None:
                raise UnsupportedStateError(f"state key {k!r} at {path or '/'} is a {type(k).__name__}; "
                                            "use str or int keys")
            items.append([k, _encode(v, f"{path}/{k}" if path else str(k), tensors)])
        return {"__items__": items}
    raise UnsupportedStateError(f"state value at {path or '/'} is a {type(value).__name__}, which cannot be "
                                "stored without pickle; store tensors, arrays, numbers, strings, lists or dicts")


def _decode(node: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(node, list):
        return [_decode(v, tensors) for v in node]
    if not isinstance(node, dict):
        return node
    if "__tensor__" in node:
        return tensors[node["__tensor__"]]
    if "__ndarray__" in node:
        return tensors[node["__ndarray__"]].numpy()
    if "__float__" in node:
        return float(node["__float__"])
    if "__tuple__" in node:
        return tuple(_decode(v, tensors) for v in node["__tuple__"])
    if "__dtype__" in node:
        return getattr(torch, node["__dtype__"])
    if "__items__" in node:
        return {k: _decode(v, tensors) for k, v in node["__items__"]}
    return {k: _decode(v, tensors) for k, v in node.items()}


def _unshare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing memory (tied weights, views): give each its own copy."""
    seen: dict[tuple[int, int], str] = {}
    out = {}
    for key, tensor in tensors.items():
        if tensor.numel() == 0:
            out[key] = tensor.contiguous()
            continue
        storage = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        if storage in seen or not tensor.is_contiguous() or tensor.storage_offset() or \
                tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
            out[key] = tensor.contiguous().clone()
        else:
            out[key] = tensor
        seen.setdefault(storage, key)
    return out


def save_state(path: Path, state: Any, info: Mapping[str, Any] | None = None) -> None:
    """Write ``state`` (a tree, see the module docstring) to ``path`` atomically.

    Parameters
    ----------
    path : Path
        Destination, conventionally ``*.safetensors``.
    state : object
        The tree.
    info : mapping, optional
        JSON-serialisable facts stored beside the tree (read back by :func:`read_info` without
        loading any tensor).
    """
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(state, "", tensors)
    metadata = {FORMAT_KEY: FORMAT, TREE_KEY: json.dumps(tree), INFO_KEY: json.dumps(dict(info or {}), default=str)}
    tensors = _unshare(tensors)
    atomic_write_with(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types on a bad header
        raise DamagedStateError(f"{path} is not a readable state file ({type(exc).__name__}: {exc})") from exc
    if metadata.get(FORMAT_KEY) != FORMAT or TREE_KEY not in metadata:
        raise DamagedStateError(f"{path} is a safetensors file but not one the harness wrote (no state tree)")
    return metadata


def read_info(path: Path) -> dict[str, Any]:
    """The ``info`` stored with a state file, without reading its tensors."""
    try:
        return json.loads(_metadata(Path(path)).get(INFO_KEY, "{}"))
    except ValueError as exc:
        raise DamagedStateError(f"{path}: its metadata is not valid JSON ({exc})") from exc


def load_state(path: Path, device: torch.device | str | None = None) -> tuple[Any, dict[str, Any]]:
    """Read a file written by :func:`save_state`: ``(state, info)``.

    Raises
    ------
    DamagedStateError
        When the file is truncated, not a state file, or its tensors do not match its tree.
    """
    from safetensors.torch import load_file

    path = Path(path)
    metadata = _metadata(path)
    try:
        tensors = load_file(str(path), device=str(device) if device is not None else "cpu")
        tree = json.loads(metadata[TREE_KEY])
        info = json.loads(metadata.get(INFO_KEY, "{}"))
        return _decode(tree, tensors), info
    except (KeyError, ValueError, OSError, RuntimeError) as exc:
        raise DamagedStateError(f"{path} is damaged ({type(exc).__name__}: {exc})") from exc
    except Exception as exc:  # noqa: BLE001 - safetensors' own errors for a truncated body
        raise DamagedStateError(f"{path} is damaged ({type(exc).__name__}: {exc})") from exc
