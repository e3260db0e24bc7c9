"""Architecture facts for the estimator, read from a config; parameters counted on torch's meta device
(exact, no memory, no weights)."""

from __future__ import annotations

import torch
from transformers import AutoModelForSequenceClassification, PretrainedConfig

from ftprof.estimate import Arch
from ftprof.models import resolve_model_spec

DECODERS = ("gpt2", "gpt_neo", "gptj", "llama", "mistral", "qwen2", "opt", "bloom", "falcon", "phi", "gemma")


def _first(config: PretrainedConfig, *names: str):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    raise ValueError(f"config of type {config.model_type!r} has none of {names}")


def arch_from_config(name: str, config: PretrainedConfig, num_labels: int = 2, attention: str | None = None) -> Arch:
    """Facts of a sequence classifier with ``num_labels`` outputs built from ``config``."""
    config.num_labels = num_labels
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    hidden = int(_first(config, "hidden_size", "dim", "n_embd"))
    dropout = float(_first(config, "hidden_dropout_prob", "dropout", "resid_pdrop", "attention_dropout")) > 0
    intermediate = getattr(config, "intermediate_size", None) or getattr(config, "hidden_dim", None) \
        or getattr(config, "n_inner", None) or 4 * hidden
    return Arch(
        name=name, family="decoder" if config.model_type in DECODERS else "encoder", params=params,
        layers=int(_first(config, "num_hidden_layers", "n_layers", "n_layer")), hidden=hidden,
        heads=int(_first(config, "num_attention_heads", "n_heads", "n_head")), intermediate=int(intermediate),
        vocab=int(config.vocab_size), dropout=dropout,
        attention="eager" if (attention or config._attn_implementation or "sdpa") == "eager" else "sdpa",
        num_labels=num_labels)


def arch_for(model: str, attention: str | None = None) -> Arch:
    """Facts of ``model`` (a known architecture, local directory or reachable Hub id), weights never loaded.

    Raises:
        ModelError: the architecture can't be found offline.
    """
    spec = resolve_model_spec(model, random_init=True)
    return arch_from_config(model, spec.config, attention=attention)
