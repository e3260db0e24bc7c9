"""LoRA in the estimator: parameter counts exact against real peft models, model states as DeepSpeed holds
frozen weights, saved activations against real forwards, and ``ftprof estimate --peft``."""

import statistics

import pytest
import torch
from peft import LoraConfig, TaskType, get_peft_model
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from ftprof.cli.estimate import main
from ftprof.errors import ConfigError
from ftprof.estimate.adapters import LoraSpec, lora_facts_for, role_of
from ftprof.estimate.architecture import arch_for, arch_from_config
from ftprof.estimate.calibration import measure_saved_bytes, zero_dropout
from ftprof.estimate.estimator import estimate, lora_saved_activations, model_states, saved_activations
from ftprof.point import Point
from ftprof.train.models import resolve_model_spec


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """No saved calibration, and a console wide enough that no table cell wraps."""
    monkeypatch.setenv("FTPROF_HOME", str(tmp_path / "ftprof"))
    monkeypatch.setenv("COLUMNS", "300")


def peft_model(model: str, spec: LoraSpec, task: str = "classification", config=None) -> torch.nn.Module:
    """A real peft model of ``model`` with ``spec``'s adapters (random weights; on the meta device unless the
    caller builds it elsewhere)."""
    config = config or resolve_model_spec(model, random_init=True).config
    config.num_labels = 2
    if config.pad_token_id is None:  # decoders' classification heads find each row's last token by it
        config.pad_token_id = config.eos_token_id
    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    torch.manual_seed(0)
    base = auto.from_config(config)
    lora = LoraConfig(
        task_type=TaskType.CAUSAL_LM if task == "causal-lm" else TaskType.SEQ_CLS,
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=list(spec.targets_for(config.model_type)),
    )
    return get_peft_model(base, lora)


COUNT_CASES = [
    ("tiny-bert", "classification", ()),
    ("tiny-gpt2", "classification", ()),
    ("tiny-llama", "classification", ()),
    ("tiny-distilbert", "classification", ()),
    ("tiny-gpt2", "causal-lm", ("c_attn", "c_proj", "c_fc")),  # c_proj: attention's and the MLP's (Conv1D)
    ("tiny-llama", "causal-lm", ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    ("tiny-roberta", "classification", ("query", "value", "dense")),  # dense: in the layers, not the head's
    ("bert-base-uncased", "classification", ()),
    ("gpt2", "causal-lm", ()),
]


@pytest.mark.parametrize(("model", "task", "targets"), COUNT_CASES)
def test_counts_match_a_real_peft_model(model, task, targets):
    """Trainable parameters (each one, in order), frozen ones and the adapted layers, exactly as peft 0.21
    builds them (the base configs on the meta device)."""
    spec = LoraSpec(r=16, target_modules=targets)
    facts = lora_facts_for(model, spec, task)
    with torch.device("meta"):
        net = peft_model(model, spec, task)
    trainable = tuple(p.numel() for p in net.parameters() if p.requires_grad)
    assert facts.trainable_sizes == trainable
    assert facts.trainable_params == sum(trainable)
    assert facts.frozen_params == sum(p.numel() for p in net.parameters() if not p.requires_grad)
    assert facts.params == sum(p.numel() for p in net.parameters())
    adapted = {n for n, _ in net.named_modules() if n.endswith(".lora_A")}
    assert {"base_model.model." + layer.name + ".lora_A" for layer in facts.layers} == adapted


def test_counts_spelled_out_on_tiny_presets():
    """r x (in + out) per adapted layer, plus the classifier head peft copies (DistilBERT's pre_classifier
    too: peft matches ``classifier`` as a name suffix)."""
    r = 8
    bert = lora_facts_for("tiny-bert", LoraSpec(r=r))  # 2 layers, hidden 64: query and value
    assert bert.adapter_params == 2 * 2 * r * (64 + 64)
    assert bert.head_params == 64 * 2 + 2
    gpt2 = lora_facts_for("tiny-gpt2", LoraSpec(r=r))  # c_attn: 64 -> 192 (Conv1D, weight 64 x 192)
    assert gpt2.adapter_params == 2 * r * (64 + 192)
    assert gpt2.head_params == 64 * 2
    llama = lora_facts_for("tiny-llama", LoraSpec(r=r), "causal-lm")  # v_proj: 64 -> 32 (2 KV heads of 16)
    assert llama.adapter_params == 2 * r * ((64 + 64) + (64 + 32))
    assert llama.head_params == 0
    distil = lora_facts_for("tiny-distilbert", LoraSpec(r=r))
    assert distil.head_params == (64 * 64 + 64) + (64 * 2 + 2)
    assert not bert.head_saves_input
    assert distil.head_saves_input
    assert [role_of(layer.name) for layer in gpt2.layers] == ["qkv", "qkv"]


def test_a_target_that_names_no_linear_layer_lists_the_linear_layers():
    with pytest.raises(ConfigError, match=r"'q,v'.*its Linear layers: classifier,dense,key,query,value"):
        lora_facts_for("tiny-bert", LoraSpec(target_modules=("q", "v")))
    with pytest.raises(ConfigError, match="--lora_r 0"):
        LoraSpec(r=0)


def test_model_states_keep_frozen_weights_in_16_bits_without_states():
    """bf16 over 2 ranks: the frozen weights are whole under ZeRO-2 and halved under ZeRO-3; gradients, fp32
    master weights and Adam's moments are the trainable parameters' only."""
    arch = arch_for("tiny-bert")
    facts = lora_facts_for("tiny-bert", LoraSpec(r=8))
    trained, frozen = facts.trainable_params, facts.frozen_params
    assert (trained, frozen) == (2 * 2 * 8 * (64 + 64) + 130, arch.params)  # as a real peft model counts
    z2, _ = model_states(arch, Point(batch_size=4, seq_len=64, precision="bf16", zero=2, world_size=2), lora=facts)
    assert z2["frozen_parameters"] == 2 * frozen
    assert z2["parameters"] == 2 * trained
    assert z2["master_weights"] == 4 * trained // 2
    assert z2["optimizer_states"] == 8 * trained // 2
    z3, _ = model_states(arch, Point(batch_size=4, seq_len=64, precision="bf16", zero=3, world_size=2), lora=facts)
    assert z3["frozen_parameters"] == 2 * frozen // 2
    # Under ZeRO-3 too the adapters are in the training dtype (ftprof casts them: the recipe's
    # _adapters_in_the_training_dtype); measured per rank on 2 CPU ranks in tests/integration/test_sweep_peft.py.
    assert z3["parameters"] == 2 * trained // 2
    assert z3["gradients"] == 2 * trained // 2
    off = Point(batch_size=4, seq_len=64, precision="bf16", zero=3, world_size=2, offload="optimizer+param")
    held, host = model_states(arch, off, lora=facts)
    assert "frozen_parameters" not in held
    assert host["frozen_parameters"] == frozen
    z3_point = Point(batch_size=4, seq_len=64, precision="bf16", zero=3, world_size=2)
    full, lora = estimate(arch, z3_point, device="cpu"), estimate(arch, z3_point, device="cpu", lora=facts)
    assert lora.items["gathered_parameters"] == 2 * facts.params  # every parameter is gathered, frozen or not
    assert lora.items["optimizer_step"] == 4 * trained // 2 < full.items["optimizer_step"]


def test_no_adapter_leaves_every_item_unchanged():
    arch = arch_for("tiny-gpt2")
    point = Point(batch_size=4, seq_len=64, precision="bf16", zero=2, world_size=2)
    assert estimate(arch, point, lora=None) == estimate(arch, point)


def lora_saved_activations_case(
    model: str, task: str, attention: str, dropout: bool, point: Point, spec: LoraSpec
) -> tuple[int, int]:
    """(predicted, measured) bytes a real LoRA forward saves for backward on this CPU: the model from its
    offline config, every dropout zeroed unless ``dropout``, cast to the point's precision as DeepSpeed does."""
    config = resolve_model_spec(model, random_init=True).config
    if not dropout:
        zero_dropout(config)
    config._attn_implementation = attention
    net = peft_model(model, spec, task, config).train()
    if point.precision != "fp32":
        net = net.to(torch.bfloat16)
    measured = measure_saved_bytes(net, int(config.vocab_size), point, task)
    arch = arch_from_config(model, config, attention=attention, task=task)
    predicted = sum(lora_saved_activations(arch, point, lora_facts_for(model, spec, task), "cpu").values())
    return predicted, measured


FAMILIES = [
    ("tiny-bert", "classification"),
    ("tiny-roberta", "classification"),
    ("tiny-gpt2", "classification"),
    ("tiny-gpt2", "causal-lm"),
    ("tiny-llama", "causal-lm"),
]
HELD_OUT = ("tiny-distilbert", "classification")  # not looked at while building the formula


def activation_errors(model: str, task: str) -> list[float]:
    errs = []
    for attention in ("eager", "sdpa"):
        for ckpt in (False, True):
            for precision, lora_dropout in (("fp32", 0.05), ("bf16", 0.0)):
                point = Point(batch_size=4, seq_len=64, precision=precision, zero=0, gradient_checkpointing=ckpt)
                spec = LoraSpec(r=8, alpha=16, dropout=lora_dropout)
                dropout = model != "tiny-llama"  # Llama-style models have none
                predicted, measured = lora_saved_activations_case(model, task, attention, dropout, point, spec)
                errs.append(abs(predicted - measured) / measured)
    return errs


def test_lora_saved_activations_match_real_forwards_across_families():
    """Within 5% per family (median; eager and SDPA, checkpointing off and on, fp32 with lora_dropout 0.05
    and bf16 without). Here: a median of 0.3-2.7% per family, the worst case 3.7% (RoBERTa, checkpointing, bf16).
    Not covered, as the full fine-tuning formula doesn't cover them: Llama-style classifiers in bf16 (a
    20% miss with checkpointing), GPT-2 with SDPA and no dropout (the per-score tensor, 5.8%)."""
    errs = {f"{model} {task}": activation_errors(model, task) for model, task in FAMILIES}
    print(
        {family: f"median {100 * statistics.median(e):.2f}%, worst {100 * max(e):.2f}%" for family, e in errs.items()}
    )
    assert all(statistics.median(e) <= 0.05 for e in errs.values()), errs


def test_lora_saved_activations_on_the_held_out_family():
    """DistilBERT, reported apart: the formula was built on the other families only. Here: a median of 3.5%, the
    worst 6.8% (dropout on, no checkpointing: predicted over)."""
    errs = activation_errors(*HELD_OUT)
    print(f"held out {HELD_OUT[0]}: median {100 * statistics.median(errs):.2f}%, worst {100 * max(errs):.2f}%")
    assert statistics.median(errs) <= 0.05, errs


def test_lora_keeps_less_than_full_fine_tuning_and_itemises_its_adapters():
    arch = arch_for("tiny-llama", task="causal-lm")
    facts = lora_facts_for("tiny-llama", LoraSpec(r=8, dropout=0.05), "causal-lm")
    point = Point(batch_size=4, seq_len=64, precision="bf16", zero=0)
    full, lora = saved_activations(arch, point, "cpu"), lora_saved_activations(arch, point, facts, "cpu")
    assert lora["layers"] < full["layers"]
    assert lora["embeddings"] == 0
    # each of 4 adapters (q, v in 2 layers): r-wide output (8 x 2 B) and its dropped input and mask (2 x 64 x 2 B)
    assert lora["adapters"] == 4 * 64 * 4 * (8 * 2 + 64 * 2 * 2)


def test_cli_bad_target_module_is_one_line_exit_2(capsys):
    code = main(["--model", "tiny-bert", "--peft", "lora", "--lora_target_modules", "q,v"])
    err = capsys.readouterr().err
    assert code == 2
    assert "no Linear layer of this model is named so; its Linear layers: classifier,dense,key,query,value" in err
    assert len([line for line in err.splitlines() if line.startswith("ftprof: error")]) == 1
    assert main(["--model", "tiny-bert", "--peft", "qlora"]) == 2
    assert "--peft 'qlora'" in capsys.readouterr().err


def test_cli_peft_none_lora_side_by_side(capsys):
    flags = ["--model", "tiny-gpt2", "--batch_size", "4", "--seq_len", "64", "--world_size", "2"]
    assert main([*flags, "--zero", "2,3", "--peft", "none,lora", "--lora_r", "8"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if "ZeRO-2 full" in line)
    assert header.index("ZeRO-2 full") < header.index("ZeRO-2 LoRA") < header.index("ZeRO-3 full")
    assert "ZeRO-3 LoRA" in header
    assert "frozen weights (LoRA)" in out
    assert "trainable parameters (LoRA)" in out
    assert "adapters" in out
    assert "LoRA r=8, alpha=16, dropout=0.05 on 2 layers (c_attn): 4,224 trainable" in out
    assert main([*flags, "--zero", "2"]) == 0
    assert "LoRA" not in capsys.readouterr().out
