"""A whole sweep through :func:`ftprof.sweep.driver.run_sweep`, no argument parser: resume, the manifest, the
re-measure passes and the typed facts each record carries.

The point runner is a deterministic stand-in (as in tests/sweep/test_schedule_and_remeasure.py) that builds
its records the way the real one does (:meth:`SweepConfig.record`); the results files, the manifest and the
estimator are real.
"""

import json

import pytest

from ftprof.errors import ConfigError
from ftprof.point import Point
from ftprof.records.profile import Profile
from ftprof.records.results import RunFacts, read_records
from ftprof.sweep.driver import ExecutorChoice, Note, Remeasuring, Starting, SweepRequest, run_sweep
from ftprof.sweep.executors.slurm_jobs import JOBS, JobEntry, JobLog
from ftprof.sweep.plan import plan_grid
from ftprof.sweep.point_run import SweepConfig


def request(tmp_path, batches=(4, 8, 16), **kwargs):
    points = plan_grid(list(batches), [1], ["fp32"], [128], [2], [1])
    config = SweepConfig(
        model="tiny-bert", task="classification", points=points, out_dir=tmp_path / "sweep", steps=3, min_seconds=1.0
    )
    return SweepRequest(config, **kwargs)


class Runner:
    """Measures a point as ``sps(batch, steps, nth run of that point)`` samples/s with a ±``spread`` window,
    and calls it contended on the runs ``busy(batch, n)`` says."""

    def __init__(self, sps, spread=lambda steps: 0.01, busy=lambda batch, n: False):
        self.sps, self.spread, self.busy = sps, spread, busy
        self.calls: list[tuple[int, int]] = []  # (batch, steps) of each run, in order

    def __call__(self, cfg, p: Point, **_):
        self.calls.append((p.batch_size, cfg.steps))
        n = sum(b == p.batch_size for b, _ in self.calls)
        sps, spread = self.sps(p.batch_size, cfg.steps, n), self.spread(cfg.steps)
        profile = Profile(
            sampler="rss",
            samples_per_s=sps,
            samples_per_step=p.batch_size,
            step_time_median_low_s=p.batch_size / sps / (1 + spread),
            step_time_median_high_s=p.batch_size / sps * (1 + spread),
            cpu_wait_share=0.9 if self.busy(p.batch_size, n) else 0.01,
        )
        return cfg.record(p, "ok", RunFacts(worker="fresh"), peak_bytes=p.batch_size * 2**20, profile=profile)


def steady(batch, steps, n):
    return 10.0 * batch


def test_a_sweep_writes_typed_records_and_its_manifest(tmp_path):
    req = request(tmp_path, remeasure=False)
    run, events, seen = Runner(steady), [], []
    written = run_sweep(req, on_record=seen.append, on_event=events.append, run=run)
    assert run.calls == [(4, 3), (8, 3), (16, 3)]  # smallest predicted peak first
    assert written == seen == read_records(req.config.results_path)
    (start,) = [e for e in events if not isinstance(e, Note)]
    assert start == Starting("tiny-bert", "bert", start.device, 3, 3, tmp_path / "sweep" / "results.jsonl")
    assert start.device.startswith("cpu")
    first = written[0]
    assert (first.task, first.run, first.machine["device"]) == (
        "classification",
        RunFacts(worker="fresh"),
        start.device,
    )
    assert first.predicted_bytes > 0
    assert first.ds_config["zero_optimization"]["stage"] == 2
    manifest = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert (manifest["model"], manifest["steps"], manifest["task"]) == ("tiny-bert", 3, "classification")


def test_resume_skips_the_points_measured_and_retries_failures_only_when_asked(tmp_path):
    run = Runner(steady)
    run_sweep(request(tmp_path, batches=(4, 8), remeasure=False), run=run)
    with pytest.raises(ConfigError, match=r"results.jsonl already exists; pass --resume"):
        run_sweep(request(tmp_path, batches=(4, 8, 16), remeasure=False), run=run)
    events = []
    new = run_sweep(
        request(tmp_path, batches=(4, 8, 16), remeasure=False, resume=True), on_event=events.append, run=run
    )
    assert [r.point.batch_size for r in new] == [16]
    assert run.calls == [(4, 3), (8, 3), (16, 3)]
    assert [(e.to_run, e.points) for e in events if isinstance(e, Starting)] == [(1, 3)]

    def failing(cfg, p, **_):
        return cfg.record(p, "error", RunFacts(worker="fresh"), reason="boom")

    run_sweep(request(tmp_path, batches=(4, 8, 16, 32), remeasure=False, resume=True), run=failing)
    again = request(tmp_path, batches=(4, 8, 16, 32), remeasure=False, resume=True)
    assert run_sweep(again, run=run) == []  # an error is an outcome: resuming doesn't run it again...
    retried = run_sweep(
        request(tmp_path, batches=(4, 8, 16, 32), remeasure=False, resume=True, retry_failed=True), run=run
    )
    assert [(r.point.batch_size, r.status) for r in retried] == [(32, "ok")]  # ...unless asked


def test_the_three_re_measure_passes_run_in_order_and_once(tmp_path):
    # Batch 4 waits for CPUs on its first run; 8 and 16 tie within the short window's noise, and the
    # longer window separates them.
    def sps(batch, steps, n):
        return {4: 50.0, 8: 100.0, 16: 101.0 if steps == 3 else 120.0}[batch]

    run = Runner(sps, spread=lambda steps: 0.2 if steps == 3 else 0.01, busy=lambda batch, n: (batch, n) == (4, 1))
    events, seen = [], []
    run_sweep(request(tmp_path), on_record=seen.append, on_event=events.append, run=run)
    passes = [e for e in events if isinstance(e, Remeasuring)]
    assert [(e.reason, [p.batch_size for p in e.points]) for e in passes] == [
        ("contended", [4]),  # the same window again
        ("repeat", [8]),  # the first clean point: 4's first window was not
        ("close call", [16, 8]),  # the fastest first, then those within noise of it, 3x longer
    ]
    assert run.calls == [(4, 3), (8, 3), (16, 3), (4, 3), (8, 3), (16, 9), (8, 9)]
    assert [r.run.remeasured for r in seen] == [None, None, None, "contended", "repeat", "close call", "close call"]
    assert read_records(request(tmp_path).config.results_path) == seen
    events = []
    assert run_sweep(request(tmp_path, resume=True), on_event=events.append, run=run) == []  # once per sweep
    assert len(run.calls) == 7
    assert not [e for e in events if isinstance(e, Remeasuring)]


def test_no_remeasure_runs_the_grid_only(tmp_path):
    run = Runner(lambda batch, steps, n: 100.0, spread=lambda steps: 0.2, busy=lambda batch, n: batch == 4)
    events = []
    run_sweep(request(tmp_path, remeasure=False), on_event=events.append, run=run)
    assert run.calls == [(4, 3), (8, 3), (16, 3)]
    assert not [e for e in events if isinstance(e, Remeasuring)]


def test_a_folder_measured_with_other_settings_is_refused(tmp_path):
    run = Runner(steady)
    run_sweep(request(tmp_path, remeasure=False), run=run)
    other = request(tmp_path, remeasure=False, resume=True)
    other.config.steps = 5
    with pytest.raises(ConfigError, match=r"measured with other settings \(steps: sweep has 3, now 5\)"):
        run_sweep(other, run=run)
    assert len(run.calls) == 3
    assert len(read_records(other.config.results_path)) == 3


def test_open_slurm_jobs_need_the_slurm_executor(tmp_path):
    req = request(tmp_path, remeasure=False)
    run_sweep(req, run=Runner(steady))
    unfinished = plan_grid([32], [1], ["fp32"], [128], [2], [1])[0]
    JobLog(req.config.out_dir / JOBS).submitted(JobEntry("77", unfinished, str(tmp_path), "ftprof-x", 0.0))
    again = request(tmp_path, batches=(4, 8, 16, 32), remeasure=False, resume=True)
    with pytest.raises(
        ConfigError, match=r"1 Slurm jobs of .* \(77\) were never collected; resume with --executor slurm"
    ):
        run_sweep(again, run=Runner(steady))


def test_executor_choice_refuses_what_cannot_run():
    with pytest.raises(ConfigError, match="--parallel must be at least 1, got 0"):
        ExecutorChoice("local", parallel=0)
    with pytest.raises(ConfigError, match="--executor slurm needs its job options"):
        ExecutorChoice("slurm")
