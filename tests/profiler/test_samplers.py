"""RSS is real here; NVML can't exist without a GPU, so it runs against a fake module (and for real in gpu tests)."""

import os
import time
from types import SimpleNamespace

import pytest

from ftprof.profiler.samplers import NvmlSampler, ProfilerUnavailable, RssSampler


def test_rss_watermark_sees_a_transient_allocation():
    sampler = RssSampler(interval=0.001)
    try:
        sampler.start("phase")
        before = sampler.read()["rss_bytes"]
        block = bytearray(200 * 2**20)  # 200 MiB, touched so it is resident
        for i in range(0, len(block), 4096):
            block[i] = 1
        time.sleep(0.02)
        del block
        time.sleep(0.02)
        peak = sampler.stop("phase")["rss_bytes"]
        assert peak - before >= 190 * 2**20
        assert sampler.read()["rss_bytes"] < peak  # freed again: only the watermark remembers it
    finally:
        sampler.close()


class FakeNvml:
    """The pynvml calls NvmlSampler makes, over a settable 'used' figure."""

    def __init__(self, pids):
        self.used, self.pids = 1000, pids

    def nvmlInit(self):
        pass

    def nvmlDeviceGetHandleByIndex(self, i):
        return f"gpu{i}"

    def nvmlDeviceGetMemoryInfo(self, handle):
        return SimpleNamespace(used=self.used, total=80 * 2**30)

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        return [SimpleNamespace(pid=pid, usedGpuMemory=self.used - 1000) for pid in self.pids]


def test_nvml_process_memory_by_pid():
    fake = FakeNvml([os.getpid()])
    sampler = NvmlSampler(interval=0.001, nvml=fake)
    try:
        assert sampler.process_visible and sampler.baseline == 1000
        sampler.start("x")
        fake.used = 5000
        time.sleep(0.01)
        fake.used = 3000
        assert sampler.stop("x") == {"nvml_device_used_bytes": 5000, "nvml_process_bytes": 4000}
    finally:
        sampler.close()


def test_nvml_falls_back_to_device_delta_in_containers():
    fake = FakeNvml([12345])  # a host PID: ours is not listed
    sampler = NvmlSampler(interval=0.001, nvml=fake)
    try:
        assert not sampler.process_visible
        fake.used = 2500
        assert sampler.read() == {"nvml_device_used_bytes": 2500, "nvml_process_bytes": 1500}
    finally:
        sampler.close()


def test_nvml_without_gpu_is_unavailable():
    class NoGpu(FakeNvml):
        def nvmlInit(self):
            raise RuntimeError("NVML Shared Library Not Found")

    with pytest.raises(ProfilerUnavailable, match="NVML can't open GPU 0"):
        NvmlSampler(nvml=NoGpu([]))
