"""Find pretrained weights on disk. Nothing is ever downloaded.

Search order for a file or folder ``name``:

1. the directory given by ``--weights-dir`` (or the ``HARNESS_WEIGHTS`` environment variable);
2. the standard caches: torch hub (``$TORCH_HOME/hub/checkpoints``), Hugging Face
   (``$HF_HOME/hub``, snapshots of ``models--org--name``);
3. any extra candidates the method names.

When nothing is found, :class:`WeightsNotFoundError` names the file, the places searched, where
to put it, and the ``tiny`` profile that needs no weights.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

from harness.errors import WeightsNotFoundError

ENV_VAR = "HARNESS_WEIGHTS"


def torch_hub_dir() -> Path:
    """The torch hub checkpoint cache (``$TORCH_HOME/hub/checkpoints``)."""
    home = os.environ.get("TORCH_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "torch")
    return Path(home) / "hub" / "checkpoints"


def hf_hub_dir() -> Path:
    """The Hugging Face hub cache (``$HF_HUB_CACHE`` or ``$HF_HOME/hub``)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "huggingface")
    return Path(home) / "hub"


class WeightsResolver:
    """Resolve weight files and model folders from local directories and caches.

    Parameters
    ----------
    weights_dir : path, optional
        The user's weights directory; defaults to ``$HARNESS_WEIGHTS``.
    """

    def __init__(self, weights_dir: str | os.PathLike | None = None) -> None:
        env = os.environ.get(ENV_VAR)
        self.weights_dir = Path(weights_dir) if weights_dir else (Path(env) if env else None)

    def search_dirs(self) -> list[Path]:
        """Directories searched for plain files, in order."""
        dirs = [d for d in (self.weights_dir,) if d is not None]
        return dirs + [torch_hub_dir()]

    def find_file(self, names: Sequence[str], what: str, extra: Iterable[Path] = ()) -> Path:
        """Return the first existing file among ``names`` in the search directories.

        Parameters
        ----------
        names : sequence of str
            Acceptable file names (e.g. the torchvision and timm names of the same weights).
        what : str
            Human description for the error ("ImageNet WideResNet-50-2 weights").
        extra : iterable of Path
            More candidate paths (e.g. a file named by a setting).

        Raises
        ------
        WeightsNotFoundError
        """
        candidates = [Path(p) for p in extra] + [d / n for d in self.search_dirs() for n in names]
        for path in candidates:
            if path.is_file():
                return path
        raise self._missing(what, names, candidates)

    def find_hf_model(self, repo_id: str, what: str, local: Path | None = None) -> Path:
        """Return a local folder holding a Hugging Face model repository ``repo_id``.

        Looks in ``local``, in ``<weights_dir>/<repo name>`` and ``<weights_dir>/<org>/<name>``,
        and in the HF cache's newest snapshot of ``models--org--name``.
        """
        candidates: list[Path] = []
        if local is not None:
            candidates.append(Path(local))
        if self.weights_dir is not None:
            candidates += [self.weights_dir / repo_id.split("/")[-1], self.weights_dir / repo_id]
        snapshots = hf_hub_dir() / ("models--" + repo_id.replace("/", "--")) / "snapshots"
        if snapshots.is_dir():
            candidates += sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
        for path in candidates:
            if path.exists():
                return path
        raise self._missing(what, [repo_id], candidates or [snapshots])

    def _missing(self, what: str, names: Sequence[str], searched: Sequence[Path]) -> WeightsNotFoundError:
        where = self.weights_dir or f"${ENV_VAR} (or --weights-dir)"
        lines = "\n".join(f"  - {p}" for p in searched[:12])
        return WeightsNotFoundError(
            f"{what} not found: looked for {', '.join(names)} in\n{lines}\n"
            f"Put the file in {where}, or in the torch / Hugging Face cache, then run again. "
            "Nothing is downloaded at run time. To run without pretrained weights, use the "
            "'tiny' profile (--profile tiny)."
        )
