import json

import pytest

from ftprof.point import Point
from ftprof.records.profile import Profile
from ftprof.records.results import SCHEMA, Record, ResultsError, append_record, read_records


def rec(batch=8, status="ok", peak=2**30):
    point = Point(precision="fp32", zero=2, world_size=1, grad_accum=1, seq_len=128, batch_size=batch)
    profile = Profile(sampler="rss", samples_per_s=10.0 * batch) if status == "ok" else None
    return Record(point=point, status=status, model="tiny-bert", peak_bytes=peak, profile=profile)


def test_round_trip_and_pandas_friendly(tmp_path):
    path = tmp_path / "p" / "results.jsonl"
    append_record(path, rec(8))
    append_record(path, rec(16, "oom", None))
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [x["schema"] for x in lines] == [SCHEMA, SCHEMA]
    assert lines[1]["key"] == "fp32-z2-w1-ga1-s128-b16" and lines[1]["effective_batch"] == 16
    back = read_records(path)
    assert [(r.point, r.status, r.peak_bytes) for r in back] == [
        (rec(8).point, "ok", 2**30),
        (rec(16).point, "oom", None),
    ]
    import pandas as pd

    assert list(pd.read_json(path, lines=True)["batch_size"]) == [8, 16]


def test_torn_last_line_is_ignored(tmp_path):
    path = tmp_path / "results.jsonl"
    append_record(path, rec(8))
    with open(path, "a") as f:
        f.write('{"schema": "ftprof.sweep/2", "key": "fp3')  # killed mid-write
    assert len(read_records(path)) == 1


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"schema": "ftprof.sweep/2"\n{"a": 1}\n', r"results.jsonl:1 is not valid JSON"),
        ('{"schema": "other/2", "key": "x"}\n', r"has schema 'other/2', expected 'ftprof.sweep/2'"),
        ("[1, 2]\n", r"has schema 'list'"),
        ('{"schema": "ftprof.sweep/2", "key": "x"}\n', r"lacks field"),
    ],
)
def test_corrupt_or_foreign_files_are_refused(tmp_path, content, message):
    path = tmp_path / "results.jsonl"
    path.write_text(content)
    with pytest.raises(ResultsError, match=message):
        read_records(path)
    assert path.read_text() == content  # untouched


def test_append_after_a_torn_line_repairs_the_file_first(tmp_path):
    path = tmp_path / "results.jsonl"
    append_record(path, rec(8))
    with open(path, "a") as f:
        f.write('{"schema": "ftprof.sweep/2", "key": "fp3')  # killed mid-write
    append_record(path, rec(16))  # the resumed sweep appends its next point
    assert [r.point.batch_size for r in read_records(path)] == [8, 16]
    assert path.read_text().count("\n") == 2


def test_old_schema_records_are_read(tmp_path):
    path = tmp_path / "results.jsonl"
    old = {
        "schema": "ftprof.sweep/1",
        "key": "fp32-z2-w1-ga1-s128-b8",
        "model": "tiny-bert",
        "precision": "fp32",
        "zero": 2,
        "world_size": 1,
        "grad_accum": 1,
        "seq_len": 128,
        "batch_size": 8,
        "status": "ok",
        "peak_bytes": 5,
        "metrics": {
            "sampler": "rss",
            "samples_per_s": 12.5,
            "predicted_bytes": 7,
            "peak_rss_bytes": 5,
            "ranks": [{"rank": 0, "phases": {"steady": {"rss_bytes": 5}}}],
        },
    }
    path.write_text(json.dumps(old) + "\n")
    (r,) = read_records(path)
    assert (r.samples_per_s, r.predicted_bytes, r.profile.peak()) == (12.5, 7, 5)
