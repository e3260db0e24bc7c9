from ftprof.recommend import launch_command, pareto_front, recommend
from ftprof.results import Record
from ftprof.sweep_plan import Point

GIB = 2**30


def rec(batch, seq, peak_gib, sps, zero=2, status="ok", ga=1, world=1, precision="bf16"):
    return Record(Point(precision, zero, world, ga, seq, batch), status, "bert-base-uncased",
                  int(peak_gib * GIB) if peak_gib else None, {"samples_per_s": sps} if sps else {})


RECORDS = [rec(8, 128, 4, 100), rec(16, 128, 6, 180), rec(32, 128, 10, 200), rec(64, 128, None, None, status="oom"),
           rec(16, 512, 12, 90), rec(32, 128, 9, 150, zero=3)]


def test_pareto_front():
    assert [r.point.key for r in pareto_front(RECORDS)] == [
        "bf16-z2-w1-ga1-s128-b8", "bf16-z2-w1-ga1-s128-b16", "bf16-z2-w1-ga1-s128-b32"]  # z3-b32: more memory, slower than b16


def test_recommendations_respect_budget_with_margin():
    recs = {r.kind: r.record.point.key for r in recommend(RECORDS, budget=10 * GIB)}
    # 10 GiB budget keeps 5% free: the 10 GiB point doesn't fit, the 9 GiB ZeRO-3 one does.
    assert recs == {"fastest": "bf16-z2-w1-ga1-s128-b16", "largest_effective_batch": "bf16-z3-w1-ga1-s128-b32",
                    "memory_optimal": "bf16-z2-w1-ga1-s128-b8"}
    assert recommend(RECORDS, budget=2 * GIB) == []
    # Without a budget the longest sequence length decides; another length can be asked for.
    assert {r.kind: r.record.point.key for r in recommend(RECORDS, None)}["fastest"] == "bf16-z2-w1-ga1-s512-b16"
    assert recommend(RECORDS, None, seq_len=128)[0].record.point.key == "bf16-z2-w1-ga1-s128-b32"
    assert recommend(RECORDS, None, seq_len=64) == []


def test_launch_command_is_exact():
    assert launch_command(rec(16, 256, 5, 10, zero=3, ga=4, world=8), "ds_configs/zero3.json") == (
        "deepspeed --num_gpus 8 launch/train.py --ds_config ds_configs/zero3.json --model bert-base-uncased "
        "--per_device_train_batch_size 16 --gradient_accumulation_steps 4 --max_length 256 --bf16")
    assert "--bf16" not in launch_command(rec(8, 128, 1, 1, precision="fp32"), "x.json")
