"""Jobs: one (method, dataset, protocol, shots, seed, profile) run, and where its record lives."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence


@dataclass(frozen=True)
class Job:
    """The key of one independent unit of work.

    Attributes
    ----------
    method, dataset, protocol, profile : str
    shots : int or None
        Shots per category for ``fewshot``, else None.
    seed : int
    overrides : tuple of (str, value)
        Settings given on the command line; they change the key so that a rerun with other
        settings does not reuse a record.
    """

    method: str
    dataset: str
    protocol: str
    shots: int | None
    seed: int
    profile: str
    overrides: tuple[tuple[str, Any], ...] = field(default=())

    @property
    def protocol_label(self) -> str:
        """``multiclass``, ``oneclass`` or ``fewshot-<k>shot``."""
        return f"{self.protocol}-{self.shots}shot" if self.protocol == "fewshot" else self.protocol

    @property
    def label(self) -> str:
        """Human-readable key, e.g. ``patchcore/tiny on synthetic multiclass seed 0``."""
        extra = f" {dict(self.overrides)}" if self.overrides else ""
        return f"{self.method}/{self.profile} on {self.dataset} {self.protocol_label} seed {self.seed}{extra}"

    def overrides_hash(self) -> str:
        """Short digest of the overrides ('' when there are none)."""
        if not self.overrides:
            return ""
        text = json.dumps(sorted(self.overrides), sort_keys=True, default=str)
        return hashlib.sha1(text.encode()).hexdigest()[:8]

    def relative_path(self) -> Path:
        """Record path relative to ``<results>/records``."""
        digest = self.overrides_hash()
        stem = f"{self.profile}-seed{self.seed}" + (f"-{digest}" if digest else "")
        return Path(self.dataset) / self.protocol_label / self.method / f"{stem}.json"

    def record_path(self, results_dir: Path) -> Path:
        """Absolute record path under ``results_dir``."""
        return Path(results_dir) / "records" / self.relative_path()

    def as_dict(self) -> dict[str, Any]:
        """JSON form stored in the record."""
        return {"method": self.method, "dataset": self.dataset, "protocol": self.protocol, "shots": self.shots,
                "seed": self.seed, "profile": self.profile, "overrides": dict(self.overrides)}


def expand_jobs(methods: Sequence[str], datasets: Sequence[str], protocol: str, shots: Sequence[int] | None,
                seeds: Sequence[int], profiles: Mapping[str, str], overrides: Mapping[str, Any] | None = None) -> list[Job]:
    """The cross product of the run's options, in a stable order (dataset, shots, seed, method).

    Parameters
    ----------
    profiles : mapping
        Profile per dataset name (the default profile may depend on the dataset).
    """
    items = tuple(sorted((overrides or {}).items()))
    shot_list: Sequence[int | None] = list(shots) if protocol == "fewshot" else [None]
    return [Job(m, d, protocol, k, s, profiles[d], items)
            for d in datasets for k in shot_list for s in seeds for m in methods]
