"""``--peft lora`` on two CPU ranks under the deepspeed launcher: ZeRO-3 + bf16 causal LM that saves its adapter
and resumes from a DeepSpeed checkpoint; ZeRO-2 + activation checkpointing classifier whose merged weights keep
the frozen base bit for bit."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, set_seed

from ftprof.train.models import build_model, resolve_model_spec
from tests.integration.conftest import read_json, run_train

pytestmark = pytest.mark.slow

COMMON = ["--dataset", "synthetic", "--max_eval_samples", "16", "--per_device_train_batch_size", "4"]
COMMON += ["--peft", "lora", "--disable_tqdm", "true", "--report_to", "none", "--seed", "42"]
LLAMA_ADAPTER = [f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")]


def test_zero3_bf16_causal_lm_saves_the_adapter_and_resumes(tmp_path):
    out = tmp_path / "out"
    lm = ["--task", "causal-lm", "--model", "tiny-llama", "--max_train_samples", "128", "--max_length", "64"]
    steps = ["--save_strategy", "steps", "--save_steps", "2", "--eval_strategy", "steps", "--eval_steps", "2"]
    args = [*COMMON, *lm, *steps, "--zero", "3", "--precision", "bf16", "--output_dir", str(out)]
    run_train([*args, "--max_steps", "4"], ranks=2)

    for rank in (0, 1):
        footprint = read_json(out / f"footprint_rank{rank}.json")
        # q_proj 64 -> 64 and v_proj 64 -> 32 (2 KV heads of 16) in 2 layers, r 8: 2 x 8 x (128 + 96)
        assert footprint["trainable_parameter_numel"] == 3584
        assert footprint["frozen_parameter_numel"] == footprint["total_parameter_numel"] - 3584
        assert footprint["local_parameter_numel"] == footprint["total_parameter_numel"] // 2  # ZeRO-3 partitions
        assert footprint["optimizer_state_bytes"] == 3584 // 2 * 8  # fp32 Adam moments of this rank's half
        assert footprint["adapted_modules"] == LLAMA_ADAPTER
    adapter = load_file(out / "checkpoint-4" / "adapter_model.safetensors")  # gathered from the partitions
    assert sorted(adapter) == sorted(f"base_model.model.{m}.lora_{ab}.weight" for m in LLAMA_ADAPTER for ab in "AB")
    assert all(adapter[k].abs().sum() > 0 for k in adapter)  # lora_B starts at zero: it trained
    assert (out / "adapter_config.json").is_file()
    assert not (out / "model.safetensors").exists()

    run_train([*args, "--max_steps", "6", "--resume_from_checkpoint", "true"], ranks=2)
    state = read_json(out / "trainer_state.json")
    assert state["global_step"] == 6
    assert [e["step"] for e in state["log_history"] if "eval_loss" in e] == [2, 4, 6]
    resumed = load_file(out / "checkpoint-6" / "adapter_model.safetensors")
    assert resumed.keys() == adapter.keys()
    assert any(not torch.equal(resumed[k], adapter[k]) for k in adapter)


def test_zero2_checkpointed_classifier_merges_over_the_frozen_base(tmp_path):
    out = tmp_path / "out"
    cls = ["--model", "tiny-bert", "--max_train_samples", "64", "--lora_target_modules", "attention,mlp"]
    once = ["--max_steps", "3", "--save_strategy", "no", "--eval_strategy", "no", "--load_best_model_at_end", "false"]
    extra = ["--zero", "2", "--gradient_checkpointing", "--merge_adapter", "--output_dir", str(out)]
    run_train([*COMMON, *cls, *once, *extra], ranks=2)

    footprint = read_json(out / "footprint_rank1.json")
    # query, value (64 -> 64), intermediate (64 -> 128), output (128 -> 64) in 2 layers, r 8; the head 64 x 2 + 2
    assert footprint["trainable_parameter_numel"] == 2 * 8 * (128 + 128 + 192 + 192) + 130
    assert len(footprint["adapted_modules"]) == 8

    # The frozen base, rebuilt as the run built it (random weights from --seed): unchanged outside the adapters.
    merged = load_file(out / "merged" / "model.safetensors")
    set_seed(42)
    spec = resolve_model_spec("tiny-bert")
    base = build_model(spec, AutoTokenizer.from_pretrained(out / "tokenizer"), ["0", "1"]).state_dict()
    adapted = {f"{m}.weight" for m in footprint["adapted_modules"]} | {"classifier.weight", "classifier.bias"}
    frozen = [k for k in merged if k not in adapted]
    assert len(frozen) > 20
    assert all(torch.equal(merged[k], base[k]) for k in frozen)
    assert all(not torch.equal(merged[k], base[k]) for k in adapted)
