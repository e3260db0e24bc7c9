"""The real NVML path, on a CUDA machine only (`pytest -m gpu`); CI has no GPU and skips these."""

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
    assert large.profile.peak("torch_allocated_bytes") > small.profile.peak("torch_allocated_bytes")
    assert large.peak_bytes >= small.peak_bytes
