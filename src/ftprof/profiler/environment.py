"""What this machine is: its accelerator, its memory and the library versions a measurement depends on."""

from __future__ import annotations

import os
import platform
from typing import Any


def device_kind() -> tuple[str, bool, bool]:
    """(short device name for folder names, has CUDA, CUDA has bf16)."""
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0).replace("NVIDIA ", "").split()[0].lower()
        return name, True, torch.cuda.is_bf16_supported()
    return "cpu", False, False


def environment() -> dict[str, Any]:
    """What a measurement depends on besides its settings: devices, driver, library versions."""
    from importlib.metadata import version

    import torch
    import transformers

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        # Its version without importing it: ``import deepspeed`` detects the accelerator and, without CUDA, logs
        # "Setting accelerator to CPU" in the sweep's console, between ftprof's own lines.
        "deepspeed": version("deepspeed"),
        "cpu_count": os.cpu_count(),
        "host": platform.node(),
    }
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name(0)
        env["device_count"] = torch.cuda.device_count()
        env["cuda"] = torch.version.cuda
        try:
            import pynvml

            from ftprof.profiler.samplers import nvml_handle_for_torch_device

            pynvml.nvmlInit()
            env["driver"] = pynvml.nvmlSystemGetDriverVersion()
            # torch's cuda:0, the device named above; NVML's index 0 is the host's first GPU, whatever
            # CUDA_VISIBLE_DEVICES says.
            handle = nvml_handle_for_torch_device(pynvml, 0)
            env["device_memory_bytes"] = int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
        except Exception:  # NVML missing or blocked: the rest is still useful
            pass
    else:
        env["device"] = f"cpu ({platform.processor() or platform.machine()})"
        import psutil

        env["device_memory_bytes"] = psutil.virtual_memory().total
    return env
