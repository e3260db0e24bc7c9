"""Load a text-classification dataset (Hub name, local file or folder, or ``synthetic``) and tokenize it.

Everything that can be wrong with the data (missing columns, non-integer labels, empty splits) is found
here, before a model is built. Loading and split selection are shared with ``--task causal-lm``
(:mod:`ftprof.train.causal_lm_data`), which needs texts only.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from datasets import ClassLabel, Dataset, DatasetDict, Value, load_dataset

from ftprof.errors import DataError
from ftprof.train.synthetic import synthetic_dataset

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

# Suffix → (datasets builder, extra loader arguments). TSV fields are not quoted in GLUE-style files.
FORMATS: dict[str, tuple[str, dict]] = {
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"delimiter": "\t", "quoting": csv.QUOTE_NONE}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
    ".txt": ("text", {}),  # one document per line, in a column named "text"
}
SPLIT_NAMES = {
    "train": ("train",),
    "validation": ("validation", "valid", "val", "dev", "eval"),
    "test": ("test",),
}
TEXT_COLUMNS = ("text", "sentence", "review", "content", "document", "utterance")
LABEL_COLUMNS = ("label", "labels", "sentiment", "target", "class", "y")
EVAL_SPLITS = ("validation", "test")  # taken in this order when the data has no explicit eval file


@dataclass
class TaskData:
    """Train/eval splits with known text and label columns."""

    train: Dataset
    eval: Dataset
    text_column: str
    label_column: str
    label_names: list[str]


def load_raw(name: str, seed: int = 42) -> DatasetDict:
    """Load ``name`` as a DatasetDict: ``synthetic``, a local file/folder, or a Hub dataset.

    Raises:
        DataError: the path has no supported files, or the Hub dataset can't be fetched.
    """
    if name == "synthetic":
        return synthetic_dataset(seed=seed)
    path = Path(name).expanduser()
    if path.exists():
        return _load_local(path)
    if name.startswith((".", "/", "~")) or path.suffix in FORMATS:
        raise DataError(f"--dataset {name!r}: no such file or folder")
    try:
        loaded = load_dataset(name)
    except Exception as err:  # datasets raises many types (ConnectionError, FileNotFoundError, ...)
        raise DataError(
            f"--dataset {name!r} can't be loaded from the Hugging Face Hub ({type(err).__name__}); pass a "
            "local file or folder (--dataset data/train.csv) or --dataset synthetic"
        ) from None
    if not isinstance(loaded, DatasetDict):
        raise DataError(f"--dataset {name!r} loaded as {type(loaded).__name__}, expected named splits")
    return loaded


def _split_of(file: Path) -> str | None:
    stem = file.name.split(".")[0].lower()
    for split, prefixes in SPLIT_NAMES.items():
        if any(stem == p or stem.startswith(p + "_") or stem.startswith(p + "-") for p in prefixes):
            return split
    return None


def _load_local(path: Path) -> DatasetDict:
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix.lower() in FORMATS)
    if not files:
        raise DataError(f"--dataset {str(path)!r}: no {'/'.join(FORMATS)} files in it")
    suffixes = {f.suffix.lower() for f in files}
    if len(suffixes) > 1 or files[0].suffix.lower() not in FORMATS:
        raise DataError(
            f"--dataset {str(path)!r}: expected files of one format among {', '.join(FORMATS)}, "
            f"found {', '.join(sorted(suffixes))}"
        )
    builder, kwargs = FORMATS[files[0].suffix.lower()]
    data_files: dict[str, list[str]] = {}
    if path.is_file():
        data_files = {"train": [str(path)]}
    else:
        for f in files:
            data_files.setdefault(_split_of(f) or "train", []).append(str(f))
    try:
        return load_dataset(builder, data_files=data_files, **kwargs)
    except Exception as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        if "corresponds to no data" in message:  # datasets' wording for a split with no rows
            empty = message.split('"')[1] if '"' in message else "a"
            raise DataError(f"--dataset {str(path)!r}: the {empty} split is empty; check the file") from None
        raise DataError(f"--dataset {str(path)!r} can't be parsed as {builder}: {message}") from None


def detect_column(ds: Dataset, candidates: tuple[str, ...], flag: str, want_text: bool) -> str:
    """The first of ``candidates`` among ``ds``'s columns, else the only string column (for text)."""
    for name in candidates:
        if name in ds.column_names:
            return name
    if want_text:
        strings = [c for c, f in ds.features.items() if isinstance(f, Value) and f.dtype in ("string", "large_string")]
        if len(strings) == 1:
            return strings[0]
    raise DataError(
        f"can't tell which column holds the {'text' if want_text else 'labels'} among "
        f"{ds.column_names}; pass {flag} NAME"
    )


def prepare_task(
    raw: DatasetDict,
    text_column: str | None,
    label_column: str | None,
    seed: int = 42,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
) -> TaskData:
    """Pick splits and columns, check the labels, and subsample.

    ``max_*_samples`` take a seeded random subset, since local files are often sorted (by label, by
    length) and their first rows are not representative.

    Raises:
        DataError: a column is missing, labels aren't non-negative integers, or a split is empty.
    """
    train, evaluation = split_train_eval(raw, seed)
    text_column = text_column or detect_column(train, TEXT_COLUMNS, "--text_column", want_text=True)
    label_column = label_column or detect_column(train, LABEL_COLUMNS, "--label_column", want_text=False)
    label_names = None
    for split_name, ds in (("train", train), ("eval", evaluation)):
        for column, flag in ((text_column, "--text_column"), (label_column, "--label_column")):
            if column not in ds.column_names:
                raise DataError(
                    f"{flag} {column!r} is not a column of the {split_name} split (columns: {ds.column_names})"
                )
        if len(ds) == 0:
            raise DataError(f"the {split_name} split is empty; check the file or --dataset")
        names = _label_names(ds, label_column, split_name)
        label_names = names if label_names is None or len(names) > len(label_names) else label_names
    assert label_names is not None
    train, evaluation = subsample(train, max_train_samples, seed), subsample(evaluation, max_eval_samples, seed)
    return TaskData(train, evaluation, text_column, label_column, label_names)


def split_train_eval(raw: DatasetDict, seed: int = 42) -> tuple[Dataset, Dataset]:
    """The train split, and the eval split: ``validation``, else ``test``, else 10% of train held out.

    Raises:
        DataError: there is no train split, or too few rows to hold one out.
    """
    if "train" not in raw:
        raise DataError(f"the dataset has no train split (splits: {list(raw)}); name a file train.csv or similar")
    train = raw["train"]
    eval_name = next((s for s in EVAL_SPLITS if s in raw and len(raw[s]) > 0), None)
    if eval_name is not None:
        return train, raw[eval_name]
    logger.warning("no validation split; holding out 10% of train for evaluation")
    if len(train) < 2:
        raise DataError(f"the train split has {len(train)} rows; it needs at least 2 to hold out an eval split")
    parts = train.train_test_split(test_size=0.1, seed=seed)
    return parts["train"], parts["test"]


def subsample(ds: Dataset, n: int | None, seed: int) -> Dataset:
    """A seeded random subset of ``n`` rows (all of ``ds`` when ``n`` is None or larger).

    Random, not the first rows: local files are often sorted (by label, by length).
    """
    if n is None:
        return ds
    return ds.shuffle(seed=seed).select(range(min(n, len(ds))))


def _label_names(ds: Dataset, column: str, split_name: str) -> list[str]:
    feature = ds.features[column]
    if isinstance(feature, ClassLabel):
        labels = [y for y in ds.unique(column) if y is not None]
        if any(y < 0 for y in labels):  # -1 marks unlabelled rows, as in GLUE test splits
            raise DataError(
                f"the {split_name} split has unlabelled rows (label -1 in {column!r}); use a labelled split"
            )
        return list(feature.names)
    if not (isinstance(feature, Value) and feature.dtype.startswith(("int", "uint"))):
        kind = feature.dtype if isinstance(feature, Value) else type(feature).__name__
        kind = "text" if kind in ("string", "large_string") else kind
        example = next((y for y in ds[column][:100] if y is not None), None)
        raise DataError(
            f"labels in {column!r} ({split_name} split) must be integers 0..K-1, got {kind} values "
            f"like {example!r}; map them to integers or pass --label_column"
        )
    labels = ds.unique(column)
    if None in labels or min(labels) < 0:
        raise DataError(
            f"labels in {column!r} ({split_name} split) must be integers 0..K-1, "
            f"found {'missing values' if None in labels else min(labels)}"
        )
    return [str(i) for i in range(max(labels) + 1)]


def tokenize(
    task: TaskData, tokenizer: PreTrainedTokenizerBase, max_length: int, with_length: bool = False
) -> tuple[Dataset, Dataset]:
    """Tokenize both splits with truncation and no padding (the collator pads each batch to its longest).

    The ``datasets`` cache keys the result on the tokenizer and arguments, so a rerun skips this step.
    With ``with_length`` a ``length`` column feeds ``--group_by_length``.
    """

    def encode(batch: dict) -> dict:
        texts = [t if t is not None else "" for t in batch[task.text_column]]
        enc = tokenizer(texts, truncation=True, max_length=max_length)
        if with_length:
            enc["length"] = [len(ids) for ids in enc["input_ids"]]
        enc["labels"] = batch[task.label_column]
        return enc

    out = []
    for split in (task.train, task.eval):
        out.append(split.map(encode, batched=True, remove_columns=split.column_names, desc="Tokenizing"))
    return out[0], out[1]
