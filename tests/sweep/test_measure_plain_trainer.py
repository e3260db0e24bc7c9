"""A measured point without DeepSpeed (``--zero none``; ``MeasureSpec.ds_config`` None): plain HF Trainer
stepping its ``--optim``, as bench/bench_trainer_vs_deepspeed.py compares against the launcher."""

import os

from ftprof.estimate.architecture import arch_for
from ftprof.estimate.estimator import estimate
from ftprof.estimate.optimizers import trainer_optimizer
from ftprof.point import Point
from ftprof.sweep import measure


def test_a_point_without_a_deepspeed_config_measures_plain_trainer(tmp_path, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    spec = measure.MeasureSpec(
        point=Point(precision="fp32", zero=0, deepspeed=False, seq_len=32, batch_size=4),
        model="tiny-bert",
        steps=3,
        warmup=1,
        ds_config=None,
        result_path=str(tmp_path / "result.json"),
        optim="adamw_torch",
    )
    profile = measure.measure(spec)
    (rank,) = profile.ranks
    assert profile.steady_steps == 3
    assert profile.samples_per_step == 4
    assert rank.levers["optimizer"] == "AdamW"  # the Trainer's own torch optimizer, not DeepSpeed's
    assert rank.breakdown["master_weights"] == 0  # no fp32 master copy
    assert rank.levers["optimizer_impl"] != "fused"  # --optim adamw_torch, not the Trainer's default (fused)
    # The model states are what the estimator of --zero none --optim adamw_torch says, byte for byte.
    predicted = estimate(
        arch_for("tiny-bert"), spec.point, device="cpu", trainer_optim=trainer_optimizer("adamw_torch")
    )
    params = rank.breakdown["parameters_fp32"]
    assert params == predicted.items["parameters"] == rank.breakdown["gradients"] == predicted.items["gradients"]
    assert rank.breakdown["optimizer_states"] == predicted.items["optimizer_states"] == 2 * params  # Adam's moments
    assert "RANK" not in os.environ  # no process group was set up for it
