"""Two CPU ranks under the deepspeed launcher: ZeRO really partitions, data is sharded, loss is the mean.

The per-rank figures each rank measures on its real engine (``footprint_rank{N}.json``) are also checked
against the estimator's ZeRO partition arithmetic, and against DeepSpeed's exact partition sizes.
"""

import math
from typing import NamedTuple

import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, PretrainedConfig

from ftprof.estimate.architecture import arch_for, arch_from_config
from ftprof.estimate.estimator import model_states
from ftprof.point import Point
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
FP32_BYTES = 4  # CPU runs train in fp32: parameters, gradients and Adam's two moments are 4 bytes an element


class Run(NamedTuple):
    zero: int
    state: dict
    result: dict
    footprints: list[dict]
    config: PretrainedConfig  # of the model trained (and saved): the tiny-bert preset fitted to the data


def train(tmp_path, name, ranks, batch, extra=()) -> Run:
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
    state, result = read_json(out / "trainer_state.json"), read_json(out / "train_results.json")
    return Run(int(name.removeprefix("zero")), state, result, footprints, AutoConfig.from_pretrained(out))


def check_against_estimator(run: Run) -> None:
    """Measured per-rank bytes vs ``model_states``' arithmetic (within 1%) and DeepSpeed's exact sizes."""
    with torch.device("meta"):
        numels = [p.numel() for p in AutoModelForSequenceClassification.from_config(run.config).parameters()]
    n, p = len(run.footprints), sum(numels)
    # The synthetic task has 2 labels, as the estimator's Arch assumes; the training entry fits the preset's
    # embedding to the tokenizer it trains on the data, so the Arch comes from the saved config, not the preset.
    assert run.config.num_labels == 2
    assert run.config.vocab_size < arch_for("tiny-bert").vocab
    arch = arch_from_config("tiny-bert", run.config)
    assert arch.params == p
    point = Point(precision="fp32", zero=run.zero, world_size=n, seq_len=128, batch_size=8)  # states: any s, b
    states, host = model_states(arch, point, device="cpu")
    assert host == {}
    if run.zero == 3:
        # Each parameter is padded to a multiple of the world size and split (partition_parameters.py:
        # _aligned_size / ds_tensor); the fp32 optimizer partition concatenates those slices (stage3.py).
        partition = sum(math.ceil(numel / n) for numel in numels)
        local_params = partition
    else:
        # One flat fp32 group (HF hands DeepSpeed a single parameter list), padded to a multiple of 2 x world
        # size (stage_1_and_2.py: nccl_start_alignment_factor = 2, align_dense_tensors) and split evenly.
        partition = 2 * math.ceil(p / (2 * n)) if run.zero >= 1 else p
        local_params = p
    for f in run.footprints:
        print(
            f"zero{run.zero} rank {f['rank']}/{n}: Adam moments measured {f['optimizer_state_bytes']} B, "
            f"estimated {states['optimizer_states']} B; parameters measured "
            f"{FP32_BYTES * f['local_parameter_numel']} B, estimated {states['parameters']} B"
        )
        assert f["world_size"] == n
        assert f["total_parameter_numel"] == p
        assert f["optimizer_state_bytes"] == pytest.approx(states["optimizer_states"], rel=0.01)
        assert FP32_BYTES * f["local_parameter_numel"] == pytest.approx(states["parameters"], rel=0.01)
        assert f["optimizer_state_bytes"] == 2 * FP32_BYTES * partition  # exp_avg + exp_avg_sq, padding included
        assert f["local_parameter_numel"] == local_params


@pytest.mark.slow
def test_zero2_partitions_optimizer_state_and_reports_mean_loss(tmp_path):
    # Same global batch (16) on one rank and on two; lr 0 keeps the model fixed, so both runs see the same
    # loss up to dropout noise — unless ranks' losses were summed (2x) instead of averaged.
    extra = ["--learning_rate", "0"]
    one = train(tmp_path, "zero2", 1, 16, extra)
    two = train(tmp_path, "zero2", 2, 8, extra)
    assert [f["world_size"] for f in two.footprints] == [2, 2]
    assert one.state["global_step"] == two.state["global_step"] == 20  # 320 rows / 16: the data is sharded
    (single,) = one.footprints
    for f in two.footprints:
        assert 0.45 < f["optimizer_state_bytes"] / single["optimizer_state_bytes"] < 0.55
        assert f["local_parameter_numel"] == single["local_parameter_numel"]  # ZeRO-2 keeps all parameters
    assert two.result["train_loss"] == pytest.approx(one.result["train_loss"], rel=0.05)
    assert 0.6 < two.result["train_loss"] < 0.8  # ln 2 = 0.693 for an untrained 2-class head
    check_against_estimator(one)
    check_against_estimator(two)


@pytest.mark.slow
def test_zero3_partitions_parameters_and_optimizer_state(tmp_path):
    one = train(tmp_path, "zero3", 1, 8, ["--max_steps", "3"])
    two = train(tmp_path, "zero3", 2, 8, ["--max_steps", "3"])
    assert two.state["global_step"] == 3
    (single,) = one.footprints
    assert sum(f["local_parameter_numel"] for f in two.footprints) >= single["total_parameter_numel"]
    for f in two.footprints:
        assert 0.45 < f["optimizer_state_bytes"] / single["optimizer_state_bytes"] < 0.55
        assert 0.45 < f["local_parameter_numel"] / single["local_parameter_numel"] < 0.55
    check_against_estimator(one)
    check_against_estimator(two)
