"""Architecture facts for the estimator, read from a config; parameters counted on torch's meta device
(exact, no memory, no weights)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, PretrainedConfig
from transformers.trainer_pt_utils import get_parameter_names

from ftprof.estimate.estimator import Arch
from ftprof.estimate.optimizers import EmbeddingShape
from ftprof.known_configs import dims
from ftprof.point import Task
from ftprof.train.models import resolve_model_spec

DECODERS = ("gpt2", "gpt_neo", "gptj", "llama", "mistral", "qwen2", "qwen3", "opt", "bloom", "falcon", "phi", "gemma")
# Llama-style blocks: RMSNorm, rotary, grouped-query attention, SiLU-gated MLP.
GATED_MLP = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "phi3")


def arch_from_config(
    name: str,
    config: PretrainedConfig,
    num_labels: int = 2,
    attention: str | None = None,
    task: Task = "classification",
) -> Arch:
    """Facts of the model ``task`` builds from ``config``: a sequence classifier with ``num_labels`` outputs,
    or a causal LM (logits over the vocabulary; tied embeddings counted once)."""
    config.num_labels = num_labels
    with torch.device("meta"):
        if task == "causal-lm":
            model = AutoModelForCausalLM.from_config(config)
        else:
            model = AutoModelForSequenceClassification.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    sizes = tuple(p.numel() for p in model.parameters() if p.requires_grad)
    decay = set(get_parameter_names(model, [torch.nn.LayerNorm], DECAY_EXCLUDED))
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    trained = [
        (n, EmbeddingShape(p.shape) if id(p) in embeddings else tuple(p.shape))
        for n, p in model.named_parameters()
        if p.requires_grad
    ]
    step_groups = (tuple(s for n, s in trained if n in decay), tuple(s for n, s in trained if n not in decay))
    d = dims(config)
    dropout_names = ("hidden_dropout_prob", "dropout", "resid_pdrop", "attention_dropout")
    dropout = float(next((getattr(config, n) for n in dropout_names if getattr(config, n, None) is not None), 0)) > 0
    return Arch(
        name=name,
        family="decoder" if config.model_type in DECODERS else "encoder",
        params=params,
        layers=d.layers,
        hidden=d.hidden,
        heads=d.heads,
        intermediate=d.intermediate,
        vocab=int(config.vocab_size),
        dropout=dropout,
        attention="eager" if (attention or config._attn_implementation or "sdpa") == "eager" else "sdpa",
        lm_head=task == "causal-lm",
        num_labels=num_labels,
        kv_heads=int(getattr(config, "num_key_value_heads", None) or d.heads),
        mlp="gated" if config.model_type in GATED_MLP else "plain",
        param_sizes=sizes,
        step_groups=step_groups,
        mask_per_layer=config.model_type == "gpt2",
        head_keeps_output=not (dropout and config.model_type in ("roberta", "xlm-roberta", "camembert")),
        # transformers' gelu_new is tanh-approximated GELU in Python ops, each saving an MLP-width tensor
        mlp_saves=5 if getattr(config, "activation_function", getattr(config, "hidden_act", "")) == "gelu_new" else 2,
    )


#: Parameter names HF Trainer keeps out of weight decay, as ``Trainer.get_decay_parameter_names`` spells them
#: (importing Trainer costs seconds; tests/estimate check the two agree). Its optimizer steps the decayed group first.
DECAY_EXCLUDED = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]


def arch_for(model: str, attention: str | None = None, task: Task = "classification") -> Arch:
    """Facts of ``model`` (a known architecture, local directory or reachable Hub id), weights never loaded.

    Raises:
        ModelError: the architecture can't be found offline.
    """
    spec = resolve_model_spec(model, random_init=True)
    return arch_from_config(model, spec.config, attention=attention, task=task)
