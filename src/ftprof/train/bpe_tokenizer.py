"""A byte-level BPE tokenizer trained on the task's own texts, for causal LMs that come without one offline.

GPT-2, Llama 3 and Qwen2 all tokenize with byte-level BPE: every string encodes (no unknown token) and decodes
back exactly, which a language model needs since it predicts the text itself. Documents are separated by
``<|endoftext|>`` (GPT-2's convention, also the BOS token); padding has its own ``<|pad|>`` token, so a pad
is never mistaken for a real end of text.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

EOS = "<|endoftext|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [EOS, PAD]


def train_byte_bpe(texts: Iterable[str], vocab_size: int, model_max_length: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (GPT-2 style, no lower-casing) on ``texts``.

    Args:
        texts: the training texts (an iterator is fine; it is read once).
        vocab_size: upper bound on the vocabulary, the 256 byte symbols and specials included.
        model_max_length: the longest sequence the model accepts.

    >>> tok = train_byte_bpe(["a good film", "a dull film"] * 10, 300, 64)
    >>> tok.decode(tok("A good FILM!")["input_ids"])
    'A good FILM!'
    >>> (tok.eos_token, tok.bos_token, tok.pad_token)
    ('<|endoftext|>', '<|endoftext|>', '<|pad|>')
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)  # adds no special tokens: docs get EOS later
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is ever unknown
        min_frequency=2,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=model_max_length,
    )
