"""Every shipped DeepSpeed config runs real training steps, saves, evaluates, and can be reloaded."""

import pytest
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from tests.conftest import ROOT
from tests.integration.conftest import TINY, read_json, run_train

CONFIGS = ["zero0", "zero1", "zero2", "zero3", "zero2_offload", "zero3_offload"]


@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIGS)
def test_config_trains_saves_and_reloads(tmp_path, name):
    out = tmp_path / "out"
    run_train(
        TINY
        + [
            "--ds_config",
            str(ROOT / "ds_configs" / f"{name}.json"),
            "--output_dir",
            str(out),
            "--max_steps",
            "6",
            "--per_device_train_batch_size",
            "8",
            "--max_eval_samples",
            "64",
            "--eval_strategy",
            "steps",
            "--eval_steps",
            "3",
            "--save_strategy",
            "steps",
            "--save_steps",
            "3",
            "--logging_steps",
            "2",
            "--learning_rate",
            "1e-3",
        ]
    )
    state = read_json(out / "trainer_state.json")
    assert state["global_step"] == 6
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    assert losses and all(0.3 < loss < 1.2 for loss in losses)  # a real cross-entropy on 2 classes
    assert state["best_model_checkpoint"] is not None
    metrics = read_json(out / "eval_results.json")
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and "eval_f1" in metrics and metrics["random_init"] is True
    assert read_json(out / "train_results.json")["train_samples"] == 2000
    footprint = read_json(out / "footprint_rank0.json")
    assert footprint["world_size"] == 1 and footprint["optimizer_state_bytes"] > 0
    # The saved folder is a normal transformers model + tokenizer (ZeRO-3 gathers its partitions to save).
    model = AutoModelForSequenceClassification.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.num_labels == 2 and len(tokenizer) == model.config.vocab_size
    assert sum(p.numel() for p in model.parameters()) == footprint["total_parameter_numel"]


@pytest.mark.slow
def test_profile_flag_records_steady_state_figures(tmp_path):
    out = tmp_path / "out"
    run_train(
        TINY
        + [
            "--ds_config",
            str(ROOT / "ds_configs" / "zero2.json"),
            "--output_dir",
            str(out),
            "--max_steps",
            "5",
            "--per_device_train_batch_size",
            "8",
            "--eval_strategy",
            "no",
            "--save_strategy",
            "no",
            "--load_best_model_at_end",
            "false",
            "--profile",
        ]
    )
    history = read_json(out / "trainer_state.json")["log_history"]
    profile = next(e["profile"] for e in history if "profile" in e)
    assert profile["steady_steps"] == 3 and profile["samples_per_s"] > 0
    assert profile["real_tokens_per_s"] < profile["padded_tokens_per_s"]  # dynamic padding still pads a little
    assert {"setup", "first_step", "steady"} <= set(profile["ranks"][0]["phases"])
