"""ProfilerCallback inside a plain HF Trainer (no DeepSpeed, no ftprof launcher)."""

import os
import subprocess
import sys
import time

import pytest
import torch
from datasets import Dataset
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from ftprof.profiler import ProfilerCallback, add_profiler
from ftprof.profiler.flops import model_shape, training_flops_per_token


class PadCollator:
    """Pads input_ids with 0 and builds the attention mask (no tokenizer needed)."""

    def __call__(self, features):
        longest = max(len(f["input_ids"]) for f in features)
        ids = torch.zeros(len(features), longest, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, f in enumerate(features):
            ids[i, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
            mask[i, : len(f["input_ids"])] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([f["labels"] for f in features])}


def make_trainer(tmp_path, ga=1):
    torch.manual_seed(0)
    model = BertForSequenceClassification(
        BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    )
    # Lengths alternate 10 and 30, so each batch of 4 pads 2 rows: real 80 tokens, padded 120.
    rows = [{"input_ids": [5] * (10 if i % 2 else 30), "labels": i % 2} for i in range(64)]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=ga,
        max_steps=6,
        report_to="none",
        disable_tqdm=True,
        logging_steps=3,
        save_strategy="no",
        use_cpu=True,
        dataloader_num_workers=0,
        train_sampling_strategy="sequential",
    )
    return Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows), data_collator=PadCollator())


def test_callback_in_plain_trainer_counts_tokens_under_accumulation(tmp_path):
    trainer = make_trainer(tmp_path, ga=2)
    profiler = ProfilerCallback(warmup_steps=2)
    trainer.add_callback(profiler)
    trainer.train()
    s = profiler.profile.to_json()
    assert s["steady_steps"] == 4
    assert s["sampler"] == "rss"
    # Exactly the window's samples: batch 4 x accumulation 2 x 1 rank per step, although Trainer draws each
    # step's batches before on_step_begin and accelerate prefetches one more.
    assert s["samples_per_step"] == 4 * 2 * 1
    assert s["samples_per_s"] == pytest.approx(8 / s["step_time_median_s"])
    assert s["step_time_p90_s"] >= s["step_time_median_s"] >= s["step_time_p10_s"] > 0
    assert s["step_time_spread"] == pytest.approx(
        (s["step_time_p90_s"] - s["step_time_p10_s"]) / s["step_time_median_s"]
    )
    assert 0 < s["optimizer_step_median_s"] < s["step_time_median_s"]
    # 4 optimizer steps x 2 micro-batches x 4 rows; real/padded = 80/120 per micro-batch.
    assert s["padded_tokens_per_s"] * s["window_s"] == pytest.approx(4 * 2 * 120)  # tokens: totals over time
    assert s["real_tokens_per_s"] / s["padded_tokens_per_s"] == pytest.approx(80 / 120)
    phases = s["ranks"][0]["phases"]
    assert {"model_load", "setup", "first_step", "steady", "optimizer"} <= set(phases)
    assert phases["steady"]["rss_bytes"] >= phases["model_load"]["rss_bytes"] > 0
    assert trainer.state.log_history[-1]["profile"]["steady_steps"] == 4  # saved in trainer_state.json


class RecordingIntegration(TrainerCallback):
    """Stands in for TensorBoard/W&B: integrations receive each log through on_log."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def test_add_profiler_reaches_reporting_integrations(tmp_path):
    trainer = make_trainer(tmp_path)
    integration = RecordingIntegration()
    trainer.add_callback(integration)
    add_profiler(trainer, warmup_steps=1)
    trainer.train()
    losses = [e for e in integration.logs if "loss" in e]
    assert len(losses) == 2
    assert all(e["profile/samples_per_s"] > 0 for e in losses)
    assert losses[-1]["profile/steady_steps"] == 5


def test_flops_formula_by_hand(tmp_path):
    trainer = make_trainer(tmp_path)
    n, layers, heads, head_dim = model_shape(trainer.model)
    # Non-embedding parameters: all minus word (100x32), position (512x32) and token-type (2x32) embeddings.
    total = sum(p.numel() for p in trainer.model.parameters())
    assert (n, layers, heads, head_dim) == (total - (100 + 512 + 2) * 32, 2, 2, 16)
    assert training_flops_per_token(n, layers, heads, head_dim, 128) == 6 * n + 12 * 2 * 2 * 16 * 128


def test_min_seconds_extends_the_window_and_stops_training(tmp_path):
    trainer = make_trainer(tmp_path)
    trainer.args.max_steps = 10_000
    profiler = ProfilerCallback(warmup_steps=1, min_steps=3, min_seconds=0.5)
    trainer.add_callback(profiler)
    trainer.train()
    s = profiler.profile
    assert 3 <= trainer.state.global_step - 1 == s.steady_steps < 10_000  # stopped by the window, not max_steps
    assert s.window_s >= 0.5  # the measured steps lasted at least min_seconds


def test_a_tied_lm_head_counts_in_model_flops():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    model = Qwen2ForCausalLM(config)
    n, *_ = model_shape(model)
    total = sum(p.numel() for p in model.parameters())  # tied: the embedding is counted once
    assert n == total  # minus the lookup table, plus the same matrix as the output projection


def hogs() -> list[subprocess.Popen]:
    """A busy loop on every core, each in its own session: other users' jobs, as far as the run can tell."""
    return [
        subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
        for _ in range(os.cpu_count() or 1)
    ]


def test_the_window_records_how_long_its_threads_waited_for_a_cpu(tmp_path):
    """With every core taken by other processes, torch's threads wait for a CPU through the window: that is
    recorded (seconds waited per second, from the threads' schedstat) and marks the throughput contended.
    Alone on the machine they hardly wait."""
    busy = hogs()
    try:
        time.sleep(0.5)
        trainer = make_trainer(tmp_path)
        trainer.args.max_steps = 10_000
        contended = ProfilerCallback(warmup_steps=1, min_steps=3, min_seconds=1.0)
        trainer.add_callback(contended)
        trainer.train()
    finally:
        for p in busy:
            p.kill()
            p.wait()
    assert contended.profile.cpu_wait_share > 0.3
    assert contended.profile.contended

    trainer = make_trainer(tmp_path)
    trainer.args.max_steps = 10_000
    quiet = ProfilerCallback(warmup_steps=1, min_steps=3, min_seconds=1.0)
    trainer.add_callback(quiet)
    trainer.train()
    assert quiet.profile.cpu_wait_share < contended.profile.cpu_wait_share / 3
    waited = (contended.profile.cpu_wait_share, quiet.profile.cpu_wait_share)
    print(f"waited {waited[0]:.3f} s/s with every core busy, {waited[1]:.3f} alone")


class ConstantSampler:
    """A sampler whose readings never change (or, with ``rising``, grow at every reading); counts its starts."""

    kind = "fake"
    figure = "rss"

    def __init__(self, rising: bool = False) -> None:
        self.rising, self.readings, self.starts = rising, 0, {}

    def read(self):
        self.readings += 1
        return {"rss_bytes": 1000 + (self.readings if self.rising else 0)}

    def start(self, name):
        self.starts[name] = self.starts.get(name, 0) + 1

    def stop(self, name):
        return self.read()

    def close(self):
        pass


def profiler_hooks(model) -> int:
    """Forward hooks of ftprof's meters still on ``model``'s modules."""
    hooks = [h for m in model.modules() for h in (*m._forward_pre_hooks.values(), *m._forward_hooks.values())]
    return sum(type(getattr(h, "__self__", None)).__module__.startswith("ftprof.profiler") for h in hooks)


class StepRecorder(TrainerCallback):
    """After the profiler's on_step_end: its hooks on the model and the optimizer phases it sampled so far."""

    def __init__(self, model, sampler):
        self.model, self.sampler, self.steps = model, sampler, []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append((profiler_hooks(self.model), self.sampler.starts.get("optimizer", 0)))


@pytest.mark.parametrize("rising", [False, True])
def test_per_step_hooks_and_optimizer_sampling_stop_once_their_figures_are_taken(tmp_path, rising):
    """The saved-activation and (ZeRO-3) gathered-parameter meters hook every forward while they measure: after
    ``measuring_steps`` only the batch counter's pre-hook is left. The optimizer phase is sampled until the
    window is open and OPTIMIZER_QUIET_STEPS steps in a row raised nothing; as long as figures rise, every step."""
    from ftprof.profiler.callback import OPTIMIZER_QUIET_STEPS

    trainer = make_trainer(tmp_path)
    trainer.args.max_steps = 10
    model = trainer.model
    for p in model.parameters():  # ZeRO-3's mark: the gathered-parameter meter attaches
        p.ds_tensor = p.data
    sampler = ConstantSampler(rising=rising)
    profiler = ProfilerCallback(warmup_steps=2, sampler=sampler)
    recorder = StepRecorder(model, sampler)
    trainer.add_callback(profiler)
    trainer.add_callback(recorder)
    trainer.train()

    hooks = [h for h, _ in recorder.steps]
    assert hooks[0] == 2  # step 1: the batch counter and the gathered-parameter meter (saved activations: done)
    assert hooks[1:] == [1] * 9, hooks  # from step 2's end on: the batch counter only
    assert profiler_hooks(model) == 0  # and none after training
    assert profiler.measuring_steps == 2
    sampled = [n for _, n in recorder.steps]
    if rising:
        assert sampled == list(range(1, 11))
    else:  # steps 1-2 (warm-up; step 1 is new), then until 3 quiet steps: 4 of 10 steps
        assert sampled[-1] == 1 + OPTIMIZER_QUIET_STEPS == 4, sampled
    # The figures those steps measured are all there.
    rank = profiler.profile.ranks[0]
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert rank.breakdown["gathered_parameters"] == parameter_bytes
    assert rank.breakdown["saved_activations"] > 0
    assert rank.phases["optimizer"]["rss_bytes"] >= 1000
    assert profiler.profile.optimizer_step_median_s > 0  # timed every step regardless
