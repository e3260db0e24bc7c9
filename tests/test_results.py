import json

import pytest

from ftprof.results import SCHEMA, Record, ResultsError, append_record, read_records
from ftprof.sweep_plan import Point


def rec(batch=8, status="ok", peak=2**30):
    return Record(Point("fp32", 2, 1, 1, 128, batch), status, "tiny-bert", peak, {"samples_per_s": 10.0 * batch})


def test_round_trip_and_pandas_friendly(tmp_path):
    path = tmp_path / "p" / "results.jsonl"
    append_record(path, rec(8))
    append_record(path, rec(16, "oom", None))
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [x["schema"] for x in lines] == [SCHEMA, SCHEMA]
    assert lines[1]["key"] == "fp32-z2-w1-ga1-s128-b16" and lines[1]["effective_batch"] == 16
    back = read_records(path)
    assert [(r.point, r.status, r.peak_bytes) for r in back] == [(rec(8).point, "ok", 2**30), (rec(16).point, "oom", None)]
    import pandas as pd

    assert list(pd.read_json(path, lines=True)["batch_size"]) == [8, 16]


def test_torn_last_line_is_ignored(tmp_path):
    path = tmp_path / "results.jsonl"
    append_record(path, rec(8))
    with open(path, "a") as f:
        f.write('{"schema": "ftprof.sweep/1", "key": "fp3')  # killed mid-write
    assert len(read_records(path)) == 1


@pytest.mark.parametrize("content, message", [
    ('{"schema": "ftprof.sweep/1"\n{"a": 1}\n', r"results.jsonl:1 is not valid JSON"),
    ('{"schema": "other/2", "key": "x"}\n', r"has schema 'other/2', expected 'ftprof.sweep/1'"),
    ('[1, 2]\n', r"has schema 'list'"),
    ('{"schema": "ftprof.sweep/1", "key": "x"}\n', r"lacks field"),
])
def test_corrupt_or_foreign_files_are_refused(tmp_path, content, message):
    path = tmp_path / "results.jsonl"
    path.write_text(content)
    with pytest.raises(ResultsError, match=message):
        read_records(path)
    assert path.read_text() == content  # untouched
