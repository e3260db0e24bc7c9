"""The pre-imported worker: a forked point measures what a fresh process measures, and fails the same ways."""

import contextlib
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from ftprof.point import Point
from ftprof.sweep.point_run import SweepConfig, close_fork_worker, fork_worker, run_point
from ftprof.sweep.worker import resident_file_pages, touch_pages


def vm_rss() -> int:
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) * 1024


def test_a_forked_child_maps_the_library_pages_back_and_starts_at_the_parents_rss():
    import torch  # noqa: F401  (its libraries are most of this process's file-backed pages)

    pages = resident_file_pages()
    parent = vm_rss()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: RSS before and after mapping the pages again; never returns into pytest
        try:
            before = vm_rss()
            touch_pages(pages)
            os.write(write, json.dumps([before, vm_rss()]).encode())
        finally:
            os._exit(0)
    os.close(write)
    message = os.read(read, 1000)
    os.waitpid(pid, 0)
    before, after = json.loads(message)
    mapped = sum(length for _, length in pages)
    assert mapped > 50 * 2**20  # torch's code and data the imports touched
    assert before < parent - 0.5 * mapped  # fork() left them out of the child's page tables
    assert after == pytest.approx(parent, rel=0.02)


def config(tmp_path: Path, worker: str, point: Point | None = None, **kwargs) -> SweepConfig:
    point = point or Point(precision="fp32", zero=2, seq_len=128, batch_size=16)
    kwargs = {"model": "tiny-bert", "steps": 2, "warmup": 1, **kwargs}
    return SweepConfig(points=[point], out_dir=tmp_path, worker=worker, **kwargs)


TWO_RANKS = Point(precision="fp32", zero=3, seq_len=64, batch_size=4, world_size=2)


def child_pids(pid: int) -> list[int]:
    with contextlib.suppress(OSError):
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return []


@pytest.mark.slow
def test_a_two_rank_point_forks_its_ranks_and_measures_what_the_launcher_does(tmp_path):
    """The same ZeRO-3 point under the deepspeed launcher and forked: every rank's RSS after loading the model
    and its peak within 3%, one world.
    Then one rank killed mid-window ends the other and the point, as a rank lost to the OOM killer does."""
    records = {}
    try:
        for worker in ("fresh", "fork"):
            cfg = config(tmp_path, worker, TWO_RANKS)
            records[worker] = run_point(cfg, TWO_RANKS)
            assert records[worker].status == "ok", records[worker].stderr_tail
            assert records[worker].run.worker == worker
        fresh, forked = (records[w].profile for w in ("fresh", "fork"))
        assert [r.rank for r in forked.ranks] == [0, 1]
        for a, b in zip(fresh.ranks, forked.ranks, strict=True):
            for phase in ("model_load", "steady"):
                assert b.phases[phase]["rss_bytes"] == pytest.approx(a.phases[phase]["rss_bytes"], rel=0.03), phase
        assert forked.samples_per_step == fresh.samples_per_step == 8  # 4 samples on each of 2 ranks

        groups: list[int] = []
        ranks: list[int] = []
        cfg = config(tmp_path, "fork", TWO_RANKS, min_seconds=600.0, timeout_s=120.0)

        def kill_one_rank_when_training() -> None:
            while not groups:
                time.sleep(0.1)
            time.sleep(10)  # inside the training window (min_seconds 600)
            ranks.extend(child_pids(groups[0]))
            os.kill(ranks[-1], signal.SIGKILL)

        killer = threading.Thread(target=kill_one_rank_when_training, daemon=True)
        killer.start()
        r = run_point(cfg, TWO_RANKS, started=groups.append)
        killer.join()
        assert len(ranks) == 2  # the point's process forked one process per rank
        assert r.status == "oom", r.stderr_tail
        assert "SIGKILL" in r.reason
        with pytest.raises(ProcessLookupError):  # rank 0 did not outlive the point
            os.killpg(groups[0], 0)
    finally:
        close_fork_worker()


@pytest.mark.slow
def test_forked_and_fresh_points_measure_the_same_peaks(tmp_path):
    """Alternated fresh / fork / fresh / fork: each fork peak within the fresh ones' own spread + 2% (RSS is
    sampled every 50 ms; bench/bench_worker.py measures the agreement on more points and rounds)."""
    records = {"fresh": [], "fork": []}
    try:
        for worker in ("fresh", "fork", "fresh", "fork"):
            cfg = config(tmp_path, worker)
            r = run_point(cfg, cfg.points[0])
            assert r.status == "ok", r.stderr_tail
            assert r.run.worker == worker
            records[worker].append(r)
    finally:
        close_fork_worker()
    fresh = [r.peak_bytes for r in records["fresh"]]
    low, high = min(fresh) * 0.98, max(fresh) * 1.02
    for r in records["fork"]:
        assert low <= r.peak_bytes <= high, (fresh, [r.peak_bytes for r in records["fork"]])
        load = r.profile.ranks[0].phases["model_load"]["rss_bytes"]
        assert load == pytest.approx(records["fresh"][0].profile.ranks[0].phases["model_load"]["rss_bytes"], rel=0.02)
        assert r.profile.samples_per_step == 16  # the same training, counted the same way


@pytest.mark.slow
def test_a_forked_point_times_out_fails_and_is_killed_like_a_fresh_one(tmp_path):
    try:
        # A hang: the point is stopped at the timeout, its process group with it.
        groups: list[int] = []
        cfg = config(tmp_path, "fork", timeout_s=3.0, min_seconds=600.0)
        r = run_point(cfg, cfg.points[0], started=groups.append)
        assert r.status == "timeout"
        assert r.reason == "no result after 3 s"
        with pytest.raises(ProcessLookupError):
            os.killpg(groups[0], 0)
        # A crash in the point: an error with its output's last line.
        cfg = config(tmp_path, "fork", model="no-such-model-anywhere")
        r = run_point(cfg, cfg.points[0])
        assert r.status == "error"
        assert "no-such-model-anywhere" in r.stderr_tail
        # SIGKILL from outside (the kernel's OOM killer): an oom, as for a fresh process.
        cfg = config(tmp_path, "fork", min_seconds=600.0, timeout_s=120.0)
        groups.clear()

        def kill_when_training() -> None:
            while not groups:
                time.sleep(0.1)
            time.sleep(8)  # inside the point's training window (min_seconds 600)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(groups[-1], signal.SIGKILL)

        killer = threading.Thread(target=kill_when_training, daemon=True)
        killer.start()
        r = run_point(cfg, cfg.points[0], started=groups.append)
        killer.join()
        assert r.status == "oom"
        assert "SIGKILL" in r.reason
        assert r.run.worker == "fork"
        assert fork_worker() is not None  # the worker itself lives on
    finally:
        close_fork_worker()
