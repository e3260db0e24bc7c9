"""A stand-in for the ``pynvml`` module and for torch's view of the same GPUs, with real NVML's semantics.

What real NVML does, and this fake too:

* It numbers every GPU of the host in PCI order; ``CUDA_VISIBLE_DEVICES`` and ``CUDA_DEVICE_ORDER`` renumber
  CUDA's (torch's) devices only. ``cuda_order`` here is the list of physical GPUs in torch's order.
* ``nvmlDeviceGetUUID`` gives ``GPU-<uuid>`` (a str); torch's ``get_device_properties(i).uuid`` prints the
  bare ``<uuid>``. ``nvmlDeviceGetPciInfo(h).busId`` is bytes, ``b"00000000:3B:00.0"``.
* A process is in ``nvmlDeviceGetComputeRunningProcesses`` only once it holds a CUDA context on that GPU,
  with ``usedGpuMemory`` = its context plus its allocations. Inside a container (own PID namespace) the
  list is empty: the driver can't map host PIDs into it.
* ``nvmlDeviceGetMemoryInfo(h).used`` is the driver's reservation plus every process's memory on the GPU,
  this one's and other tenants'.

The test drives "this process" through CUDA, so by torch index: :meth:`FakeNvml.create_context`,
:meth:`FakeNvml.allocate`; other tenants by physical index: :meth:`FakeNvml.tenant_allocates`.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Literal

GiB = 2**30
CONTEXT_BYTES = 500 * 2**20  # what a CUDA context costs on a recent GPU, roughly
RESERVED_BYTES = 600 * 2**20  # used memory of an idle GPU: the driver's own


class NVMLError(Exception):
    """Like pynvml's: carries an NVML return code."""

    def __init__(self, value: int, message: str = "") -> None:
        super().__init__(message or f"NVML error {value}")
        self.value = value


NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_LIBRARY_NOT_FOUND = 12


@dataclass
class FakeGpu:
    """One physical GPU: its identity, its memory, and who holds what on it (pid -> bytes)."""

    uuid: str  # bare, lower-case; NVML adds "GPU-"
    bus: int
    total: int = 80 * GiB
    processes: dict[int, int] = field(default_factory=dict)

    @property
    def bus_id(self) -> bytes:
        return f"00000000:{self.bus:02X}:00.0".encode()

    @property
    def used(self) -> int:
        return RESERVED_BYTES + sum(self.processes.values())


class FakeCUuuid:
    """torch's ``_CUuuid``: ``str()`` gives the bare UUID."""

    def __init__(self, uuid: str) -> None:
        self._uuid = uuid

    def __str__(self) -> str:
        return self._uuid


class FakeNvml:
    """The ``pynvml`` functions ftprof calls, over ``gpus`` (physical, in PCI order).

    Args:
        gpus: number of physical GPUs, or the list of them.
        cuda_order: the physical GPUs torch sees, in its order (``CUDA_VISIBLE_DEVICES=2`` -> ``[2]``); all,
            in PCI order, by default.
        mode: ``"bare_metal"`` lists processes by PID; ``"container"`` lists none.
        pid: this process's PID.
    """

    NVMLError = NVMLError

    def __init__(
        self,
        gpus: int | list[FakeGpu] = 4,
        cuda_order: list[int] | None = None,
        mode: Literal["bare_metal", "container"] = "bare_metal",
        pid: int | None = None,
    ) -> None:
        if isinstance(gpus, int):
            gpus = [
                FakeGpu(uuid=f"{i:08x}-1111-2222-3333-{0xABC000 + i:012x}", bus=0x18 + 0x10 * i) for i in range(gpus)
            ]
        self.gpus = gpus
        self.cuda_order = list(range(len(gpus))) if cuda_order is None else cuda_order
        self.mode = mode
        self.pid = os.getpid() if pid is None else pid
        self.initialised = False
        self._lock = threading.Lock()  # the sampler's thread reads while the test changes memory

    # -- pynvml ----------------------------------------------------------------------------------------
    def nvmlInit(self) -> None:
        self.initialised = True

    def nvmlShutdown(self) -> None:
        self.initialised = False

    def _check(self) -> None:
        if not self.initialised:
            raise NVMLError(NVML_ERROR_UNINITIALIZED, "Uninitialized")

    def nvmlSystemGetDriverVersion(self) -> str:
        self._check()
        return "550.54.15"

    def nvmlDeviceGetCount(self) -> int:
        self._check()
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        """By PHYSICAL index, as NVML numbers them: unaffected by ``cuda_order``."""
        self._check()
        if not 0 <= index < len(self.gpus):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT, "Invalid Argument")
        return self.gpus[index]

    def nvmlDeviceGetUUID(self, handle: FakeGpu) -> str:
        return f"GPU-{handle.uuid}"

    def nvmlDeviceGetPciInfo(self, handle: FakeGpu) -> SimpleNamespace:
        return SimpleNamespace(busId=handle.bus_id, domain=0, bus=handle.bus, device=0)

    def nvmlDeviceGetMemoryInfo(self, handle: FakeGpu) -> SimpleNamespace:
        with self._lock:
            used = handle.used
        return SimpleNamespace(total=handle.total, used=used, free=handle.total - used)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: FakeGpu) -> list[SimpleNamespace]:
        if self.mode == "container":
            return []
        with self._lock:
            return [
                SimpleNamespace(pid=pid, usedGpuMemory=used, gpuInstanceId=0xFFFFFFFF, computeInstanceId=0xFFFFFFFF)
                for pid, used in handle.processes.items()
            ]

    # -- torch's side of the same GPUs -----------------------------------------------------------------
    def cuda_gpu(self, torch_index: int) -> FakeGpu:
        return self.gpus[self.cuda_order[torch_index]]

    def cuda_get_device_properties(self, torch_index: int) -> SimpleNamespace:
        """Like ``torch.cuda.get_device_properties``: identity of torch's ``cuda:<torch_index>``."""
        gpu = self.cuda_gpu(torch_index)
        return SimpleNamespace(
            name="NVIDIA H100 80GB HBM3",
            total_memory=gpu.total,
            uuid=FakeCUuuid(gpu.uuid),
            pci_domain_id=0,
            pci_bus_id=gpu.bus,
            pci_device_id=0,
        )

    def cuda_has_primary_context(self, torch_index: int) -> bool:
        return self.pid in self.cuda_gpu(torch_index).processes

    # -- what happens on the GPUs ----------------------------------------------------------------------
    def create_context(self, torch_index: int = 0) -> None:
        """This process's first CUDA call on ``cuda:<torch_index>``: NVML lists it from now on."""
        with self._lock:
            self.cuda_gpu(torch_index).processes.setdefault(self.pid, CONTEXT_BYTES)

    def allocate(self, torch_index: int, nbytes: int) -> None:
        """This process allocates (negative: frees) on ``cuda:<torch_index>``; it needs a context first."""
        gpu = self.cuda_gpu(torch_index)
        with self._lock:
            if self.pid not in gpu.processes:
                raise RuntimeError("allocate before create_context: a CUDA allocation creates the context first")
            gpu.processes[self.pid] += nbytes

    def tenant_allocates(self, physical_index: int, pid: int, nbytes: int) -> None:
        """Another process (``pid``) allocates on physical GPU ``physical_index``."""
        with self._lock:
            processes = self.gpus[physical_index].processes
            processes[pid] = processes.get(pid, 0) + nbytes
