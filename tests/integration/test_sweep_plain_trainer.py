"""`ftprof sweep --zero none,0 --optim sgd` for real: HF Trainer without DeepSpeed measured beside DeepSpeed's
ZeRO-0, each stepping what it says, and the report's command for the plain point."""

import pytest

from ftprof.estimate.architecture import arch_for
from ftprof.estimate.estimator import estimate
from ftprof.estimate.optimizers import trainer_optimizer
from ftprof.records.results import latest, read_records
from ftprof.report.recommend import recommend
from tests.integration.test_sweep_cli import sweep


@pytest.mark.slow
def test_zero_none_beside_zero_0_each_steps_its_own_optimizer(tmp_path):
    out = tmp_path / "plain"
    proc = sweep(
        ["--zero", "none,0", "--optim", "sgd", "--batch_sizes", "4", "--seq_lens", "32", "--precision", "fp32"]
        + ["--out", str(out), "--no_remeasure"]
    )
    by_key = {r.point.key: r for r in latest(read_records(out / "results.jsonl"))}
    assert set(by_key) == {"fp32-znone-w1-ga1-s32-b4", "fp32-z0-w1-ga1-s32-b4"}
    plain, zero0 = by_key["fp32-znone-w1-ga1-s32-b4"], by_key["fp32-z0-w1-ga1-s32-b4"]
    assert (plain.status, zero0.status) == ("ok", "ok")
    assert (plain.ds_config, plain.optim) == (None, "sgd")
    assert zero0.ds_config["zero_optimization"]["stage"] == 0
    (p_rank,), (z_rank,) = plain.profile.ranks, zero0.profile.ranks
    assert p_rank.levers["optimizer"] == "SGD"  # the Trainer's --optim
    assert z_rank.levers["optimizer"] == "FusedAdam"  # the ds_config's optimizer block; --optim does not apply
    arch = arch_for("tiny-bert")
    predicted = estimate(arch, plain.point, device="cpu", trainer_optim=trainer_optimizer("sgd")).items
    assert p_rank.breakdown["optimizer_states"] == predicted["optimizer_states"] == 0  # SGD without momentum
    assert z_rank.breakdown["optimizer_states"] == 2 * z_rank.breakdown["parameters_fp32"]  # Adam's moments
    assert p_rank.breakdown["parameters_fp32"] == predicted["parameters"] == z_rank.breakdown["parameters_fp32"]
    assert plain.predicted_bytes  # the sweep's predictor answers --zero none fp32 points
    # The report's recommendation of the plain point, as read back: HF Trainer with the --optim it measured.
    (pick, *_) = recommend([plain], None)
    assert pick.command.startswith("python launch/train.py --zero none --optim sgd --model tiny-bert")
    assert (pick.ds_config, pick.config_path) == (None, None)
    assert "znone" in proc.stdout  # the report printed at the end names the plain point


@pytest.mark.slow
def test_zero_none_on_two_ranks_is_ddp_and_each_rank_holds_what_the_estimate_says(tmp_path):
    """HF Trainer without DeepSpeed on two ranks wraps the model in DDP, whose gradient buckets copy every
    gradient: each rank's parameters, gradients, Adam moments and buckets as the estimate predicts them, exactly
    (tiny-gpt2, whose tied embedding is counted once)."""
    from ftprof.estimate.estimator import MODEL_STATES, measured_bytes

    out = tmp_path / "ddp"
    sweep(
        ["--model", "tiny-gpt2", "--zero", "none", "--world_size", "2", "--optim", "adamw_torch"]
        + ["--batch_sizes", "2", "--seq_lens", "32", "--precision", "fp32", "--steps", "1", "--warmup", "0"]
        + ["--min_seconds", "0", "--out", str(out), "--no_remeasure", "--no_report"]
    )
    (r,) = latest(read_records(out / "results.jsonl"))
    assert r.status == "ok", r.reason
    assert [rank.rank for rank in r.profile.ranks] == [0, 1]
    assert r.profile.samples_per_step == 2 * 2  # batch x ranks: one world
    predicted = estimate(arch_for("tiny-gpt2"), r.point, device="cpu", trainer_optim=trainer_optimizer("adamw_torch"))
    assert predicted.items["gradient_buckets"] == predicted.items["gradients"] > 0  # a copy of every gradient
    for rank in r.profile.ranks:
        for item in [*MODEL_STATES, "gradient_buckets"]:
            assert measured_bytes(rank.breakdown, item) == predicted.items[item], (rank.rank, item)
