"""What a point's process pays to import its libraries, with the installed bytecode and without it.

    .venv/bin/python bench/bench_imports.py             # 5 rounds, ~2 min on a 2-core CPU
    .venv/bin/python bench/bench_imports.py --rounds 3

Every point of a sweep, every rank and every launcher process imports torch, transformers' Trainer and
deepspeed. Where ``PYTHONDONTWRITEBYTECODE`` is set (this machine's CI sets it) Python never caches the
compiled modules, so unless the install wrote them (``launch/setup.sh``: ``uv pip install
--compile-bytecode``; pip always does) each process compiles all those sources again. This times
``python -c "import torch, transformers.trainer, deepspeed"`` both ways, alternating which goes first each
round: "bytecode" reads the installed ``__pycache__``; "source" points ``PYTHONPYCACHEPREFIX`` at an empty
folder, so Python finds no bytecode and, with ``PYTHONDONTWRITEBYTECODE``, writes none (the state of a venv
installed by uv without ``--compile-bytecode``). Prints the median and range of each and their ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

IMPORTS = "import torch, transformers.trainer, deepspeed"


def timed_import(env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", IMPORTS], env=env, check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    base = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"))
    with tempfile.TemporaryDirectory(prefix="ftprof-no-bytecode-") as empty:
        envs = {"bytecode": base, "source": {**base, "PYTHONPYCACHEPREFIX": empty}}
        times: dict[str, list[float]] = {name: [] for name in envs}
        for round_ in range(args.rounds):
            order = list(envs) if round_ % 2 == 0 else list(reversed(envs))
            for name in order:
                times[name].append(timed_import(envs[name]))
            print(f"round {round_ + 1}: " + ", ".join(f"{n} {times[n][-1]:.2f} s" for n in envs), flush=True)
    medians = {name: statistics.median(t) for name, t in times.items()}
    print(f"\n`{IMPORTS}` in a new process, {args.rounds} rounds:")
    for name, t in times.items():
        print(f"  {name:9} median {medians[name]:.2f} s (range {min(t):.2f}-{max(t):.2f})")
    print(f"  bytecode / source: {medians['bytecode'] / medians['source']:.2f}x")


if __name__ == "__main__":
    main()
