"""Run the real training entry in subprocesses: one rank with python, several with the deepspeed launcher."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ftprof.runtime.distributed import SHM_FOLDER, SHM_PREFIX, free_port
from tests.conftest import LAUNCHER_ENV, ROOT, run_group

TINY = ["--model", "tiny-bert", "--dataset", "synthetic", "--disable_tqdm", "true", "--report_to", "none"]


def train_env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    for key in LAUNCHER_ENV:  # a run's own launcher sets these; inherited ones name a port this process holds
        env.pop(key, None)
    return env


def train_command(args: list[str], ranks: int = 1) -> list[str]:
    script = str(ROOT / "launch" / "train.py")
    if ranks == 1:
        return [sys.executable, script, *args]
    deepspeed = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
    return [deepspeed, "--num_gpus", str(ranks), "--master_port", str(free_port()), script, *args]


def run_train(args: list[str], ranks: int = 1, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run training to the end; fail the test with the output's tail when it exits non-zero."""
    before = shm_buffers()
    proc = run_group(train_command(args, ranks), timeout, env=train_env(), cwd=ROOT)
    if proc.returncode != 0:
        pytest.fail(f"training exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-4000:]}")
    assert shm_buffers() <= before, "the run left DeepSpeed shm buffers in /dev/shm"
    return proc


def shm_buffers() -> set[Path]:
    """This user's DeepSpeed CPU-collective buffers in /dev/shm now (a run must not leave its own behind)."""
    return set(SHM_FOLDER.glob(f"{SHM_PREFIX}_{os.getuid()}_*"))


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


from tests.slurm_cluster import slurm_cluster  # noqa: E402,F401  (session fixture: a one-node Slurm cluster)
