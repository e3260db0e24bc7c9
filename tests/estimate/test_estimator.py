import statistics
from dataclasses import replace

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

import ftprof.estimate.estimator
from ftprof.errors import ConfigError
from ftprof.estimate.architecture import arch_for, arch_from_config
from ftprof.estimate.calibration import Observation, calibrate, error_summary, errors, observations_from_records
from ftprof.estimate.estimator import (
    MODEL_STATES,
    Arch,
    Calibration,
    estimate,
    live_logits,
    max_batch,
    measured_bytes,
    saved_activations,
)
from ftprof.point import Point
from ftprof.records.results import read_records
from ftprof.units import GIB
from tests.conftest import ROOT

CONFIG = dict(
    vocab_size=1000,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=256,
    max_position_embeddings=128,
)


def pt(batch_size: int, seq_len: int, precision: str = "bf16", zero: int = 2, **levers) -> Point:
    return Point(batch_size=batch_size, seq_len=seq_len, precision=precision, zero=zero, **levers)


def real_model() -> BertForSequenceClassification:
    return BertForSequenceClassification(BertConfig(**CONFIG, num_labels=2))


def real_param_count() -> int:
    return sum(p.numel() for p in real_model().parameters())


def test_facts_count_the_real_models_parameters():
    arch = arch_from_config("small", BertConfig(**CONFIG))
    assert arch.params == real_param_count()
    assert (arch.layers, arch.hidden, arch.heads, arch.intermediate, arch.family) == (2, 64, 4, 256, "encoder")
    assert arch_for("tiny-gpt2").family == "decoder"


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def test_model_state_bytes_match_real_tensors_bf16_zero2_four_ranks():
    """The truth is measured on the real model: its weights in bf16, the gradients a backward pass leaves,
    and the fp32 weights and Adam moments of a real ``torch.optim.AdamW`` after one step. ZeRO-2 over four
    ranks keeps the weights whole and splits master weights and moments evenly (DeepSpeed's alignment padding,
    a few elements, is checked against real ranks in tests/integration/test_two_ranks.py)."""
    torch.manual_seed(0)
    model = real_model()
    ids, labels = torch.randint(0, CONFIG["vocab_size"], (4, 32)), torch.tensor([0, 1, 1, 0])
    optimizer = torch.optim.AdamW(model.parameters())
    model(input_ids=ids, labels=labels).loss.backward()
    optimizer.step()
    master = tensor_bytes(model.parameters())
    moments = tensor_bytes(t for state in optimizer.state.values() for t in state.values() if t.dim() > 0)
    model.to(torch.bfloat16).zero_grad(set_to_none=True)
    model(input_ids=ids, labels=labels).loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    weights = tensor_bytes(model.parameters())
    grads = tensor_bytes(p.grad for p in model.parameters())

    arch = arch_from_config("small", BertConfig(**CONFIG), attention="eager")
    cal = Calibration(runtime_bytes=1000, activation_factor=1.0, zero_runtime_bytes=300, reserved_factor=1.0)
    est = estimate(arch, pt(4, 32, "bf16", zero=2, world_size=4), cal)
    ranks = 4
    # Gradients: the whole gradient of every parameter overlapping the fullest rank's partition, between an
    # even share and all of them; what real ranks hold is checked in tests/integration/test_estimate_accuracy.py
    # (test_model_states_match_each_ranks_measured_breakdown_item_by_item).
    assert -(-grads // ranks) <= est.items["gradients"] <= grads
    assert {k: est.items[k] for k in ("parameters", "master_weights", "optimizer_states")} == {
        "parameters": weights,
        "master_weights": -(-master // ranks),
        "optimizer_states": -(-moments // ranks),
    }
    assert est.items["gradient_buckets"] == 2 * 64 * 64 * 2  # HF's "auto" reduce bucket: hidden² bf16 elements
    assert est.items["zero_runtime"] == 300
    assert est.allocated == sum(est.items.values())
    assert est.device_used == est.allocated + 1000


def saved_for_backward(model: BertForSequenceClassification, **inputs) -> dict[str, int]:
    """Bytes a BERT forward saves for backward, by block (``embeddings``, ``layer0``, ..., ``other``)."""
    blocks = {"embeddings": model.bert.embeddings} | {f"layer{i}": m for i, m in enumerate(model.bert.encoder.layer)}
    return saved_by_block(model, blocks, **inputs)


# Exact on CPU since the estimator counts dropout masks in the data type (torch's CPU dropout saves them so)
# and LayerNorm's fp32 statistics; 0.5% leaves room for torch versions, while one missing s·b·h fp32 tensor
# is over 2% of a layer at these shapes. Before those two fixes: -0.3% without dropout, -13% to -18% with.
ACTIVATION_TOLERANCE = 0.005


@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize(("batch", "seq"), [(4, 32), (2, 128)])
def test_layer_activations_match_what_a_real_forward_saves(dropout, batch, seq):
    """A real fp32 forward of a small BERT (eager attention, train mode): what its encoder layers save for
    backward, measured with saved-tensor hooks, against the estimator's ``activations (layers)``."""
    p = 0.1 if dropout else 0.0
    config = BertConfig(**CONFIG, hidden_dropout_prob=p, attention_probs_dropout_prob=p)
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(**config.to_dict(), num_labels=2, attn_implementation="eager"))
    assert model.config._attn_implementation == "eager"
    measured = saved_for_backward(
        model.train(),
        input_ids=torch.randint(5, CONFIG["vocab_size"], (batch, seq)),
        labels=torch.randint(0, 2, (batch,)),
    )
    arch = arch_from_config("small", config, attention="eager")
    assert arch.dropout is dropout
    predicted = saved_activations(arch, pt(batch, seq, "fp32", zero=0), device="cpu")["layers"]
    layers = sum(v for k, v in measured.items() if k.startswith("layer"))
    error = predicted / layers - 1
    print(f"b={batch} s={seq} dropout={dropout}: saved by layers {layers} B, predicted {predicted} B ({error:+.2%})")
    assert abs(error) < ACTIVATION_TOLERANCE, measured


@pytest.mark.parametrize(
    ("zero", "params_div", "grads_div", "optim_div"), [(0, 1, 1, 1), (1, 1, 8, 8), (2, 1, 8, 8), (3, 8, 8, 8)]
)
def test_zero_partition_factors(zero, params_div, grads_div, optim_div):
    """Without the parameter list, even shares. ZeRO-1 frees the gradients outside a rank's partition after
    reducing them, as ZeRO-2 does (DeepSpeed 0.19: measured alike on two ranks)."""
    arch = Arch("x", "encoder", 8_000_000, 2, 64, 4, 256, 1000)
    items = estimate(arch, pt(1, 16, "fp16", zero=zero, world_size=8)).items
    assert items["parameters"] == 2 * 8_000_000 // params_div
    assert items["gradients"] == 2 * 8_000_000 // grads_div
    assert items["optimizer_states"] == 8 * 8_000_000 // optim_div


def test_offload_moves_states_to_host_on_gpus_only():
    arch = Arch("x", "encoder", 1_000_000, 2, 64, 4, 256, 1000)
    gpu = estimate(arch, pt(1, 16, "bf16", zero=3, world_size=2, offload="optimizer+param"))
    assert set(gpu.host_items) == {"parameters", "gradients", "master_weights", "optimizer_states"}
    cpu = estimate(arch, pt(1, 16, "bf16", zero=3, world_size=2, offload="optimizer"), device="cpu")
    assert cpu.host_items == {}
    assert "optimizer_states" in cpu.items


def test_grows_with_batch_and_sequence_and_attention_choice_matters():
    arch = arch_for("bert-base-uncased")
    for s in (128, 256, 512):
        by_batch = [estimate(arch, pt(b, s)).allocated for b in (8, 16, 32)]
        assert by_batch == sorted(by_batch)
        assert len(set(by_batch)) == 3
    for b in (8, 16, 32):
        by_seq = [estimate(arch, pt(b, s)).allocated for s in (128, 256, 512)]
        assert by_seq == sorted(by_seq)
        assert len(set(by_seq)) == 3
    eager = replace(arch, attention="eager")
    assert estimate(eager, pt(32, 512)).allocated > estimate(arch, pt(32, 512)).allocated * 1.5
    ckpt = estimate(arch, pt(32, 512, gradient_checkpointing=True)).activation_parts["layers"]
    full = estimate(arch, pt(32, 512)).activation_parts["layers"]
    assert ckpt < full / 5  # 12 layers: inputs only, plus one layer recomputed


def test_max_batch_inverts_the_model():
    arch, cal = arch_for("bert-base-uncased"), Calibration()
    budget = 24 * GIB
    best = max_batch(arch, pt(1, 512), budget, cal)
    assert estimate(arch, pt(best, 512), cal).device_used <= budget < estimate(arch, pt(best + 1, 512), cal).device_used


def test_solver_recovers_constants_from_points_the_estimator_made():
    """The least-squares solver only: the "measurements" come from :func:`estimate` itself, so this says
    nothing about whether the estimator is right (see the real-measurement test below)."""
    truth = Calibration(
        runtime_bytes=0.7 * GIB, activation_factor=1.3, zero_runtime_bytes=0.05 * GIB, reserved_factor=1.0
    )
    arch = Arch("x", "encoder", 30_000_000, 4, 512, 8, 2048, 30000, attention="eager")
    obs = [
        Observation(arch, s, "cpu", estimate(arch, s, truth, "cpu").device_used)
        for s in (pt(b, q, "fp32", zero=z) for b in (2, 8, 32) for q in (64, 256) for z in (0, 2))
    ]
    fitted = calibrate(obs, "cpu", Calibration(reserved_factor=1.0))
    assert fitted.runtime_bytes == pytest.approx(truth.runtime_bytes, rel=1e-3)
    assert fitted.activation_factor == pytest.approx(1.3, rel=1e-3)
    assert fitted.zero_runtime_bytes == pytest.approx(0.05 * GIB, rel=1e-2)
    assert error_summary(errors(obs, fitted))["worst_abs_pct"] < 0.01


def real_observations(model: str) -> list[Observation]:
    return observations_from_records(read_records(ROOT / "profiles" / f"cpu-2core-{model}" / "results.jsonl"), arch_for)


# Why 5%: fitted on tiny-bert, the tiny-gpt2 points come out at a median of 1.0% (worst 3.8%, at the largest
# batch, where RSS also moves most between neighbouring points); 5% leaves room for that noise.
OTHER_FAMILY_MEDIAN_PCT = 5.0


def other_family_error(fit_on: list[Observation], judge_on: list[Observation]) -> dict[str, float]:
    cal = calibrate(fit_on, "cpu", Calibration(reserved_factor=1.0))
    return error_summary(errors(judge_on, cal))


def test_calibrated_on_tiny_bert_predicts_measured_peaks_of_tiny_gpt2():
    """Real measurements (profiles/, peak RSS on the 2-core CPU): the constants fitted on tiny-bert only, judged
    on tiny-gpt2's points. Out of this fit, but not an unseen family: GPT-2's real forwards shaped the activation
    formulas, and the committed calibration in docs/benchmarks.md is fitted on its points too. The one family
    nothing was fitted or shaped on is distilbert (the held-out tests below)."""
    bert, gpt2 = real_observations("tiny-bert"), real_observations("tiny-gpt2")
    assert len(bert) == len(gpt2) == 12
    summary = other_family_error(bert, gpt2)
    print(f"fitted on tiny-bert, judged on tiny-gpt2: {summary}")
    assert summary["median_abs_pct"] < OTHER_FAMILY_MEDIAN_PCT


def test_other_family_check_fails_an_estimator_with_model_states_100x(monkeypatch):
    """The check above must be able to fail. Model states 100x too big push the fitted runtime to zero and the
    other family's error past the bound. It is a coarse check: the ~0.55 GiB interpreter runtime dominates
    these tiny models' peaks, so a 10x error (3.1%) or any error in the activations' scale (absorbed by the
    fitted factor) passes it; model states are checked against real tensors above and on real ranks in
    tests/integration/test_two_ranks.py."""
    real = ftprof.estimate.estimator.model_states

    def hundredfold(arch, s, device="gpu", rank=None):
        held, host = real(arch, s, device, rank)
        return {k: 100 * v for k, v in held.items()}, host

    monkeypatch.setattr(ftprof.estimate.estimator, "model_states", hundredfold)
    summary = other_family_error(real_observations("tiny-bert"), real_observations("tiny-gpt2"))
    print(f"fitted on tiny-bert, judged on tiny-gpt2, model states x100: {summary}")
    assert summary["median_abs_pct"] > OTHER_FAMILY_MEDIAN_PCT


# The held-out family: no fit, test or formula change looked at distilbert (docs/benchmarks.md). Its committed
# sweep (profiles/cpu-2core-tiny-distilbert, the same grid as tiny-bert's, measured 2026-12-04) is only judged:
# nothing below fits a constant to it, and its figures are reported apart from the families the estimator saw.
HELD_OUT = "tiny-distilbert"
# Saved activations are the one measured item the arithmetic can miss here: each point within 5% (the goal
# the per-family activation check above holds; measured +1.6% to +3.8%, over-predicted at every point).
HELD_OUT_SAVED_ACTIVATIONS_PCT = 5.0
# Whole peaks, with the constants fitted on the 24 committed tiny-bert and tiny-gpt2 points: the goal
# docs/benchmarks.md sets for models nobody fitted, 10% median and 20% worst (measured 9.1% / 13.1%, all over:
# the process's RSS before any model is ~57 MiB lower than when those 24 points were measured on 2026-11-25;
# tiny-bert re-measured beside distilbert peaks at 0.530 GiB at batch 4 x 128, was 0.587, and the fitted
# runtime carries the old figure).
HELD_OUT_PEAK_MEDIAN_PCT, HELD_OUT_PEAK_WORST_PCT = 10.0, 20.0


def held_out_items() -> dict[str, list[tuple[str, int, int]]]:
    """(point, predicted, measured) per measured item on every point of the held-out family's profile: the
    model states and the saved activations, none of which depends on a fitted constant."""
    arch = arch_for(HELD_OUT)
    records = read_records(ROOT / "profiles" / f"cpu-2core-{HELD_OUT}" / "results.jsonl")
    assert len(records) == 12
    assert {r.status for r in records} == {"ok"}
    items: dict[str, list[tuple[str, int, int]]] = {k: [] for k in (*MODEL_STATES, "saved_activations")}
    for r in records:
        (rank,) = r.profile.ranks
        est = estimate(arch, r.point, device="cpu")
        for item, rows in items.items():
            rows.append((r.point.key, est.items.get(item, 0), measured_bytes(rank.breakdown, item)))
    return items


def test_held_out_family_items_match_each_points_measured_breakdown():
    """distilbert, item by item on each of its 12 measured points (ZeRO 0/2, batch 4/16/32, 128/512 tokens):
    model states to the byte, saved activations within 5%."""
    items = held_out_items()
    for item in MODEL_STATES:
        assert [(key, p) for key, p, m in items[item] if p != m] == [], item
    assert sum(m for _, _, m in items["master_weights"]) == 6 * 4 * arch_for(HELD_OUT).params  # ZeRO-2's fp32 copy
    saved = [100 * (p - m) / m for _, p, m in items["saved_activations"]]
    print(
        f"held-out {HELD_OUT}: model states exact on 12 points; saved activations "
        f"median {statistics.median(map(abs, saved)):.2f}%, worst {max(map(abs, saved)):.2f}% ({min(saved):+.2f}% to "
        f"{max(saved):+.2f}%)"
    )
    assert max(map(abs, saved)) <= HELD_OUT_SAVED_ACTIVATIONS_PCT, saved


def test_held_out_family_items_check_fails_activations_off_by_a_tenth(monkeypatch):
    """The check above can fail: saved activations 10% too high put every point past its bound."""
    real = ftprof.estimate.estimator.saved_activations
    monkeypatch.setattr(
        ftprof.estimate.estimator,
        "saved_activations",
        lambda arch, s, device="gpu": {k: int(1.1 * v) for k, v in real(arch, s, device).items()},
    )
    saved = [abs(p - m) / m for _, p, m in held_out_items()["saved_activations"]]
    assert min(saved) * 100 > HELD_OUT_SAVED_ACTIVATIONS_PCT


def test_held_out_family_peaks_with_constants_fitted_on_the_others():
    """distilbert's 12 measured peaks, predicted with the constants fitted on the other two committed sweeps."""
    fit_on = real_observations("tiny-bert") + real_observations("tiny-gpt2")
    cal = calibrate(fit_on, "cpu", Calibration(reserved_factor=1.0))
    summary = error_summary(errors(real_observations(HELD_OUT), cal))
    print(f"held-out {HELD_OUT}, whole peaks, fitted on tiny-bert + tiny-gpt2: {summary}")
    assert summary["median_abs_pct"] <= HELD_OUT_PEAK_MEDIAN_PCT
    assert summary["worst_abs_pct"] <= HELD_OUT_PEAK_WORST_PCT


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0, "seq_len": 8}, "--batch_size must be a positive"),
        ({"batch_size": 1, "seq_len": -1}, "--seq_len must be a positive"),
        ({"batch_size": 1, "seq_len": 8, "zero": 4}, "unknown ZeRO stage"),
    ],
)
def test_bad_settings(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        pt(**kwargs)


def test_cli_errors(capsys):
    from ftprof.cli.estimate import main

    assert main(["--model", "bert-base-uncased", "--gpu", "h900-1tb"]) == 2
    assert "unknown GPU" in capsys.readouterr().err
    assert main(["--model", "bert-base-uncased", "--batch_size", "0"]) == 2
    assert "--batch_size must be a positive integer" in capsys.readouterr().err
    assert main(["--model", "someone/unknown-model"]) == 2
    assert "not known offline" in capsys.readouterr().err
    assert main(["--model", "tiny-bert", "--grid"]) == 2
    assert "--grid needs a memory size" in capsys.readouterr().err


def test_cli_breakdown_says_whether_it_fits(capsys):
    from ftprof.cli.estimate import main

    assert (
        main(
            [
                "--model",
                "bert-base-uncased",
                "--batch_size",
                "32",
                "--seq_len",
                "512",
                "--zero",
                "2",
                "--world_size",
                "8",
                "--gpu",
                "h100-80gb",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "Adam moments" in out
    assert "fits (predicted" in out
    assert "GiB of 79.6 GiB, 5% margin kept)" in out


def saved_by_block(model, blocks: dict[str, torch.nn.Module], **inputs) -> dict[str, int]:
    """Bytes of the tensors a forward pass saves for backward, by the named block that saved them (``other``
    outside every block). Each storage counts once, parameters (saved by every linear) not at all."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    current, seen = ["other"], {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            seen.setdefault(t.untyped_storage().data_ptr(), (current[0], t.untyped_storage().nbytes()))
        return t

    for name, block in blocks.items():
        block.register_forward_pre_hook(lambda m, args, name=name: current.__setitem__(0, name))
        block.register_forward_hook(lambda m, args, out: current.__setitem__(0, "other"))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**inputs).loss  # noqa: B018  (the forward is what saves)
    by_block: dict[str, int] = {}
    for block, nbytes in seen.values():
        by_block[block] = by_block.get(block, 0) + nbytes
    return by_block


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_llama_style_layers_and_lm_head_match_what_a_real_forward_saves(attention):
    """A real fp32 Llama forward (grouped-query attention: 4 heads, 2 kv heads; gated MLP; causal-LM loss)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        attn_implementation=attention,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).train()
    ids = torch.randint(0, 1000, (2, 32))
    layers = {f"layer{i}": m for i, m in enumerate(model.model.layers)}
    measured = saved_by_block(model, layers, input_ids=ids, labels=ids)
    arch = arch_from_config("tiny-llama", config, attention=attention, task="causal-lm")
    assert (arch.mlp, arch.kv_heads, arch.lm_head, arch.dropout) == ("gated", 2, True, False)
    items = saved_activations(arch, pt(2, 32, "fp32", zero=0), device="cpu")
    # rotary cos/sin are computed once and saved by layer 0 only (2 x s x head_dim fp32): not itemised
    rotary = 2 * 32 * 16 * 4
    assert items["layers"] == measured["layer0"] + measured["layer1"] - rotary
    # outside the layers: ids, final norm + lm_head input, fp32 log-softmax and labels (+ the scalar loss);
    assert items["embeddings"] + items["head"] + items["loss"] == measured["other"] - 4
    # the live logits (not saved) are alive until the loss is taken: 4 bytes x b x s x V in fp32
    assert live_logits(arch, pt(2, 32, "fp32", zero=0)) == 2 * 32 * 1000 * 4


# distilbert is the family kept out of every test and formula change: bench/bench_breakdown.py reports it apart.
ACTIVATION_CASES = [
    (model, task, attention, dropout, ckpt, precision)
    for model, task in [
        ("tiny-bert", "classification"),
        ("tiny-roberta", "classification"),
        ("tiny-gpt2", "classification"),
        ("tiny-gpt2", "causal-lm"),
        ("tiny-llama", "causal-lm"),
    ]
    for attention in ("eager", "sdpa")
    for dropout in ((False,) if model == "tiny-llama" else (True, False))  # Llama-style models have none
    for ckpt in (False, True)
    for precision in ("fp32", "bf16")
]


def test_saved_activations_match_real_forwards_across_families():
    """The estimator's saved activations against :class:`SavedActivationMeter` on real forwards at batch 4 x
    64: 4 families, eager and SDPA attention, dropout on and off (Llama-style models have none), gradient
    checkpointing on and off, fp32 and bf16; the goal is a median within 5%, here per family. The activation
    items before this check (they counted the recomputed layer and the live logits as saved, and missed
    gelu_new's tensors and the heads' view of the last layer) were off by a median of 117% at batch 2 x 32,
    18% of the cases within 5%."""
    from ftprof.estimate.calibration import saved_activations_case

    errs: dict[str, list[float]] = {}
    for model, task, attention, dropout, ckpt, precision in ACTIVATION_CASES:
        point = pt(4, 64, precision, zero=0, gradient_checkpointing=ckpt)
        predicted, measured = saved_activations_case(model, point, attention, dropout, task)
        errs.setdefault(f"{model} {task}", []).append(abs(predicted - measured) / measured)
    every = sorted(e for family in errs.values() for e in family)
    within = sum(e <= 0.05 for e in every) / len(every)
    print(f"saved activations: median {100 * statistics.median(every):.2f}%, {100 * within:.0f}% within 5%")
    assert all(statistics.median(family) <= 0.05 for family in errs.values()), errs
    # 97% within 5% here. The misses: GPT-2 with SDPA and no dropout (its CPU kernel keeps a per-score tensor
    # the formula lacks). At batch 2 x 32 kilobyte-sized constants not itemised (index buffers, RNG state
    # under checkpointing) also miss 5% of totals of ~70 KB: 86% within.
    assert within >= 0.9


def test_zero2_peak_on_a_cpu_grows_with_batch_and_sequence():
    """gpt2 under ZeRO-2: the optimizer step's fp32 gradients once hid every activation (3.336 GiB predicted at
    b1/s64 and at b4/s128 while the measured RSS grew from 3.48 to 4.50 GiB): on a CPU the heap keeps what the
    forward grew, so both moments add up; on a GPU the allocator reuses the blocks, so the larger one counts."""
    gpt2 = arch_for("gpt2")
    small, large = pt(1, 64, "fp32", zero=2), pt(4, 128, "fp32", zero=2)
    cpu_small, cpu_large = estimate(gpt2, small, device="cpu"), estimate(gpt2, large, device="cpu")
    grown = cpu_large.items["saved_activations"] - cpu_small.items["saved_activations"]
    assert cpu_large.allocated - cpu_small.allocated >= grown > 0
    assert cpu_small.items["optimizer_step"] == 4 * gpt2.params  # fp32 gradients of the (one-rank) partition
    gpu_small = estimate(gpt2, small, device="gpu")
    assert gpu_small.allocated == sum(gpu_small.items.values())
    assert (
        gpu_small.items["optimizer_step"] + sum(gpu_small.items[k] for k in ("saved_activations", "temporaries"))
        == 4 * gpt2.params
    )


def test_zero3_keeps_the_gathered_16bit_weights_of_models_under_max_live_parameters():
    arch = arch_for("bert-base-uncased")
    est = estimate(arch, pt(8, 128, "bf16", zero=3, world_size=8))
    assert est.items["parameters"] == -(-2 * arch.params // 8)  # this rank's partition
    assert est.items["gathered_parameters"] == 2 * arch.params  # the whole model, resident during forward/backward
    assert "gathered_parameters" not in estimate(arch, pt(8, 128, "bf16", zero=2, world_size=8)).items


def test_offload_buffers_match_what_deepspeed_allocates():
    """DeepSpeed 0.19 (stage_1_and_2.py) allocates, with the optimizer offloaded: temp_grad_buffer_for_gpu_offload
    and temp_grad_buffer_for_cpu_offload (the largest parameter each, in the model's dtype), the bf16 partition
    buffer it copies updated weights through, and the fp32 gradient partition for the CPU optimizer."""
    arch = arch_for("tiny-bert")
    largest = arch.largest_param
    assert largest == 4096 * 64  # the word embeddings
    est = estimate(arch, pt(2, 32, "bf16", zero=2, world_size=2, offload="optimizer"))
    assert est.items["offload_buffers"] == 2 * largest
    assert est.host_items["offload_buffers"] == 2 * largest + -(-2 * arch.params // 2)
    assert est.host_items["gradients"] == -(-4 * arch.params // 2)
    assert "gradients" not in est.items  # the 16-bit gradients leave the device as they are reduced


def test_the_sweeps_predictor_answers_zero_none_points_with_the_trainers_optim_or_not_at_all():
    """A --zero none point is predicted with the optimizer the Trainer steps (its default, or --optim), and
    what the estimator does not model (bf16 without DeepSpeed, an unmodelled --optim) gets no prediction
    instead of a wrong one."""
    from ftprof.estimate.calibration import predictor
    from ftprof.estimate.optimizers import DEFAULT_TRAINER_OPTIM, trainer_optimizer

    arch = arch_for("tiny-bert")
    fp32 = Point(precision="fp32", zero=0, deepspeed=False, seq_len=64, batch_size=4)
    for optim in (None, "adamw_torch", "sgd"):
        predict, _ = predictor(arch, "cpu", cuda=False, optim=optim)
        expected = estimate(
            arch, fp32, predict_calibration(), "cpu", trainer_optim=trainer_optimizer(optim or DEFAULT_TRAINER_OPTIM)
        )
        assert predict(fp32) == expected.device_used
        assert predict(replace(fp32, precision="bf16")) is None
        zero0 = replace(fp32, deepspeed=True)
        assert predict(zero0) == estimate(arch, zero0, predict_calibration(), "cpu").device_used
    assert predictor(arch, "cpu", cuda=False, optim="adamw_torch_4bit")[0](fp32) is None
    with pytest.raises(ValueError, match="exactly when DeepSpeed is off"):
        estimate(arch, fp32, device="cpu")


def predict_calibration():
    from ftprof.estimate.calibration import load_calibration

    return load_calibration("cpu")
