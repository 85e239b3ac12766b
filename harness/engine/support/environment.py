"""What every record says about where it ran, and the seeding every job starts from."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import random
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness import __version__


def now() -> str:
    """The current UTC time, ISO format (records' ``started`` / ``finished``)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (every device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def git_revision() -> str | None:
    """The harness checkout's git revision, or None outside a checkout."""
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return rev.stdout.strip() or None


#: The environment entries that decide a run's floating-point results: two records that agree on
#: all of them (and on code, data and seed) hold the same numbers. Training a network is chaotic
#: enough that another CPU kernel family (AVX2 vs AVX-512) moves a tiny profile's AUROC by
#: several points, so comparisons of numbers check these first (:mod:`harness.results.leaderboard`).
#: ``precision`` (``fp32``, ``bf16-cast``, ``bf16-autocast``...), ``tf32`` and ``compile`` are how
#: a job ran inference (:mod:`harness.engine.inference.acceleration`), set per job by the runner.
#: ``cpu_signature`` is there because a hypervisor may show every AMD host as plain "AMD EPYC":
#: two such hosts of different generations (or cache sizes, which oneDNN's blocking reads) gave
#: DiffusionAD's tiny profile image AUROCs 17 points apart on one category.
NUMERICS_KEYS: tuple[str, ...] = ("torch", "device", "device_name", "cpu_model", "cpu_signature", "cpu_capability",
                                  "torch_threads", "precision", "tf32", "compile")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; the platform's processor string elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_signature() -> str | None:
    """The CPU's family, model, stepping and cache sizes, e.g. ``AuthenticAMD 25/17/1 L2 1024 KB L3 32768K``.

    ``cpu_model`` alone may be a hypervisor's generic name; this tells such hosts apart. None
    where ``/proc/cpuinfo`` is not readable (not Linux).
    """
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if not line.strip():
                break  # the first processor's block describes them all
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
    except OSError:
        return None
    parts = [fields.get("vendor_id", "?"),
             "/".join(fields.get(k, "?") for k in ("cpu family", "model", "stepping"))]
    if "cache size" in fields:
        parts.append(f"L2 {fields['cache size']}")
    l3 = Path("/sys/devices/system/cpu/cpu0/cache/index3/size")
    try:
        parts.append(f"L3 {l3.read_text().strip()}")
    except OSError:
        pass
    return " ".join(parts)


def environment(device: torch.device | None = None) -> dict[str, Any]:
    """Versions, platform, CPU, device and git revision, stored in every record.

    ``cpu_capability`` is the vector instruction set torch's CPU kernels dispatch to (``AVX2``,
    ``AVX512``, ...); with ``cpu_model`` it tells whether two CPU runs can agree bit for bit
    (:data:`NUMERICS_KEYS`).
    """
    env: dict[str, Any] = {
        "harness": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "numpy": np.__version__, "platform": platform.platform(), "processor": platform.machine(),
        "hostname": platform.node(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "cpu_model": cpu_model(), "cpu_signature": cpu_signature(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "device": str(device) if device is not None else None, "git_revision": git_revision(),
    }
    if device is not None and device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when available) as a device.

    Raises
    ------
    harness.errors.UsageError
        When CUDA is asked for and not available.
    """
    from harness.errors import UsageError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name}: not a device; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device
