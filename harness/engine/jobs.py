"""Jobs: one (method, dataset, protocol, shots, seed, profile) run, and where its record lives."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

#: The dataset of a run that names none: the embedded synthetic set (offline, seconds).
DEFAULT_DATASET = "synthetic"


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
    dev_run : bool
        ``--fast-dev-run``: a smoke test of the real code, never a result.
    weights : str
        ``pretrained`` or ``random`` (``--weights random``: never a result).
    eval_grid : str
        ``harness`` or ``paper`` (``--eval-grid``): a paper-grid record never stands in for a
        harness-grid one.
    """

    method: str
    dataset: str
    protocol: str
    shots: int | None
    seed: int
    profile: str
    overrides: tuple[tuple[str, Any], ...] = field(default=())
    dev_run: bool = False
    weights: str = "pretrained"
    eval_grid: str = "harness"

    @property
    def protocol_label(self) -> str:
        """``multiclass``, ``oneclass`` or ``fewshot-<k>shot``."""
        return f"{self.protocol}-{self.shots}shot" if self.protocol == "fewshot" else self.protocol

    @property
    def label(self) -> str:
        """Human-readable key, e.g. ``patchcore/tiny on synthetic multiclass seed 0``."""
        extra = f" {dict(self.overrides)}" if self.overrides else ""
        marks = "".join([" [dev run]" if self.dev_run else "", " [random weights]" if self.weights == "random" else "",
                         " [paper grid]" if self.eval_grid == "paper" else ""])
        return f"{self.method}/{self.profile} on {self.dataset} {self.protocol_label} seed {self.seed}{extra}{marks}"

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
        # Smoke tests get their own files, so they never stand in for (or skip) a real job.
        stem += ("-devrun" if self.dev_run else "") + ("-randomweights" if self.weights == "random" else "")
        stem += "-papergrid" if self.eval_grid == "paper" else ""
        return Path(self.dataset) / self.protocol_label / self.method / f"{stem}.json"

    def record_path(self, results_dir: Path) -> Path:
        """Absolute record path under ``results_dir``."""
        return Path(results_dir) / "records" / self.relative_path()

    def as_dict(self) -> dict[str, Any]:
        """JSON form stored in the record."""
        out = {"method": self.method, "dataset": self.dataset, "protocol": self.protocol, "shots": self.shots,
               "seed": self.seed, "profile": self.profile, "overrides": dict(self.overrides)}
        if self.dev_run:
            out["dev_run"] = True
        if self.weights != "pretrained":
            out["weights"] = self.weights
        if self.eval_grid != "harness":
            out["eval_grid"] = self.eval_grid
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Job":
        """Inverse of :meth:`as_dict` (records of every schema version)."""
        overrides = tuple(sorted((data.get("overrides") or {}).items()))
        return cls(str(data["method"]), str(data["dataset"]), str(data["protocol"]),
                   None if data.get("shots") is None else int(data["shots"]), int(data.get("seed", 0)),
                   str(data["profile"]), overrides, bool(data.get("dev_run", False)),
                   str(data.get("weights", "pretrained")), str(data.get("eval_grid", "harness")))

    def lock_path(self, results_dir: Path) -> Path:
        """The job's lock file under ``results_dir`` (see :mod:`harness.engine.support.locks`)."""
        return Path(results_dir) / "locks" / self.relative_path().with_suffix(".lock")


def expand_jobs(methods: Sequence[str], datasets: Sequence[str], protocol: str, shots: Sequence[int] | None,
                seeds: Sequence[int], profiles: Mapping[Any, str], overrides: Mapping[str, Any] | None = None,
                dev_run: bool = False, weights: str = "pretrained",
                method_overrides: Mapping[str, Mapping[str, Any]] | None = None, eval_grid: str = "harness") -> list[Job]:
    """The cross product of the run's options, in a stable order (dataset, shots, seed, method).

    Parameters
    ----------
    profiles : mapping
        Profile per dataset name, or per ``(method, dataset)`` (which wins when both are given).
    overrides : mapping, optional
        Typed setting overrides for every method.
    method_overrides : mapping, optional
        Typed setting overrides per method name (replaces ``overrides`` for that method).
    eval_grid : str
        ``harness`` or ``paper`` (see :class:`Job`).
    """
    def overrides_of(method: str) -> tuple[tuple[str, Any], ...]:
        values = (method_overrides or {}).get(method, overrides or {})
        return tuple(sorted(values.items()))

    shot_list: Sequence[int | None] = list(shots) if protocol == "fewshot" else [None]
    return [Job(m, d, protocol, k, s, profiles.get((m, d)) or profiles[d], overrides_of(m), dev_run, weights, eval_grid)
            for d in datasets for k in shot_list for s in seeds for m in methods]
