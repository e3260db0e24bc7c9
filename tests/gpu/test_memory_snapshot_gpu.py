"""`ftprof sweep --memory_snapshot` on a real GPU (`pytest -m gpu`); CI has no GPU and skips these."""

import json
import pickle

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.slow
def test_gpu_sweep_point_writes_the_allocator_snapshot_and_its_figures(tmp_path):
    from ftprof.profiler.breakdown import ALLOCATOR_STATS
    from ftprof.records.results import latest, read_records
    from tests.integration.test_sweep_cli import sweep

    sweep(
        ["--model", "tiny-bert", "--zero", "2", "--batch_sizes", "8", "--seq_lens", "128", "--precision", "bf16"]
        + ["--memory_snapshot", "--out", str(tmp_path), "--no_report", "--no_remeasure"]
    )
    (record,) = latest(read_records(tmp_path / "results.jsonl"))
    assert record.status == "ok"
    assert record.profile.steady_steps == 2
    (rank,) = record.profile.ranks
    stem = f"snapshots/{record.point.key}-rank0"
    # On a GPU every record is written: the allocator's snapshot and the profiled step's memory timeline (the
    # trace fallback is for torch's CPU memory profiler failing on a gloo rank's op graph, not for CUDA).
    assert sorted(rank.memory_files) == sorted([f"{stem}.pickle", f"{stem}-timeline.html", f"{stem}-timeline.json"])
    assert rank.memory_notes == []
    with open(tmp_path / f"{stem}.pickle", "rb") as f:
        snapshot = pickle.load(f)
    assert {"segments", "device_traces"} <= set(snapshot)
    assert snapshot["segments"]
    assert any(snapshot["device_traces"])
    # The profiled step's memory timeline on the GPU, with the step's allocations in it.
    times, sizes = json.loads((tmp_path / f"{stem}-timeline.json").read_text())
    assert len(times) == len(sizes) > 0
    assert max(sum(row) for row in sizes) > 0
    # The allocator's figures beside the breakdown, consistent with it and with the phases' peaks.
    assert set(rank.allocator) == set(ALLOCATOR_STATS)
    allocated = rank.peak("torch_allocated_bytes")
    parameters = sum(v for k, v in rank.breakdown.items() if k.startswith("parameters_") and not k.endswith("_host"))
    assert 0 < parameters <= allocated <= rank.peak("torch_reserved_bytes")
    assert 0 < rank.allocator["requested_peak_bytes"] <= allocated <= rank.allocator["active_peak_bytes"]
