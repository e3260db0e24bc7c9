"""Memory records (``sweep --memory_snapshot``) inside a plain HF Trainer on the CPU: the profiled step comes
after the measured window and is neither timed nor counted; its memory timeline is really written."""

import json

import pytest
import torch

from ftprof.profiler import ProfilerCallback
from ftprof.profiler.memory_records import MemoryRecorder
from tests.profiler.test_callback import make_trainer


def test_step_after_the_window_is_profiled_not_measured(tmp_path):
    trainer = make_trainer(tmp_path / "run")  # batch 4, lengths 10 and 30: 120 padded tokens per step
    recorder = MemoryRecorder(tmp_path / "snapshots", "point-rank0", cuda=False)
    recorder.start()
    profiler = ProfilerCallback(warmup_steps=2, min_steps=3, memory_recorder=recorder)
    trainer.add_callback(profiler)
    trainer.train()
    assert trainer.state.global_step == 6  # 2 warm-up + 3 measured + the profiled one (max_steps 6)
    s = profiler.profile.to_json()
    assert s["steady_steps"] == 3
    assert s["samples_per_step"] == 4
    assert s["padded_tokens_per_s"] * s["window_s"] == pytest.approx(3 * 120)
    rank = s["ranks"][0]
    names = sorted(p.rsplit("/", 1)[-1] for p in rank["memory_files"])
    assert names == ["point-rank0-timeline.html", "point-rank0-timeline.json"]
    assert rank["memory_notes"] == []
    html = (tmp_path / "snapshots" / "point-rank0-timeline.html").read_text()
    assert "data:image/png;base64," in html
    times, sizes = json.loads((tmp_path / "snapshots" / "point-rank0-timeline.json").read_text())
    assert len(times) == len(sizes) > 0
    assert max(sum(s) for s in sizes) > 0
    assert not (tmp_path / "snapshots" / "point-rank0.pickle").exists()  # no CUDA allocator here
    assert rank["allocator"] == {}  # CUDA only


def test_training_that_ends_in_the_window_profiles_nothing_and_says_so(tmp_path):
    trainer = make_trainer(tmp_path / "run")  # max_steps 6: no room after a 4-step window
    recorder = MemoryRecorder(tmp_path / "snapshots", "p-rank0", cuda=False)
    recorder.start()
    profiler = ProfilerCallback(warmup_steps=2, min_steps=4, memory_recorder=recorder)
    trainer.add_callback(profiler)
    trainer.train()
    assert profiler.profile.steady_steps == 4
    assert recorder.files == []
    assert list((tmp_path / "snapshots").iterdir()) == []
    assert profiler.profile.ranks[0].memory_notes == [
        "no memory timeline: training ended before a step could be profiled"
    ]


def test_a_failed_timeline_leaves_no_partial_file_and_falls_back_to_the_trace(tmp_path, monkeypatch):
    def fail(self, path, device=None):
        with open(path, "w") as f:
            f.write("partial")
        raise AssertionError("version mismatch: {id=133}\nmore")

    monkeypatch.setattr(torch.profiler.profile, "export_memory_timeline", fail)
    recorder = MemoryRecorder(tmp_path, "p-rank0", cuda=False)
    recorder.start()
    recorder.begin_step()
    torch.ones(64, requires_grad=True).square().sum().backward()
    recorder.end_step()
    assert recorder.finish() == [tmp_path / "p-rank0-trace.json"]
    assert list(tmp_path.iterdir()) == recorder.files
    events = json.loads(recorder.files[0].read_text())["traceEvents"]
    assert any(e.get("name") == "[memory]" and e["args"]["Bytes"] for e in events)  # the step's allocations
    assert recorder.notes == [
        "no memory timeline (cpu): AssertionError: version mismatch: {id=133}; wrote the step's trace with its "
        "memory events instead (p-rank0-trace.json)"
    ]

    monkeypatch.setattr(torch.profiler.profile, "export_chrome_trace", fail)
    recorder = MemoryRecorder(tmp_path / "none", "p-rank0", cuda=False)
    recorder.start()
    recorder.begin_step()
    torch.ones(8).sum()
    recorder.end_step()
    assert recorder.finish() == []
    assert list((tmp_path / "none").iterdir()) == []
    assert recorder.notes[0].endswith("; no trace either: AssertionError: version mismatch: {id=133}")


def test_the_sweep_says_each_note_once_and_what_this_device_gets(tmp_path):
    from ftprof.cli.sweep import _new_memory_notes, memory_snapshot_line
    from ftprof.point import Point
    from ftprof.records.profile import Profile, RankProfile
    from ftprof.records.results import Record

    def record(*notes):
        ranks = [RankProfile(rank=r, memory_notes=[n]) for r, n in enumerate(notes)]
        point = Point(precision="fp32", zero=2, world_size=max(1, len(notes)), seq_len=32, batch_size=4)
        return Record(point=point, status="ok", model="m", profile=Profile(sampler="rss", ranks=ranks))

    said: set[str] = set()
    assert _new_memory_notes(record("a", "a", "b"), said) == ["a", "b"]
    assert _new_memory_notes(record("b", "c"), said) == ["c"]
    assert _new_memory_notes(Record(point=record().point, status="oom", model="m"), said) == []
    cpu, gpu = memory_snapshot_line(tmp_path, cuda=False), memory_snapshot_line(tmp_path, cuda=True)
    assert "no allocator snapshot (.pickle)" in cpu
    assert "-timeline.html" in cpu
    assert str(tmp_path) in cpu
    assert ".pickle, open it in https://pytorch.org/memory_viz" in gpu
    assert "-timeline.html" in gpu
