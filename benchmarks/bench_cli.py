"""Start-up cost of the command line, as a multiple of ``python -c "import torch"``.

Every ``harness`` command imports the core (which imports torch) and every installed plugin's
entry point; an entry point that imported diffusers, timm or transformers at module level would
make ``harness --help`` cost seconds more. The target (issue "Core, second shape") is at most
1.5x the bare torch import for ``harness --help`` and ``harness list``, and (issue "Core, third
shape") for ``harness describe NAME``. Its first call for a method and settings builds the networks
on the meta device to count their parameters, so it pays for importing the method's own libraries
(timm, which imports torchvision and ``torch._dynamo``; diffusers, transformers); later calls read
the counts cached for the same settings, code and libraries (:mod:`harness.engine.describe`). Both
are shown: ``describe NAME`` (a filled cache) and ``describe NAME (first call...)`` (an empty one).

Each command runs ``--repeats`` times in a fresh interpreter; the best wall time is kept (the
machine is shared, and the best run is the one least disturbed).

Run: ``python benchmarks/bench_cli.py [--repeats 5] [--describe patchcore,diad]``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time


def best_time(command: list[str], repeats: int, cold_cache: bool = False) -> float:
    """Best wall time of ``command`` over ``repeats`` runs (seconds).

    With ``cold_cache`` every run gets an empty ``$HARNESS_CACHE_HOME`` (``describe`` builds the
    networks); otherwise one untimed run first fills a private one (``describe`` reads its counts).
    """
    times = []
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "HARNESS_CACHE_HOME": home}
        if not cold_cache:
            subprocess.run(command, check=True, capture_output=True, env=env)
        for index in range(repeats):
            if cold_cache:
                env["HARNESS_CACHE_HOME"] = os.path.join(home, str(index))
            start = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True, env=env)
            times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    """Time the baseline and each command; print a Markdown table with the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--describe", default="patchcore,diffusionad,lafite,diad,anomalysd",
                        help="methods whose 'harness describe' is timed")
    args = parser.parse_args()
    python = sys.executable
    commands = {"python -c 'import torch'": [python, "-c", "import torch"],
                "harness --help": [python, "-m", "harness", "--help"],
                "harness list": [python, "-m", "harness", "list"]}
    cold = set()
    for name in filter(None, args.describe.split(",")):
        commands[f"harness describe {name}"] = [python, "-m", "harness", "describe", name]
        commands[f"harness describe {name} (first call: networks built)"] = [python, "-m", "harness", "describe", name]
        cold.add(f"harness describe {name} (first call: networks built)")
    times = {label: best_time(command, args.repeats, cold_cache=label in cold) for label, command in commands.items()}
    base = times["python -c 'import torch'"]
    print(f"best of {args.repeats} runs each; ratio = time / (python -c 'import torch')\n")
    print("| command | seconds | ratio |\n|---|---:|---:|")
    for label, seconds in times.items():
        print(f"| `{label}` | {seconds:.2f} | {seconds / base:.2f}x |")


if __name__ == "__main__":
    main()
