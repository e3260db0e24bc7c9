"""Peak-memory samplers: a background thread reads memory every few milliseconds and keeps watermarks.

A watermark is a named peak that starts when :meth:`MemorySampler.start` is called and is read with
:meth:`MemorySampler.stop`; several can overlap (a step and the optimizer step inside it).

* :class:`RssSampler` — this process's resident set size (psutil), plus ``ru_maxrss`` for the lifetime peak.
* :class:`NvmlSampler` — GPU memory from NVML, on the physical GPU behind this rank's torch device
  (:func:`nvml_handle_for_torch_device`: NVML numbers every GPU on the host and ignores
  ``CUDA_VISIBLE_DEVICES`` / ``CUDA_DEVICE_ORDER``, so devices are matched by UUID or PCI address).
  Its :attr:`~NvmlSampler.figure` says which figure is this rank's own: ``"process"``
  (``nvml_process_bytes``, this PID's line in NVML's process list) or ``"device_delta"``
  (``nvml_device_delta_bytes``, the device's used memory minus what it held when sampling began), the
  fallback where NVML doesn't list this process (PID namespaces in containers hide it). Which one is
  decided once this process has a CUDA context, not when the sampler starts, because before that NVML
  lists no process at all.
"""

from __future__ import annotations

import os
import resource
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import psutil

from ftprof.errors import FtprofError
from ftprof.records.profile import FIGURE_KEYS  # noqa: F401  (re-exported: the keys readings carry)


class ProfilerUnavailable(FtprofError):
    """The requested memory backend can't run here (no NVML, no GPU)."""


NvmlFigure = Literal["process", "device_delta"]


class MemorySampler(Protocol):
    kind: str

    @property
    def figure(self) -> str:
        """A key of :data:`FIGURE_KEYS`: the kind of figure this sampler reports as its process's memory."""
        ...

    def read(self) -> dict[str, int]: ...
    def start(self, name: str) -> None: ...
    def stop(self, name: str) -> dict[str, int]: ...
    def close(self) -> None: ...


class _ThreadedSampler:
    """Shared machinery: a daemon thread takes a reading (:meth:`_background_read`, :meth:`read` unless a
    sampler has a cheaper one) every ``interval`` seconds.

    The thread shares the GIL with training: each reading takes it from the training thread once per call
    that releases it (system calls, NVML's C calls), and a launch-bound GPU step feels every hand-off, so
    readings are kept to as few such calls, and as little Python, as they can be.
    """

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

    def _background_read(self) -> dict[str, int]:
        return self.read()

    def _run(self) -> None:
        # time.sleep, not Event.wait(interval): Condition.wait's Python (a lock allocated per call, a waiter
        # queue) held the GIL for as long as the reading itself. close() is seen within 0.1 s.
        sleep, stopped = time.sleep, self._stop.is_set
        while True:
            remaining = self.interval
            while remaining > 0:
                sleep(min(remaining, 0.1))
                remaining -= 0.1
                if stopped():
                    return
            self._update(self._background_read())

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
    compute threads for the same cores, and waking every 5 ms slowed training measurably on a 2-core machine
    (docs/benchmarks.md, "Profiler overhead"). ``ru_maxrss`` still records the exact peak the kernel saw.

    On Linux a reading is one ``pread`` of ``/proc/<pid>/statm`` (resident pages, the figure psutil reports)
    on a descriptor kept open, and ``getrusage``: a few microseconds, where psutil's ``memory_info`` opens,
    reads and closes the file each time (~30 us, and three GIL hand-offs, on a slow CPU).
    """

    kind = "rss"
    figure = "rss"

    def __init__(self, interval: float = 0.05) -> None:
        self._process = psutil.Process(os.getpid())
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 0
        self._statm: int | None = None
        try:
            self._statm = os.open(f"/proc/{os.getpid()}/statm", os.O_RDONLY)
            self._rss()
        except (OSError, ValueError, IndexError):  # no procfs (macOS), or an unexpected format: psutil
            self._close_statm()
        super().__init__(interval)

    def _rss(self) -> int:
        if self._statm is None:
            return int(self._process.memory_info().rss)
        return int(os.pread(self._statm, 256, 0).split()[1]) * self._page

    def _close_statm(self) -> None:
        if self._statm is not None:
            fd, self._statm = self._statm, None
            os.close(fd)

    def read(self) -> dict[str, int]:
        return {
            "rss_bytes": self._rss(),
            "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        }

    def close(self) -> None:
        super().close()
        if not self._thread.is_alive():  # a reading still under way would read a closed (or reused) descriptor
            self._close_statm()


@dataclass(frozen=True)
class DeviceIdentity:
    """What tells one physical GPU from another, as CUDA and NVML both report it.

    Attributes:
        uuid: lower-case hex UUID without NVML's ``GPU-`` prefix, or None when unknown.
        pci: (domain, bus, device) of its PCI address, or None when unknown.
    """

    uuid: str | None
    pci: tuple[int, int, int] | None


def _normalize_uuid(value: str | bytes) -> str:
    """The bare UUID: NVML writes ``GPU-<uuid>`` (``MIG-<uuid>`` for MIG instances), CUDA just ``<uuid>``.

    >>> _normalize_uuid(b"GPU-8A2D7C4E-0B1F-4C3D-9E8F-1A2B3C4D5E6F")
    '8a2d7c4e-0b1f-4c3d-9e8f-1a2b3c4d5e6f'
    """
    text = value.decode() if isinstance(value, bytes) else str(value)
    text = text.strip().lower()
    for prefix in ("gpu-", "mig-"):
        text = text.removeprefix(prefix)
    return text


def _parse_pci_bus_id(value: str | bytes) -> tuple[int, int, int] | None:
    """(domain, bus, device) of a PCI address ``domain:bus:device.function`` in hex; None if malformed.

    >>> _parse_pci_bus_id(b"00000000:3B:00.0")
    (0, 59, 0)
    """
    text = value.decode() if isinstance(value, bytes) else str(value)
    try:
        domain, bus, rest = text.strip().split(":")
        return int(domain, 16), int(bus, 16), int(rest.split(".")[0], 16)
    except ValueError:
        return None


def torch_device_identity(device_index: int, device_properties: Callable[[int], Any] | None = None) -> DeviceIdentity:
    """The UUID and PCI address of torch's ``cuda:<device_index>``.

    Args:
        device_index: torch's index, already renumbered by ``CUDA_VISIBLE_DEVICES`` / ``CUDA_DEVICE_ORDER``.
        device_properties: returns an object shaped like ``torch.cuda.get_device_properties(i)`` (``uuid``,
            ``pci_domain_id``, ``pci_bus_id``, ``pci_device_id``); that function by default. Older torch
            builds lack some of these attributes; what is missing is None here.
    """
    if device_properties is None:
        import torch

        device_properties = torch.cuda.get_device_properties
    props = device_properties(device_index)
    uuid = getattr(props, "uuid", None)  # torch's _CUuuid prints as the bare UUID
    domain, bus, device = (getattr(props, name, None) for name in ("pci_domain_id", "pci_bus_id", "pci_device_id"))
    pci = None
    if domain is not None and bus is not None and device is not None:
        pci = (int(domain), int(bus), int(device))
    return DeviceIdentity(uuid=_normalize_uuid(str(uuid)) if uuid is not None else None, pci=pci)


def nvml_handle_for_torch_device(
    nvml: Any, device_index: int, device_properties: Callable[[int], Any] | None = None
) -> Any:
    """The NVML handle of the physical GPU that is torch's ``cuda:<device_index>``.

    NVML numbers every GPU the driver sees, in PCI order, whatever ``CUDA_VISIBLE_DEVICES`` and
    ``CUDA_DEVICE_ORDER`` say, so ``nvmlDeviceGetHandleByIndex(i)`` is in general another GPU than torch's
    ``cuda:i``. The GPU is found by its UUID and, where torch doesn't report one, by its PCI address.
    Under MIG, torch's UUID is the instance's, which no NVML device handle has; the PCI address then finds
    the parent GPU, so the figures are the whole GPU's.

    Args:
        nvml: the ``pynvml`` module, already initialised (``nvmlInit``).
        device_index: torch's CUDA index (``torch.cuda.current_device()`` for this rank).
        device_properties: passed to :func:`torch_device_identity` (injectable for tests).

    Returns:
        The NVML device handle.

    Raises:
        ProfilerUnavailable: no GPU in NVML matches, or torch reports neither a UUID nor a PCI address.
    """
    wanted = torch_device_identity(device_index, device_properties)
    if wanted.uuid is None and wanted.pci is None:
        raise ProfilerUnavailable(
            f"torch reports neither a UUID nor a PCI address for cuda:{device_index}, so its NVML device is "
            "unknown; upgrade torch or profile with RSS (ProfilerCallback(sampler=RssSampler()))"
        )
    found: list[tuple[Any, str | None, tuple[int, int, int] | None]] = []
    for nvml_index in range(int(nvml.nvmlDeviceGetCount())):
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(nvml_index)
        except Exception:  # a GPU NVML lists but won't open for us (permissions) can't be the one we use
            continue
        found.append((handle, _nvml_uuid(nvml, handle), _nvml_pci(nvml, handle)))
    for handle, uuid, _ in found:
        if wanted.uuid is not None and uuid == wanted.uuid:
            return handle
    for handle, _, pci in found:
        if wanted.pci is not None and pci == wanted.pci:
            return handle
    pci_text = "{:08x}:{:02x}:{:02x}".format(*wanted.pci) if wanted.pci else None
    raise ProfilerUnavailable(
        f"NVML has no GPU matching torch's cuda:{device_index} (UUID {wanted.uuid!r}, PCI {pci_text!r}) among "
        f"its {len(found)} devices (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); make NVML "
        "see the GPUs CUDA uses (the container's device list), or profile with RSS instead"
    )


def _nvml_uuid(nvml: Any, handle: Any) -> str | None:
    try:
        return _normalize_uuid(nvml.nvmlDeviceGetUUID(handle))
    except Exception:
        return None


def _nvml_pci(nvml: Any, handle: Any) -> tuple[int, int, int] | None:
    try:
        return _parse_pci_bus_id(nvml.nvmlDeviceGetPciInfo(handle).busId)  # bytes in pynvml
    except Exception:
        return None


def torch_has_context(device_index: int) -> bool:
    """Whether this process holds a CUDA (primary) context on torch's ``cuda:<device_index>`` yet."""
    import torch

    if not torch.cuda.is_initialized():  # no cuInit from torch: no context it could have made
        return False
    probe = getattr(torch._C, "_cuda_hasPrimaryContext", None)
    return bool(probe(device_index)) if probe is not None else False


class NvmlSampler(_ThreadedSampler):
    """GPU memory of this rank's device from NVML (``pynvml`` of nvidia-ml-py), in bytes.

    Each reading holds ``nvml_device_used_bytes`` (the whole GPU), ``nvml_device_delta_bytes`` (that minus
    :attr:`baseline`, the used memory when the sampler started) and, once NVML lists this process,
    ``nvml_process_bytes`` (its ``usedGpuMemory``: context and allocations). :attr:`figure` names the one that
    is this process's memory: ``"device_delta"`` until this PID shows up in the process list, ``"process"``
    from then on. NVML lists a process only once it has a CUDA context, so while there is none the list
    is polled; once a context exists and the PID still isn't listed after ``settle_s`` (PID namespaces
    in containers), the sampler settles on ``"device_delta"`` and stops polling. The device delta also
    counts whatever other processes allocate on the GPU meanwhile.

    Args:
        device_index: torch's CUDA index of this rank's GPU (renumbered by ``CUDA_VISIBLE_DEVICES``; not an
            NVML index); ``torch.cuda.current_device()`` by default.
        interval: seconds between readings of the background thread.
        nvml: the ``pynvml`` module (injectable so tests without a GPU can pass a fake).
        device_properties: torch's ``get_device_properties`` stand-in, see :func:`nvml_handle_for_torch_device`.
        has_context: whether this process has a CUDA context on a torch device (:func:`torch_has_context`).
        settle_s: how long after the context appears the PID is still looked for before settling on
            device deltas; a margin for a process list that lags the context by a reading or two.
        refresh_readings: the background thread reads the process list (two NVML calls and Python objects
            per process) only when the device's used memory moved since its last reading, and at least every
            this many readings: while ``used`` stands still, so does this process's figure (short of another
            tenant freeing exactly what this one allocates, which the refresh bounds). :meth:`read`, and so
            :meth:`start` / :meth:`stop`, always read it.

    Raises:
        ProfilerUnavailable: NVML is missing, finds no GPU, or has none matching the torch device.
    """

    kind = "nvml"

    def __init__(
        self,
        device_index: int | None = None,
        interval: float = 0.005,
        nvml: Any = None,
        device_properties: Callable[[int], Any] | None = None,
        has_context: Callable[[int], bool] = torch_has_context,
        settle_s: float = 1.0,
        refresh_readings: int = 20,
    ) -> None:
        if nvml is None:
            try:
                import pynvml

                nvml = pynvml
            except ImportError as err:
                raise ProfilerUnavailable("NVML needs nvidia-ml-py: pip install nvidia-ml-py") from err
        try:
            nvml.nvmlInit()
            if device_index is None:
                import torch

                device_index = torch.cuda.current_device()
        except Exception as err:  # NVMLError has many subclasses; any means "no usable GPU"
            raise ProfilerUnavailable(f"NVML can't open a GPU: {err}") from None
        try:
            self._handle = nvml_handle_for_torch_device(nvml, device_index, device_properties)
            memory = nvml.nvmlDeviceGetMemoryInfo(self._handle)
        except ProfilerUnavailable:
            raise
        except Exception as err:
            raise ProfilerUnavailable(f"NVML can't open the GPU of torch's cuda:{device_index}: {err}") from None
        self.device_index = device_index
        self._nvml = nvml
        self._pid = os.getpid()
        self._has_context = has_context
        self.settle_s = settle_s
        self.baseline = int(memory.used)
        self.total = int(memory.total)
        self.figure: NvmlFigure = "device_delta"
        self._settled = False
        self._context_since: float | None = None
        self._figure_lock = threading.Lock()
        self.refresh_readings = refresh_readings
        self._last: dict[str, int] | None = None  # the background thread's last reading with a process figure
        self._reused = 0  # ... and how many readings since reused it
        super().__init__(interval)

    @property
    def settled(self) -> bool:
        """Whether :attr:`figure` is final (``"process"`` is final as soon as it is set)."""
        return self._settled

    def _process_used(self) -> int | None:
        """This PID's memory in NVML's process list of the device; None when it isn't listed."""
        try:
            procs = self._nvml.nvmlDeviceGetComputeRunningProcesses(self._handle)
        except Exception:  # NOT_SUPPORTED on some vGPU/MIG setups: same as not listed
            return None
        used = [int(p.usedGpuMemory) for p in procs if p.pid == self._pid and p.usedGpuMemory is not None]
        return sum(used) if used else None

    def _settle_unless_listed(self) -> None:
        """Not listed: once a context has existed for ``settle_s``, NVML won't list us, so stop looking."""
        try:
            has_context = self._has_context(self.device_index)
        except Exception:  # this runs on the sampling thread: an error here must not end the sampling
            has_context = False
        if not has_context:
            return
        now = time.monotonic()
        with self._figure_lock:
            if self._context_since is None:
                self._context_since = now
            if now - self._context_since >= self.settle_s:
                self._settled = True

    def read(self) -> dict[str, int]:
        return self._reading(int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used))

    def _background_read(self) -> dict[str, int]:
        used = int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)
        last = self._last
        if last is not None and last["nvml_device_used_bytes"] == used and self._reused < self.refresh_readings:
            self._reused += 1
            return last
        sample = self._reading(used)
        self._last, self._reused = (sample, 0) if "nvml_process_bytes" in sample else (None, 0)
        return sample

    def _reading(self, used: int) -> dict[str, int]:
        sample = {"nvml_device_used_bytes": used, "nvml_device_delta_bytes": max(0, used - self.baseline)}
        if self._settled and self.figure != "process":
            return sample
        process = self._process_used()
        if process is None:
            if not self._settled:
                self._settle_unless_listed()
            return sample
        with self._figure_lock:
            if self._settled and self.figure != "process":  # settled by another thread meanwhile: stays final
                return sample
            self.figure, self._settled = "process", True
        sample["nvml_process_bytes"] = process
        return sample


def make_sampler(device: str = "auto", device_index: int | None = None) -> MemorySampler:
    """NVML on a CUDA machine, RSS otherwise (``device`` may force ``"cuda"`` or ``"cpu"``).

    Args:
        device: ``"auto"``, ``"cuda"`` or ``"cpu"``.
        device_index: torch's CUDA index of this rank's GPU (``torch.cuda.current_device()`` if None).
    """
    if device == "cpu":
        return RssSampler()
    import torch

    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return NvmlSampler(device_index)
    return RssSampler()
