"""Full fine-tuning beside LoRA in the report: the comparison rows, the recommended command, the exports."""

import json

from ftprof.point import LoraOptions, Point
from ftprof.records.profile import Profile
from ftprof.records.results import Record
from ftprof.report.adapters import comparison
from ftprof.report.exports import to_json, to_markdown
from ftprof.report.recommend import recommend
from ftprof.units import GIB


def rec(batch, peak_gib, sps, lora_r=0, status="ok", seq=512):
    point = Point(
        precision="bf16", zero=2, seq_len=seq, batch_size=batch, peft="lora" if lora_r else "none", lora_r=lora_r
    )
    return Record(
        point=point,
        status=status,
        model="gpt2",
        task="causal-lm",
        peak_bytes=int(peak_gib * GIB) if peak_gib else None,
        profile=Profile(sampler="nvml", samples_per_s=sps) if sps else None,
        lora=LoraOptions(alpha=32, target_modules="attention,mlp") if lora_r else None,
    )


FULL = [rec(8, 20, 100), rec(16, 36, 150), rec(32, None, None, status="oom")]
LORA8 = [rec(8, 12, 130, 8), rec(16, 20, 210, 8), rec(32, 36, 260, 8)]
LORA64 = [rec(8, 13, 120, 64), rec(16, 22, 190, 64)]


def test_each_method_gets_its_largest_fitting_batch_and_ratios_at_the_common_one():
    rows = comparison(FULL + LORA8 + LORA64, budget=40 * GIB)  # 38 GiB usable: 36 fits
    assert [(x.method, x.max_batch, x.common_batch) for x in rows] == [
        ("full", 16, 16),
        ("LoRA r=8", 32, 16),
        ("LoRA r=64", 16, 16),
    ]
    full, lora8, lora64 = rows
    assert lora8.peak_bytes == 36 * GIB
    assert lora8.samples_per_s == 260
    assert lora8.peak_vs_full == 20 / 36
    assert lora8.speed_vs_full == 210 / 150
    assert lora64.peak_vs_full == 22 / 36
    assert {x.setting for x in rows} == {"bf16 ZeRO-2 seq 512"}

    tight = comparison(FULL + LORA8, budget=16 * GIB)  # only LoRA r=8 at batch 8 fits 15.2 GiB
    assert [(x.method, x.max_batch, x.common_batch, x.peak_vs_full) for x in tight] == [
        ("full", None, None, None),
        ("LoRA r=8", 8, None, None),
    ]


def test_a_setting_measured_with_one_method_has_no_rows():
    assert comparison(FULL, None) == []
    assert comparison(FULL[:1] + [rec(8, 12, 130, lora_r=8, seq=128)], None) == []  # another sequence length


def test_the_recommended_command_trains_the_lora_point_it_names():
    picks = {r.kind: r for r in recommend(FULL + LORA8, budget=40 * GIB)}
    assert picks["fastest"].record.point.key == "bf16-z2-w1-ga1-s512-b32-lora_r8"
    assert picks["fastest"].command.endswith(
        "--task causal-lm --peft lora --lora_r 8 --lora_alpha 32 --lora_dropout 0.05 "
        "--lora_target_modules attention,mlp"
    )
    assert picks["memory_optimal"].record.point.key == "bf16-z2-w1-ga1-s512-b8-lora_r8"
    # Without LoRA on the grid, LoRA is never what the report proposes, even where it would be faster.
    assert all("--peft" not in r.command for r in recommend(FULL, budget=40 * GIB))


def test_lever_notes_name_the_method_of_a_lora_setting():
    from ftprof.report.recommend import lever_notes

    ckpt = [
        Record(
            point=Point(**{**r.point.to_json(), "gradient_checkpointing": True}),
            status="ok",
            model=r.model,
            peak_bytes=int(r.peak_bytes * 0.5),
            profile=r.profile,
        )
        for r in LORA8[:2]
    ]
    notes = lever_notes(LORA8[:2] + ckpt, budget=None)
    assert notes == ["bf16 ZeRO-2 seq 512 LoRA r=8: gradient checkpointing fits no larger batch at 1.00x the speed"]


def test_exports_carry_the_comparison():
    records = FULL + LORA8
    recs = recommend(records, budget=40 * GIB)
    data = json.loads(to_json(records, recs, 40 * GIB))
    assert [(x["method"], x["max_batch"]) for x in data["peft_comparison"]] == [("full", 16), ("LoRA r=8", 32)]
    assert {p["peft"] for p in data["points"]} == {"none", "lora"}
    md = to_markdown(records, recs, 40 * GIB)
    assert "| bf16 ZeRO-2 seq 512 | LoRA r=8 | 32 | 36 | 260 | 16 | 0.56 | 1.4 |" in md
