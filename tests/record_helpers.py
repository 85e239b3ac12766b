"""Sample records in the schema of :mod:`harness.results.records`, for the tests of their readers."""

from __future__ import annotations

from pathlib import Path

from harness.metrics import METRIC_NAMES
from harness.results.records import write_record


def sample_metrics(base: float, pixel: bool = True) -> dict[str, float | None]:
    """Seven metric values around ``base`` (a fraction); pixel ones None when ``pixel`` is False."""
    values: dict[str, float | None] = {}
    for offset, name in enumerate(METRIC_NAMES):
        values[name] = None if (name.startswith("pixel_") and not pixel) else round(base - offset * 0.01, 6)
    return values


def sample_record(method: str, seed: int, base: float, *, dataset="synthetic", protocol="multiclass", shots=None,
                  pixel=True, status="ok", fps=100.0):
    """A record in the schema of ``harness.results.records``; category values are ``base`` and ``base - 0.02``."""
    job = {"method": method, "dataset": dataset, "protocol": protocol, "shots": shots, "seed": seed,
           "profile": "tiny", "overrides": {}}
    if status != "ok":
        return {"schema": 1, "job": job, "status": "failed", "metrics": {}, "mean": {}, "efficiency": {},
                "error": {"phase": "fit", "type": "RuntimeError", "message": "boom | bad\nsecond line",
                          "traceback": "..."}}
    per_category = {"bottle": sample_metrics(base, pixel), "cable": sample_metrics(base - 0.02, pixel)}
    mean = {name: (None if per_category["bottle"][name] is None
                   else (per_category["bottle"][name] + per_category["cable"][name]) / 2) for name in METRIC_NAMES}
    if all(v is not None for v in mean.values()):
        mean["mad"] = sum(mean.values()) / len(mean)
    return {"schema": 1, "job": job, "status": "ok", "error": None, "metrics": per_category, "mean": mean,
            "efficiency": {"fps": fps, "params": 2_500_000, "latency_ms": 3.0, "device": "cpu",
                           "params_by_network": {"net": 2_500_000}}, "finished": "2024-01-01T00:00:00"}


def write_sample_record(results: Path, record: dict) -> None:
    """Write ``record`` where the runner would."""
    job = record["job"]
    folder = job["protocol"] + (f"-{job['shots']}shot" if job["shots"] is not None else "")
    path = results / "records" / job["dataset"] / folder / job["method"] / f"{job['profile']}-seed{job['seed']}.json"
    write_record(path, record)
