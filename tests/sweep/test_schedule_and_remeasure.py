"""The sweep loop's decisions (skip, resume, bisect) with the point runner replaced by a memory model.

The real runner (fresh processes, the deepspeed launcher, OOM detection) is exercised in
tests/integration/test_sweep_cli.py; here a deterministic stand-in lets us check every decision exactly.
"""

from ftprof.point import Point
from ftprof.records.profile import Profile
from ftprof.records.results import Record, latest, read_records
from ftprof.sweep.plan import plan_grid
from ftprof.sweep.point_run import SweepConfig, classify
from ftprof.sweep.remeasure import close_calls, contended_points, remeasure, repeat_point
from ftprof.sweep.schedule import iterate_sweep


def fake_runner(limit_tokens):
    calls = []

    def run(cfg, p: Point) -> Record:
        calls.append(p.key)
        if p.batch_size * p.seq_len > limit_tokens:
            return Record(point=p, status="oom", model=cfg.model, reason="CUDA out of memory")
        return Record(
            point=p,
            status="ok",
            model=cfg.model,
            peak_bytes=p.batch_size * p.seq_len * 1000,
            profile=Profile(sampler="rss", samples_per_s=float(p.batch_size)),
        )

    return run, calls


def test_points_that_must_oom_are_skipped_not_run(tmp_path):
    points = plan_grid([8, 16, 32, 64], [1], ["fp32"], [128, 256], [2], [1])
    run, calls = fake_runner(limit_tokens=16 * 128)
    cfg = SweepConfig(model="m", points=points, out_dir=tmp_path)
    records = list(iterate_sweep(cfg, {}, run))
    status = {r.point.key: r.status for r in records}
    assert status == {
        "fp32-z2-w1-ga1-s128-b8": "ok",
        "fp32-z2-w1-ga1-s128-b16": "ok",
        "fp32-z2-w1-ga1-s128-b32": "oom",
        "fp32-z2-w1-ga1-s128-b64": "skipped",
        "fp32-z2-w1-ga1-s256-b8": "ok",
        "fp32-z2-w1-ga1-s256-b16": "oom",
        "fp32-z2-w1-ga1-s256-b32": "skipped",
        "fp32-z2-w1-ga1-s256-b64": "skipped",
    }
    assert len(calls) == 5
    assert [r.point.key for r in read_records(cfg.results_path)] == [r.point.key for r in records]


def test_resume_runs_only_missing_points(tmp_path):
    points = plan_grid([8, 16], [1], ["fp32"], [128], [0, 2], [1])
    run, calls = fake_runner(limit_tokens=10**9)
    cfg = SweepConfig(model="m", points=points, out_dir=tmp_path)
    first = iterate_sweep(cfg, {}, run)
    next(first), next(first)  # "killed" after two points
    done = {r.point.key: r for r in read_records(cfg.results_path)}
    list(iterate_sweep(cfg, done, run))
    keys = [r.point.key for r in read_records(cfg.results_path)]
    assert sorted(keys) == sorted(p.key for p in points)
    assert len(keys) == len(set(keys)) == 4
    assert len(calls) == 4


def test_find_max_batch_bisects_per_setting(tmp_path):
    points = plan_grid([8], [1], ["fp32"], [128, 512], [2], [1])
    run, calls = fake_runner(limit_tokens=40 * 128)  # fits up to batch 40 at 128, 10 at 512
    cfg = SweepConfig(model="m", points=points, out_dir=tmp_path, find_max_batch=True, max_batch=256)
    records = list(iterate_sweep(cfg, {}, run))
    best = {}
    for r in records:
        if r.status == "ok":
            best[r.point.seq_len] = max(best.get(r.point.seq_len, 0), r.point.batch_size)
    assert best == {128: 40, 512: 10}
    grid_cost = 256 // 8 * 2  # an exhaustive grid of multiples of 8 up to 256, for both lengths
    assert len(calls) < grid_cost * 0.4


def test_find_max_batch_to_within_a_step_runs_fewer_points(tmp_path):
    points = plan_grid([8], [1], ["fp32"], [128], [2], [1])
    run, calls = fake_runner(limit_tokens=40 * 128)  # fits up to batch 40
    exact = SweepConfig(model="m", points=points, out_dir=tmp_path / "exact", find_max_batch=True, max_batch=256)
    list(iterate_sweep(exact, {}, run))
    exact_calls, calls[:] = list(calls), []
    coarse = SweepConfig(
        model="m", points=points, out_dir=tmp_path / "coarse", find_max_batch=True, max_batch=256, batch_step=8
    )
    records = list(iterate_sweep(coarse, {}, run))
    assert max(r.point.batch_size for r in records if r.status == "ok") == 40  # 40 is a multiple of 8
    assert all(r.point.batch_size % 8 == 0 for r in records)
    assert len(calls) < len(exact_calls)


def test_on_a_gpu_the_memory_limit_caps_the_allocator_not_the_address_space(tmp_path, monkeypatch):
    from ftprof.sweep import point_run

    p = Point(precision="bf16", zero=2, seq_len=128, batch_size=8)
    cfg = SweepConfig(model="tiny-bert", points=[p], out_dir=tmp_path, child_memory_limit=2**30)
    monkeypatch.setattr(point_run, "_has_cuda", lambda: True)
    assert point_run._measure_spec(cfg, p, tmp_path / "r.json").device_memory_limit == 2**30
    assert point_run._address_space_limit(cfg) is None  # CUDA maps far more address space than it uses
    monkeypatch.setattr(point_run, "_has_cuda", lambda: False)
    assert point_run._measure_spec(cfg, p, tmp_path / "r.json").device_memory_limit is None
    assert point_run._address_space_limit(cfg) == 2**30


def test_classify_cpu_oom_and_errors():
    assert (
        classify(
            1,
            "RuntimeError: [enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate "
            "memory: you tried to allocate 123 bytes",
            False,
        )[0]
        == "oom"
    )
    assert classify(1, "Traceback ...\nValueError: bad thing\n", False) == ("error", "ValueError: bad thing")
    assert classify(0, "", False)[0] == "error"  # exit 0 without a result is not a success


def test_points_predicted_far_over_budget_are_skipped_with_the_figure(tmp_path):
    points = plan_grid([4, 8, 16], [1], ["fp32"], [128], [2], [1])
    run, calls = fake_runner(limit_tokens=10**9)
    cfg = SweepConfig(
        model="m", points=points, out_dir=tmp_path, predict=lambda p: p.batch_size * 2**30, budget=10 * 2**30
    )
    records = {r.point.batch_size: r for r in iterate_sweep(cfg, {}, run)}
    assert [records[b].status for b in (4, 8, 16)] == ["ok", "ok", "over_budget"]  # 16 GiB > 10 GiB + 50%
    assert records[16].reason == "not run: predicted 16.00 GiB exceeds the 10.0 GiB budget by more than 50%"
    assert records[8].predicted_bytes == 8 * 2**30
    assert len(calls) == 2


def test_a_prediction_never_stands_in_for_an_oom_when_bisecting(tmp_path):
    points = plan_grid([8], [1], ["fp32"], [128], [2], [1])
    run, calls = fake_runner(limit_tokens=40 * 128)  # batch 40 fits
    # The estimator wrongly says anything above batch 16 needs 100 GiB: bisection must still measure.
    cfg = SweepConfig(
        model="m",
        points=points,
        out_dir=tmp_path,
        find_max_batch=True,
        max_batch=64,
        predict=lambda p: (100 if p.batch_size > 16 else 1) * 2**30,
        budget=10 * 2**30,
    )
    records = list(iterate_sweep(cfg, {}, run))
    assert max(r.point.batch_size for r in records if r.status == "ok") == 40
    assert "over_budget" not in {r.status for r in records}


def test_close_calls_are_measured_again_longer_and_replace_the_first_figures(tmp_path):
    points = plan_grid([4, 8, 16], [1], ["fp32"], [128], [2], [1])
    cfg = SweepConfig(model="m", points=points, out_dir=tmp_path, steps=3, min_seconds=1.0)
    cfg.predict = lambda p: 1000 * p.batch_size
    windows = []

    def run(c, p):  # first pass: batches 8 and 16 tie within noise; longer windows separate them
        windows.append((p.batch_size, c.steps, c.min_seconds))
        spread = 0.2 if c.steps == 3 else 0.01
        sps = {4: 50.0, 8: 100.0, 16: 101.0 if c.steps == 3 else 120.0}[p.batch_size]
        prof = Profile(
            sampler="rss",
            samples_per_s=sps,
            samples_per_step=p.batch_size,
            step_time_median_low_s=p.batch_size / sps / (1 + spread),
            step_time_median_high_s=p.batch_size / sps * (1 + spread),
        )
        return Record(point=p, status="ok", model="m", peak_bytes=p.batch_size, profile=prof)

    list(iterate_sweep(cfg, {}, run))
    close = close_calls(read_records(cfg.results_path), None)
    assert sorted(p.batch_size for p in close) == [8, 16]
    list(remeasure(cfg, close, run))
    assert sorted(w for w in windows if w[1] == 9) == [(8, 9, 3.0), (16, 9, 3.0)]
    latest_records = {r.point.batch_size: r for r in latest(read_records(cfg.results_path))}
    assert latest_records[16].samples_per_s == 120.0
    assert len(latest_records) == 3
    assert latest_records[16].predicted_bytes == 16_000  # the prediction stays beside the new figures
    assert close_calls(read_records(cfg.results_path), None) == []  # separated now


def test_a_base_ds_config_travels_with_each_record_into_the_recommendation(tmp_path):
    from ftprof.report.recommend import recommend
    from ftprof.runtime.deepspeed_config import DeepSpeedConfig, ds_config_for

    base = ds_config_for(3, offload_optimizer=True, offload_param=True)
    base["zero_optimization"]["reduce_bucket_size"] = 12345  # the user's own bucket
    points = plan_grid([4, 8], [1], ["fp32"], [128], [2, 3], [1], offload=DeepSpeedConfig(base).offload)
    run, _ = fake_runner(limit_tokens=10**9)
    cfg = SweepConfig(model="m", points=points, out_dir=tmp_path, base_ds_config=DeepSpeedConfig(base))
    list(iterate_sweep(cfg, {}, run))
    records = read_records(cfg.results_path)
    zero = {r.point.key: r.ds_config["zero_optimization"] for r in records}
    assert zero["fp32-z3-w1-ga1-s128-b8-off_optimizer+param"]["offload_param"]["device"] == "cpu"
    assert zero["fp32-z2-w1-ga1-s128-b8-off_optimizer"]["stage"] == 2
    assert "offload_param" not in zero["fp32-z2-w1-ga1-s128-b8-off_optimizer"]
    assert {z["reduce_bucket_size"] for z in zero.values()} == {12345}  # kept through the change of stage
    fastest = recommend(records, None, config_dir=str(tmp_path))[0]
    assert fastest.ds_config == fastest.record.ds_config  # what ran, not the shipped file
    assert fastest.config_path == f"{tmp_path}/recommended_fastest.json"


def test_a_point_is_re_measured_once():
    def rec(batch, sps):
        prof = Profile(
            sampler="rss",
            samples_per_s=sps,
            samples_per_step=batch,
            step_time_median_low_s=batch / sps / 1.2,
            step_time_median_high_s=batch / sps * 1.2,
        )
        p = Point(precision="fp32", zero=2, seq_len=128, batch_size=batch)
        return Record(point=p, status="ok", model="m", peak_bytes=batch, profile=prof)

    first = [rec(8, 100.0), rec(16, 101.0)]
    assert sorted(p.batch_size for p in close_calls(first, None)) == [8, 16]
    assert close_calls([*first, rec(8, 99.0), rec(16, 100.0)], None) == []  # still tied: not again


def test_points_measured_while_others_used_the_cpus_are_measured_again_once(tmp_path):
    points = plan_grid([4, 8, 16], [1], ["fp32"], [128], [2], [1])
    cfg = SweepConfig(model="m", points=points, out_dir=tmp_path, steps=3, min_seconds=1.0)
    runs: list[tuple[int, int]] = []

    def run(c, p):  # batch 8 shares the machine on its first run, and batch 16 on every run
        runs.append((p.batch_size, c.steps))
        busy = p.batch_size == 16 or (p.batch_size == 8 and runs.count((8, 3)) == 1)
        prof = Profile(sampler="rss", samples_per_s=10.0, cpu_wait_share=0.5 if busy else 0.01)
        return Record(point=p, status="ok", model="m", peak_bytes=p.batch_size, profile=prof)

    list(iterate_sweep(cfg, {}, run))
    again = contended_points(read_records(cfg.results_path))
    assert sorted(p.batch_size for p in again) == [8, 16]
    list(remeasure(cfg, again, run, window=1))  # the same window: the machine, not the length, was the problem
    assert sorted(runs) == [(4, 3), (8, 3), (8, 3), (16, 3), (16, 3)]
    latest_by_key = {r.point.batch_size: r for r in latest(read_records(cfg.results_path))}
    assert not latest_by_key[8].profile.contended
    assert latest_by_key[16].profile.contended
    assert contended_points(read_records(cfg.results_path)) == []  # measured twice: reported as it is


def test_waiting_that_the_settings_own_threads_explain_is_not_contention():
    """Two ranks of two threads on two cores wait for each other by construction (measured: 0.57 s per s);
    one busy outside process on two cores makes a lone rank wait about 1 s per s."""
    own = Profile(sampler="rss", cpu_wait_share=0.57, cpu_oversubscribed=True)
    outside = Profile(sampler="rss", cpu_wait_share=0.9)
    alone = Profile(sampler="rss", cpu_wait_share=0.08, cpu_steal_share=0.0)
    stolen = Profile(sampler="rss", cpu_wait_share=0.08, cpu_steal_share=0.2, cpu_oversubscribed=True)
    assert [p.contended for p in (own, outside, alone, stolen)] == [False, True, False, True]


def test_a_contended_re_measure_leaves_the_close_call_re_measure_to_come(tmp_path):
    points = plan_grid([8, 16], [1], ["fp32"], [128], [2], [1])
    cfg = SweepConfig(model="m", points=points, out_dir=tmp_path, steps=3, min_seconds=1.0)
    runs: list[tuple[int, int]] = []

    def run(c, p):  # batch 8 is contended on its first run; 8 and 16 tie within noise on short windows
        runs.append((p.batch_size, c.steps))
        wait = 0.9 if (p.batch_size, c.steps) == (8, 3) and runs.count((8, 3)) == 1 else 0.01
        sps = {8: 100.0, 16: 101.0 if c.steps == 3 else 120.0}[p.batch_size]
        prof = Profile(
            sampler="rss",
            samples_per_s=sps,
            samples_per_step=p.batch_size,
            step_time_median_low_s=p.batch_size / sps / 1.2,
            step_time_median_high_s=p.batch_size / sps * 1.2,
            cpu_wait_share=wait,
        )
        return Record(point=p, status="ok", model="m", peak_bytes=p.batch_size, profile=prof)

    list(iterate_sweep(cfg, {}, run))
    list(remeasure(cfg, contended_points(read_records(cfg.results_path)), run, window=1, reason="contended"))
    close = close_calls(read_records(cfg.results_path), None)
    assert sorted(p.batch_size for p in close) == [8, 16]  # both get the longer window


def test_the_first_clean_point_is_repeated_once_and_its_drift_opens_close_calls(tmp_path):
    points = plan_grid([2, 4, 8, 16], [1], ["fp32"], [128], [2], [1])
    cfg = SweepConfig(model="m", points=points, out_dir=tmp_path, steps=3, min_seconds=1.0)
    runs: list[int] = []

    def run(c, p):  # batch 2 fails, batch 4 waits for CPUs; 8 is measured at 100 then 80; 16 at 85
        runs.append(p.batch_size)
        if p.batch_size == 2:
            return Record(point=p, status="error", model="m", reason="boom")
        sps = {4: 50.0, 8: 100.0 if runs.count(8) == 1 else 80.0, 16: 85.0}[p.batch_size]
        prof = Profile(
            sampler="rss",
            samples_per_s=sps,
            samples_per_step=p.batch_size,
            step_time_median_low_s=p.batch_size / sps / 1.01,  # intervals of ±1%: no overlaps
            step_time_median_high_s=p.batch_size / sps * 1.01,
            cpu_wait_share=0.9 if p.batch_size == 4 else 0.01,
        )
        return Record(point=p, status="ok", model="m", peak_bytes=p.batch_size, profile=prof)

    list(iterate_sweep(cfg, {}, run))
    assert close_calls(read_records(cfg.results_path), None) == []  # 100 vs 85: apart, as far as windows say
    first = repeat_point(read_records(cfg.results_path))
    assert first is not None
    assert first.batch_size == 8
    list(remeasure(cfg, [first], run, window=1, reason="repeat"))
    records = read_records(cfg.results_path)
    assert repeat_point(records) is None  # once per sweep, resumed or not
    # 8 moved 100 → 80 (-20%) on its own: its latest 80 and 16's 85 are within that of each other
    assert sorted(p.batch_size for p in close_calls(records, None)) == [8, 16]
