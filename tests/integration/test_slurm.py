"""Multi-node style training through a real (one-node) Slurm cluster: srun starts the ranks, not deepspeed.

srun gives each task SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID but none of torch's RANK / WORLD_SIZE /
LOCAL_RANK / MASTER_ADDR / MASTER_PORT; ftprof.runtime.distributed maps them, so a plain `srun python launch/train.py`
(the command the README gives for clusters) and DeepSpeed's `--launcher slurm` both start one world.
"""

import math
import socket
import subprocess
import sys

import pytest

from ftprof.runtime.distributed import free_port
from tests.conftest import ROOT, run_group
from tests.integration.conftest import TINY, read_json, train_env

pytestmark = pytest.mark.slow

COMMON = TINY + [
    "--ds_config",
    str(ROOT / "ds_configs" / "zero2.json"),
    "--max_train_samples",
    "320",
    "--max_eval_samples",
    "64",
    "--save_strategy",
    "no",
    "--eval_strategy",
    "no",
    "--load_best_model_at_end",
    "false",
    "--logging_steps",
    "2",
]
TRAIN = [sys.executable, str(ROOT / "launch" / "train.py")]


def run(command, env, timeout=300) -> subprocess.CompletedProcess:
    proc = run_group(command, timeout, env=env, cwd=ROOT)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(command[:6])} ... exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-4000:]}")
    return proc


def env_for(slurm_cluster) -> dict[str, str]:
    env = train_env()
    env.update(SLURM_CONF=slurm_cluster["SLURM_CONF"], PATH=slurm_cluster["PATH"])
    return {k: v for k, v in env.items() if not k.startswith("SLURM_") or k == "SLURM_CONF"}


def test_srun_runs_two_tasks_on_the_node(slurm_cluster):
    proc = run(
        ["srun", "-N1", "-n2", "bash", "-c", 'echo "$SLURM_PROCID/$SLURM_NTASKS $(hostname -s)"'],
        slurm_cluster,
        timeout=60,
    )
    host = socket.gethostname().split(".")[0]
    assert sorted(proc.stdout.split("\n")[:-1]) == [f"0/2 {host}", f"1/2 {host}"]


def test_two_ranks_under_srun_train_together_with_zero2(slurm_cluster, tmp_path):
    env = {**env_for(slurm_cluster), "OMP_NUM_THREADS": "1"}
    two, one = tmp_path / "srun-2", tmp_path / "srun-1"
    run(
        [
            "srun",
            "-N1",
            "-n2",
            "--cpus-per-task=1",
            *TRAIN,
            *COMMON,
            "--max_steps",
            "4",
            "--per_device_train_batch_size",
            "8",
            "--output_dir",
            str(two),
        ],
        env,
    )
    # The same global batch (16) in one task: the reference for what one rank holds unpartitioned.
    run(
        [
            "srun",
            "-N1",
            "-n1",
            "--cpus-per-task=2",
            *TRAIN,
            *COMMON,
            "--max_steps",
            "4",
            "--per_device_train_batch_size",
            "16",
            "--output_dir",
            str(one),
        ],
        env,
    )

    ref = read_json(one / "footprint_rank0.json")
    ranks = [read_json(two / f"footprint_rank{r}.json") for r in range(2)]
    assert [(f["rank"], f["world_size"]) for f in ranks] == [(0, 2), (1, 2)]
    assert ref["world_size"] == 1
    for f in ranks:
        assert 0.45 < f["optimizer_state_bytes"] / ref["optimizer_state_bytes"] < 0.55  # ZeRO-2 halves it
        assert f["local_parameter_numel"] == ref["local_parameter_numel"]  # and keeps every parameter
    state, result = read_json(two / "trainer_state.json"), read_json(two / "train_results.json")
    # 4 steps of 8 rows on each of 2 ranks = 64 of 320 rows: the data was sharded, not read twice.
    assert state["global_step"] == 4
    assert state["epoch"] == pytest.approx(0.2)
    assert math.isfinite(result["train_loss"])
    assert 0.5 < result["train_loss"] < 0.9
    assert result["train_loss"] == pytest.approx(read_json(one / "train_results.json")["train_loss"], abs=0.05)


def test_deepspeed_slurm_launcher_starts_one_two_rank_job(slurm_cluster, tmp_path):
    env = env_for(slurm_cluster)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(f"{socket.gethostname().split('.')[0]} slots=2\n")
    out = tmp_path / "ds-slurm"
    deepspeed = (
        str(ROOT / ".venv" / "bin" / "deepspeed") if (ROOT / ".venv" / "bin" / "deepspeed").exists() else "deepspeed"
    )
    # --force_multi: with one host in the hostfile deepspeed would otherwise launch locally, not via srun.
    # --master_addr: without it deepspeed ssh-es to the host to ask its address (the slurm runner then
    # ignores it and passes neither it nor --master_port to the tasks).
    run(
        [
            deepspeed,
            "--hostfile",
            str(hostfile),
            "--launcher",
            "slurm",
            "--force_multi",
            "--no_ssh_check",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(free_port()),
            str(ROOT / "launch" / "train.py"),
            *COMMON,
            "--max_steps",
            "2",
            "--per_device_train_batch_size",
            "8",
            "--output_dir",
            str(out),
        ],
        env,
    )
    assert (out / "footprint_rank1.json").exists(), "the two srun tasks did not form one world of 2 ranks"
    assert [read_json(out / f"footprint_rank{r}.json")["world_size"] for r in range(2)] == [2, 2]
