"""Run the real training entry in subprocesses: one rank with python, several with the deepspeed launcher."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
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


# tiny-bert's ZeRO 0/2 x batch 4/8 at 32 tokens, one at a time, without re-measures (every line unique).
LOCAL_GRID = ["--model", "tiny-bert", "--zero", "0,2", "--batch_sizes", "4,8", "--seq_lens", "32"]
LOCAL_GRID += ["--no_report", "--no_remeasure"]


@dataclass
class KilledLocalSweep:
    """``LOCAL_GRID`` swept by the local executor, SIGKILLed (sweep and point) after its first record, resumed."""

    out: Path
    finished: list[str]  # results.jsonl's lines when the sweep was killed


@pytest.fixture(scope="session")
def killed_local_sweep(tmp_path_factory) -> KilledLocalSweep:
    """One local sweep for two modules: test_sweep_cli checks that the kill lost and duplicated nothing, and
    test_sweep_slurm compares the Slurm executor's records with these, the local executor's, point for point
    (the same four points, each measured one at a time; a second local sweep of them would check no more)."""
    from tests.integration.test_sweep_cli import SWEEP, sweep

    out = tmp_path_factory.mktemp("local") / "killed"
    args = [*LOCAL_GRID, "--out", str(out)]
    proc = subprocess.Popen(
        SWEEP + args,
        env=train_env(),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    results = out / "results.jsonl"
    deadline = time.time() + 600
    while not (results.exists() and results.read_text().count("\n") >= 1):
        assert proc.poll() is None
        assert time.time() < deadline
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep and the point it is running
    proc.wait()
    finished = results.read_text().splitlines()
    sweep([*args, "--resume"])
    return KilledLocalSweep(out, finished)


from tests.slurm_cluster import slurm_cluster  # noqa: E402,F401  (session fixture: a one-node Slurm cluster)
