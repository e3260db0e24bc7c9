"""`ftprof sweep --executor slurm` through a real one-node Slurm cluster (tests/slurm_cluster.py).

Each point is a Slurm job submitted through submitit; the records must match the local executor's point for
point (one at a time, and --parallel 2 side by side), a 2-rank point is one srun job step, a killed driver
resumes without submitting anything twice, Ctrl-C cancels the jobs, and Slurm's own time limit becomes a
`timeout` record.

The Slurm sweep of the grid is run once for the module (``killed_slurm_sweep``): its driver is SIGKILLed after
the first record and resumed, and the resumed records are both what the killed-driver test checks and the Slurm
side of the point-for-point comparison (a second, uninterrupted Slurm sweep of the same four points would
check nothing more, at four Slurm jobs' cost).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from ftprof.records.results import latest, read_records
from tests.conftest import ROOT, run_group
from tests.integration.conftest import LOCAL_GRID, train_env
from tests.integration.test_sweep_cli import SWEEP as LOCAL_SWEEP

pytestmark = pytest.mark.slow

SWEEP = [sys.executable, "-m", "ftprof.cli.main", "sweep", "--model", "tiny-bert", "--no_report", "--no_remeasure"]
WINDOW = ["--steps", "2", "--warmup", "1", "--min_seconds", "0"]
GRID = ["--zero", "0,2", "--batch_sizes", "4,8", "--seq_lens", "32", *WINDOW]
SLURM = ["--executor", "slurm", "--slurm_partition", "debug"]
# Peaks are process RSS: the same point differs run to run by allocator arenas, thread stacks (a job's rank
# runs OMP_NUM_THREADS=1, a local one a thread per core) and page-cache luck. Measured here they agree within
# 1%; 15% still tells a batch-4 point from a batch-32 one at 512 tokens, and never fails on that noise.
PEAK_TOLERANCE = 0.15


def env_for(cluster: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in train_env().items() if not k.startswith("SLURM_")}
    return env | {"SLURM_CONF": cluster["SLURM_CONF"], "PATH": cluster["PATH"]}


def sweep(args, env, timeout=900) -> subprocess.CompletedProcess:
    proc = run_group(SWEEP + args, timeout, env=env, cwd=ROOT)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


def flags(argv: list[str]) -> dict[str, str | None]:
    """``--flag value`` pairs (``None`` for a flag without a value), in any order."""
    pairs = zip(argv, [*argv[1:], None], strict=True)
    return {a: (b if b and not b.startswith("--") else None) for a, b in pairs if a.startswith("--")}


def padded_tokens_per_step(r) -> float:
    """Padded tokens trained on per optimizer step over the window, all ranks (the window's total / its steps)."""
    return r.profile.padded_tokens_per_s * r.profile.window_s / r.profile.steady_steps


def submitted(out) -> list[dict]:
    lines = [json.loads(x) for x in (out / "jobs.jsonl").read_text().splitlines()]
    return [x for x in lines if x["event"] == "submitted"]


def _submitted_count(out) -> int:
    """Jobs submitted so far (0 before the driver writes its first; a line being written is not counted)."""
    try:
        return len(submitted(out))
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


@dataclass
class KilledSweep:
    """The grid swept through Slurm by a driver SIGKILLed after its first record, then resumed."""

    out: Path
    before: list[str]  # results.jsonl's lines when the driver was killed
    submitted_before: set[str]  # the job ids submitted by then
    killed_output: str  # what the killed driver printed (submissions, jobs running)
    resumed: subprocess.CompletedProcess


@pytest.fixture(scope="module")
def killed_slurm_sweep(slurm_cluster, tmp_path_factory) -> KilledSweep:
    """The grid through Slurm once for this module: the driver is SIGKILLed once a record is written (its jobs
    belong to Slurm and keep running), then resumed to the end."""
    env, out = env_for(slurm_cluster), tmp_path_factory.mktemp("slurm") / "killed"
    args = [*GRID, *SLURM, "--out", str(out)]
    log = out.parent / "killed-driver.log"
    # Unbuffered: what the driver printed before the SIGKILL is in the log, not lost in a buffer.
    with log.open("w") as sink:
        driver = subprocess.Popen(
            SWEEP + args,
            env=env | {"PYTHONUNBUFFERED": "1"},
            cwd=ROOT,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        results, deadline = out / "results.jsonl", time.time() + 600
        # Killed with a record written and a job still in flight (submitted, no record yet): the case a resume
        # must not submit twice. Waiting for the first record alone raced: under load both first jobs had
        # recorded by the next poll, and nothing was in flight.
        while not (results.exists() and 1 <= results.read_text().count("\n") < _submitted_count(out)):
            assert driver.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline
            time.sleep(0.05)
        os.killpg(driver.pid, signal.SIGKILL)  # the driver only: its jobs belong to Slurm and keep running
        driver.wait()
    before = results.read_text().splitlines()
    submitted_before = {j["job_id"] for j in submitted(out)}
    resumed = sweep([*args, "--resume"], env)
    return KilledSweep(out, before, submitted_before, log.read_text(), resumed)


def test_slurm_records_match_the_local_executors_point_for_point(
    slurm_cluster, killed_local_sweep, killed_slurm_sweep, tmp_path
):
    """Local (one at a time), --parallel 2 and Slurm records of the same grid agree point for point. The local
    records are tests/integration/conftest.py::killed_local_sweep's (the same grid and window, also checked by
    test_sweep_cli's kill-and-resume test), the Slurm ones ``killed_slurm_sweep``'s (killed and resumed: the
    same four jobs, one per point)."""
    assert flags(SWEEP[4:] + GRID) == flags(LOCAL_SWEEP[4:] + LOCAL_GRID)  # the same points, the same window
    env = env_for(slurm_cluster)
    sweep([*GRID, "--parallel", "2", "--out", str(tmp_path / "parallel")], env)
    slurm_out = killed_slurm_sweep.out
    outs = {"local": killed_local_sweep.out, "parallel": tmp_path / "parallel", "slurm": slurm_out}
    local = {r.point.key: r for r in read_records(outs["local"] / "results.jsonl")}
    assert len(local) == 4
    assert next(iter(local.values())).run.concurrent_points == 1
    for name, out in outs.items():
        other = {r.point.key: r for r in read_records(out / "results.jsonl")}
        assert other.keys() == local.keys(), name
        for key, r in other.items():
            assert r.status == local[key].status == "ok", (name, key, r.reason)
            assert r.profile is not None
            assert r.profile.steady_steps >= 2
            # The samples of one optimizer step on all ranks, counted over the window: the point's micro-batch
            # x accumulation x ranks, exactly, each 32 tokens long; the rate is that over the median step.
            assert r.profile.samples_per_step == r.point.effective_batch() == r.point.batch_size, (name, key)
            assert padded_tokens_per_step(r) == pytest.approx(r.point.batch_size * 32), (name, key)
            assert r.samples_per_s == pytest.approx(r.profile.samples_per_step / r.profile.step_time_median_s)
            assert abs(r.peak_bytes - local[key].peak_bytes) <= PEAK_TOLERANCE * local[key].peak_bytes, (name, key)
            assert r.ds_config == local[key].ds_config
            assert r.point.world_size == 1
            assert r.run.concurrent_points == (2 if name == "parallel" else 1)
    slurm = {r.point.key: r for r in read_records(slurm_out / "results.jsonl")}
    jobs = submitted(slurm_out)
    assert sorted(j["job_id"] for j in jobs) == sorted(r.run.slurm_job_id for r in slurm.values())
    # The driver's progress lines, over its two lives (the killed one submitted the jobs).
    printed = killed_slurm_sweep.killed_output + killed_slurm_sweep.resumed.stdout
    assert "submitted as Slurm job" in printed
    assert "running on" in printed


def test_a_two_rank_point_is_one_world_across_an_srun_step(slurm_cluster, tmp_path):
    out = tmp_path / "two"
    args = ["--zero", "2", "--batch_sizes", "4", "--seq_lens", "32", "--world_size", "2", *WINDOW, *SLURM]
    sweep([*args, "--slurm_cpus_per_task", "1", "--out", str(out)], env_for(slurm_cluster))
    (r,) = read_records(out / "results.jsonl")
    assert r.status == "ok", r.reason
    assert [rank.rank for rank in r.profile.ranks] == [0, 1]
    assert r.point.world_size == r.profile.world_size == 2
    # 4 samples on each of 2 ranks per step, all 32 tokens long: the two tasks trained as one world.
    assert r.profile.samples_per_step == r.point.effective_batch() == 8
    assert padded_tokens_per_step(r) == pytest.approx(8 * 32)
    assert r.run.slurm_nodes
    assert r.run.slurm_job_id == submitted(out)[0]["job_id"]


def test_a_killed_driver_resumes_without_submitting_anything_twice(killed_slurm_sweep):
    out, before = killed_slurm_sweep.out, killed_slurm_sweep.before
    assert 1 <= len(before) < 4
    assert len(killed_slurm_sweep.submitted_before) > len(before)

    results = out / "results.jsonl"
    records = read_records(results)
    keys = [r.point.key for r in records]
    assert len(keys) == len(set(keys)) == 4
    assert {r.status for r in records} == {"ok"}
    assert results.read_text().splitlines()[: len(before)] == before
    jobs = submitted(out)
    ids = [j["job_id"] for j in jobs]
    assert len(ids) == len(set(ids)) == 4  # one job per point: none resubmitted, none submitted twice
    assert sorted(ids) == sorted(r.run.slurm_job_id for r in records)
    assert "re-attached to Slurm job" in killed_slurm_sweep.resumed.stdout


def test_ctrl_c_cancels_the_jobs_and_resume_runs_them_again(slurm_cluster, tmp_path):
    env, out = env_for(slurm_cluster), tmp_path / "interrupted"
    args = ["--zero", "0,2", "--batch_sizes", "4", "--seq_lens", "32", *WINDOW, *SLURM, "--out", str(out)]
    driver = subprocess.Popen(
        SWEEP + args, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.time() + 120
    while not ((out / "jobs.jsonl").exists() and len(submitted(out)) == 2):
        assert driver.poll() is None
        assert time.time() < deadline
        time.sleep(0.2)
    driver.send_signal(signal.SIGINT)
    output, _ = driver.communicate(timeout=120)
    assert driver.returncode == 130, output[-3000:]
    assert "interrupted: the running points were stopped" in output, output[-3000:]
    ids = [j["job_id"] for j in submitted(out)]
    lines = [json.loads(x) for x in (out / "jobs.jsonl").read_text().splitlines()]
    assert sorted(x["job_id"] for x in lines if x["event"] == "cancelled") == sorted(ids)
    squeue = subprocess.run(
        ["squeue", "-h", "-j", ",".join(ids), "-o", "%i %T"], env=env, capture_output=True, text=True
    )
    assert not [ln for ln in squeue.stdout.splitlines() if ln.split()[1] in ("PENDING", "RUNNING")], squeue.stdout
    assert not (out / "results.jsonl").exists()

    sweep([*args, "--resume"], env)  # cancelled jobs are not waited for: their points run again
    records = read_records(out / "results.jsonl")
    assert sorted(r.point.zero for r in records) == [0, 2]
    assert {r.status for r in records} == {"ok"}
    assert not {r.run.slurm_job_id for r in records} & set(ids)


def test_slurms_time_limit_becomes_a_timeout_record(slurm_cluster, tmp_path):
    out = tmp_path / "late"
    # A window of 10 minutes (5000 steps at most: long enough at 512 tokens) in a job of 1 minute: Slurm
    # ends it, within a minute or so more (its time checks run every ~30 s, then KillWait).
    args = ["--zero", "0", "--batch_sizes", "8", "--seq_lens", "512", "--steps", "2", "--warmup", "1"]
    started = time.time()
    sweep([*args, "--min_seconds", "600", *SLURM, "--slurm_time", "1", "--out", str(out)], env_for(slurm_cluster))
    (r,) = latest(read_records(out / "results.jsonl"))
    assert r.status == "timeout", (r.status, r.reason)
    assert r.run.slurm_state == "TIMEOUT", (r.status, r.reason)
    assert r.reason == f"Slurm stopped job {r.run.slurm_job_id} at its time limit (--slurm_time 1 min)"
    assert "DUE TO TIME LIMIT" in r.stderr_tail
    assert time.time() - started < 300
