"""``--peft lora``: flags, default targets per family, bad targets, and a short in-process run that trains only
the adapters and the head (DeepSpeed runs: tests/integration/test_peft.py)."""

import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from ftprof.cli.train import main as cli_main
from ftprof.errors import ConfigError
from ftprof.known_configs import TINY_PRESETS
from ftprof.profiler.breakdown import adapted_modules, parameter_counts
from ftprof.train.adapters import (
    attention_targets,
    lora_config,
    parse_target_modules,
    resolve_targets,
    skeleton,
)
from ftprof.train.models import config_from_dict
from ftprof.train.run import fit, parse, setup

SMALL = ["--dataset", "synthetic", "--max_train_samples", "64", "--max_eval_samples", "16"]
SMALL += ["--per_device_train_batch_size", "8", "--report_to", "none", "--disable_tqdm", "true"]


def config_of(preset):
    return config_from_dict(TINY_PRESETS[preset])


def test_flags_parse(tmp_path):
    script, _ = parse(
        ["--model", "tiny-bert", *SMALL, "--output_dir", str(tmp_path / "out"), "--peft", "lora", "--lora_r", "4"]
        + ["--lora_alpha", "8", "--lora_dropout", "0.1", "--lora_target_modules", "query,key", "--merge_adapter"]
    )
    assert (script.peft, script.lora_r, script.lora_alpha, script.lora_dropout) == ("lora", 4, 8, 0.1)
    assert (script.lora_target_modules, script.merge_adapter) == ("query,key", True)
    plain, _ = parse(["--model", "tiny-bert", *SMALL, "--output_dir", str(tmp_path / "out2")])
    assert (plain.peft, plain.lora_r, plain.lora_alpha, plain.lora_dropout) == ("none", 8, 16, 0.05)
    assert plain.lora_target_modules is None
    assert not plain.merge_adapter


@pytest.mark.parametrize(
    ("preset", "causal_lm", "targets", "trainable"),
    [
        # 2 layers x (query, value) x r 8 x (64 in + 64 out), + the head's copy (64 x 2 + 2)
        ("tiny-bert", False, ["query", "value"], 2 * 2 * 8 * 128 + 130),
        # DistilBERT's head is pre_classifier (64 x 64 + 64) and classifier (64 x 2 + 2): peft copies both
        ("tiny-distilbert", False, ["q_lin", "v_lin"], 2 * 2 * 8 * 128 + 4160 + 130),
        ("tiny-gpt2", True, ["c_attn"], 2 * 8 * (64 + 192)),  # fused q, k, v: 64 -> 192
        ("tiny-llama", True, ["q_proj", "v_proj"], 2 * 8 * ((64 + 64) + (64 + 32))),  # 2 KV heads of 16
    ],
)
def test_default_targets_per_family(preset, causal_lm, targets, trainable):
    config = config_of(preset)
    lora = lora_config(config, preset, causal_lm, r=8, alpha=16, dropout=0.05, target_modules=None)
    assert sorted(lora.target_modules) == sorted(targets)
    auto = AutoModelForCausalLM if causal_lm else AutoModelForSequenceClassification
    from peft import get_peft_model

    model = get_peft_model(auto.from_config(config), lora)
    counts = parameter_counts(model)
    assert counts[0] == trainable
    assert len(adapted_modules(model)) == 2 * len(targets)  # 2 layers


def test_attention_and_mlp():
    model = skeleton(config_of("tiny-bert"), causal_lm=False)
    targets = resolve_targets("attention,mlp", model, "bert", "tiny-bert")
    # The MLP's output.dense by full name: the suffix would also catch attention.output.dense.
    assert targets == ["query", "value"] + [
        f"bert.encoder.layer.{i}.{name}.dense" for i in range(2) for name in ("intermediate", "output")
    ]
    llama = skeleton(config_of("tiny-llama"), causal_lm=True)
    assert len(resolve_targets("mlp", llama, "llama", "tiny-llama")) == 6  # gate, up, down x 2 layers
    assert resolve_targets("all-linear", llama, "llama", "tiny-llama") == "all-linear"
    assert resolve_targets("o_proj", llama, "llama", "tiny-llama") == ["o_proj"]


def test_target_words():
    assert parse_target_modules(" query , value ") == ["query", "value"]
    assert attention_targets("no-such-family") is None
    with pytest.raises(ConfigError, match="all-linear already covers every Linear"):
        parse_target_modules("all-linear,query")


def test_a_bad_target_names_the_linear_layers():
    model = skeleton(config_of("tiny-bert"), causal_lm=False)
    with pytest.raises(ConfigError) as err:
        resolve_targets("q_proj", model, "bert", "tiny-bert")
    assert str(err.value) == (
        "--lora_target_modules 'q_proj' matches no Linear layer of 'tiny-bert'; its Linear layers: "
        "query, key, value, dense, classifier (or attention, mlp, all-linear)"
    )
    with pytest.raises(ConfigError, match="'encoder' matches no Linear layer"):  # a module, but not a Linear
        resolve_targets("encoder", model, "bert", "tiny-bert")


@pytest.mark.parametrize(
    ("extra", "pattern"),
    [
        (["--peft", "lora", "--lora_target_modules", "q_proj"], r"'q_proj' matches no Linear layer of 'tiny-bert'"),
        (["--lora_r", "4"], r"--lora_r applies to --peft lora only"),
        (["--peft", "lora", "--merge_adapter", "--zero", "3"], r"--merge_adapter needs the whole weights"),
        (["--peft", "lora", "--lora_r", "0"], r"--lora_r 0: must be a positive integer"),
    ],
)
def test_user_mistakes_exit_2_with_one_line(tmp_path, capsys, extra, pattern):
    out = tmp_path / "out"
    code = cli_main(["--model", "tiny-bert", *SMALL, "--output_dir", str(out), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("ftprof: error: ")
    assert re.search(pattern, err[-1]), err
    assert "Traceback" not in "\n".join(err)
    assert not out.exists()  # failed before any data, tokenizer or weights


def lora_run(out, *extra):
    script, args = parse(["--model", "tiny-bert", *SMALL, "--output_dir", str(out), "--peft", "lora", *extra])
    return setup(script, args)


def test_lora_trains_only_adapters_and_head(tmp_path):
    out = tmp_path / "out"
    # With activation checkpointing the frozen embeddings' outputs must still carry gradients.
    s = lora_run(out, "--max_steps", "3", "--save_strategy", "no", "--eval_strategy", "no", "--gradient_checkpointing")
    model = s.trainer.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fit(s)
    assert model.get_base_model().is_activation_checkpointing
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed == trainable
    assert len(trainable) == 2 * 2 * 2 + 2  # lora_A, lora_B on query and value of 2 layers; the head's copy
    assert all("lora_" in n or "modules_to_save" in n for n in trainable)
    footprint = json.loads((out / "footprint_rank0.json").read_text())
    assert footprint["trainable_parameter_numel"] == 4226
    assert footprint["frozen_parameter_numel"] == footprint["total_parameter_numel"] - 4226
    assert footprint["adapted_modules"] == [
        f"bert.encoder.layer.{i}.attention.self.{m}" for i in range(2) for m in ("query", "value")
    ]
    assert footprint["optimizer_state_bytes"] == 4226 * 8  # Adam's two fp32 moments, adapters and head only
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {p.name for p in out.iterdir()}
    assert not (out / "model.safetensors").exists()


def test_lora_saves_resumes_and_merges(tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "out"
    steps = ["--save_strategy", "steps", "--save_steps", "2", "--eval_strategy", "steps", "--eval_steps", "2"]
    fit(lora_run(out, "--max_steps", "2", *steps))
    first = load_file(out / "checkpoint-2" / "adapter_model.safetensors")
    assert len(first) == 2 * 2 * 2 + 2
    assert all("lora_" in k or "classifier" in k for k in first)
    resume = ["--resume_from_checkpoint", "true", "--merge_adapter", "--load_best_model_at_end", "false"]
    s = lora_run(out, "--max_steps", "4", *steps, *resume)
    assert s.resume == str(out / "checkpoint-2")
    fit(s)
    assert s.trainer.state.global_step == 4
    final = load_file(out / "adapter_model.safetensors")
    assert final.keys() == first.keys()
    assert any(not torch.equal(final[k], first[k]) for k in first)
    last = load_file(out / "checkpoint-4" / "adapter_model.safetensors")
    assert all(torch.equal(final[k], last[k]) for k in final)
    # One history across the resume: evaluations at steps 2 and 4, and fit's final one (at step 4 too).
    assert [e["step"] for e in s.trainer.state.log_history if "eval_loss" in e] == [2, 4, 4]
    merged = load_file(out / "merged" / "model.safetensors")
    assert not any("lora_" in k for k in merged)
    assert (out / "merged" / "tokenizer.json").is_file()
    assert "bert.encoder.layer.0.attention.self.query.weight" in merged


def test_a_sweep_point_builds_the_same_lora_model(tmp_path):
    """What :mod:`ftprof.sweep.measure` builds (a Measurement, no data) once it passes ``peft="lora"``."""
    from ftprof.train.args import FtprofTrainingArguments, ScriptArguments
    from ftprof.train.recipe import Measurement, build_trainer

    script = ScriptArguments(task="causal-lm", model="tiny-llama", dataset="", max_length=32, random_init=True)
    script.peft = "lora"
    args = FtprofTrainingArguments(
        output_dir=str(tmp_path), report_to="none", eval_strategy="no", load_best_model_at_end=False
    )
    rows = Measurement(rows=lambda train, spec: [{"input_ids": [1] * 32, "labels": [1] * 32}], with_data=False)
    recipe = build_trainer(script, args, measurement=rows)
    assert recipe.trainer.model is recipe.model
    assert parameter_counts(recipe.model)[0] == 3584  # as ftprof train's (tests/integration/test_peft.py)
    assert adapted_modules(recipe.model) == [
        f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")
    ]
