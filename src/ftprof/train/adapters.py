"""LoRA adapters (``--peft lora``): which layers get one, checked against the model before any data is loaded.

``--lora_target_modules`` takes module names, matched as ``peft`` matches them (a module whose name is the
target or ends with ``.<target>``), and three words of its own:

* ``attention`` (the default): the family's attention projections, from peft's
  ``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`` (query and value; GPT-2's fused ``c_attn``);
* ``mlp``: the family's feed-forward Linear layers (:data:`MLP_PATTERNS`), as full module names;
* ``all-linear``: peft's own, every Linear layer but the output head (alone, not in a list).

Only Linear layers (and GPT-2's ``Conv1D``) can be adapted; a target that matches none is a
:class:`~ftprof.errors.ConfigError` naming the model's Linear layers. The estimator reads
:data:`ATTENTION_TARGETS` and :data:`MLP_PATTERNS` from here.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from transformers import PretrainedConfig
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING,
)
from transformers.pytorch_utils import Conv1D

from ftprof.errors import ConfigError

ALL_LINEAR = "all-linear"  # peft's word for every Linear layer but the output head
# Families peft's mapping lacks: the same rule (query and value projections).
EXTRA_ATTENTION_TARGETS: dict[str, tuple[str, ...]] = {"distilbert": ("q_lin", "v_lin")}
# Feed-forward Linear layers by full module name. A pattern, not a suffix: BERT's second MLP layer
# (layer.N.output.dense) is a suffix of its attention output (layer.N.attention.output.dense).
MLP_PATTERNS: dict[str, str] = {
    "bert": r".*\.layer\.\d+\.(intermediate|output)\.dense",
    "roberta": r".*\.layer\.\d+\.(intermediate|output)\.dense",
    "xlm-roberta": r".*\.layer\.\d+\.(intermediate|output)\.dense",
    "distilbert": r".*\.ffn\.lin[12]",
    "gpt2": r".*\.mlp\.c_(fc|proj)",
    "gpt_neo": r".*\.mlp\.c_(fc|proj)",
    "opt": r".*\.fc[12]",
    "llama": r".*\.mlp\.(gate|up|down)_proj",
    "mistral": r".*\.mlp\.(gate|up|down)_proj",
    "qwen2": r".*\.mlp\.(gate|up|down)_proj",
    "qwen3": r".*\.mlp\.(gate|up|down)_proj",
    "gemma": r".*\.mlp\.(gate|up|down)_proj",
}


def attention_targets(model_type: str) -> tuple[str, ...] | None:
    """The attention projections LoRA adapts by default in ``model_type`` (None: no default known).

    >>> attention_targets("llama"), attention_targets("gpt2"), attention_targets("distilbert")
    (('q_proj', 'v_proj'), ('c_attn',), ('q_lin', 'v_lin'))
    """
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    found = PEFT_DEFAULTS.get(model_type) or EXTRA_ATTENTION_TARGETS.get(model_type)
    return tuple(found) if found else None


def parse_target_modules(value: str | None) -> list[str]:
    """``--lora_target_modules`` as a list of names (empty or None: ``attention``).

    >>> parse_target_modules("attention, mlp"), parse_target_modules(None)
    (['attention', 'mlp'], ['attention'])
    """
    names = [n.strip() for n in (value or "").split(",") if n.strip()]
    if ALL_LINEAR in names and len(names) > 1:
        raise ConfigError(f"--lora_target_modules {value!r}: {ALL_LINEAR} already covers every Linear; pass it alone")
    return names or ["attention"]


def skeleton(config: PretrainedConfig, causal_lm: bool) -> torch.nn.Module:
    """The model's modules, weights on the meta device (no memory, no DeepSpeed ``zero.Init``)."""
    mapping = MODEL_FOR_CAUSAL_LM_MAPPING if causal_lm else MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING
    model_class: Any = mapping[type(config)]  # the class itself: from_config would enter DeepSpeed's zero.Init
    with torch.device("meta"):
        return model_class(config)


def linear_names(model: torch.nn.Module) -> list[str]:
    """Full names of the modules LoRA can adapt: ``nn.Linear`` and GPT-2's ``Conv1D``."""
    return [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear | Conv1D)]


def resolve_targets(value: str | None, model: torch.nn.Module, model_type: str, model_name: str) -> list[str] | str:
    """What peft's ``LoraConfig.target_modules`` gets for ``--lora_target_modules value`` on ``model``.

    Raises:
        ConfigError: a name that matches no Linear layer (the message lists the model's), or ``attention`` /
            ``mlp`` for a family without a default.
    """
    names = parse_target_modules(value)
    if names == [ALL_LINEAR]:
        return ALL_LINEAR
    linears = linear_names(model)
    targets: list[str] = []
    for name in names:
        if name == "attention":
            found = attention_targets(model_type)
            if found is None:
                raise _no_default(name, model_name, model_type, linears)
            targets += found
        elif name == "mlp":
            pattern = MLP_PATTERNS.get(model_type)
            if pattern is None:
                raise _no_default(name, model_name, model_type, linears)
            targets += [n for n in linears if re.fullmatch(pattern, n)]
        elif any(n == name or n.endswith("." + name) for n in linears):
            targets.append(name)
        else:
            raise ConfigError(
                f"--lora_target_modules {name!r} matches no Linear layer of {model_name!r}; its Linear layers: "
                f"{', '.join(leaf_names(linears))} (or attention, mlp, {ALL_LINEAR})"
            )
    return list(dict.fromkeys(targets))


def leaf_names(linears: list[str]) -> list[str]:
    """The last part of each name, once each, in model order.

    >>> leaf_names(["a.0.query", "a.0.value", "a.1.query", "classifier"])
    ['query', 'value', 'classifier']
    """
    return list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in linears))


def _no_default(word: str, model_name: str, model_type: str, linears: list[str]) -> ConfigError:
    return ConfigError(
        f"--lora_target_modules {word}: no default for {model_name!r} ({model_type}); name its Linear layers "
        f"({', '.join(leaf_names(linears))}) or pass {ALL_LINEAR}"
    )


def check_peft_flags(peft: str, passed: set[str], zero_stage: int | None) -> None:
    """LoRA flags without ``--peft lora``, and ``--merge_adapter`` where the weights are partitioned.

    ``passed``: the names of the flags on the command line; ``zero_stage``: DeepSpeed's (None: no DeepSpeed).

    Raises:
        ConfigError: a LoRA flag that would do nothing, or ``--merge_adapter`` with ZeRO-3.
    """
    lora_flags = sorted(f for f in passed if f.startswith("lora_") or f == "merge_adapter")
    if peft != "lora" and lora_flags:
        raise ConfigError(f"--{lora_flags[0]} applies to --peft lora only; add --peft lora, or drop it")
    if peft == "lora" and "merge_adapter" in passed and zero_stage == 3:
        raise ConfigError(
            "--merge_adapter needs the whole weights on one rank, and ZeRO-3 partitions them; train with --zero 2 "
            "(or lower), or merge the saved adapter afterwards: "
            "PeftModel.from_pretrained(base_model, '<output_dir>').merge_and_unload()"
        )


def lora_config(
    config: PretrainedConfig,
    model_name: str,
    causal_lm: bool,
    *,
    r: int,
    alpha: int,
    dropout: float,
    target_modules: str | None,
) -> Any:
    """peft's ``LoraConfig`` for the model ``config`` describes, its targets checked on a meta-device skeleton.

    Raises:
        ConfigError: a bad rank or dropout, or a target that matches no Linear layer.
    """
    from peft import LoraConfig, TaskType

    if r < 1:
        raise ConfigError(f"--lora_r {r!r}: must be a positive integer")
    if not 0 <= dropout < 1:
        raise ConfigError(f"--lora_dropout {dropout!r}: must be >= 0 and < 1")
    model = skeleton(config, causal_lm)
    targets = resolve_targets(target_modules, model, config.model_type, model_name)
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM if causal_lm else TaskType.SEQ_CLS,
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        # GPT-2's Conv1D stores its weight in x out (peft would correct it, with a warning per layer)
        fan_in_fan_out=any(isinstance(m, Conv1D) for m in model.modules()),
    )
