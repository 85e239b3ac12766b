"""Pretrained weights: pinned, found on disk, verified, and fetched only on request.

Every file a profile needs is declared as a :class:`harness.WeightFile` (hub id, revision, file,
sha256 where known) by the method's ``weights(settings)``. Runs never download:
:class:`WeightsResolver` looks for each file, in order,

1. at the path named by the file's setting (e.g. ``backbone_weights_file``), when set;
2. in the directory given by ``--weights-dir`` (or ``$HARNESS_WEIGHTS``): under each of the
   file's names, or, for a model folder, as ``<dir>/<repo name>`` or ``<dir>/<org>/<repo name>``;
3. in the torch hub cache (``$TORCH_HOME/hub/checkpoints``) under each of the file's names;
4. in the Hugging Face cache (``$HF_HOME/hub``): the pinned revision's snapshot, else the
   newest snapshot of the repository.

A missing file is a :class:`WeightsNotFoundError` that names it, every place searched and the
command that fetches it (``harness weights pull --methods NAME``). Every file a job reads is
remembered with its sha256 (:attr:`WeightsResolver.used`), which the job's record lists; hashes
are cached by path, size and modification time, so a 5 GB checkpoint is hashed once.

``harness weights pull`` is the only network use of the harness: :func:`pull` fetches exactly
the declared files into the standard caches with ``huggingface_hub`` (``hf_hub_download`` /
``snapshot_download``) or ``torch.hub.download_url_to_file``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from harness.errors import HarnessError, WeightsNotFoundError, WeightsVerifyError

if TYPE_CHECKING:  # pragma: no cover
    from harness.specs import WeightFile

ENV_VAR = "HARNESS_WEIGHTS"
#: Model files hashed inside a model folder (a diffusers pipeline).
MODEL_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt")


class WeightsPullError(HarnessError):
    """``harness weights pull`` could not fetch a file (offline, unknown repository, ...)."""


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


def _hash_cache_path() -> Path:
    env = os.environ.get("HARNESS_HASH_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))
    return Path(base) / "harness" / "sha256.json"


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file, cached by (real path, size, mtime)."""
    path = Path(path)
    stat = path.stat()
    key = f"{os.path.realpath(path)}|{stat.st_size}|{stat.st_mtime_ns}"
    cache_path = _hash_cache_path()
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return cache[key]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    value = digest.hexdigest()
    cache[key] = value
    try:
        from harness.engine.support.fsutil import atomic_write

        atomic_write(cache_path, json.dumps(cache))
    except (OSError, HarnessError):
        pass  # a read-only home only costs hashing again
    return value


def model_files(path: Path) -> list[Path]:
    """The weight files of a file or model folder (the folder's model files, sorted)."""
    path = Path(path)
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in MODEL_SUFFIXES)


@dataclass(frozen=True)
class Located:
    """Where a declared weight file was looked for and found.

    Attributes
    ----------
    file : WeightFile
    path : Path or None
        The file or folder found, None when missing.
    searched : tuple of Path
        Every candidate, in order.
    refused : Path or None
        A file that looks like this one but is the wrong version (``WeightFile.refuse``).
    """

    file: "WeightFile"
    path: Path | None
    searched: tuple[Path, ...]
    refused: Path | None = None


class WeightsResolver:
    """Resolve weight files and model folders from local directories and caches.

    Parameters
    ----------
    weights_dir : path, optional
        The user's weights directory; defaults to ``$HARNESS_WEIGHTS``.
    pull_hint : str
        The command named in the error for a missing file.
    """

    def __init__(self, weights_dir: str | os.PathLike | None = None, pull_hint: str = "") -> None:
        env = os.environ.get(ENV_VAR)
        self.weights_dir = Path(weights_dir) if weights_dir else (Path(env) if env else None)
        self.pull_hint = pull_hint
        #: Files read through this resolver: ``{"key", "what", "path", "sha256"}``.
        self.used: list[dict[str, Any]] = []

    def search_dirs(self) -> list[Path]:
        """Directories searched for plain files, in order."""
        dirs = [d for d in (self.weights_dir,) if d is not None]
        return dirs + [torch_hub_dir()]

    # -- declared files ---------------------------------------------------------------------------
    def locate(self, file: "WeightFile", settings: Mapping[str, Any] | None = None) -> Located:
        """Find a declared file without raising (the preflight and ``harness weights list`` use it)."""
        candidates: list[Path] = []
        explicit = str((settings or {}).get(file.setting, "") or "") if file.setting else ""
        if explicit:
            candidates.append(Path(explicit).expanduser())
        if file.folder:
            if self.weights_dir is not None and file.repo_id:
                candidates += [self.weights_dir / file.repo_id.split("/")[-1], self.weights_dir / file.repo_id]
            candidates += [d / n for d in self.search_dirs() for n in file.filenames]
            candidates += self._hf_snapshots(file.repo_id, file.revision)
            found = next((p for p in candidates if p.is_dir() or (p.is_file() and p.suffix in MODEL_SUFFIXES)), None)
        else:
            candidates += [d / n for d in self.search_dirs() for n in file.filenames]
            if file.repo_id and file.filename:
                candidates += [snap / file.filename for snap in self._hf_snapshots(file.repo_id, file.revision)]
            found = next((p for p in candidates if p.is_file()), None)
        refused = None
        if found is not None and found.name in file.refuse:
            refused, found = found, None
        elif found is None and file.refuse:
            refused = next((d / n for d in self.search_dirs() for n in file.refuse if (d / n).is_file()), None)
        return Located(file, found, tuple(candidates), refused)

    def resolve(self, file: "WeightFile", settings: Mapping[str, Any] | None = None) -> Path:
        """The path of a declared file; remembers it (with its sha256) for the record.

        Raises
        ------
        WeightsNotFoundError
            Naming the file, where it was looked for and the ``harness weights pull`` command; or
            explaining why a look-alike file found (``WeightFile.refuse``) is not accepted.
        WeightsVerifyError
            When the file's sha256 differs from the pinned one.
        """
        located = self.locate(file, settings)
        if located.path is None:
            raise self.missing_error(located)
        if file.refuse_sha256 and located.path.is_file():
            # Checked before the file is remembered: a refused file is not one the job used.
            digest = sha256_file(located.path)
            if refused_digest(file, digest):
                raise WeightsNotFoundError(
                    f"{located.path} is not accepted as {file.what}: its sha256 {digest} is that of another version "
                    f"of these weights (accepted: {', '.join(file.filenames) or file.filename}). {self._pull_text()}")
        digest = self.note_used(located.path, file.what, file.key)
        if file.sha256 and not file.folder and digest != file.sha256:
            raise WeightsVerifyError(f"{located.path} ({file.what}) has sha256 {digest}, but the pinned file has "
                                     f"{file.sha256}: it is another file or damaged. {self._pull_text()}")
        return located.path

    def missing_error(self, located: Located) -> WeightsNotFoundError:
        """The error for a declared file that is not on disk."""
        file = located.file
        if located.refused is not None:
            return WeightsNotFoundError(
                f"{located.refused} is not accepted as {file.what}: it is another version of these weights "
                f"(accepted: {', '.join(file.filenames) or file.filename}). {self._pull_text()}")
        lines = "\n".join(f"  - {p}" for p in located.searched[:14])
        return WeightsNotFoundError(
            f"{file.what} not found: looked for {', '.join(file.filenames or (file.filename or file.repo_id,))} in\n"
            f"{lines}\n{self._pull_text()} Or put the file in {self.weights_dir or '$' + ENV_VAR + ' (--weights-dir)'}"
            f"{' or set ' + file.setting + '=PATH' if file.setting else ''}. Nothing is downloaded at run time. "
            "To exercise the code without weight files, use --weights random (or the 'tiny' profile).")

    def _pull_text(self) -> str:
        return (f"Fetch the pinned files with: {self.pull_hint}" if self.pull_hint
                else "Fetch the pinned files with: harness weights pull --methods METHOD")

    def note_used(self, path: Path, what: str, key: str = "") -> str:
        """Remember that a job read ``path`` (a file or a folder); return the file's sha256.

        For a folder, every model file in it is listed with its own sha256 and the digest
        returned is that of the sorted list.
        """
        path = Path(path)
        entries = []
        for item in model_files(path):
            entries.append({"key": key, "what": what, "path": str(item), "sha256": sha256_file(item)})
        known = {e["path"] for e in self.used}
        self.used += [e for e in entries if e["path"] not in known]
        if len(entries) == 1 and path.is_file():
            return entries[0]["sha256"]
        return hashlib.sha256("".join(e["sha256"] for e in entries).encode()).hexdigest()

    def _hf_snapshots(self, repo_id: str, revision: str = "") -> list[Path]:
        if not repo_id:
            return []
        repo = hf_hub_dir() / ("models--" + repo_id.replace("/", "--"))
        snapshots = repo / "snapshots"
        if not snapshots.is_dir():
            return [snapshots / (revision or "<revision>")]
        ordered = sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
        if revision:
            ref = repo / "refs" / revision
            commit = ref.read_text().strip() if ref.is_file() else revision
            pinned = [p for p in ordered if p.name == commit]
            return pinned + [p for p in ordered if p.name != commit]
        return ordered

    # -- the earlier, name-based API (kept for plugins written against it) ------------------------
    def find_file(self, names: Sequence[str], what: str, extra: Iterable[Path] = ()) -> Path:
        """Return the first existing file among ``names`` in the search directories (and remember it).

        Parameters
        ----------
        names : sequence of str
            Acceptable file names (e.g. the torchvision and timm names of the same weights).
        what : str
            Human description for the error ("ImageNet WideResNet-50-2 weights").
        extra : iterable of Path
            More candidate paths (e.g. a file named by a setting), tried first.

        Raises
        ------
        WeightsNotFoundError
        """
        candidates = [Path(p) for p in extra] + [d / n for d in self.search_dirs() for n in names]
        for path in candidates:
            if path.is_file():
                self.note_used(path, what)
                return path
        lines = "\n".join(f"  - {p}" for p in candidates[:12])
        raise WeightsNotFoundError(f"{what} not found: looked for {', '.join(names)} in\n{lines}\n"
                                   f"Put the file in {self.weights_dir or '$' + ENV_VAR + ' (--weights-dir)'}, or in "
                                   "the torch / Hugging Face cache, then run again. Nothing is downloaded at run "
                                   "time. To run without pretrained weights, use --weights random or the 'tiny' "
                                   "profile.")

    def find_hf_model(self, repo_id: str, what: str, local: Path | None = None) -> Path:
        """Return a local folder holding a Hugging Face model repository ``repo_id`` (and remember it)."""
        candidates: list[Path] = []
        if local is not None:
            candidates.append(Path(local))
        if self.weights_dir is not None:
            candidates += [self.weights_dir / repo_id.split("/")[-1], self.weights_dir / repo_id]
        candidates += [p for p in self._hf_snapshots(repo_id) if p.exists()]
        for path in candidates:
            if path.exists():
                self.note_used(path, what)
                return path
        lines = "\n".join(f"  - {p}" for p in candidates[:12]) or f"  - {hf_hub_dir()}"
        raise WeightsNotFoundError(f"{what} not found: looked for {repo_id} in\n{lines}\n{self._pull_text()} "
                                   "Nothing is downloaded at run time. To run without pretrained weights, use "
                                   "--weights random or the 'tiny' profile.")


# -- verify and pull ----------------------------------------------------------------------------

def refused_digest(file: "WeightFile", digest: str) -> bool:
    """Whether ``digest`` is one of the file's refused sha256 digests (or starts with a refused prefix)."""
    return any(digest.startswith(prefix.lower()) for prefix in getattr(file, "refuse_sha256", ()) if prefix)


def verify(located: Located) -> tuple[str, str]:
    """``(status, detail)`` of a located file: ``ok``, ``missing``, ``mismatch`` or ``unpinned``."""
    if located.path is None:
        return "missing", "not found"
    file = located.file
    if file.folder:
        return "unpinned", f"{len(model_files(located.path))} model file(s); folders are not pinned by hash"
    digest = sha256_file(located.path)
    if refused_digest(file, digest):
        return "mismatch", f"{digest} is a refused version of these weights"
    if not file.sha256:
        return "unpinned", digest
    return ("ok", digest) if digest == file.sha256 else ("mismatch", f"{digest} != pinned {file.sha256}")


def _offline_error(file: "WeightFile", exc: BaseException) -> WeightsPullError:
    return WeightsPullError(
        f"cannot fetch {file.what} ({file.repo_id or file.url}): {type(exc).__name__}: {exc}. "
        "This machine seems to be offline. On a machine with network access run the same "
        "'harness weights pull' command, then copy the caches (~/.cache/huggingface, ~/.cache/torch) or "
        "the files into --weights-dir here.")


def pull(file: "WeightFile") -> Path:
    """Fetch one declared file into the standard Hugging Face or torch cache; return its path.

    Raises
    ------
    WeightsPullError
        When the network is unreachable or the source refuses; the message says what to do.
    """
    if file.repo_id:
        try:
            import huggingface_hub as hub

            if file.folder:
                path = hub.snapshot_download(file.repo_id, revision=file.revision or None,
                                             allow_patterns=list(file.allow_patterns) or None)
            else:
                path = hub.hf_hub_download(file.repo_id, file.filename, revision=file.revision or None)
        except Exception as exc:  # noqa: BLE001 - network, auth and hub errors all end the same way
            raise _offline_error(file, exc) from exc
        return Path(path)
    if file.url:
        import torch.hub

        target = torch_hub_dir() / (file.filenames[0] if file.filenames else file.url.rsplit("/", 1)[-1])
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(file.url, str(target), hash_prefix=file.sha256[:8] or None,
                                           progress=False)
        except Exception as exc:  # noqa: BLE001
            raise _offline_error(file, exc) from exc
        return target
    raise WeightsPullError(f"{file.what} declares neither a hub repository nor a URL; it cannot be pulled. "
                           "Put it in --weights-dir by hand.")
