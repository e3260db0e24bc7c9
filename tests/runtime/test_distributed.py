"""Rank variables under every launcher: srun tasks join one world; an sbatch shell stays one process."""

import os

import pytest

from ftprof.runtime.distributed import LAUNCHER_VARIABLES, adopt_slurm_env, ensure_single_process_env

STEP = {
    "SLURM_PROCID": "1",
    "SLURM_NTASKS": "2",
    "SLURM_LOCALID": "1",
    "SLURM_STEP_ID": "0",
    "SLURM_JOB_ID": "42",
    "SLURM_STEP_NUM_NODES": "1",
    "SLURM_JOB_NODELIST": "vm",
}


@pytest.fixture
def clean_env(monkeypatch):
    """No rank or Slurm variables; afterwards the environment is restored whole (the code under test writes
    os.environ directly, which monkeypatch would not undo, and a leaked RANK=1 hangs later tests)."""
    saved = dict(os.environ)
    for var in (*LAUNCHER_VARIABLES, "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", *STEP):
        monkeypatch.delenv(var, raising=False)
    yield monkeypatch
    os.environ.clear()
    os.environ.update(saved)


def test_srun_task_becomes_its_rank_of_the_step(clean_env):
    for k, v in STEP.items():
        clean_env.setenv(k, v)
    assert adopt_slurm_env()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("1", "2", "1")
    assert os.environ["MASTER_ADDR"] == "127.0.0.1"
    assert os.environ["MASTER_PORT"] == str(20000 + 42 * 16)
    assert not ensure_single_process_env()  # rank variables are set: not "rank 0 of 1"


def test_sbatch_shell_without_a_step_stays_one_process(clean_env):
    for k, v in STEP.items():
        if k != "SLURM_STEP_ID":
            clean_env.setenv(k, v)
    assert not adopt_slurm_env()
    assert ensure_single_process_env()
    assert os.environ["WORLD_SIZE"] == "1"


def test_a_launchers_variables_win(clean_env):
    for k, v in STEP.items():
        clean_env.setenv(k, v)
    clean_env.setenv("RANK", "0"), clean_env.setenv("WORLD_SIZE", "4"), clean_env.setenv("LOCAL_RANK", "0")
    assert not adopt_slurm_env()
    assert os.environ["WORLD_SIZE"] == "4"


def test_stale_shm_buffers_are_ours_old_and_mapped_by_nobody(tmp_path):
    import mmap
    import time

    from ftprof.runtime.distributed import SHM_PREFIX, remove_stale_shm_buffers, stale_shm_buffers

    def buffer(name, age_s):
        path = tmp_path / f"{SHM_PREFIX}_{name}"
        path.write_bytes(b"\0" * 4096)
        past = time.time() - age_s
        os.utime(path, (past, past))
        return path

    uid = os.getuid()
    left = buffer(f"{uid}_127.0.0.1_29500_0", 600)  # a finished run's
    young = buffer(f"{uid}_127.0.0.1_29501_0", 5)  # a rank that just created it
    others = buffer(f"{uid + 1}_127.0.0.1_29500_0", 600)  # another user's
    live = buffer(f"{uid}_127.0.0.1_29502_1", 600)  # a running rank's: mapped
    with live.open("r+b") as f, mmap.mmap(f.fileno(), 4096):
        assert stale_shm_buffers(tmp_path) == [left]
        assert remove_stale_shm_buffers(tmp_path) == (1, 4096)
    assert not left.exists()
    assert young.exists()
    assert others.exists()
    assert live.exists()
    assert stale_shm_buffers(tmp_path) == [live]  # unmapped now


RANK_SCRIPT = """
import sys

import torch
import torch.distributed as dist

from ftprof.runtime.distributed import exit_rank, shutdown

dist.init_process_group("gloo")
other = dist.new_group([0, 1])  # a second group, as DeepSpeed makes: the world barrier doesn't drain it
for i in range(200):  # collectives still in flight at the end, their handles and tensors dropped
    dist.all_reduce(torch.ones(4096), group=other if i % 2 else None, async_op=True)
exit_rank(shutdown())
sys.exit(3)  # not reached: one rank of several ends in exit_rank
"""


def test_two_ranks_exit_zero_with_collectives_in_flight(tmp_path):
    """Gloo's worker threads outlive destroy_process_group; one still releasing a collective's tensors (it takes
    the GIL) as the interpreter finalizes is ended by Python mid-destructor: SIGABRT, "terminate called without
    an active exception", after a run that succeeded. Ranks must leave without finalizing (a quarter of the
    pairs aborted before: 3 of 12)."""
    import subprocess
    import sys

    from ftprof.runtime.distributed import free_port
    from tests.conftest import ROOT

    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    for _ in range(4):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2")
        env.pop("LOCAL_SIZE", None)
        ranks = [
            subprocess.Popen(
                [sys.executable, str(script)],
                env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for r in range(2)
        ]
        try:
            outs = [p.communicate(timeout=120)[0] for p in ranks]
        finally:
            for p in ranks:
                p.kill()  # no-op once exited; a hung pair must not outlive the test
                p.wait()
        assert [p.returncode for p in ranks] == [0, 0], outs
        assert not any("terminate called" in out for out in outs), outs
