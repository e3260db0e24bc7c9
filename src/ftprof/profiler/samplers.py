"""Peak-memory samplers: a background thread reads memory every few milliseconds and keeps watermarks.

A watermark is a named peak that starts when :meth:`MemorySampler.start` is called and is read with
:meth:`MemorySampler.stop`; several can overlap (a step and the optimizer step inside it).

* :class:`RssSampler` — this process's resident set size (psutil), plus ``ru_maxrss`` for the lifetime peak.
* :class:`NvmlSampler` — the GPU's used memory and this process's, from NVML. Inside containers NVML lists
  host PIDs, so the process figure falls back to the device's used memory minus a baseline taken at start.
"""

from __future__ import annotations

import os
import resource
import threading
from typing import Protocol

import psutil

from ftprof.errors import FtprofError


class ProfilerUnavailable(FtprofError):
    """The requested memory backend can't run here (no NVML, no GPU)."""


class MemorySampler(Protocol):
    kind: str

    def read(self) -> dict[str, int]: ...
    def start(self, name: str) -> None: ...
    def stop(self, name: str) -> dict[str, int]: ...
    def close(self) -> None: ...


class _ThreadedSampler:
    """Shared machinery: a daemon thread calls :meth:`read` every ``interval`` seconds."""

    kind = "base"

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self._marks: dict[str, dict[str, int]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"ftprof-{self.kind}-sampler", daemon=True)
        self._thread.start()

    def read(self) -> dict[str, int]:
        raise NotImplementedError

    def _update(self, sample: dict[str, int]) -> None:
        with self._lock:
            for mark in self._marks.values():
                for key, value in sample.items():
                    if value > mark.get(key, -1):
                        mark[key] = value

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._update(self.read())

    def start(self, name: str) -> None:
        sample = self.read()
        with self._lock:
            self._marks[name] = dict(sample)

    def stop(self, name: str) -> dict[str, int]:
        """The peaks since :meth:`start` (including a reading taken now), and forget the mark."""
        self._update(self.read())
        with self._lock:
            return self._marks.pop(name, {})

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1)


class RssSampler(_ThreadedSampler):
    """Resident memory of this process, in bytes (``rss``) and the kernel's lifetime peak (``ru_maxrss``).

    The default interval is long (50 ms) on purpose: on a CPU the sampling thread competes with torch's
    compute threads for the same cores, and waking every 5 ms cost ~10% of training speed on 2 cores
    (bench/bench_profiler.py). ``ru_maxrss`` still records the exact peak the kernel saw.
    """

    kind = "rss"

    def __init__(self, interval: float = 0.05) -> None:
        self._process = psutil.Process(os.getpid())
        super().__init__(interval)

    def read(self) -> dict[str, int]:
        return {"rss_bytes": self._process.memory_info().rss,
                "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


class NvmlSampler(_ThreadedSampler):
    """Device and process GPU memory from NVML (``pynvml`` of nvidia-ml-py), in bytes.

    Args:
        device_index: the NVML index of this rank's GPU.
        nvml: the ``pynvml`` module (injectable so tests without a GPU can pass a fake).
    """

    kind = "nvml"

    def __init__(self, device_index: int = 0, interval: float = 0.005, nvml=None) -> None:
        if nvml is None:
            try:
                import pynvml as nvml
            except ImportError as err:
                raise ProfilerUnavailable("NVML needs nvidia-ml-py: pip install nvidia-ml-py") from err
        try:
            nvml.nvmlInit()
            self._handle = nvml.nvmlDeviceGetHandleByIndex(device_index)
        except Exception as err:  # NVMLError has many subclasses; any means "no usable GPU"
            raise ProfilerUnavailable(f"NVML can't open GPU {device_index}: {err}") from None
        self._nvml = nvml
        self._pid = os.getpid()
        self.baseline = int(nvml.nvmlDeviceGetMemoryInfo(self._handle).used)
        self.total = int(nvml.nvmlDeviceGetMemoryInfo(self._handle).total)
        self.process_visible = self._process_used() is not None
        super().__init__(interval)

    def _process_used(self) -> int | None:
        try:
            procs = self._nvml.nvmlDeviceGetComputeRunningProcesses(self._handle)
        except Exception:
            return None
        for p in procs:
            if p.pid == self._pid and p.usedGpuMemory is not None:
                return int(p.usedGpuMemory)
        return None

    def read(self) -> dict[str, int]:
        used = int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)
        process = self._process_used() if self.process_visible else None
        if process is None:  # PID namespaces (containers): attribute the growth since start to us
            process = max(0, used - self.baseline)
        return {"nvml_device_used_bytes": used, "nvml_process_bytes": process}

    def close(self) -> None:
        super().close()


def make_sampler(device: str = "auto", device_index: int = 0) -> MemorySampler:
    """NVML on a CUDA machine, RSS otherwise (``device`` may force ``"cuda"`` or ``"cpu"``)."""
    if device == "cpu":
        return RssSampler()
    import torch

    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return NvmlSampler(device_index)
    return RssSampler()
