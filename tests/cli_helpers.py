"""The command line run as a user's shell runs it, and plugins installed as a user installs them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def harness(*args: str, cwd: Path, pythonpath: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``python -m harness ARGS`` in a subprocess, like a user's shell would."""
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pythonpath), env.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-m", "harness", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    if check and done.returncode != 0:
        raise AssertionError(f"harness {' '.join(args)} exited {done.returncode}\n{done.stdout}\n{done.stderr}")
    return done


def install_package(package: Path, target: Path) -> None:
    """pip-install a package folder into ``target`` offline, as a user installs a plugin."""
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(package)], check=True, capture_output=True, timeout=300)
