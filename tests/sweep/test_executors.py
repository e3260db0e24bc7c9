"""Executors without real training: device slots with a fake runner, pruning under concurrency, Slurm states
turned into statuses, the job log that --resume re-attaches from, and the Slurm driver loop on canned states.

Real points through Slurm run in tests/integration/test_sweep_slurm.py.
"""

import subprocess
import threading
import time
from pathlib import Path

import pytest

from ftprof.point import Point
from ftprof.records.profile import Profile
from ftprof.records.results import Record, RunFacts, read_records, results_path
from ftprof.sweep.executors import SerialExecutor
from ftprof.sweep.executors import slurm as slurm_mod
from ftprof.sweep.executors.local import LocalExecutor, device_slots
from ftprof.sweep.executors.slurm import SlurmExecutor, SlurmOptions, parse_slurm_time, srun_command
from ftprof.sweep.executors.slurm_jobs import JobEntry, JobLog, JobState, parse_sacct, parse_squeue, status_for_state
from ftprof.sweep.plan import plan_grid
from ftprof.sweep.point_run import SweepConfig
from ftprof.sweep.schedule import iterate_sweep


def point(zero=2, world=1, batch=8, seq=128, precision="fp32"):
    return Point(precision=precision, zero=zero, world_size=world, seq_len=seq, batch_size=batch)


class FakeRunner:
    """Stands in for run_point: records what each point's processes would see, and which points overlapped.
    A point "OOMs" above ``limit_tokens`` (batch x sequence); each run lasts ``seconds``."""

    def __init__(self, seconds=0.05, limit_tokens=10**9):
        self.seconds, self.limit_tokens = seconds, limit_tokens
        self.lock = threading.Lock()
        self.live: dict[str, set[str]] = {}  # key -> devices of the points running now
        self.env: dict[str, dict[str, str]] = {}
        self.overlaps: list[tuple[str, str]] = []
        self.calls: list[str] = []
        self.commands: dict[str, list[str] | None] = {}

    def __call__(self, cfg, p, *, env=None, started=None, command=None):
        devices = set((env or {}).get("CUDA_VISIBLE_DEVICES", "").split(",")) - {""}
        with self.lock:
            self.calls.append(p.key)
            self.env[p.key] = dict(env or {})
            self.commands[p.key] = command(Path("spec.json"), p.world_size) if command else None
            for other, theirs in self.live.items():
                self.overlaps.append((p.key, other))
                assert not devices & theirs, f"{p.key} shares GPUs {devices & theirs} with {other}"
            self.live[p.key] = devices
        time.sleep(self.seconds)
        with self.lock:
            del self.live[p.key]
        if p.batch_size * p.seq_len > self.limit_tokens:
            return Record(point=p, status="oom", model=cfg.model, reason="CUDA out of memory")
        return Record(point=p, status="ok", model=cfg.model, peak_bytes=p.batch_size, profile=Profile(sampler="nvml"))


def test_device_slots_are_disjoint_and_sized_to_each_points_ranks(tmp_path):
    points = [point(zero=z, world=w, precision=pr) for pr in ("fp32", "bf16") for z in (0, 2, 3) for w in (1, 2)]
    run = FakeRunner(seconds=0.1)
    pool = LocalExecutor(["0", "1", "2", "3"], run=run)
    records = list(iterate_sweep(SweepConfig(model="m", points=points, out_dir=tmp_path), {}, executor=pool))
    assert sorted(r.point.key for r in records) == sorted(p.key for p in points)
    for p in points:  # each point saw exactly as many GPUs as it has ranks (disjointness: FakeRunner)
        devices = run.env[p.key]["CUDA_VISIBLE_DEVICES"].split(",")
        assert len(devices) == len(set(devices)) == p.world_size
        assert set(devices) <= {"0", "1", "2", "3"}
    assert run.overlaps, "no two points ever ran at once"
    assert {r.run.concurrent_points for r in records} == {4}
    first = [p.key for p in points[:3]]  # started at once, in order, on the lowest free GPUs
    assert [run.env[k]["CUDA_VISIBLE_DEVICES"] for k in first] == ["0", "1,2", "3"]
    # deepspeed --num_gpus 2 would take GPUs 0 and 1 whatever CUDA_VISIBLE_DEVICES says: name them instead
    launcher = run.commands[first[1]]
    assert launcher[1:3] == ["--include", "localhost:1,2"]
    assert "--num_gpus" not in launcher
    assert run.commands[first[0]][-1] == "spec.json"
    assert "--include" not in run.commands[first[0]]


def test_a_two_rank_point_waits_for_two_free_slots(tmp_path):
    cfg = SweepConfig(model="m", points=[], out_dir=tmp_path)
    release = {k: threading.Event() for k in ("a", "b")}
    seen = {}

    def run(cfg, p, *, env=None, started=None, command=None):
        seen[p.key] = env["CUDA_VISIBLE_DEVICES"]
        release["a" if p.world_size == 1 else "b"].wait(10)
        return Record(point=p, status="ok", model="m")

    pool = LocalExecutor(["0", "1"], run=run)
    one, two = point(world=1), point(world=2)
    assert pool.can_start(one)
    pool.start(cfg, one)
    assert not pool.can_start(two)  # one slot free, two needed
    release["a"].set()
    assert [r.point for r in pool.wait()] == [one]
    assert pool.can_start(two)
    pool.start(cfg, two)
    release["b"].set()
    assert [r.point for r in pool.wait()] == [two]
    assert seen == {one.key: "0", two.key: "0,1"}


def test_a_wide_point_is_not_overtaken_by_narrow_ones_behind_it(tmp_path):
    points = [point(zero=0, world=1), point(zero=2, world=2), point(zero=3, world=1)]
    starts = []
    run = FakeRunner(seconds=0.1)

    def recording(cfg, p, **kw):
        starts.append(p.key)
        return run(cfg, p, **kw)

    cfg = SweepConfig(model="m", points=points, out_dir=tmp_path, prune=False)
    list(iterate_sweep(cfg, {}, executor=LocalExecutor(["0", "1"], run=recording)))
    assert starts == [p.key for p in points]  # z3 (1 rank) waited behind the 2-rank z2 point


def test_cpu_slots_share_the_cores_and_flag_the_records(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    run = FakeRunner()
    points = [point(zero=0), point(zero=2), point(zero=3, world=4)]
    pool = LocalExecutor(device_slots(2, cuda=False), run=run, cpu_count=8)
    records = list(iterate_sweep(SweepConfig(model="m", points=points, out_dir=tmp_path), {}, executor=pool))
    assert {k: e.get("OMP_NUM_THREADS") for k, e in run.env.items()} == dict.fromkeys(run.env, "4")
    assert all("CUDA_VISIBLE_DEVICES" not in e for e in run.env.values())
    assert pool.slots_needed(points[2]) == 2  # wider than the pool: runs alone, on all of it
    assert [r.run.concurrent_points for r in read_records(results_path(tmp_path))] == [2, 2, 2]
    assert len(records) == 3


def test_concurrent_sweeps_still_skip_points_that_must_oom(tmp_path):
    points = plan_grid([8, 16, 32, 64], [1], ["fp32"], [128], [0, 2], [1])
    run = FakeRunner(limit_tokens=16 * 128)
    cfg = SweepConfig(model="m", points=points, out_dir=tmp_path)
    records = list(iterate_sweep(cfg, {}, executor=LocalExecutor(["0", "1", "2", "3"], run=run)))
    status = {r.point.key: r.status for r in records}
    for z in (0, 2):  # a larger batch waits for the smaller one of its setting: b64 is proven, not run
        assert [status[f"fp32-z{z}-w1-ga1-s128-b{b}"] for b in (8, 16, 32, 64)] == ["ok", "ok", "oom", "skipped"]
    assert len(run.calls) == 6
    assert any({a[:8], b[:8]} == {"fp32-z0-", "fp32-z2-"} for a, b in run.overlaps)  # the two settings overlapped


def test_find_max_batch_searches_settings_side_by_side(tmp_path):
    points = plan_grid([8], [1], ["fp32"], [128, 512], [2], [1])
    run = FakeRunner(limit_tokens=40 * 128)
    cfg = SweepConfig(model="m", points=points, out_dir=tmp_path, find_max_batch=True, max_batch=256)
    records = list(iterate_sweep(cfg, {}, executor=LocalExecutor(["0", "1"], run=run)))
    best = {}
    for r in records:
        if r.status == "ok":
            best[r.point.seq_len] = max(best.get(r.point.seq_len, 0), r.point.batch_size)
    assert best == {128: 40, 512: 10}
    assert run.overlaps  # one point per setting at a time, the two settings at once


def test_cancel_kills_every_running_point(tmp_path):
    cfg = SweepConfig(model="m", points=[], out_dir=tmp_path)
    procs = []

    def run(cfg, p, *, env=None, started=None, command=None):
        proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
        procs.append(proc)
        started(proc.pid)
        proc.wait()
        return Record(point=p, status="error", model="m")

    pool = LocalExecutor(["0", "1"], run=run)
    pool.start(cfg, point(zero=0))
    pool.start(cfg, point(zero=2))
    deadline = time.time() + 10
    while len(procs) < 2 and time.time() < deadline:
        time.sleep(0.01)
    pool.cancel()
    assert [p.wait(5) for p in procs] == [-9, -9]
    assert pool.running() == []


def test_serial_executor_is_the_default_and_runs_in_order(tmp_path):
    run = FakeRunner()
    pool = SerialExecutor(run)
    points = [point(zero=0), point(zero=2)]
    keys = [
        r.point.key for r in iterate_sweep(SweepConfig(model="m", points=points, out_dir=tmp_path), {}, executor=pool)
    ]
    assert keys == run.calls == [p.key for p in points]
    assert not run.overlaps


@pytest.mark.parametrize(
    ("state", "status", "words"),
    [
        ("TIMEOUT", "timeout", "at its time limit (--slurm_time 30 min)"),
        ("NODE_FAIL", "error", "lost its node on node7 (NODE_FAIL)"),
        ("OUT_OF_MEMORY", "oom", "exceeding its memory allocation"),
        ("FAILED", "error", "failed on node7 (exit 1:0)"),
        ("CANCELLED", "error", "cancelled outside this sweep"),
        ("PREEMPTED", "error", "preempted"),
        ("BOOT_FAIL", "error", "lost its node"),
        ("DEADLINE", "timeout", "time limit"),
        ("SPECIAL_EXIT", "error", "ended in state SPECIAL_EXIT"),
    ],
)
def test_slurm_states_become_statuses_with_a_reason(state, status, words):
    got_status, reason = status_for_state(JobState(state, reason="exit 1:0", nodes="node7"), "42", 30)
    assert got_status == status
    assert words in reason
    assert "42" in reason


def test_slurm_answers_are_parsed_by_job_id():
    sacct = parse_sacct("12|ftprof-x|CANCELLED by 1000|0:15|n1\n13|ftprof-y|OUT_OF_MEMORY|0:125|n2\n")
    assert sacct["12"].state == "CANCELLED"
    assert sacct["13"] == JobState("OUT_OF_MEMORY", "ftprof-y", "exit 0:125", "n2")
    squeue = parse_squeue("14|ftprof-z|PENDING|Resources|\n15|ftprof-w|TIMEOUT|TimeLimit|n3\n")
    assert squeue["14"].live
    assert not squeue["15"].live
    assert squeue["15"].reason == "TimeLimit"


def test_slurm_times_and_job_shapes():
    assert parse_slurm_time("1:00:00") == 60
    assert parse_slurm_time("0:30") == 1
    with pytest.raises(Exception, match="not a Slurm time"):
        parse_slurm_time("soon")
    gpus = SlurmOptions(time_min=10, gpus_per_node=4, partition="gpu", account="lab")
    assert gpus.parameters(point(world=8)) == {
        "job_name": "ftprof-fp32-z2-w8-ga1-s128-b8",
        "time": 10,
        "nodes": 2,
        "ntasks_per_node": 4,
        "use_srun": False,
        "gpus_per_node": 4,
        "partition": "gpu",
        "account": "lab",
    }
    assert gpus.shape(point(world=2)) == (1, 2)
    assert gpus.shape(point(world=6)) == (2, 3)
    with pytest.raises(Exception, match="don't split evenly"):
        gpus.shape(point(world=7))
    assert SlurmOptions(time_min=5).shape(point(world=3)) == (1, 3)  # CPU nodes: every rank on one node


def test_a_multi_rank_point_is_one_srun_step(monkeypatch):
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "4")
    command = srun_command(Path("/shared/spec.json"), 2)
    assert command[:4] == ["srun", "--ntasks=2", "--kill-on-bad-exit=1", "--cpus-per-task=4"]
    assert command[-3:] == ["-m", "ftprof.sweep.measure", "/shared/spec.json"]
    assert srun_command(Path("/shared/spec.json"), 1)[-1] == "/shared/spec.json"  # one rank: no step


def test_the_job_log_knows_which_jobs_are_still_open(tmp_path):
    log = JobLog(tmp_path / "jobs.jsonl")
    a, b, c, d = (point(batch=n) for n in (1, 2, 3, 4))
    for job_id, p in zip("1234", (a, b, c, d), strict=True):
        log.submitted(JobEntry(job_id, p, str(tmp_path), f"ftprof-{p.key}", 0.0))
    log.cancelled(["3"])
    with open(tmp_path / "jobs.jsonl", "a") as f:
        f.write('{"event": "submitted", "job_id": "9')  # torn by a kill mid-write
    recorded = [Record(point=a, status="ok", model="m", run=RunFacts(slurm_job_id="1"))]
    # 1: recorded; 3: cancelled (runs again); 4: its point has a record already (a re-measurement's job)
    assert [e.job_id for e in log.open_jobs(recorded, done={a.key, d.key})] == ["2"]
    log.submitted(JobEntry("5", a, str(tmp_path), "x", 0.0))  # the torn line is cut before appending
    assert [e.job_id for e in log.entries()] == ["1", "2", "3", "4", "5"]


class FakeJob:
    def __init__(self, folder, job_id):
        self.paths = type("Paths", (), {"result_pickle": Path(folder) / f"{job_id}_0_result.pkl"})()

    def stdout(self):
        return "slurmstepd: error: *** JOB 7 ON n1 CANCELLED AT 2026-01-01T00:00:00 DUE TO TIME LIMIT ***"

    def stderr(self):
        return None


def test_jobs_slurm_ended_become_records_and_reused_ids_are_not_ours(tmp_path, monkeypatch):
    monkeypatch.setattr(slurm_mod, "_submitit_executor", lambda folder: None)
    monkeypatch.setattr(slurm_mod, "RESULT_GRACE_S", 0.0)
    monkeypatch.setattr(slurm_mod, "GRACE_S", 0.0)
    monkeypatch.setattr(slurm_mod, "RESULT_POLL_S", 0.0)
    monkeypatch.setattr("submitit.SlurmJob", FakeJob)
    answers = [
        {"7": JobState("RUNNING", "ftprof-" + point(batch=1).key, "None", "n1"), "8": JobState("PENDING", "x")},
        {"7": JobState("TIMEOUT", "ftprof-" + point(batch=1).key, "TimeLimit", "n1")},
    ]
    monkeypatch.setattr(slurm_mod, "query_states", lambda ids: answers.pop(0) if answers else {})
    events = []
    ex = SlurmExecutor(tmp_path, SlurmOptions(time_min=1), on_event=events.append)
    cfg = SweepConfig(model="m", points=[], out_dir=tmp_path, machine={"device": "cpu"})
    p7, p8 = point(batch=1), point(batch=2)
    ex.reattach([JobEntry("7", p7, str(tmp_path), "ftprof-" + p7.key, 0.0)], cfg)
    ex.reattach([JobEntry("8", p8, str(tmp_path), "ftprof-" + p8.key, 0.0)], cfg)
    monkeypatch.setattr(slurm_mod, "STATE_POLL_S", 0.0)
    records = {r.point.key: r for r in ex.wait() + ex.wait()}
    timeout, gone = records[p7.key], records[p8.key]
    assert timeout.status == "timeout"
    assert timeout.reason == "Slurm stopped job 7 at its time limit (--slurm_time 1 min)"
    assert "DUE TO TIME LIMIT" in timeout.stderr_tail
    assert timeout.run.slurm_state == "TIMEOUT"
    assert (timeout.run.slurm_job_id, timeout.machine, timeout.run.worker) == ("7", {"device": "cpu"}, None)
    # Job 8's id answered with another job's name (a restarted cluster): ours is gone without a result.
    assert gone.status == "error"
    assert "no longer knows job 8" in gone.reason
    assert events[:3] == [
        f"{p7.key}: re-attached to Slurm job 7",
        f"{p8.key}: re-attached to Slurm job 8",
        f"{p7.key}: job 7 running on n1",
    ]
    assert ex.running() == []


def test_slurm_flags_need_the_slurm_executor(capsys):
    from ftprof.cli import sweep as sweep_cli

    code = sweep_cli.main(["--model", "tiny-bert", "--slurm_partition", "gpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1] == "ftprof: error: --slurm_partition needs --executor slurm"
    assert sweep_cli.main(["--model", "tiny-bert", "--parallel", "0"]) == 2
    assert "--parallel must be at least 1, got 0" in capsys.readouterr().err


def test_no_srun_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun, no sbatch
    with pytest.raises(slurm_mod.SlurmError, match="run the sweep where sbatch and srun work"):
        SlurmExecutor(tmp_path, SlurmOptions(time_min=5))
