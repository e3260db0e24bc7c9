"""Every shipped DeepSpeed config runs real training steps, saves, evaluates, and can be reloaded."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from ftprof.train.data import load_raw, prepare_task
from tests.conftest import ROOT
from tests.integration.conftest import TINY, read_json, run_train

CONFIGS = ["zero0", "zero1", "zero2", "zero3", "zero2_offload", "zero3_offload"]
SEED, EVAL_ROWS, EVAL_BATCH = 42, 64, 8


def eval_rows() -> tuple[list[str], np.ndarray]:
    """The eval rows a run with ``--seed SEED --max_eval_samples EVAL_ROWS`` on the synthetic data uses."""
    task = prepare_task(load_raw("synthetic", seed=SEED), None, None, seed=SEED, max_eval_samples=EVAL_ROWS)
    return list(task.eval["text"]), np.array(task.eval["label"])


def eval_logits(model, tokenizer, texts: list[str]) -> np.ndarray:
    """Logits of a plain forward, batched as the run evaluated (in order, padded to each batch's longest)."""
    batches = []
    with torch.no_grad():
        for i in range(0, len(texts), EVAL_BATCH):
            inputs = tokenizer(texts[i : i + EVAL_BATCH], padding=True, truncation=True, return_tensors="pt")
            batches.append(model(**inputs).logits.numpy())
    return np.concatenate(batches).astype(np.float64)


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean cross-entropy: what Trainer reports as ``eval_loss`` when all eval batches have the same size."""
    top = logits.max(axis=-1)
    log_norm = top + np.log(np.exp(logits - top[:, None]).sum(axis=-1))
    return float(np.mean(log_norm - logits[np.arange(len(labels)), labels]))


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
            "--seed",
            str(SEED),
            "--max_eval_samples",
            str(EVAL_ROWS),
            "--per_device_eval_batch_size",
            str(EVAL_BATCH),
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
    assert losses
    assert all(0.3 < loss < 1.2 for loss in losses)
    assert state["best_model_checkpoint"] is not None
    metrics = read_json(out / "eval_results.json")
    assert metrics["eval_samples"] == EVAL_ROWS
    assert metrics["random_init"] is True
    assert read_json(out / "train_results.json")["train_samples"] == 2000
    footprint = read_json(out / "footprint_rank0.json")
    assert footprint["world_size"] == 1
    assert footprint["optimizer_state_bytes"] > 0
    # The saved folder is a normal transformers model + tokenizer (ZeRO-3 gathers its partitions to save):
    # every weight is there, in its shape ...
    model, loading = AutoModelForSequenceClassification.from_pretrained(out, output_loading_info=True)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert not any(loading.values()), loading  # no missing, unexpected or mismatched weights
    assert model.num_labels == 2
    assert len(tokenizer) == model.config.vocab_size
    assert sum(p.numel() for p in model.parameters()) == footprint["total_parameter_numel"]
    # ... trained: LayerNorm weights start at exactly 1 and the classifier's bias at 0 (BERT's init), and
    # every Adam step moves what gets a gradient ...
    norms = [m.weight for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 1 + 2 * model.config.num_hidden_layers
    assert all((w - 1).abs().max() > 1e-6 for w in norms)
    assert model.classifier.bias.abs().max() > 1e-6
    # ... and it is the model that was evaluated: the same rows through it score what the run reported. After
    # 6 steps every row gets the same class, so accuracy alone can't tell checkpoints apart; the loss can
    # (another checkpoint of the run is ~3e-3 off, this one within 1e-7).
    texts, labels = eval_rows()
    logits = eval_logits(model.eval(), tokenizer, texts)
    assert metrics["eval_loss"] == pytest.approx(cross_entropy(logits, labels), rel=1e-6)
    predictions = logits.argmax(axis=-1)
    accuracy = float(np.mean(predictions == labels))
    tp, fp, fn = (int(np.sum((predictions == a) & (labels == b))) for a, b in ((1, 1), (1, 0), (0, 1)))
    assert metrics["eval_accuracy"] == accuracy  # k/64 has at most 6 decimals: exact after the run's rounding
    assert metrics["eval_f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn), abs=1e-6)


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
    assert profile["steady_steps"] == 3
    assert profile["samples_per_s"] > 0
    assert profile["real_tokens_per_s"] < profile["padded_tokens_per_s"]  # dynamic padding still pads a little
    assert {"setup", "first_step", "steady", "optimizer"} <= set(profile["ranks"][0]["phases"])
    # The optimizer phase is DeepSpeed's real step (the engine runs it inside backward), not Trainer's no-op
    # optimizer.step() that follows: it takes time.
    assert profile["optimizer_step_median_s"] > 1e-4
