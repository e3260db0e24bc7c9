"""NVML's view of torch's devices, with the real pynvml and a real GPU (`pytest -m gpu`); CI skips these.

The fake in tests/profiler/fake_nvml.py encodes what these check against the driver: that torch's device and
the NVML handle ftprof picks for it are the same GPU, and that memory torch allocates shows up in the figure
the sampler says it reports.
"""

import os
import subprocess
import sys
import time

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_mapped_handle_is_the_torch_devices_gpu():
    import pynvml

    from ftprof.profiler.samplers import nvml_handle_for_torch_device

    pynvml.nvmlInit()
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        handle = nvml_handle_for_torch_device(pynvml, index)
        assert pynvml.nvmlDeviceGetUUID(handle).lower() == f"gpu-{props.uuid}".lower()
        # torch 2.13's CUDA builds report the PCI address (torch.numa reads it too): NVML's must be the same.
        bus_id = pynvml.nvmlDeviceGetPciInfo(handle).busId
        bus_id = bus_id.decode() if isinstance(bus_id, bytes) else bus_id
        assert int(bus_id.split(":")[1], 16) == props.pci_bus_id


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs to renumber")
def test_mapping_under_cuda_visible_devices_finds_the_physical_gpu():
    import pynvml

    pynvml.nvmlInit()
    last = pynvml.nvmlDeviceGetCount() - 1
    child = (
        "import pynvml\n"
        "from ftprof.profiler.samplers import nvml_handle_for_torch_device\n"
        "pynvml.nvmlInit()\n"
        "print(pynvml.nvmlDeviceGetIndex(nvml_handle_for_torch_device(pynvml, 0)))\n"
    )
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(last), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    out = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True, check=True)
    assert int(out.stdout.strip()) == last  # torch's cuda:0 is NVML's last GPU, not NVML's index 0


def test_sampler_figure_sees_a_tensor_allocation():
    from ftprof.profiler.samplers import FIGURE_KEYS, NvmlSampler

    torch.cuda.empty_cache()  # a cached block from an earlier test would absorb the allocation below
    sampler = NvmlSampler(device_index=torch.cuda.current_device(), interval=0.001, settle_s=0.2)
    try:
        before = sampler.read()
        sampler.start("x")
        block = torch.empty(2**30, dtype=torch.uint8, device="cuda")
        block.fill_(1)
        torch.cuda.synchronize()
        time.sleep(0.5)  # past settle_s: the figure is decided once this process has a context
        peaks = sampler.stop("x")
        del block
        assert sampler.settled, f"figure still undecided: {sampler.figure!r}"
        key = FIGURE_KEYS[sampler.figure]
        assert peaks[key] - before.get(key, 0) >= 2**30, (sampler.figure, before, peaks)
        assert peaks["nvml_device_used_bytes"] - before["nvml_device_used_bytes"] >= 2**30
    finally:
        sampler.close()
