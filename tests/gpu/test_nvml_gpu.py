"""The real NVML path, on a CUDA machine only (`pytest -m gpu`); CI has no GPU and skips these."""

import time

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_nvml_sampler_sees_a_real_allocation():
    from ftprof.profiler.samplers import FIGURE_KEYS, NvmlSampler

    sampler = NvmlSampler(interval=0.001)
    try:
        sampler.start("x")
        before = sampler.read()["nvml_device_used_bytes"]
        block = torch.empty(2**30, dtype=torch.uint8, device="cuda")
        block.fill_(1)
        torch.cuda.synchronize()
        peaks = sampler.stop("x")
        assert peaks["nvml_device_used_bytes"] - before >= 2**30
        assert peaks[FIGURE_KEYS[sampler.figure]] >= 2**30
        del block
    finally:
        sampler.close()


def test_a_transient_peak_freed_before_the_sampler_stops_is_still_caught():
    from ftprof.profiler.samplers import FIGURE_KEYS, NvmlSampler

    torch.cuda.empty_cache()
    sampler = NvmlSampler(device_index=torch.cuda.current_device(), interval=0.001, settle_s=0.2)
    try:
        before = sampler.read()
        sampler.start("x")
        time.sleep(0.3)  # past settle_s: the figure is decided
        block = torch.empty(4 * 2**30, dtype=torch.uint8, device="cuda")
        block.fill_(1)
        torch.cuda.synchronize()
        time.sleep(0.05)  # 50 sampling intervals
        del block
        torch.cuda.empty_cache()  # back to the driver: the device figure falls again
        torch.cuda.synchronize()
        time.sleep(0.05)
        key = FIGURE_KEYS[sampler.figure]
        last = sampler.read()
        peaks = sampler.stop("x")
        assert last[key] - before.get(key, 0) < 2**30, (before, last)  # a reading at stop would miss it
        assert peaks[key] - before.get(key, 0) >= 4 * 2**30, (sampler.figure, before, peaks)
    finally:
        sampler.close()


@pytest.mark.slow
def test_gpu_sweep_point_records_nvml_and_torch_peaks(tmp_path):
    from ftprof.records.results import latest, read_records
    from tests.integration.test_sweep_cli import sweep

    sweep(
        [
            "--model",
            "tiny-bert",
            "--zero",
            "2",
            "--batch_sizes",
            "8,32",
            "--seq_lens",
            "256",
            "--precision",
            "bf16",
            "--out",
            str(tmp_path),
            "--no_report",
        ]
    )
    records = latest(read_records(tmp_path / "results.jsonl"))
    assert {r.status for r in records} == {"ok"}
    small, large = sorted(records, key=lambda r: r.point.batch_size)
    for r in records:
        assert r.profile.sampler == "nvml"
        assert r.profile.peak("torch_allocated_bytes") > 0
        assert r.profile.peak("torch_reserved_bytes") >= r.profile.peak("torch_allocated_bytes")
    for r in records:
        # NVML sees this process's whole footprint: the allocator's segments plus the CUDA context (and what
        # cuBLAS/cuDNN hold outside the allocator), so it is above the reserved peak by some hundreds of MiB.
        extra = r.peak_bytes - r.profile.peak("torch_reserved_bytes")
        assert 64 * 2**20 <= extra <= 2 * 2**30, (r.point.key, r.profile.sampler, extra)
    assert large.profile.peak("torch_allocated_bytes") > small.profile.peak("torch_allocated_bytes")
    assert large.peak_bytes >= small.peak_bytes
