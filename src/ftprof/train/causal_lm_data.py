"""Plain text for ``--task causal-lm``: documents → token ids → packed blocks (or padded documents) → batches.

Packing is the default: documents are tokenized whole, joined with an end-of-text token between them, and
cut into blocks of exactly ``--max_length`` tokens (Hugging Face's ``run_clm`` ``group_texts``, done over the
whole split so only the split's last partial block is dropped). Why packing:

- no pad tokens: every position of every batch is a real token the model learns from, so a step costs what
  it teaches (padding SST-2's sentences to a batch's longest makes 57% of a batch of 8 pads, 68% at 32);
- fixed shapes: every batch is ``batch × max_length``, so memory and step time don't depend on which
  documents a batch drew (a memory profile measured on it holds for the whole run), and no attention mask
  is needed (SDPA's causal fast path);
- long documents are not cut: a document longer than a block continues in the next one.

The price: a block can start mid-document, and tokens attend across the end-of-text separator to the
previous document (the EOS token tells the model a new one begins; standard for pre-training and for
fine-tuning on plain text). ``--packing false`` keeps one document per row instead (truncated to
``--max_length``), padded per batch to its longest, with ``attention_mask`` 0 and labels -100 on the pads:
use it when documents must not see each other, e.g. evaluating each one on its own.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from datasets import Dataset, DatasetDict

from ftprof.errors import DataError, ModelError
from ftprof.train.data import TEXT_COLUMNS, detect_column, split_train_eval, subsample

logger = logging.getLogger(__name__)
IGNORE_INDEX = -100  # label value that torch's cross-entropy (and every HF causal-LM loss) skips


@dataclass
class Corpus:
    """Train/eval splits of documents in ``text_column`` (other columns, labels included, are ignored)."""

    train: Dataset
    eval: Dataset
    text_column: str


def prepare_corpus(
    raw: DatasetDict,
    text_column: str | None,
    seed: int = 42,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
) -> Corpus:
    """Pick splits and the text column, and subsample (``max_*_samples`` count documents, before packing).

    Raises:
        DataError: no train split, the text column is missing or can't be detected, or a split is empty.
    """
    train, evaluation = split_train_eval(raw, seed)
    text_column = text_column or detect_column(train, TEXT_COLUMNS, "--text_column", want_text=True)
    for split_name, ds in (("train", train), ("eval", evaluation)):
        if text_column not in ds.column_names:
            raise DataError(
                f"--text_column {text_column!r} is not a column of the {split_name} split (columns: {ds.column_names})"
            )
        if len(ds) == 0:
            raise DataError(f"the {split_name} split is empty; check the file or --dataset")
    train, evaluation = subsample(train, max_train_samples, seed), subsample(evaluation, max_eval_samples, seed)
    return Corpus(train, evaluation, text_column)


def end_of_text_id(tokenizer: Any) -> int:
    """The token that ends a document: EOS, else SEP (BERT-style vocabularies).

    Raises:
        ModelError: the tokenizer has neither.
    """
    for token_id in (tokenizer.eos_token_id, getattr(tokenizer, "sep_token_id", None)):
        if token_id is not None:
            return int(token_id)
    raise ModelError(
        f"the tokenizer ({type(tokenizer).__name__}) has no end-of-text (EOS) token to separate documents; "
        "use a decoder's tokenizer"
    )


def tokenize_documents(
    split: Dataset, text_column: str, tokenizer: Any, max_length: int | None = None, with_length: bool = False
) -> Dataset:
    """One row of ``input_ids`` per non-empty document, ending with the end-of-text token.

    The tokenizer adds its own specials (Llama's BOS, none for GPT-2); EOS is appended unless the tokenizer
    already ends documents with it. ``max_length`` truncates (padding mode: a cut document keeps its first
    tokens and has no EOS, as it did not end); packing passes None. Empty and blank texts are skipped.
    """
    eos = end_of_text_id(tokenizer)

    def encode(batch: dict) -> dict:
        texts = [t for t in batch[text_column] if t is not None and t.strip()]
        # verbose=False: documents longer than the model's limit are expected here; packing splits them.
        encoded = tokenizer(texts, verbose=False)["input_ids"] if texts else []
        ids = [x if x and x[-1] == eos else [*x, eos] for x in encoded]
        if max_length is not None:
            ids = [x[:max_length] for x in ids]
        out: dict[str, list] = {"input_ids": ids}
        if with_length:
            out["length"] = [len(x) for x in ids]
        return out

    return split.map(encode, batched=True, remove_columns=split.column_names, desc="Tokenizing")


def pack(docs: Dataset, block_size: int) -> Dataset:
    """Concatenate ``docs``' token ids in order and cut them into rows of exactly ``block_size`` tokens.

    Only the last ``len(all tokens) % block_size`` tokens are dropped. Runs on the Arrow buffers (a few
    bytes per token, no Python list per token), so a split of hundreds of millions of tokens packs in seconds.

    >>> blocks = pack(Dataset.from_dict({"input_ids": [[1, 2, 0], [3, 0], [4, 5, 6, 0]]}), 4)
    >>> blocks[:]["input_ids"]
    [[1, 2, 0, 3], [0, 4, 5, 6]]
    """
    table = docs.with_format("arrow")[:]  # honours an indices mapping (select, shuffle)
    chunks = [chunk.flatten().to_numpy(zero_copy_only=False) for chunk in table.column("input_ids").chunks]
    flat = np.concatenate(chunks) if chunks else np.empty(0, dtype=np.int32)
    n_blocks = len(flat) // block_size
    return Dataset.from_dict({"input_ids": flat[: n_blocks * block_size].reshape(n_blocks, block_size)})


def lm_datasets(
    corpus: Corpus, tokenizer: Any, max_length: int, packing: bool = True, with_length: bool = False
) -> tuple[Dataset, Dataset]:
    """Train and eval datasets of ``input_ids``: packed blocks of ``max_length``, or one document per row.

    Raises:
        DataError: a split has no tokens, or (packing) fewer than one block of them.
    """
    out = []
    for name, split in (("train", corpus.train), ("eval", corpus.eval)):
        docs = tokenize_documents(
            split, corpus.text_column, tokenizer, None if packing else max_length, with_length and not packing
        )
        if len(docs) == 0:
            raise DataError(f"the {name} split has no text in {corpus.text_column!r} (every row is empty)")
        if not packing:
            out.append(docs)
            continue
        blocks = pack(docs, max_length)
        if len(blocks) == 0:
            tokens = sum(len(ids) for ids in docs["input_ids"])
            raise DataError(
                f"the {name} split has {tokens} tokens, less than one block of --max_length {max_length}; "
                "lower --max_length, add data, or pass --packing false"
            )
        out.append(blocks)
    return out[0], out[1]


@dataclass
class CausalLMCollator:
    """Batches for a causal LM: ``labels`` are the ``input_ids`` (the model shifts them), -100 on padding.

    Packed blocks all have the same length, so nothing is padded and no ``attention_mask`` is sent. Documents
    (``--packing false``) are right-padded to the batch's longest (rounded up to ``pad_to_multiple_of``); pads
    are found by position, not by id, so a tokenizer whose pad token is its EOS (GPT-2) still learns EOS.

    >>> batch = CausalLMCollator(pad_token_id=0)([{"input_ids": [5, 6, 7]}, {"input_ids": [8]}])
    >>> batch["labels"].tolist(), batch["attention_mask"].tolist()
    ([[5, 6, 7], [8, -100, -100]], [[1, 1, 1], [1, 0, 0]])
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        lengths = [len(row["input_ids"]) for row in rows]
        width = max(lengths)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (row, n) in enumerate(zip(rows, lengths, strict=True)):
            ids = torch.as_tensor(row["input_ids"], dtype=torch.long)
            input_ids[i, :n], labels[i, :n], attention_mask[i, :n] = ids, ids, 1
        batch = {"input_ids": input_ids, "labels": labels}
        if min(lengths) < width:
            batch["attention_mask"] = attention_mask
        return batch
