from dataclasses import replace

import pytest
from transformers import BertConfig, BertForSequenceClassification

from ftprof.calibrate import Observation, calibrate, error_summary, errors
from ftprof.errors import ConfigError
from ftprof.estimate import Arch, Calibration, estimate, max_batch
from ftprof.model_facts import arch_for, arch_from_config
from ftprof.point import Point
from ftprof.units import GIB

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


def real_param_count() -> int:
    return sum(p.numel() for p in BertForSequenceClassification(BertConfig(**CONFIG, num_labels=2)).parameters())


def test_facts_count_the_real_models_parameters():
    arch = arch_from_config("small", BertConfig(**CONFIG))
    assert arch.params == real_param_count()
    assert (arch.layers, arch.hidden, arch.heads, arch.intermediate, arch.family) == (2, 64, 4, 256, "encoder")
    assert arch_for("tiny-gpt2").family == "decoder"


def test_itemised_bytes_by_hand_bf16_zero2_four_ranks():
    p = real_param_count()
    arch = arch_from_config("small", BertConfig(**CONFIG), attention="eager")
    cal = Calibration(runtime_bytes=1000, activation_factor=1.0, zero_runtime_bytes=300, reserved_factor=1.0)
    est = estimate(arch, pt(4, 32, "bf16", zero=2, world_size=4), cal)
    b, s, h, i, a, L = 4, 32, 64, 256, 4, 2
    layer = s * b * h * (8 * 2 + 2) + 2 * s * b * i * 2 + a * s * s * b * (2 + 1 * (2 + 1))
    expected = {
        "parameters": 2 * p,  # bf16 weights, whole on every rank below ZeRO-3
        "gradients": -(-2 * p // 4),  # ZeRO-2 partitions gradients over 4 ranks
        "fp32 master weights": -(-4 * p // 4),
        "Adam moments": -(-8 * p // 4),
        "activations (layers)": L * layer,
        "activations (embeddings)": s * b * h * (2 * 2 + 1),
        "logits + loss": 2 * 4 * b * 2,
        "DeepSpeed buckets": 2 * h * h * 2,  # two hidden² buckets of bf16
        "DeepSpeed runtime": 300,
    }
    assert est.items == expected
    assert est.allocated == sum(expected.values())
    assert est.device_used == est.allocated + 1000


@pytest.mark.parametrize(
    "zero, params_div, grads_div, optim_div", [(0, 1, 1, 1), (1, 1, 1, 8), (2, 1, 8, 8), (3, 8, 8, 8)]
)
def test_zero_partition_factors(zero, params_div, grads_div, optim_div):
    arch = Arch("x", "encoder", 8_000_000, 2, 64, 4, 256, 1000)
    items = estimate(arch, pt(1, 16, "fp16", zero=zero, world_size=8)).items
    assert items["parameters"] == 2 * 8_000_000 // params_div
    assert items["gradients"] == 2 * 8_000_000 // grads_div
    assert items["Adam moments"] == 8 * 8_000_000 // optim_div


def test_offload_moves_states_to_host_on_gpus_only():
    arch = Arch("x", "encoder", 1_000_000, 2, 64, 4, 256, 1000)
    gpu = estimate(arch, pt(1, 16, "bf16", zero=3, world_size=2, offload="optimizer+param"))
    assert set(gpu.host_items) == {"parameters", "fp32 master weights", "Adam moments"}
    cpu = estimate(arch, pt(1, 16, "bf16", zero=3, world_size=2, offload="optimizer"), device="cpu")
    assert cpu.host_items == {} and "Adam moments" in cpu.items


def test_grows_with_batch_and_sequence_and_attention_choice_matters():
    arch = arch_for("bert-base-uncased")
    for s in (128, 256, 512):
        by_batch = [estimate(arch, pt(b, s)).allocated for b in (8, 16, 32)]
        assert by_batch == sorted(by_batch) and len(set(by_batch)) == 3
    for b in (8, 16, 32):
        by_seq = [estimate(arch, pt(b, s)).allocated for s in (128, 256, 512)]
        assert by_seq == sorted(by_seq) and len(set(by_seq)) == 3
    eager = replace(arch, attention="eager")
    assert estimate(eager, pt(32, 512)).allocated > estimate(arch, pt(32, 512)).allocated * 1.5
    ckpt = estimate(arch, pt(32, 512, gradient_checkpointing=True)).items["activations (layers)"]
    full = estimate(arch, pt(32, 512)).items["activations (layers)"]
    assert ckpt < full / 5  # 12 layers: inputs only, plus one layer recomputed


def test_max_batch_inverts_the_model():
    arch, cal = arch_for("bert-base-uncased"), Calibration()
    budget = 24 * GIB
    best = max_batch(arch, pt(1, 512), budget, cal)
    assert estimate(arch, pt(best, 512), cal).device_used <= budget < estimate(arch, pt(best + 1, 512), cal).device_used


def test_calibration_recovers_constants_from_synthetic_points():
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


@pytest.mark.parametrize(
    "kwargs, message",
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
    assert "Adam moments" in out and "budget 80.0 GiB: fits" in out
