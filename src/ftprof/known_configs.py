"""Architectures ftprof knows without a network: common checkpoints' configs and tiny presets.

The numbers are copied from each checkpoint's ``config.json`` on the Hub, so that profiling, estimating and
``--random_init`` training (which need only the shapes) work on air-gapped machines. Weights are never
implied: a model built from one of these has random weights, and ftprof says so. Decoders (GPT-2, Llama,
Qwen2, Mistral) serve both ``--task classification`` and ``--task causal-lm``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

_BERT = dict(
    model_type="bert",
    vocab_size=30522,
    max_position_embeddings=512,
    type_vocab_size=2,
    hidden_act="gelu",
    hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1,
    layer_norm_eps=1e-12,
    pad_token_id=0,
)
_ROBERTA = dict(
    model_type="roberta",
    vocab_size=50265,
    max_position_embeddings=514,
    type_vocab_size=1,
    hidden_act="gelu",
    hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1,
    layer_norm_eps=1e-5,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
)
_DISTILBERT = dict(
    model_type="distilbert",
    vocab_size=30522,
    max_position_embeddings=512,
    sinusoidal_pos_embds=False,
    dropout=0.1,
    attention_dropout=0.1,
    activation="gelu",
    pad_token_id=0,
)
_GPT2 = dict(
    model_type="gpt2",
    vocab_size=50257,
    n_positions=1024,
    activation_function="gelu_new",
    resid_pdrop=0.1,
    embd_pdrop=0.1,
    attn_pdrop=0.1,
    layer_norm_epsilon=1e-5,
    bos_token_id=50256,
    eos_token_id=50256,
)
# Llama-style decoders: RMSNorm, SwiGLU MLP, rotary positions, grouped-query attention (num_key_value_heads).
_LLAMA = dict(
    model_type="llama",
    hidden_act="silu",
    attention_bias=False,
    attention_dropout=0.0,
    mlp_bias=False,
    initializer_range=0.02,
    pretraining_tp=1,
)
_QWEN2 = dict(model_type="qwen2", hidden_act="silu", attention_dropout=0.0, initializer_range=0.02)
_MISTRAL = dict(model_type="mistral", hidden_act="silu", attention_dropout=0.0, initializer_range=0.02)

KNOWN_CHECKPOINTS: dict[str, dict[str, Any]] = {
    "bert-base-uncased": {
        **_BERT,
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
    },
    "bert-base-cased": {
        **_BERT,
        "vocab_size": 28996,
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
    },
    "bert-large-uncased": {
        **_BERT,
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "intermediate_size": 4096,
    },
    "distilbert-base-uncased": {**_DISTILBERT, "dim": 768, "n_layers": 6, "n_heads": 12, "hidden_dim": 3072},
    "roberta-base": {
        **_ROBERTA,
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
    },
    "roberta-large": {
        **_ROBERTA,
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "intermediate_size": 4096,
    },
    "gpt2": {**_GPT2, "n_embd": 768, "n_layer": 12, "n_head": 12},
    "gpt2-medium": {**_GPT2, "n_embd": 1024, "n_layer": 24, "n_head": 16},
    "gpt2-large": {**_GPT2, "n_embd": 1280, "n_layer": 36, "n_head": 20},
    "gpt2-xl": {**_GPT2, "n_embd": 1600, "n_layer": 48, "n_head": 25},
    "distilgpt2": {**_GPT2, "n_embd": 768, "n_layer": 6, "n_head": 12},
    "Qwen/Qwen2.5-0.5B": {
        **_QWEN2,
        "vocab_size": 151936,
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "use_sliding_window": False,
        "sliding_window": 32768,
        "max_window_layers": 24,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
    },
    "meta-llama/Llama-3.2-1B": {
        **_LLAMA,
        "vocab_size": 128256,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 32.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
        },
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
    },
    "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T": {
        **_LLAMA,
        "vocab_size": 32000,
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 22,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "max_position_embeddings": 2048,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
    "mistralai/Mistral-7B-v0.1": {
        **_MISTRAL,
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 32768,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "sliding_window": 4096,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
}

# The Hub's organisation-prefixed names for the same checkpoints.
ALIASES = {
    "google-bert/bert-base-uncased": "bert-base-uncased",
    "google-bert/bert-base-cased": "bert-base-cased",
    "google-bert/bert-large-uncased": "bert-large-uncased",
    "distilbert/distilbert-base-uncased": "distilbert-base-uncased",
    "FacebookAI/roberta-base": "roberta-base",
    "FacebookAI/roberta-large": "roberta-large",
    "openai-community/gpt2": "gpt2",
    "openai-community/gpt2-medium": "gpt2-medium",
    "openai-community/gpt2-large": "gpt2-large",
    "openai-community/gpt2-xl": "gpt2-xl",
    "distilbert/distilgpt2": "distilgpt2",
    # TinyLlama v1.1 retrained the same architecture (same config.json shapes) on a different data mix.
    "TinyLlama/TinyLlama_v1.1": "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T",
}

# Tiny presets: real architectures at toy size, for tests and for the no-network default job.
# vocab_size is an upper bound; a tokenizer trained on the data sets the real size.
TINY_PRESETS: dict[str, dict[str, Any]] = {
    "tiny-bert": {
        **_BERT,
        "vocab_size": 4096,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 128,
    },
    "tiny-distilbert": {**_DISTILBERT, "vocab_size": 4096, "dim": 64, "n_layers": 2, "n_heads": 2, "hidden_dim": 128},
    "tiny-roberta": {
        **_ROBERTA,
        "vocab_size": 4096,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 128,
    },
    "tiny-gpt2": {
        **_GPT2,
        "vocab_size": 4096,
        "n_positions": 512,
        "n_embd": 64,
        "n_layer": 2,
        "n_head": 2,
        "bos_token_id": 4095,
        "eos_token_id": 4095,
    },
    # Llama-style at toy size, with grouped-query attention (2 KV heads for 4 query heads) like the real ones.
    "tiny-llama": {
        **_LLAMA,
        "vocab_size": 4096,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,  # as TinyLlama, Mistral
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
    "tiny-qwen2": {
        **_QWEN2,
        "vocab_size": 4096,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,  # as Qwen2.5-0.5B, Llama-3.2-1B
        "bos_token_id": 4095,
        "eos_token_id": 4095,
    },
}


def known_config_dict(name: str) -> dict[str, Any] | None:
    """The offline config of a known checkpoint or tiny preset, or None.

    >>> known_config_dict("google-bert/bert-base-uncased")["hidden_size"]
    768
    """
    name = ALIASES.get(name, name)
    found = KNOWN_CHECKPOINTS.get(name) or TINY_PRESETS.get(name)
    return dict(found) if found else None


def known_names() -> list[str]:
    return sorted(KNOWN_CHECKPOINTS) + sorted(TINY_PRESETS)


@dataclass(frozen=True)
class Dims:
    """The shape of a transformer stack, whatever its config calls the fields."""

    layers: int
    hidden: int
    heads: int
    intermediate: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def dims(config: Any) -> Dims:
    """A transformers config's dimensions. Configs map the common names (``hidden_size``,
    ``num_hidden_layers``, ``num_attention_heads``) onto their own (GPT-2's ``n_embd``, DistilBERT's ``dim``)
    through ``attribute_map``; only the MLP width has no common name.

    >>> from transformers import GPT2Config
    >>> dims(GPT2Config(n_embd=64, n_layer=2, n_head=4))
    Dims(layers=2, hidden=64, heads=4, intermediate=256)
    """
    hidden = int(config.hidden_size)
    intermediate = next(
        (getattr(config, n) for n in ("intermediate_size", "hidden_dim", "n_inner") if getattr(config, n, None)),
        4 * hidden,
    )
    return Dims(
        layers=int(config.num_hidden_layers),
        hidden=hidden,
        heads=int(config.num_attention_heads),
        intermediate=int(intermediate),
    )
