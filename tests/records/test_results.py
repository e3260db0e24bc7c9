import json
from pathlib import Path

import pytest

from ftprof.errors import ConfigError
from ftprof.point import LoraOptions, Point
from ftprof.records.profile import Profile, RankProfile
from ftprof.records.results import (
    RESULTS,
    SCHEMA,
    Record,
    ResultsError,
    RunFacts,
    append_record,
    latest,
    read_records,
    results_path,
)

ROOT = Path(__file__).resolve().parents[2]


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
    assert lines[1]["key"] == "fp32-z2-w1-ga1-s128-b16"
    assert lines[1]["effective_batch"] == 16
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
    ("content", "message"),
    [
        ('{"schema": "ftprof.sweep/2"\n{"a": 1}\n', r"results.jsonl:1 is not valid JSON"),
        ('{"schema": "other/2", "key": "x"}\n', r"has schema 'other/2', expected 'ftprof.sweep/5'"),
        ("[1, 2]\n", r"has schema 'list'"),
        ('{"schema": "ftprof.sweep/2", "key": "x"}\n', r"lacks field"),
        ('{"schema": "ftprof.sweep/3", "key": "x"}\n', r"lacks field"),
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


# One line as ftprof wrote it before the run's facts were typed: a --parallel point re-measured as a close call,
# its facts and its machine in one flat "env".
SCHEMA_2_LINE = {
    "schema": "ftprof.sweep/2",
    "key": "bf16-z2-w2-ga1-s128-b8",
    "model": "gpt2",
    "precision": "bf16",
    "zero": 2,
    "world_size": 2,
    "grad_accum": 1,
    "seq_len": 128,
    "batch_size": 8,
    "offload": "none",
    "gradient_checkpointing": False,
    "effective_batch": 16,
    "status": "ok",
    "peak_bytes": 3 * 2**30,
    "ds_config": None,
    "predicted_bytes": 2**31,
    "profile": {"sampler": "nvml", "samples_per_s": 40.0, "ranks": []},
    "reason": None,
    "stderr_tail": None,
    "wall_s": 12.5,
    "env": {
        "torch": "2.13.0",
        "device": "NVIDIA H100 80GB HBM3",
        "device_memory_bytes": 80 * 2**30,
        "task": "causal-lm",
        "world_size": 2,
        "worker": "fresh",
        "remeasured": "close call",
        "concurrent_points": 2,
        "cuda_visible_devices": "2,3",
        "peak_figure": "torch_reserved_bytes",
        "slurm_job_id": 4711,
        "slurm_nodes": "gpu[01]",
    },
}


def test_schema_2_env_is_read_into_typed_facts_and_the_machine(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps(SCHEMA_2_LINE) + "\n")
    (r,) = read_records(path)
    assert r.task == "causal-lm"
    assert r.point.world_size == 2
    assert r.run == RunFacts(
        worker="fresh",
        remeasured="close call",
        concurrent_points=2,
        cuda_visible_devices="2,3",
        peak_figure="torch_reserved_bytes",
        slurm_job_id="4711",
        slurm_nodes="gpu[01]",
    )
    assert r.machine == {"torch": "2.13.0", "device": "NVIDIA H100 80GB HBM3", "device_memory_bytes": 80 * 2**30}
    assert (r.device, r.device_memory_bytes) == ("NVIDIA H100 80GB HBM3", 80 * 2**30)
    append_record(path, r)  # written again as schema 3, it reads back the same
    line = json.loads(path.read_text().splitlines()[1])
    assert line["schema"] == SCHEMA == "ftprof.sweep/5"
    assert "env" not in line
    assert line["run"]["remeasured"] == "close call"
    assert line["task"] == "causal-lm"
    assert read_records(path)[1] == r


def test_a_point_without_deepspeed_round_trips_with_its_optim_and_schema_4_reads_as_deepspeed(tmp_path):
    path = tmp_path / "results.jsonl"
    plain = Point(precision="fp32", zero=0, deepspeed=False, seq_len=64, batch_size=4)
    append_record(path, Record(point=plain, status="ok", model="tiny-bert", peak_bytes=5, optim="sgd"))
    line = json.loads(path.read_text())
    assert (line["key"], line["deepspeed"], line["optim"], line["schema"]) == (
        "fp32-znone-w1-ga1-s64-b4",
        False,
        "sgd",
        "ftprof.sweep/5",
    )
    (back,) = read_records(path)
    assert (back.point, back.optim) == (plain, "sgd")
    old = {**line, "schema": "ftprof.sweep/4", "key": "fp32-z0-w1-ga1-s64-b4"}
    del old["deepspeed"], old["optim"]
    path.write_text(json.dumps(old) + "\n")
    (four,) = read_records(path)
    assert (four.point.deepspeed, four.point.key, four.optim) == (True, "fp32-z0-w1-ga1-s64-b4", None)


def test_run_facts_and_machine_round_trip(tmp_path):
    path = tmp_path / "results.jsonl"
    record = rec(8)
    record.task = "causal-lm"
    record.run = RunFacts(worker="fork", remeasured="repeat")
    record.machine = {"device": "cpu (x86_64)", "device_memory_bytes": 25 * 2**30}
    append_record(path, record)
    (back,) = read_records(path)
    assert back == record
    assert (back.run.concurrent_points, back.run.slurm_job_id, back.device) == (1, None, "cpu (x86_64)")


def test_a_lora_point_round_trips_with_its_adapters_and_what_each_rank_trained(tmp_path):
    path = tmp_path / "results.jsonl"
    point = Point(precision="bf16", zero=3, world_size=2, seq_len=64, batch_size=4, peft="lora", lora_r=16)
    ranks = [
        RankProfile(rank=r, trainable_parameters=3584, frozen_parameters=90_000, adapted_modules=["l.0.q_proj"])
        for r in (0, 1)
    ]
    record = Record(
        point=point,
        status="ok",
        model="tiny-llama",
        task="causal-lm",
        peak_bytes=1,
        profile=Profile(sampler="rss", ranks=ranks),
        lora=LoraOptions(alpha=8, dropout=0.0, target_modules="attention,mlp"),
    )
    append_record(path, record)
    (back,) = read_records(path)
    assert back == record
    assert back.point.key.endswith("-lora_r16")
    line = json.loads(path.read_text())
    assert (line["peft"], line["lora_r"], line["lora"]["target_modules"]) == ("lora", 16, "attention,mlp")
    # Full fine-tuning: no adapters; a record written before the peft axis reads as full fine-tuning.
    del line["peft"], line["lora_r"], line["lora"]
    old = Record.from_json({**line, "schema": "ftprof.sweep/3"})
    assert (old.point.peft, old.point.lora_r, old.lora) == ("none", 0, None)


@pytest.mark.parametrize(
    ("point", "message"),
    [
        ({"peft": "lora"}, "--peft lora with --lora_r 0: LoRA takes a rank"),
        ({"lora_r": 8}, "--peft none with --lora_r 8"),
        ({"peft": "prefix", "lora_r": 8}, "--peft 'prefix': use none or lora"),
    ],
)
def test_a_point_with_adapters_that_do_not_add_up_is_refused(point, message):
    with pytest.raises(ConfigError, match=message):
        Point(precision="fp32", zero=0, seq_len=8, batch_size=1, **point)


@pytest.mark.parametrize(
    ("run", "message"),
    [
        ({"worker": "fork", "gpu_count": 2}, r"results.jsonl:1: unknown run facts \['gpu_count'\]"),
        ({"remeasured": "bored"}, r"remeasured 'bored' is none of \['contended', 'repeat', 'close call'\]"),
        ({"worker": "spawn"}, r"results.jsonl:1: worker 'spawn' is none of \['fork', 'fresh'\]"),
    ],
)
def test_unknown_run_facts_are_refused_by_name(tmp_path, run, message):
    line = {**rec(8).to_json(), "run": run}
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps(line) + "\n")
    with pytest.raises(ResultsError, match=message):
        read_records(path)


def test_results_path_takes_a_folder_or_its_file(tmp_path):
    assert results_path(tmp_path) == tmp_path / RESULTS == results_path(tmp_path / "results.jsonl")
    assert results_path(str(tmp_path / "other.jsonl")) == tmp_path / "other.jsonl"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        (
            "status",
            "napping",
            r"results.jsonl:2: status 'napping' is none of \['ok', 'oom', 'error', 'timeout', 'skipped', "
            r"'over_budget'\]; the file is corrupt",
        ),
        ("task", "translation", r"results.jsonl:2: task 'translation' is none of \['classification', 'causal-lm'\]"),
    ],
)
def test_a_status_or_task_of_no_known_value_is_refused_by_line_and_field(tmp_path, field, value, message):
    path = tmp_path / "results.jsonl"
    append_record(path, rec(8))
    path.write_text(path.read_text() + json.dumps({**rec(16).to_json(), field: value}) + "\n")
    with pytest.raises(ResultsError, match=message):
        read_records(path)


def test_an_old_schema_task_of_no_known_value_is_refused(tmp_path):
    line = {**rec(8).to_json(), "schema": "ftprof.sweep/2", "env": {"task": "translation", "worker": "fork"}}
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps(line) + "\n")
    with pytest.raises(ResultsError, match=r"results.jsonl:1: task 'translation' is none of"):
        read_records(path)


@pytest.mark.parametrize(
    ("model", "points", "run", "memory"),
    [
        ("tiny-bert", 12, RunFacts(), 25276502016),  # one point at a time, nothing re-measured
        ("tiny-gpt2", 12, RunFacts(), 25276502016),
        ("tiny-distilbert", 12, RunFacts(worker="fork"), 25276194816),  # forked from the pre-imported worker
    ],
)
def test_the_committed_schema_2_sweeps_still_load(model, points, run, memory):
    records = read_records(results_path(ROOT / "profiles" / f"cpu-2core-{model}"))
    assert {json.loads(x)["schema"] for x in (ROOT / "profiles" / f"cpu-2core-{model}" / RESULTS).open()} == {
        "ftprof.sweep/2"
    }
    assert len(latest(records)) == points
    assert {r.task for r in records} == {"classification"}
    assert all(r.run == run for r in records)
    assert {r.device for r in records} == {"cpu (x86_64)"}
    assert {r.device_memory_bytes for r in records} == {memory}
    assert "world_size" not in records[0].machine
    assert "task" not in records[0].machine
