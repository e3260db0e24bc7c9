"""Causal-LM fine-tuning really learns: a tiny Llama-style model on SST-2's sentences, through the launcher
under ZeRO-2, and under ZeRO-3 with gradient checkpointing; eval loss falls well below its step-0 value."""

import math

import pytest

from tests.conftest import ROOT
from tests.integration.conftest import read_json, run_train


@pytest.mark.slow
@pytest.mark.parametrize(
    ("zero", "extra"),
    [("zero2", []), ("zero3", ["--gradient_checkpointing"])],
    ids=["zero2", "zero3-checkpointing"],
)
def test_tiny_llama_learns_sst2_text(tmp_path, sst2_dir, zero, extra):
    out = tmp_path / "out"
    run_train(
        [
            *("--task", "causal-lm", "--model", "tiny-llama", "--dataset", str(sst2_dir)),
            *("--ds_config", str(ROOT / "ds_configs" / f"{zero}.json"), *extra),
            *("--max_train_samples", "600", "--max_eval_samples", "200", "--max_length", "64"),
            *("--num_train_epochs", "3", "--per_device_train_batch_size", "8", "--learning_rate", "3e-3"),
            *("--eval_on_start", "true", "--output_dir", str(out), "--seed", "42"),
            *("--disable_tqdm", "true", "--report_to", "none"),
        ],
        timeout=300,
    )
    evals = [h for h in read_json(out / "trainer_state.json")["log_history"] if "eval_loss" in h]
    start, final = evals[0], read_json(out / "eval_results.json")
    assert start["step"] == 0
    assert len(evals) == 4
    train = read_json(out / "train_results.json")
    vocab = read_json(out / "config.json")["vocab_size"]
    assert abs(start["eval_loss"] - math.log(vocab)) < 0.3  # random weights: about uniform over the vocabulary
    assert final["eval_loss"] < start["eval_loss"] - 1.0, (start, final)  # learned (7.6 → ~6.3 nats at 600 rows)
    assert final["eval_perplexity"] == pytest.approx(math.exp(final["eval_loss"]), rel=1e-6)
    assert "eval_accuracy" not in final
    assert final["random_init"] is True
    assert (train["packing"], train["block_size"]) == (True, 64)
    assert train["activation_checkpointing"] is bool(extra)
    footprint = read_json(out / "footprint_rank0.json")
    assert footprint["total_parameter_numel"] > 0
    assert footprint["optimizer_state_bytes"] > 0
