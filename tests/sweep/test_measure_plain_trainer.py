"""A measured point without DeepSpeed (``MeasureSpec.ds_config`` None): plain HF Trainer, as
bench/bench_trainer_vs_deepspeed.py compares against the launcher."""

import os

from ftprof.point import Point
from ftprof.sweep import measure


def test_a_point_without_a_deepspeed_config_measures_plain_trainer(tmp_path, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    spec = measure.MeasureSpec(
        point=Point(precision="fp32", zero=0, seq_len=32, batch_size=4),
        model="tiny-bert",
        steps=3,
        warmup=1,
        ds_config=None,
        result_path=str(tmp_path / "result.json"),
    )
    profile = measure.measure(spec)
    (rank,) = profile.ranks
    assert profile.steady_steps == 3
    assert profile.samples_per_step == 4
    assert rank.levers["optimizer"] == "AdamW"  # the Trainer's own torch optimizer, not DeepSpeed's
    assert rank.breakdown["master_weights"] == 0  # no fp32 master copy
    assert "RANK" not in os.environ  # no process group was set up for it
