"""A run SIGKILLed after its first checkpoint resumes and ends where an uninterrupted run ends."""

import signal
import subprocess
import time

import pytest

from tests.conftest import ROOT
from tests.integration.conftest import TINY, read_json, run_train, train_command, train_env

ARGS = TINY + [
    "--ds_config",
    str(ROOT / "ds_configs" / "zero2.json"),
    "--max_steps",
    "60",
    "--save_steps",
    "10",
    "--save_strategy",
    "steps",
    "--eval_strategy",
    "no",
    "--load_best_model_at_end",
    "false",
    "--save_total_limit",
    "3",
    "--logging_steps",
    "10",
    "--per_device_train_batch_size",
    "32",
    "--learning_rate",
    "1e-3",
    "--seed",
    "7",
]


def final_loss(out):
    state = read_json(out / "trainer_state.json")
    last = [e for e in state["log_history"] if "loss" in e][-1]
    return state["global_step"], last["step"], last["loss"]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_end(tmp_path):
    reference = tmp_path / "reference"
    run_train(ARGS + ["--output_dir", str(reference)])

    out = tmp_path / "killed"
    proc = subprocess.Popen(
        train_command(ARGS + ["--output_dir", str(out)]),
        env=train_env(),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not (out / "checkpoint-10" / "trainer_state.json").exists():
        assert proc.poll() is None, "run ended before its first checkpoint"
        assert time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (out / "train_results.json").exists()  # really interrupted, not finished

    resumed = run_train(ARGS + ["--output_dir", str(out), "--resume_from_checkpoint", "true"])
    assert f"resuming from {out}/checkpoint-" in resumed.stdout
    assert resumed.stdout.count("{'loss'") < 6  # it continued; it did not redo all six logging intervals
    steps, last_step, loss = final_loss(out)
    ref_steps, ref_last_step, ref_loss = final_loss(reference)
    assert (steps, last_step) == (ref_steps, ref_last_step) == (60, 60)
    assert loss == pytest.approx(ref_loss, rel=0.01)
