"""``--executor local --parallel N``: several points at once on disjoint device slots of this node.

A slot is one GPU (its index, as ``CUDA_VISIBLE_DEVICES`` names it) or, on a CPU-only machine, a share of
the cores. A point takes as many slots as it has ranks and sees only its own GPUs through
``CUDA_VISIBLE_DEVICES``; points start in the sweep's order, and one that needs more slots than are free
waits, with the points behind it, until enough are (so a 2-rank point is never starved by 1-rank points).

Peaks can't leak between points: each point is its own process group, and the peak is a per-process
figure (NVML's process list, RSS). A device-level figure (NVML used memory, the fallback where a container
hides PIDs from NVML) counts whatever else the device holds, so it is not used for the peak of a point that
ran beside others: :func:`concurrent_peak` takes torch's allocator peak instead. CPU points share the cores:
their throughput is flagged (``run.concurrent_points``), their memory is not affected.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from functools import partial
from typing import Protocol

from ftprof.errors import ConfigError
from ftprof.point import Point
from ftprof.records.results import Record
from ftprof.sweep.point_run import Launch, SweepConfig, kill_process_group, local_command, run_point


class ProcessRunner(Protocol):
    """:func:`ftprof.sweep.point_run.run_point`'s shape: measure ``p`` with extra variables for its processes and the
    command that launches it, and report its process group id through ``started``."""

    def __call__(
        self,
        cfg: SweepConfig,
        p: Point,
        *,
        env: dict[str, str] | None = None,
        started: Callable[[int], None] | None = None,
        command: Launch = local_command,
    ) -> Record: ...


def device_slots(parallel: int, cuda: bool, visible: str | None = None, device_count: int = 0) -> list[str | None]:
    """The slots ``--parallel N`` runs points on: every visible GPU's id, or N shares of the CPU cores.

    Args:
        parallel: ``--parallel``, the most points at once.
        cuda: whether this machine has CUDA GPUs.
        visible: ``CUDA_VISIBLE_DEVICES`` as this process sees it (slots are then its entries).
        device_count: ``torch.cuda.device_count()``.

    >>> device_slots(2, cuda=False)
    [None, None]
    >>> device_slots(2, cuda=True, visible="4,5,7", device_count=3)
    ['4', '5', '7']
    >>> device_slots(1, cuda=True, device_count=2)
    ['0', '1']
    """
    if parallel < 1:
        raise ConfigError(f"--parallel must be at least 1, got {parallel}")
    if not cuda:
        return [None] * parallel
    ids = [d.strip() for d in visible.split(",") if d.strip()] if visible else []
    return list(ids[:device_count] if ids else map(str, range(device_count)))


def concurrent_peak(record: Record) -> Record:
    """A point that ran beside others keeps a per-process peak: a device-level figure would count the other
    points' memory too, so torch's allocator peak (``max_memory_reserved``) replaces it.

    >>> from ftprof.records.profile import Profile, RankProfile
    >>> rank = RankProfile(rank=0, figure="device_delta", phases={"steady": {"nvml_device_delta_bytes": 9,
    ...     "torch_reserved_bytes": 5}})
    >>> r = concurrent_peak(Record(point=Point(precision="fp16", zero=2, seq_len=8, batch_size=1), status="ok",
    ...     model="m", peak_bytes=9, profile=Profile(sampler="nvml", ranks=[rank])))
    >>> r.peak_bytes, r.run.peak_figure
    (5, 'torch_reserved_bytes')
    """
    if record.profile is not None and record.profile.figure == "device_delta":
        record.peak_bytes = record.profile.peak("torch_reserved_bytes") or None
        record.run.peak_figure = "torch_reserved_bytes"
    return record


class LocalExecutor:
    """Up to ``max_points`` points at once, each on ``world_size`` free slots of ``slots``.

    Args:
        slots: GPU ids, or ``None`` per CPU share (:func:`device_slots`).
        max_points: the most points at once (``--parallel``; default: one per slot).
        run: measures one point (a fake in tests).
        cpu_count: cores to share among CPU slots (default ``os.cpu_count()``).
    """

    def __init__(
        self,
        slots: Sequence[str | None],
        max_points: int | None = None,
        run: ProcessRunner = run_point,
        cpu_count: int | None = None,
    ) -> None:
        if not slots:
            raise ConfigError("--executor local found no device to run points on")
        self.slots = list(range(len(slots)))  # indices into ``labels``
        self.labels = list(slots)
        self.max_points = max_points or len(slots)
        self.run = run
        self.cpu_count = cpu_count or os.cpu_count() or 1
        self._free = list(self.slots)
        self._pool = ThreadPoolExecutor(max_workers=self.max_points, thread_name_prefix="ftprof-point")
        self._futures: dict[Future[Record], tuple[Point, list[int]]] = {}
        self._groups: dict[str, int] = {}  # point key -> process group id, to stop it
        self._lock = threading.Lock()
        self._cancelled = False

    @property
    def concurrent(self) -> bool:
        return self.max_points > 1

    def slots_needed(self, p: Point) -> int:
        """A slot per rank; on CPUs a point wider than the pool takes all of it (its ranks share the cores)."""
        gpu = self.labels[0] is not None
        return p.world_size if gpu else min(p.world_size, len(self.slots))

    def can_start(self, p: Point) -> bool:
        need = self.slots_needed(p)
        if need > len(self.slots):
            raise ConfigError(
                f"{p.key} needs {need} GPUs and this node offers {len(self.slots)} "
                f"({', '.join(map(str, self.labels))}); lower --world_size"
            )
        return len(self._futures) < self.max_points and need <= len(self._free)

    def env_for(self, taken: list[int]) -> dict[str, str]:
        """What a point's processes see: only its own GPUs; on CPUs, as many threads as its share of cores."""
        if self.labels[0] is not None:
            return {"CUDA_VISIBLE_DEVICES": ",".join(str(self.labels[i]) for i in taken)}
        if self.concurrent and "OMP_NUM_THREADS" not in os.environ:
            return {"OMP_NUM_THREADS": str(max(1, self.cpu_count // len(self.slots)))}
        return {}

    def start(self, cfg: SweepConfig, p: Point) -> None:
        if not self.can_start(p):
            raise RuntimeError(f"{p.key} started without free slots")  # the sweep asks can_start first
        need = self.slots_needed(p)
        taken, self._free = self._free[:need], self._free[need:]
        env = self.env_for(taken)
        command = partial(local_command, devices=env.get("CUDA_VISIBLE_DEVICES"))
        future = self._pool.submit(self.run, cfg, p, env=env, started=self._track(p.key), command=command)
        self._futures[future] = (p, taken)

    def _track(self, key: str) -> Callable[[int], None]:
        def started(pgid: int) -> None:
            with self._lock:
                self._groups[key] = pgid
                if self._cancelled:  # cancelled while this point was starting
                    kill_process_group(pgid)

        return started

    def wait(self) -> list[Record]:
        if not self._futures:
            return []
        finished, _ = wait_futures(list(self._futures), return_when=FIRST_COMPLETED)
        records = []
        for future in finished:
            p, taken = self._futures.pop(future)
            self._free = sorted(self._free + taken)
            with self._lock:
                self._groups.pop(p.key, None)
            record = future.result()  # run_point returns a record for the point's own failures
            if self.concurrent:
                record.run.concurrent_points = self.max_points
                if self.labels[0] is not None:
                    record.run.cuda_visible_devices = self.env_for(taken)["CUDA_VISIBLE_DEVICES"]
                concurrent_peak(record)
            records.append(record)
        return records

    def running(self) -> list[Point]:
        return [p for p, _ in self._futures.values()]

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            for pgid in self._groups.values():
                kill_process_group(pgid)
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._futures.clear()
