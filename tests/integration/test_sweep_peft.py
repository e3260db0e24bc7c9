"""``ftprof sweep --peft none,lora``: full fine-tuning and LoRA measured side by side through the one recipe;
each rank's record says what it trained, the report sets the methods beside each other, and on two ranks the
estimator's LoRA model states match what each rank really holds."""

import json

import pytest

from ftprof.cli.main import main as ftprof_main
from ftprof.estimate.adapters import LoraSpec, lora_facts_for
from ftprof.estimate.architecture import arch_for
from ftprof.estimate.estimator import estimate, measured_bytes
from ftprof.records.results import latest, read_records
from tests.integration.test_sweep_cli import sweep

pytestmark = pytest.mark.slow

HEAD = 64 * 2 + 2  # the classifier trains beside the adapters
ADAPTED = [f"bert.encoder.layer.{i}.attention.self.{m}" for i in range(2) for m in ("query", "value")]


def tiny_bert_params() -> int:
    """tiny-bert's parameters as a sweep point builds it (its config's whole vocabulary, a 2-label head)."""
    from transformers import AutoModelForSequenceClassification

    from ftprof.train.models import resolve_model_spec

    config = resolve_model_spec("tiny-bert", random_init=True).config
    config.num_labels = 2
    return sum(p.numel() for p in AutoModelForSequenceClassification.from_config(config).parameters())


def test_full_and_lora_side_by_side_with_what_each_trained(tmp_path, capsys):
    out = tmp_path / "peft"
    total = tiny_bert_params()
    sweep(
        ["--model", "tiny-bert", "--peft", "none,lora", "--lora_r", "4,8", "--zero", "0", "--precision", "fp32"]
        + ["--batch_sizes", "2", "--seq_lens", "32", "--out", str(out), "--no_report", "--no_remeasure"]
    )
    records = {r.point.key: r for r in latest(read_records(out / "results.jsonl"))}
    assert sorted(records) == [
        "fp32-z0-w1-ga1-s32-b2",
        "fp32-z0-w1-ga1-s32-b2-lora_r4",
        "fp32-z0-w1-ga1-s32-b2-lora_r8",
    ]
    assert {r.status for r in records.values()} == {"ok"}

    full = records["fp32-z0-w1-ga1-s32-b2"].profile.ranks[0]
    assert (full.trainable_parameters, full.frozen_parameters, full.adapted_modules) == (total, 0, [])
    assert full.breakdown["optimizer_states"] == 8 * total  # Adam's two fp32 moments
    for r in (4, 8):
        record = records[f"fp32-z0-w1-ga1-s32-b2-lora_r{r}"]
        rank = record.profile.ranks[0]
        trainable = 2 * 2 * r * (64 + 64) + HEAD  # query and value, 64 -> 64, in 2 layers
        assert rank.trainable_parameters == trainable
        assert rank.frozen_parameters == total  # the base, its head too: peft trains a copy of the head
        assert rank.adapted_modules == ADAPTED
        # What each rank holds, item by item: only what trains has optimizer states; the frozen base, its weights.
        assert rank.breakdown["optimizer_states"] == 8 * trainable
        assert rank.breakdown["parameters_fp32"] == 4 * trainable
        assert rank.breakdown["frozen_parameters_fp32"] == 4 * total
        assert record.lora is not None
        assert (record.lora.alpha, record.lora.dropout) == (16, 0.05)

    capsys.readouterr()
    code = ftprof_main(["report", str(out), "--format", "json"])  # in this process: no interpreter to start
    report = capsys.readouterr()
    assert code == 0, report.err[-2000:]
    data = json.loads(report.out)
    rows = {x["method"]: x for x in data["peft_comparison"]}
    assert sorted(rows) == ["LoRA r=4", "LoRA r=8", "full"]
    assert {x["setting"] for x in rows.values()} == {"fp32 ZeRO-0 seq 32"}
    assert {x["max_batch"] for x in rows.values()} == {2}
    assert rows["full"]["speed_vs_full"] == 1.0
    for rec in data["recommendations"]:  # whichever method each pick is, its command trains that method
        lora = rec["key"].rpartition("-lora_r")[2] if "-lora_r" in rec["key"] else None
        assert ("--peft lora" in rec["command"]) == (lora is not None)
        if lora:
            assert f"--lora_r {lora} --lora_alpha 16 --lora_dropout 0.05" in rec["command"]


def test_lora_model_states_match_each_ranks_measured_breakdown_on_two_ranks(tmp_path):
    """ZeRO-2 and ZeRO-3, bf16, on two ranks, a classifier (its head's trainable copy beside the adapters):
    each rank's trainable and frozen parameters, gradients, master weights and optimizer states as the
    estimator predicts them for LoRA, within 1% of what the rank holds. Under ZeRO-3 DeepSpeed does not cast a
    zero.Init model, and a classifier's adapters (fp32, as peft makes them) beside its head's bf16 copy made
    ZeRO-3 fail (one dtype per group): the recipe casts them, and the parameters item checks the dtype."""
    out = tmp_path / "lora2"
    sweep(
        ["--model", "tiny-bert", "--peft", "lora", "--lora_r", "8", "--zero", "2,3", "--world_size", "2"]
        + ["--precision", "bf16", "--batch_sizes", "2", "--seq_lens", "32", "--steps", "1", "--warmup", "0"]
        + ["--out", str(out), "--no_report", "--no_remeasure"]
    )
    records = latest(read_records(out / "results.jsonl"))
    assert [r.point.key for r in records] == ["bf16-z2-w2-ga1-s32-b2-lora_r8", "bf16-z3-w2-ga1-s32-b2-lora_r8"]
    assert {r.status for r in records} == {"ok"}
    arch = arch_for("tiny-bert")
    facts = lora_facts_for("tiny-bert", LoraSpec(r=8))
    assert (facts.adapter_params, facts.head_params) == (2 * 2 * 8 * (64 + 64), HEAD)  # counted by hand
    assert facts.frozen_params == tiny_bert_params()  # counted on a real model
    checked = 0
    for r in records:
        for rank in r.profile.ranks:
            assert (rank.trainable_parameters, rank.frozen_parameters) == (facts.trainable_params, facts.frozen_params)
            est = estimate(arch, r.point, device="cpu", rank=rank.rank, lora=facts)
            for item in ("parameters", "frozen_parameters", "gradients", "master_weights", "optimizer_states"):
                held = measured_bytes(rank.breakdown, item)
                assert held > 0, (r.point.key, rank.rank, item)
                assert est.items[item] == pytest.approx(held, rel=0.01), (r.point.key, rank.rank, item)
                checked += 1
    assert checked == 2 * 2 * 5
