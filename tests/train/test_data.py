import json

import pandas as pd
import pytest

from ftprof.errors import DataError
from ftprof.train.data import load_raw, prepare_task, tokenize
from ftprof.train.synthetic import NEGATIVE, POSITIVE, synthetic_dataset

ROWS = [{"sentence": f'a "quoted" line number {i}, with a comma', "label": i % 2} for i in range(20)]


def write_rows(path, rows):
    suffix = path.suffix
    if suffix == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    elif suffix == ".tsv":  # GLUE style: header, tab separated, fields not quoted
        path.write_text("label\tsentence\n" + "".join(f"{r['label']}\t{r['sentence']}\n" for r in rows))
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == ".parquet":
        pd.DataFrame(rows).to_parquet(path)
    return path


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".json", ".jsonl", ".parquet"])
def test_every_format_loads_with_text_intact(tmp_path, suffix):
    raw = load_raw(str(write_rows(tmp_path / f"train{suffix}", ROWS)))
    assert list(raw) == ["train"]
    assert raw["train"]["sentence"] == [r["sentence"] for r in ROWS]
    assert raw["train"]["label"] == [r["label"] for r in ROWS]


def test_folder_splits_by_file_name(tmp_path):
    write_rows(tmp_path / "train.tsv", ROWS)
    write_rows(tmp_path / "dev.tsv", ROWS[:6])
    write_rows(tmp_path / "test.tsv", ROWS[:4])
    raw = load_raw(str(tmp_path))
    assert {k: len(v) for k, v in raw.items()} == {"train": 20, "validation": 6, "test": 4}
    task = prepare_task(raw, None, None)
    assert (task.text_column, task.label_column, len(task.eval)) == ("sentence", "label", 6)
    assert task.label_names == ["0", "1"]


def test_no_eval_split_holds_out_ten_percent(tmp_path):
    task = prepare_task(load_raw(str(write_rows(tmp_path / "all.csv", ROWS))), None, None, seed=1)
    assert (len(task.train), len(task.eval)) == (18, 2)


def test_mixed_formats_rejected(tmp_path):
    write_rows(tmp_path / "train.csv", ROWS)
    write_rows(tmp_path / "dev.json", ROWS)
    with pytest.raises(DataError, match="one format"):
        load_raw(str(tmp_path))


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_raw(str(tmp_path / "missing.csv"))
    with pytest.raises(DataError, match="no .* files in it"):
        load_raw(str(tmp_path))


def test_unreachable_hub_dataset_is_one_clear_error():
    with pytest.raises(DataError, match="can't be loaded from the Hugging Face Hub.*--dataset synthetic"):
        load_raw("imdb")


def test_column_detection_falls_back_to_only_string_column(tmp_path):
    rows = [{"review_body": f"text {i}", "stars": i % 3, "sentiment": i % 2} for i in range(10)]
    task = prepare_task(load_raw(str(write_rows(tmp_path / "train.jsonl", rows))), None, None)
    assert (task.text_column, task.label_column) == ("review_body", "sentiment")


def test_explicit_columns(tmp_path):
    rows = [{"body": f"text {i}", "title": "t", "stars": i % 3} for i in range(10)]
    task = prepare_task(load_raw(str(write_rows(tmp_path / "train.jsonl", rows))), "body", "stars")
    assert task.label_names == ["0", "1", "2"]


@pytest.mark.parametrize(
    ("rows", "text_col", "label_col", "message"),
    [
        ([{"sentence": "x", "score": 1}] * 4, None, None, "which column holds the labels.*--label_column"),
        ([{"sentence": "x", "label": 1}] * 4, None, "stars", "--label_column 'stars' is not a column"),
        ([{"a": "x", "b": "y", "label": 1}] * 4, None, None, "which column holds the text.*--text_column"),
        ([{"sentence": "x", "label": "pos"}] * 4, None, None, "must be integers 0..K-1, got text values like 'pos'"),
        ([{"sentence": "x", "label": 0.5}] * 4, None, None, "must be integers 0..K-1, got float64 values like 0.5"),
        ([{"sentence": "x", "label": -1}] * 4, None, None, "must be integers 0..K-1, found -1"),
    ],
)
def test_bad_columns_and_labels(tmp_path, rows, text_col, label_col, message):
    raw = load_raw(str(write_rows(tmp_path / "train.jsonl", rows)))
    with pytest.raises(DataError, match=message):
        prepare_task(raw, text_col, label_col)


def test_empty_dataset(tmp_path):
    (tmp_path / "train.csv").write_text("sentence,label\n")
    write_rows(tmp_path / "dev.csv", ROWS)
    with pytest.raises(DataError, match="train split is empty"):
        prepare_task(load_raw(str(tmp_path)), None, None)


def row_numbers(split) -> list[int]:
    """The ``i`` of each ROWS sentence in ``split``, in order."""
    return [int(s.split("number ")[1].split(",")[0]) for s in split["sentence"]]


def test_max_samples_take_a_seeded_random_subset(tmp_path):
    raw = load_raw(str(write_rows(tmp_path / "train.jsonl", ROWS)))
    a = prepare_task(raw, None, None, seed=3, max_train_samples=5, max_eval_samples=1)
    b = prepare_task(raw, None, None, seed=3, max_train_samples=5, max_eval_samples=1)
    whole = prepare_task(raw, None, None, seed=3)  # 18 train rows, 2 held out for eval (no dev file)
    assert row_numbers(a.train) == row_numbers(b.train) == [7, 14, 19, 2, 13]  # the seed decides, runs agree
    assert row_numbers(a.eval) == [12]
    # Drawn from the whole split, not its first rows, and never from the held-out eval rows.
    assert row_numbers(whole.train)[:5] == [18, 8, 3, 13, 15]
    assert set(row_numbers(a.train)) < set(row_numbers(whole.train))
    assert a.train["label"] == [i % 2 for i in row_numbers(a.train)]  # rows keep their own labels
    other = prepare_task(raw, None, None, seed=4, max_train_samples=5)
    assert row_numbers(other.train) == [8, 16, 15, 12, 9]


def test_synthetic_task_is_learnable_and_balanced():
    ds = synthetic_dataset(n_train=400, n_eval=100, seed=0)
    pos, neg = set(POSITIVE), set(NEGATIVE)
    for split in ds.values():
        counted = [int(sum(w in pos for w in t.split()) > sum(w in neg for w in t.split())) for t in split["text"]]
        assert counted == split["label"]  # the label is recoverable from the words: a model can learn it
        assert 0.4 < sum(split["label"]) / len(split) < 0.6
    assert synthetic_dataset(seed=0)["train"]["text"][:5] == synthetic_dataset(seed=0)["train"]["text"][:5]


def test_tokenize_truncates_without_padding(tmp_path):
    from ftprof.train.wordpiece_tokenizer import train_wordpiece

    task = prepare_task(synthetic_dataset(n_train=200, n_eval=50), None, None)
    tok = train_wordpiece(task.train["text"], 500, 512)
    train, evaluation = tokenize(task, tok, max_length=12, with_length=True)
    lengths = [len(ids) for ids in train["input_ids"]]
    assert max(lengths) == 12
    assert min(lengths) < 12
    assert train["length"] == lengths
    assert train["labels"] == task.train["label"]
    assert set(evaluation.column_names) >= {"input_ids", "attention_mask", "labels"}


def test_tsv_keeps_quotes_literal(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text('label\tsentence\n1\t"the " best " film\n0\tit \'s dull\n')
    raw = load_raw(str(path))
    assert raw["train"]["sentence"] == ['"the " best " film', "it 's dull"]
