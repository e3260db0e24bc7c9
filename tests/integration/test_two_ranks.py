"""Two CPU ranks under the deepspeed launcher: ZeRO really partitions, data is sharded, loss is the mean."""

import pytest

from tests.conftest import ROOT
from tests.integration.conftest import TINY, read_json, run_train

COMMON = TINY + [
    "--max_train_samples",
    "320",
    "--max_eval_samples",
    "64",
    "--num_train_epochs",
    "1",
    "--save_strategy",
    "no",
    "--eval_strategy",
    "no",
    "--load_best_model_at_end",
    "false",
    "--logging_steps",
    "5",
]


def train(tmp_path, name, ranks, batch, extra=()):
    out = tmp_path / f"{name}-{ranks}"
    run_train(
        COMMON
        + [
            "--ds_config",
            str(ROOT / "ds_configs" / f"{name}.json"),
            "--output_dir",
            str(out),
            "--per_device_train_batch_size",
            str(batch),
            *extra,
        ],
        ranks=ranks,
    )
    footprints = [read_json(out / f"footprint_rank{r}.json") for r in range(ranks)]
    return read_json(out / "trainer_state.json"), read_json(out / "train_results.json"), footprints


@pytest.mark.slow
def test_zero2_partitions_optimizer_state_and_reports_mean_loss(tmp_path):
    # Same global batch (16) on one rank and on two; lr 0 keeps the model fixed, so both runs see the same
    # loss up to dropout noise — unless ranks' losses were summed (2x) instead of averaged.
    extra = ["--learning_rate", "0"]
    state1, result1, (one,) = train(tmp_path, "zero2", 1, 16, extra)
    state2, result2, two = train(tmp_path, "zero2", 2, 8, extra)
    assert [f["world_size"] for f in two] == [2, 2]
    assert state1["global_step"] == state2["global_step"] == 20  # 320 rows / 16: the data is sharded
    for f in two:
        assert 0.45 < f["optimizer_state_bytes"] / one["optimizer_state_bytes"] < 0.55
        assert f["local_parameter_numel"] == one["local_parameter_numel"]  # ZeRO-2 keeps all parameters
    assert result2["train_loss"] == pytest.approx(result1["train_loss"], rel=0.05)
    assert 0.6 < result2["train_loss"] < 0.8  # ln 2 = 0.693 for an untrained 2-class head


@pytest.mark.slow
def test_zero3_partitions_parameters_and_optimizer_state(tmp_path):
    _, _, (one,) = train(tmp_path, "zero3", 1, 8, ["--max_steps", "3"])
    state2, _, two = train(tmp_path, "zero3", 2, 8, ["--max_steps", "3"])
    assert state2["global_step"] == 3
    assert sum(f["local_parameter_numel"] for f in two) >= one["total_parameter_numel"]
    for f in two:
        assert 0.45 < f["optimizer_state_bytes"] / one["optimizer_state_bytes"] < 0.55
        assert 0.45 < f["local_parameter_numel"] / one["local_parameter_numel"] < 0.55
