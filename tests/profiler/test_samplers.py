"""RSS is real here; NVML can't exist without a GPU, so it runs against a fake (tests/profiler/fake_nvml.py)
that follows real NVML's rules, and for real in tests/gpu."""

import sys
import time

import pytest
import torch

from ftprof.profiler.samplers import (
    NvmlSampler,
    ProfilerUnavailable,
    RssSampler,
    make_sampler,
    nvml_handle_for_torch_device,
)
from tests.profiler.fake_nvml import CONTEXT_BYTES, RESERVED_BYTES, FakeGpu, FakeNvml, GiB


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
        assert sampler.figure == "rss"
    finally:
        sampler.close()


def nvml_sampler(fake: FakeNvml, device_index: int = 0, settle_s: float = 0.0) -> NvmlSampler:
    """An NvmlSampler over ``fake``, with torch's side (device identity, context) faked by it too."""
    return NvmlSampler(
        device_index=device_index,
        interval=0.001,
        nvml=fake,
        device_properties=fake.cuda_get_device_properties,
        has_context=fake.cuda_has_primary_context,
        settle_s=settle_s,
    )


@pytest.fixture
def fake_torch_cuda(monkeypatch):
    """torch.cuda as on a GPU machine, answering from a FakeNvml; ``pynvml`` is that fake."""

    def install(fake: FakeNvml) -> FakeNvml:
        monkeypatch.setitem(sys.modules, "pynvml", fake)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: len(fake.cuda_order))
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: fake.cuda_get_device_properties(i).name)
        monkeypatch.setattr(torch.cuda, "get_device_properties", fake.cuda_get_device_properties)
        monkeypatch.setattr(torch._C, "_cuda_hasPrimaryContext", fake.cuda_has_primary_context, raising=False)
        return fake

    return install


# -- which GPU ---------------------------------------------------------------------------------------------
def test_torch_device_0_under_cuda_visible_devices_is_read_on_its_physical_gpu():
    fake = FakeNvml(gpus=4, cuda_order=[2])  # CUDA_VISIBLE_DEVICES=2
    fake.tenant_allocates(0, pid=777, nbytes=30 * GiB)  # NVML index 0: someone else's job
    fake.create_context(0)
    fake.allocate(0, 3 * GiB)
    sampler = nvml_sampler(fake, device_index=0)
    try:
        reading = sampler.read()
        assert reading["nvml_device_used_bytes"] == RESERVED_BYTES + CONTEXT_BYTES + 3 * GiB
        assert reading["nvml_process_bytes"] == CONTEXT_BYTES + 3 * GiB
        assert fake.nvmlDeviceGetUUID(nvml_handle_for_torch_device(fake, 0, fake.cuda_get_device_properties)) == (
            f"GPU-{fake.gpus[2].uuid}"
        )
    finally:
        sampler.close()


def test_mapping_follows_cuda_device_order_for_every_torch_index():
    fake = FakeNvml(gpus=4, cuda_order=[1, 0, 3, 2])  # CUDA_DEVICE_ORDER=FASTEST_FIRST on a mixed host
    fake.nvmlInit()
    for torch_index, physical in enumerate(fake.cuda_order):
        assert nvml_handle_for_torch_device(fake, torch_index, fake.cuda_get_device_properties) is fake.gpus[physical]


def test_mapping_falls_back_to_the_pci_address_without_a_torch_uuid():
    fake = FakeNvml(gpus=3, cuda_order=[2, 1])
    fake.nvmlInit()

    def without_uuid(i):
        props = fake.cuda_get_device_properties(i)
        del props.uuid  # torch builds that don't report it
        return props

    assert nvml_handle_for_torch_device(fake, 0, without_uuid) is fake.gpus[2]
    assert nvml_handle_for_torch_device(fake, 1, without_uuid) is fake.gpus[1]


def test_no_matching_nvml_device_is_unavailable_with_the_identity_in_the_message():
    fake = FakeNvml(gpus=2)
    stranger = FakeGpu(uuid="deadbeef-0000-0000-0000-000000000000", bus=0xC1)
    with pytest.raises(ProfilerUnavailable, match=r"no GPU matching torch's cuda:0 \(UUID 'deadbeef-.*c1"):
        NvmlSampler(
            device_index=0,
            nvml=fake,
            device_properties=lambda i: FakeNvml([stranger]).cuda_get_device_properties(i),
        )


def test_nvml_without_gpu_is_unavailable():
    class LibraryMissing(FakeNvml):
        def nvmlInit(self):
            raise FakeNvml.NVMLError(12, "NVML Shared Library Not Found")

    with pytest.raises(ProfilerUnavailable, match="NVML can't open a GPU: NVML Shared Library Not Found"):
        nvml_sampler(LibraryMissing())


def test_make_sampler_maps_the_rank_device_through_torch(fake_torch_cuda):
    fake = fake_torch_cuda(FakeNvml(gpus=4, cuda_order=[3, 0]))  # CUDA_VISIBLE_DEVICES=3,0; this rank: cuda:1
    fake.tenant_allocates(1, pid=555, nbytes=20 * GiB)  # NVML index 1: another job's GPU
    fake.create_context(1)
    fake.allocate(1, 2 * GiB)
    sampler = make_sampler("auto", device_index=1)
    try:
        assert isinstance(sampler, NvmlSampler)
        reading = sampler.read()
        assert reading["nvml_device_used_bytes"] == RESERVED_BYTES + CONTEXT_BYTES + 2 * GiB
        assert reading["nvml_process_bytes"] == CONTEXT_BYTES + 2 * GiB
        assert sampler.figure == "process"
    finally:
        sampler.close()


# -- which figure ------------------------------------------------------------------------------------------
def test_bare_metal_process_appears_after_its_context_and_is_then_reported():
    fake = FakeNvml(gpus=2, cuda_order=[1], mode="bare_metal")
    fake.tenant_allocates(1, pid=4242, nbytes=10 * GiB)  # a neighbour already on the GPU
    sampler = nvml_sampler(fake, settle_s=60.0)  # at on_init_end: no CUDA context yet
    try:
        sampler.start("setup")
        first = sampler.read()
        assert "nvml_process_bytes" not in first
        assert first["nvml_device_delta_bytes"] == 0
        assert sampler.figure == "device_delta"
        assert not sampler.settled

        fake.create_context(0)  # DeepSpeed's first touch of the GPU
        fake.allocate(0, 4 * GiB)
        fake.tenant_allocates(1, pid=4242, nbytes=GiB)  # the neighbour grows too: not ours
        time.sleep(0.02)
        fake.allocate(0, -3 * GiB)
        peaks = sampler.stop("setup")

        assert sampler.figure == "process"
        assert sampler.settled
        assert peaks["nvml_process_bytes"] == CONTEXT_BYTES + 4 * GiB
        assert peaks["nvml_device_delta_bytes"] == CONTEXT_BYTES + 4 * GiB + GiB
        assert sampler.read()["nvml_process_bytes"] == CONTEXT_BYTES + GiB
    finally:
        sampler.close()


def test_container_lists_no_process_so_the_figure_settles_on_device_deltas():
    fake = FakeNvml(gpus=2, cuda_order=[1], mode="container")
    sampler = nvml_sampler(fake, settle_s=0.0)
    try:
        sampler.read()
        assert not sampler.settled  # no context yet: NVML can't have listed us

        fake.create_context(0)
        fake.allocate(0, 6 * GiB)
        fake.tenant_allocates(1, pid=31337, nbytes=GiB)  # counted: a device delta can't tell tenants apart
        reading = sampler.read()
        assert sampler.figure == "device_delta"
        assert sampler.settled
        assert reading == {
            "nvml_device_used_bytes": RESERVED_BYTES + CONTEXT_BYTES + 7 * GiB,
            "nvml_device_delta_bytes": CONTEXT_BYTES + 7 * GiB,
        }
    finally:
        sampler.close()


def test_a_context_not_yet_listed_is_given_settle_s_before_device_deltas():
    fake = FakeNvml(gpus=1, mode="container")
    sampler = nvml_sampler(fake, settle_s=0.2)
    try:
        fake.create_context(0)
        sampler.read()
        assert not sampler.settled
        time.sleep(0.3)
        sampler.read()
        assert sampler.settled
        assert sampler.figure == "device_delta"
    finally:
        sampler.close()


# -- environment ------------------------------------------------------------------------------------------
def test_environment_device_memory_is_torch_device_0s(fake_torch_cuda):
    from ftprof.profiler.environment import environment

    gpus = [
        FakeGpu(uuid=f"{i:08x}-aaaa-bbbb-cccc-dddddddddddd", bus=0x20 + i, total=(i + 1) * 16 * GiB) for i in range(3)
    ]
    fake_torch_cuda(FakeNvml(gpus, cuda_order=[2, 0]))
    env = environment()
    assert env["device_memory_bytes"] == 48 * GiB  # physical 2's, not NVML index 0's 16 GiB
    assert env["driver"] == "550.54.15"
    assert env["device_count"] == 2


# -- cost of a reading ----------------------------------------------------------------------------------------
class CountingNvml(FakeNvml):
    """Counts NVML's calls: each real one hands the GIL over and back, which training feels."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.memory_infos = self.process_lists = 0

    def nvmlDeviceGetMemoryInfo(self, handle):
        self.memory_infos += 1
        return super().nvmlDeviceGetMemoryInfo(handle)

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        self.process_lists += 1
        return super().nvmlDeviceGetComputeRunningProcesses(handle)


@pytest.mark.parametrize("refresh", [1000, 4])
def test_the_thread_reads_the_process_list_only_when_used_memory_moves_or_to_refresh(refresh):
    fake = CountingNvml(gpus=1)
    fake.create_context(0)
    fake.allocate(0, GiB)
    sampler = NvmlSampler(
        device_index=0,
        interval=0.001,
        nvml=fake,
        device_properties=fake.cuda_get_device_properties,
        has_context=fake.cuda_has_primary_context,
        settle_s=0.0,
        refresh_readings=refresh,
    )
    try:
        assert sampler.read()["nvml_process_bytes"] == CONTEXT_BYTES + GiB
        sampler.start("x")
        infos, lists = fake.memory_infos, fake.process_lists
        time.sleep(0.1)  # memory stands still
        readings, listed = fake.memory_infos - infos, fake.process_lists - lists
        assert readings >= 10
        if refresh == 1000:
            assert listed <= 1  # the thread's first reading only
        else:  # one full reading in every refresh + 1
            assert readings / (refresh + 1) - 2 <= listed <= readings / (refresh + 1) + 2
        fake.allocate(0, 4 * GiB)  # a transient peak: used moves, so the thread reads the process list
        time.sleep(0.02)
        fake.allocate(0, -4 * GiB)
        time.sleep(0.02)
        assert sampler.read()["nvml_process_bytes"] == CONTEXT_BYTES + GiB
        peaks = sampler.stop("x")
        assert peaks["nvml_process_bytes"] == CONTEXT_BYTES + 5 * GiB
        assert sampler.figure == "process"
    finally:
        sampler.close()


def test_rss_reads_what_psutil_reads_and_falls_back_to_it_once_closed():
    import os

    import psutil

    sampler = RssSampler(interval=10.0)
    try:
        assert sampler._statm is not None  # Linux: /proc/<pid>/statm, kept open
        block = bytearray(100 * 2**20)
        for i in range(0, len(block), 4096):
            block[i] = 1
        rss = psutil.Process(os.getpid()).memory_info().rss
        assert abs(sampler.read()["rss_bytes"] - rss) < 8 * 2**20
        del block
    finally:
        sampler.close()
    assert sampler._statm is None
    assert sampler.read()["rss_bytes"] > 0
