import pytest

from ftprof.point import Point
from ftprof.records.profile import Profile
from ftprof.records.results import Record
from ftprof.report.commands import train_command
from ftprof.report.recommend import Repeat, lever_notes, pareto_front, recommend, repeats, worst_repeat
from ftprof.units import GIB


def rec(batch, seq, peak_gib, sps, zero=2, status="ok", ga=1, world=1, precision="bf16"):
    point = Point(precision=precision, zero=zero, world_size=world, grad_accum=ga, seq_len=seq, batch_size=batch)
    return Record(
        point=point,
        status=status,
        model="bert-base-uncased",
        peak_bytes=int(peak_gib * GIB) if peak_gib else None,
        profile=Profile(sampler="rss", samples_per_s=sps) if sps else None,
    )


RECORDS = [
    rec(8, 128, 4, 100),
    rec(16, 128, 6, 180),
    rec(32, 128, 10, 200),
    rec(64, 128, None, None, status="oom"),
    rec(16, 512, 12, 90),
    rec(32, 128, 9, 150, zero=3),
]


def test_pareto_front():
    assert [r.point.key for r in pareto_front(RECORDS)] == [
        "bf16-z2-w1-ga1-s128-b8",
        "bf16-z2-w1-ga1-s128-b16",
        "bf16-z2-w1-ga1-s128-b32",
    ]  # z3-b32: more memory, slower than b16


def test_recommendations_respect_budget_with_margin():
    recs = {r.kind: r.record.point.key for r in recommend(RECORDS, budget=10 * GIB)}
    # 10 GiB budget keeps 5% free: the 10 GiB point doesn't fit, the 9 GiB ZeRO-3 one does.
    assert recs == {
        "fastest": "bf16-z2-w1-ga1-s128-b16",
        "largest_effective_batch": "bf16-z3-w1-ga1-s128-b32",
        "memory_optimal": "bf16-z2-w1-ga1-s128-b8",
    }
    assert recommend(RECORDS, budget=2 * GIB) == []
    # Without a budget the longest sequence length decides; another length can be asked for.
    assert {r.kind: r.record.point.key for r in recommend(RECORDS, None)}["fastest"] == "bf16-z2-w1-ga1-s512-b16"
    assert recommend(RECORDS, None, seq_len=128)[0].record.point.key == "bf16-z2-w1-ga1-s128-b32"
    assert recommend(RECORDS, None, seq_len=64) == []


def test_launch_command_is_exact_and_pins_the_rank_count():
    r = rec(16, 256, 5, 10, zero=3, ga=4, world=8)
    assert train_command(r.model, r.point, "ds_configs/zero3.json") == (
        "deepspeed --num_gpus 8 launch/train.py --ds_config ds_configs/zero3.json --model bert-base-uncased "
        "--per_device_train_batch_size 16 --gradient_accumulation_steps 4 --max_length 256 --bf16"
    )
    one = rec(8, 128, 1, 1, precision="fp32")
    assert train_command(one.model, one.point, "x.json").startswith("deepspeed --num_gpus 1 launch/train.py")
    assert "--bf16" not in train_command(one.model, one.point, "x.json")
    assert train_command("my model", one.point, "a b.json").count("'") == 4  # quoted for the shell


def test_commands_name_the_config_that_holds_the_setting(tmp_path):
    offloaded = [rec(8, 128, 4, 100, zero=2), rec(8, 128, 3, 50, zero=3)]
    offloaded = [
        Record(
            point=Point(**{**r.point.to_json(), "offload": "optimizer"}),
            status="ok",
            model=r.model,
            peak_bytes=r.peak_bytes,
            profile=r.profile,
        )
        for r in offloaded
    ]
    by_kind = {x.kind: x for x in recommend(offloaded, None, config_dir=str(tmp_path))}
    assert by_kind["fastest"].config_path == "ds_configs/zero2_offload.json"  # shipped: same settings
    assert by_kind["memory_optimal"].config_path == f"{tmp_path}/recommended_memory_optimal.json"  # none shipped
    assert by_kind["memory_optimal"].ds_config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert "offload_param" not in by_kind["memory_optimal"].ds_config["zero_optimization"]
    written = {x.kind: x.config_path for x in recommend(offloaded, None, config_dir="out", write_configs=True)}
    assert written["fastest"] == "out/recommended_fastest.json"


def test_hf_trainer_without_deepspeed_is_recommended_with_its_optim_and_no_config(tmp_path):
    """A --zero none point that is fastest and smallest: its command is plain HF Trainer with the --optim it
    stepped, no config is written for it, and ZeRO points keep theirs."""
    from ftprof.report.sweep_report import SweepReport

    plain_point = Point(precision="fp32", zero=0, deepspeed=False, seq_len=128, batch_size=8)
    plain = Record(
        point=plain_point,
        status="ok",
        model="gpt2",
        peak_bytes=3 * GIB,
        profile=Profile(sampler="rss", samples_per_s=200),
        optim="sgd",
    )
    zero2 = rec(8, 128, 4, 100, zero=2, precision="fp32")
    by_kind = {x.kind: x for x in recommend([plain, zero2], None, config_dir=str(tmp_path), write_configs=True)}
    best = by_kind["fastest"]
    assert best.record is plain
    assert by_kind["memory_optimal"].record is plain
    assert (best.ds_config, best.config_path) == (None, None)
    assert best.command == (
        "python launch/train.py --zero none --optim sgd --model gpt2 --per_device_train_batch_size 8 "
        "--gradient_accumulation_steps 1 --max_length 128"
    )
    report = SweepReport(tmp_path, [plain, zero2], list(by_kind.values()), None)
    assert report.write_configs() == []  # nothing to write for HF Trainer alone
    assert not list(tmp_path.iterdir())


def timed(batch, sps, low_s, high_s, world=1, seq=128):
    """A measured point whose median step took low_s..high_s seconds (95% interval) for ``batch * world``."""
    r = rec(batch, seq, 4, sps, world=world)
    r.profile.samples_per_step = batch * world
    r.profile.step_time_median_low_s, r.profile.step_time_median_high_s = low_s, high_s
    return r


def test_more_ranks_never_win_by_their_total_alone():
    one, two = rec(8, 128, 4, 100, world=1), rec(8, 128, 4, 150, world=2)  # 2 ranks: 75 samples/s per rank
    recs = recommend([one, two], None)
    assert {r.cohort.world_size for r in recs} == {2}  # the cohort is one world size, stated
    assert recommend([one, two], None, world_size=1)[0].record is one
    assert str(recs[0].cohort) == "seq 128, 2 ranks"


def test_fastest_is_marked_when_within_noise_of_another():
    a = timed(8, 100.0, 0.075, 0.085)  # 94..107 samples/s
    b = timed(4, 98.0, 0.039, 0.045)  # 89..103: overlaps a
    c = timed(16, 60.0, 0.25, 0.28)  # 57..64: clearly slower
    fastest = recommend([a, b, c], None)[0]
    assert fastest.record is a
    assert fastest.within_noise_of == [b.point.key]


def with_levers(r, **levers):
    return Record(
        point=Point(**{**r.point.to_json(), **levers}),
        status=r.status,
        model=r.model,
        peak_bytes=r.peak_bytes,
        profile=r.profile,
    )


def test_lever_notes_say_what_checkpointing_and_offload_cost_and_buy():
    plain = [rec(8, 512, 6, 100, zero=3), rec(16, 512, 12, 180, zero=3)]  # batch 16 needs 12 GiB
    ckpt = [
        with_levers(rec(8, 512, 3, 70, zero=3), gradient_checkpointing=True),
        with_levers(rec(16, 512, 5, 126, zero=3), gradient_checkpointing=True),
        with_levers(rec(32, 512, 9, 240, zero=3), gradient_checkpointing=True),
    ]
    offload = [with_levers(rec(16, 512, 4, 72, zero=3), offload="optimizer+param")]
    notes = lever_notes(plain + ckpt + offload, budget=10 * GIB)
    assert notes == [
        "bf16 ZeRO-3 seq 512: gradient checkpointing buys batch 32 (vs 8) at 0.70x the speed",
        "bf16 ZeRO-3 seq 512: offload optimizer+param buys batch 16 (vs 8) at 0.40x the speed",
    ]
    assert lever_notes(ckpt[:1] + offload, budget=10 * GIB) == []  # nothing to compare against
    only = lever_notes([rec(16, 512, 12, 180, zero=3), ckpt[1]], budget=10 * GIB)
    assert only == ["bf16 ZeRO-3 seq 512: fits only with gradient checkpointing (batch 16) at 0.70x the speed"]


def remeasured(r, sps, reason, contended=False):
    again = rec(r.point.batch_size, r.point.seq_len, 4, sps)
    again.run.remeasured = reason
    if contended:
        again.profile.cpu_wait_share = 0.9
    return again


def test_repeats_pair_each_re_measure_with_its_first_clean_measurement():
    busy = rec(8, 128, 4, 40)
    busy.profile.cpu_wait_share = 0.9  # its first window waited for CPUs: no baseline
    first, other = rec(16, 128, 4, 200), rec(32, 128, 4, 300)
    records = [
        busy,
        first,
        other,
        remeasured(busy, 100, "contended"),
        remeasured(busy, 110, "close call"),  # no clean first measurement to compare with
        remeasured(first, 170, "repeat"),
        remeasured(other, 330, "close call"),
        remeasured(other, 150, "contended", contended=True),  # the CPUs, not the machine's drift
        remeasured(first, 20, "repeat", contended=True),  # nor a repeat whose window waited for CPUs
    ]
    got = [(x.key, x.first, x.again) for x in repeats(records)]
    assert got == [(first.point.key, 200, 170), (other.point.key, 300, 330)]
    worst = worst_repeat(records)
    assert worst.key == first.point.key
    assert worst.change == pytest.approx(-0.15)
    assert worst.drift == pytest.approx(200 / 170 - 1)  # as two points' figures are compared: faster / slower
    assert str(worst) == "bf16-z2-w1-ga1-s128-b16 measured again: 200.0 → 170.0 samples/s (-15.0%)"
    assert worst_repeat(records[:3]) is None


def test_the_machines_drift_widens_what_the_fastest_is_within_noise_of():
    a = timed(8, 100.0, 0.079, 0.081)  # 98.8..101.3 samples/s
    b = timed(4, 90.0, 0.0440, 0.0450)  # 88.9..90.9: no overlap, 11.1% slower
    c = timed(16, 80.0, 0.199, 0.201)  # 79.6..80.4: 25% slower
    assert recommend([a, b, c], None)[0].within_noise_of == []
    drift = Repeat("x", first=100.0, again=88.0)  # the machine moved 100/88: 13.6% between two measurements
    fastest, *others = recommend([a, b, c], None, repeat=drift)
    assert fastest.within_noise_of == [b.point.key]
    assert fastest.repeat is drift
    assert all(x.repeat is None and x.within_noise_of == [] for x in others)
    assert recommend([a, b, c], None, repeat=Repeat("x", 100.0, 130.0))[0].within_noise_of == [b.point.key, c.point.key]
