"""Resolve ``--model`` to a config, weights and tokenizer: a Hub id, a local directory or a tiny preset.

Resolution reads only configs, so a wrong name or an unreachable Hub fails in seconds, before any data or
weights are loaded. :func:`build_model` makes a sequence classifier, :func:`build_causal_lm` a language model.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from ftprof.errors import ModelError
from ftprof.known_configs import TINY_PRESETS, known_config_dict, known_names
from ftprof.train.bpe_tokenizer import train_byte_bpe
from ftprof.train.wordpiece_tokenizer import train_wordpiece

logger = logging.getLogger(__name__)

Origin = Literal["preset", "local", "hub", "offline-config"]
WEIGHT_FILES = (
    "model.safetensors",
    "pytorch_model.bin",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json")
# A tokenizer trained on the data needs no more entries than this to learn a sentiment task.
OFFLINE_VOCAB_SIZE = 8000


@dataclass
class ModelSpec:
    """Where a model's config, weights and tokenizer come from.

    ``weights`` and ``tokenizer_source`` are a directory or Hub id for ``from_pretrained``; None means
    random weights / a tokenizer trained on the data.
    """

    name: str
    config: PretrainedConfig
    origin: Origin
    weights: str | None
    tokenizer_source: str | None

    @property
    def random_init(self) -> bool:
        return self.weights is None

    def max_positions(self) -> int | None:
        """The longest input the model accepts, in tokens (None when the architecture has no limit)."""
        return max_positions(self.config)


def max_positions(config: PretrainedConfig) -> int | None:
    """Longest input in tokens; RoBERTa-style models reserve ``pad_token_id + 1`` position slots.

    >>> from transformers import RobertaConfig
    >>> max_positions(RobertaConfig(max_position_embeddings=514, pad_token_id=1))
    512
    """
    n = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if n is None:
        return None
    if "roberta" in config.model_type or config.model_type in ("camembert", "longformer"):
        n -= (config.pad_token_id or 0) + 1
    return int(n)


def config_from_dict(values: dict) -> PretrainedConfig:
    values = dict(values)
    return CONFIG_MAPPING[values.pop("model_type")](**values)


def resolve_model_spec(name: str, random_init: bool = False) -> ModelSpec:
    """Find ``name``'s config without loading weights.

    Raises:
        ModelError: the directory has no config or weights, or the Hub can't be reached and the model is
            neither cached nor (with ``--random_init``) a known architecture.
    """
    if name in TINY_PRESETS:
        return ModelSpec(name, config_from_dict(TINY_PRESETS[name]), "preset", None, None)
    path = Path(name).expanduser()
    if path.is_dir():
        return _local_spec(name, path, random_init)
    # A file-like suffix (model.bin, config.json) means a path; Hub ids have dots too (Qwen/Qwen2.5-0.5B).
    if name.startswith((".", "/", "~")) or path.suffix[1:].isalpha():
        raise ModelError(
            f"--model {name!r}: no such directory; give a model directory, a Hub id or a preset "
            f"({', '.join(sorted(TINY_PRESETS))})"
        )
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as err:
        known = known_config_dict(name)
        if random_init and known:
            logger.warning(
                "%s: config not reachable (%s); using the offline copy of its architecture", name, type(err).__name__
            )
            return ModelSpec(name, config_from_dict(known), "offline-config", None, name)
        if not random_init:
            raise ModelError(
                f"--model {name!r} can't be loaded: the Hugging Face Hub is unreachable or has no such model, "
                "and it is not in the local cache; pass a local model directory (--model /path/to/model), "
                "or add --random_init to train the architecture from random weights"
            ) from None
        raise ModelError(
            f"--model {name!r}: the Hub is unreachable and its architecture is not known offline; pass a "
            f"local directory with a config.json, or one of: {', '.join(known_names())}"
        ) from None
    return ModelSpec(name, config, "hub", None if random_init else name, name)


def _local_spec(name: str, path: Path, random_init: bool) -> ModelSpec:
    if not (path / "config.json").is_file():
        raise ModelError(f"--model {name!r}: the directory has no config.json; point at a saved model directory")
    config = AutoConfig.from_pretrained(path)
    has_weights = any((path / f).is_file() for f in WEIGHT_FILES)
    if not has_weights and not random_init:
        raise ModelError(
            f"--model {name!r}: the directory has no weights ({', '.join(WEIGHT_FILES[:2])}); "
            "add --random_init to train the architecture from random weights"
        )
    has_tokenizer = any((path / f).is_file() for f in TOKENIZER_FILES)
    weights = None if random_init else str(path)
    return ModelSpec(name, config, "local", weights, str(path) if has_tokenizer else None)


def load_tokenizer(spec: ModelSpec, fallback: Callable[[], PreTrainedTokenizerBase]) -> PreTrainedTokenizerBase:
    """The model's own tokenizer when it can be had, else ``fallback()`` (see :func:`train_tokenizer_for`)."""
    tokenizer: Any = None  # AutoTokenizer's declared return type is narrower than what it returns
    if spec.tokenizer_source is not None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer_source)
        except (OSError, ValueError) as err:
            if spec.origin != "offline-config":
                raise ModelError(f"--model {spec.name!r}: its tokenizer can't be loaded ({err})") from None
    if tokenizer is None:
        tokenizer = fallback()
    if tokenizer.pad_token is None:  # GPT-2 and other decoders ship without one
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.model_max_length > 100_000:  # "unset" in many tokenizer configs
        tokenizer.model_max_length = spec.max_positions() or 512
    return tokenizer


def train_tokenizer_for(spec: ModelSpec, texts: Iterable[str], causal_lm: bool = False) -> PreTrainedTokenizerBase:
    """A tokenizer trained on ``texts`` that fits ``spec``'s embedding and length limit.

    WordPiece (BERT-style ``[CLS] text [SEP]``) for classification; for a causal LM, byte-level BPE with an
    end-of-text token and its own pad token (:func:`ftprof.train.bpe_tokenizer.train_byte_bpe`).
    """
    vocab_size = min(OFFLINE_VOCAB_SIZE, spec.config.vocab_size)
    kind = "byte-level BPE" if causal_lm else "WordPiece"
    logger.warning(
        "%s: no tokenizer available offline; training a %d-entry %s tokenizer on the training texts",
        spec.name,
        vocab_size,
        kind,
    )
    train = train_byte_bpe if causal_lm else train_wordpiece
    return train(texts, vocab_size, spec.max_positions() or 512)


def build_model(
    spec: ModelSpec, tokenizer: PreTrainedTokenizerBase, label_names: list[str], shrink_vocab: bool = True
) -> PreTrainedModel:
    """A sequence classifier with ``len(label_names)`` outputs, pretrained body when ``spec`` has weights.

    ``shrink_vocab`` fits a tiny preset's embedding to a tokenizer trained on the data; profiling keeps the
    preset's own size so that measurements don't depend on the data.
    """
    config = spec.config
    config.num_labels = len(label_names)
    config.id2label = dict(enumerate(label_names))
    config.label2id = {label: i for i, label in enumerate(label_names)}
    config.pad_token_id = tokenizer.pad_token_id
    if spec.random_init:
        if spec.origin == "preset" and shrink_vocab:
            config.vocab_size = len(tokenizer)
        elif len(tokenizer) > config.vocab_size:
            raise ModelError(
                f"--model {spec.name!r}: tokenizer has {len(tokenizer)} entries but the model's "
                f"embedding only {config.vocab_size}"
            )
        logger.warning(
            "%s: RANDOM weights (built from its config); accuracy will not match a pretrained model", spec.name
        )
        return AutoModelForSequenceClassification.from_config(config)
    assert spec.weights is not None, "resolve_model_spec sets weights unless random_init"
    return AutoModelForSequenceClassification.from_pretrained(spec.weights, config=config)


def check_causal_lm(spec: ModelSpec) -> None:
    """Fail fast (before any data is loaded) when ``spec``'s architecture has no causal-LM head.

    Raises:
        ModelError: e.g. DistilBERT, which transformers can't build as a language model.
    """
    if spec.config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelError(
            f"--model {spec.name!r} ({spec.config.model_type}) has no causal language-model head; use a decoder "
            "(tiny-gpt2, tiny-llama, tiny-qwen2, gpt2, Qwen/Qwen2.5-0.5B, ...) or --task classification"
        )


def build_causal_lm(spec: ModelSpec, tokenizer: PreTrainedTokenizerBase, shrink_vocab: bool = True) -> PreTrainedModel:
    """A causal LM (``AutoModelForCausalLM``) covering ``tokenizer``'s vocabulary, pretrained when ``spec`` has weights.

    The embedding matches the tokenizer: a tiny preset's shrinks to a tokenizer trained on the data (unless
    ``shrink_vocab`` is off); any other model's grows when the tokenizer has more entries (random weights: built
    that size; pretrained: ``resize_token_embeddings``, which keeps tied input and output embeddings tied).
    Encoders that transformers can run as decoders (BERT, RoBERTa) get ``is_decoder``, i.e. a causal mask.

    Raises:
        ModelError: the architecture has no causal-LM head.
    """
    check_causal_lm(spec)
    config = spec.config
    if getattr(config, "is_decoder", None) is False:
        config.is_decoder = True  # without it BERT's LM head attends to the tokens it must predict
    pad = tokenizer.pad_token_id
    # A pad id becomes the embedding's padding_idx (Llama, Qwen2: that row never trains): only a dedicated pad.
    if pad is not None and pad not in (tokenizer.eos_token_id, tokenizer.bos_token_id):
        config.pad_token_id = pad
    if spec.random_init:
        # Random weights learn whatever ids the tokenizer uses (one trained on the data has its own).
        for key in ("bos_token_id", "eos_token_id"):
            if getattr(tokenizer, key) is not None:
                setattr(config, key, getattr(tokenizer, key))
        if (spec.origin == "preset" and shrink_vocab) or len(tokenizer) > config.vocab_size:
            config.vocab_size = len(tokenizer)
        logger.warning(
            "%s: RANDOM weights (built from its config); loss will start near ln(%d) = %.2f",
            spec.name,
            config.vocab_size,
            math.log(config.vocab_size),
        )
        return AutoModelForCausalLM.from_config(config)
    assert spec.weights is not None, "resolve_model_spec sets weights unless random_init"
    # fp32 weights: Trainer's --bf16/--fp16 (and DeepSpeed's) mixed precision keeps fp32 master weights; a
    # bf16 checkpoint loaded as is would train in pure bf16.
    model = AutoModelForCausalLM.from_pretrained(spec.weights, config=config, dtype=torch.float32)
    weight = model.get_input_embeddings().weight
    assert isinstance(weight, torch.Tensor)
    rows = weight.shape[0]
    if len(tokenizer) > rows:
        logger.warning(
            "%s: tokenizer has %d entries, embedding %d: resizing the embedding", spec.name, len(tokenizer), rows
        )
        model.resize_token_embeddings(len(tokenizer))
    return model
