"""The traced training step against real runs of the same step: fake and real tensors allocate the same
sequence, the saved activations match :class:`SavedActivationMeter`, the model-state categories match exact
counts, the events replay through the allocator model, and a base-size config traces without its memory."""

from __future__ import annotations

import time
from functools import cache
from types import SimpleNamespace

import pytest
import torch

from ftprof.estimate.allocator import replay, round_size
from ftprof.estimate.architecture import arch_from_config
from ftprof.estimate.estimator import saved_activations
from ftprof.estimate.trace import (
    Optimizer,
    Trace,
    batch_factory,
    known_model_factory,
    model_config,
    trace_training_step,
)
from ftprof.point import Point, Task
from ftprof.profiler.breakdown import SavedActivationMeter

B, S = 4, 64
FAMILIES: list[tuple[str, Task]] = [
    ("tiny-bert", "classification"),
    ("tiny-gpt2", "causal-lm"),
    ("tiny-llama", "causal-lm"),
]
HELD_OUT: tuple[str, Task] = ("tiny-distilbert", "classification")  # never used to change the tracer


# attention, precision, gradient checkpointing
VARIANTS = [("sdpa", "fp32", False), ("eager", "fp32", False), ("sdpa", "bf16", False), ("sdpa", "fp32", True)]


@cache
def traced(
    name: str,
    task: Task,
    fake: bool = True,
    optimizer: Optimizer = "foreach",
    attention: str = "sdpa",
    precision: str = "fp32",
    checkpointing: bool = False,
) -> Trace:
    vocab = int(model_config(name).vocab_size)
    factory = known_model_factory(name, task, precision, attention, checkpointing=checkpointing)
    return trace_training_step(factory, batch_factory(vocab, B, S, task), optimizer=optimizer, fake=fake)


def measured_saved(name: str, task: Task, attention: str, precision: str, checkpointing: bool) -> int:
    """SavedActivationMeter on a real forward (and backward) of the same model and batch shape, no tracer."""
    model = known_model_factory(name, task, precision, attention, checkpointing=checkpointing)()
    batch = batch_factory(int(model_config(name).vocab_size), B, S, task)()
    meter = SavedActivationMeter()
    meter.attach(model)
    model(**batch).loss.backward()
    assert meter.saved_bytes is not None
    return meter.saved_bytes


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize(("name", "task"), [*FAMILIES, HELD_OUT])
def test_fake_and_real_runs_allocate_the_same_sequence(name, task, checkpointing):
    fake = traced(name, task, True, checkpointing=checkpointing)
    real = traced(name, task, False, checkpointing=checkpointing)
    assert fake.alloc_sizes() == real.alloc_sizes()
    assert fake.events == real.events  # the frees too, in the same order
    assert [(s.category, s.phase, s.op) for s in fake.storages] == [(s.category, s.phase, s.op) for s in real.storages]
    assert (fake.peak, fake.saved_bytes) == (real.peak, real.saved_bytes)
    assert fake.peak > 0


@pytest.mark.parametrize("optimizer", ["fused", "for-loop"])
def test_other_adamw_implementations_trace_alike_fake_and_real(optimizer):
    fake, real = (
        traced("tiny-bert", "classification", True, optimizer),
        traced("tiny-bert", "classification", False, optimizer),
    )
    assert fake.events == real.events
    assert fake.optimizer == optimizer


def saved_errors(families: list[tuple[str, Task]]) -> dict[str, float]:
    """Relative error of the fake trace's saved activations against the meter, per family and variant."""
    errors = {}
    for name, task in families:
        for attention, precision, checkpointing in VARIANTS:
            trace = traced(name, task, True, "foreach", attention, precision, checkpointing)
            measured = measured_saved(name, task, attention, precision, checkpointing)
            key = f"{name} {task} {attention} {precision}{' checkpointing' if checkpointing else ''}"
            errors[key] = abs(trace.saved_bytes - measured) / measured
            print(f"{key}: traced {trace.saved_bytes}, measured {measured}, {100 * errors[key]:.3f}%")
    return errors


def test_fake_trace_saves_exactly_what_the_meter_sees_on_real_forwards():
    """A consistency check, not an accuracy figure: the trace and ``SavedActivationMeter`` count saved tensors
    through the same hooks and the same packing rule, so the fake trace must agree exactly with a real
    forward's meter. The independent checks are the exact model-state counts and the hand formula below."""
    errors = saved_errors([*FAMILIES, HELD_OUT])
    assert all(e == 0 for e in errors.values()), errors


def test_storages_are_tagged_with_phase_and_module():
    trace = traced("tiny-bert", "classification")
    saved = [s for s in trace.storages if s.category == "activation"]
    assert {s.phase for s in saved} == {"forward"}
    assert any(".encoder.layer.1." in s.module for s in saved)
    assert {s.phase for s in trace.storages if s.category == "gradient"} == {"backward"}
    assert {s.phase for s in trace.storages if s.category == "optimizer_state"} == {"optimizer_step"}
    assert {s.category for s in trace.storages if s.phase == "setup"} == {"parameter", "buffer", "input"}


@pytest.mark.parametrize(("name", "task"), FAMILIES)
def test_model_state_categories_are_the_exact_counts(name, task):
    trace = traced(name, task)
    model = known_model_factory(name, task)()
    params = [p for p in model.parameters()]  # tied weights once
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    assert trace.category_bytes("parameter") == param_bytes
    assert trace.category_bytes("buffer") == sum(b.numel() * b.element_size() for b in model.buffers())
    # int64 ids; a causal LM's labels are the ids themselves (one storage), a classifier's are B int64 labels
    assert trace.category_bytes("input") == (B * S * 8 if task == "causal-lm" else B * S * 8 + B * 8)
    assert trace.category_bytes("gradient") == param_bytes  # fp32 parameters: fp32 gradients
    # AdamW: exp_avg and exp_avg_sq per parameter (fp32 here) and a 4-byte fp32 ``step`` tensor per parameter
    assert trace.category_bytes("optimizer_state") == 2 * param_bytes + 4 * len(params)
    assert trace.phase_peaks["setup"] == param_bytes + trace.category_bytes("buffer") + trace.category_bytes("input")


def test_foreach_step_holds_parameter_sized_temporaries_and_fused_none():
    foreach, fused = traced("tiny-bert", "classification"), traced("tiny-bert", "classification", True, "fused")
    param_bytes = foreach.category_bytes("parameter")
    assert foreach.peak_breakdown.get("temporary") == param_bytes  # one list of parameter-sized tensors
    assert "temporary" not in fused.peak_breakdown
    assert foreach.peak - fused.peak == param_bytes
    # the peak is the step's: parameters, buffers, the batch, gradients, AdamW's two moments and step counts
    # (tiny-bert: 41 parameter tensors, 1,465,608 bytes) and the foreach temporaries
    assert dict(foreach.peak_breakdown) == {
        "parameter": 1_465_608,
        "buffer": 8_192,
        "input": B * S * 8 + B * 8,
        "gradient": 1_465_608,
        "optimizer_state": 2 * 1_465_608 + 41 * 4,
        "temporary": 1_465_608,
    }
    assert foreach.peak == foreach.phase_peaks["optimizer_step"] == sum(foreach.peak_breakdown.values())
    assert foreach.phase_peaks["backward"] < foreach.peak


def test_events_replay_through_the_allocator_model():
    trace = traced("tiny-gpt2", "causal-lm")
    stats = replay(trace.events)
    # the allocator's peak is the trace's walk with every size rounded to 512 bytes
    sizes, live = {}, 0
    rounded_peak = 0
    for event in trace.events:
        if event[0] == "alloc":
            sizes[event[1]] = round_size(int(event[2]))
            live += sizes[event[1]]
        else:
            live -= sizes.pop(event[1])
        rounded_peak = max(rounded_peak, live)
    assert stats.max_allocated == rounded_peak >= trace.peak
    assert stats.max_reserved >= stats.max_allocated
    assert stats.reserved >= stats.allocated
    assert stats.allocated == live  # parameters, gradients, optimizer state and inputs stay


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_a_base_size_config_traces_under_fake_tensors_without_its_memory():
    before = rss_bytes()
    start = time.perf_counter()
    trace = trace_training_step(known_model_factory("bert-base-uncased"), batch_factory(30522, 8, 512))
    seconds = time.perf_counter() - start
    grown = rss_bytes() - before
    print(
        f"bert-base 8 x 512: traced in {seconds:.1f} s, peak {trace.peak / 2**30:.2f} GiB, RSS +{grown / 2**20:.0f} MiB"
    )
    params = sum(s.nbytes for s in trace.storages if s.category == "parameter")
    assert params == 4 * 109_483_778  # BertForSequenceClassification, 2 labels
    assert trace.saved_bytes > 4 * 2**30
    assert trace.peak > trace.saved_bytes + params
    assert grown < trace.peak / 20
    assert seconds < 60  # 1.6 s alone; the 2 shared cores can be busy
    # the hand formula, the cross-check: 6,380,429,440 bytes against 6,380,470,404 traced (a few KB of
    # index and scalar tensors it does not itemise)
    assert abs(formula_saved("bert-base-uncased", "classification", 8, 512) - trace.saved_bytes) < 64 * 1024


def formula_saved(name: str, task: Task, batch: int, seq: int) -> int:
    arch = arch_from_config(name, model_config(name), attention="sdpa", task=task)
    return sum(saved_activations(arch, Point(batch_size=batch, seq_len=seq, precision="fp32", zero=0), "cpu").values())


@pytest.mark.parametrize(("name", "task"), FAMILIES)
def test_the_hand_formula_agrees_with_the_trace(name, task):
    """Two independent derivations of the saved activations: the estimator's per-family formula, and the real
    model's ops under fake tensors."""
    trace = traced(name, task)
    assert abs(formula_saved(name, task, B, S) - trace.saved_bytes) / trace.saved_bytes < 0.01


def test_the_hand_formula_on_the_held_out_family():
    """distilbert, which no formula change looked at, judged at the issue's 5% bound and reported apart: the
    formula over-predicts it by 4.7% at batch 4 x 64 in fp32 with dropout (the trace is exact; see above)."""
    trace = traced(*HELD_OUT)
    error = (formula_saved(*HELD_OUT, B, S) - trace.saved_bytes) / trace.saved_bytes
    print(f"held-out {HELD_OUT[0]}: formula {100 * error:+.2f}% against the trace")
    assert abs(error) < 0.05


class OutResize(torch.nn.Module):
    """A model whose forward writes into an empty buffer with ``out=``: the op resizes its storage."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> SimpleNamespace:
        buffer = x.new_empty(2).resize_(0)  # 0 elements: an out= tensor to reuse (its storage keeps 8 bytes)
        torch.mul(x, 2.0, out=buffer)  # 4 x 8 fp32: the same storage grows
        return SimpleNamespace(loss=self.linear(buffer).sum())


@pytest.mark.parametrize("fake", [True, False])
def test_a_resized_storage_is_a_new_allocation_then_the_old_ones_free(fake):
    trace = trace_training_step(OutResize, lambda: {"x": torch.ones(4, 8)}, fake=fake)
    forward = trace.events[trace.phase_starts["forward"] : trace.phase_starts["backward"]]
    empty, resized = (next(s for s in trace.storages if s.op == op) for op in ("new_empty", "mul"))
    assert (empty.nbytes, resized.nbytes) == (2 * 4, 4 * 8 * 4)
    # the resize: mul's block of 128 bytes, then the 8-byte block's free; the linear saves its input
    assert forward[:3] == (("alloc", empty.id, 8), ("alloc", resized.id, 128), ("free", empty.id))
    assert resized.category == "activation"
    assert ("free", empty.id) not in forward[3:]
    assert trace.saved_bytes == 128
    assert trace.category_bytes("parameter") == (64 + 8) * 4
