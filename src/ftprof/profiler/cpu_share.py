"""Whether a measurement window had the CPUs to itself (Linux ``/proc``; nothing elsewhere).

A throughput is only as good as the machine was free. On a CPU run, one other busy process on the cores
torch's OpenMP threads use can slow a step a hundredfold (threads wait at every parallel region for a peer
the scheduler took away), and on a virtual machine the hypervisor can take time from all of them (steal).
Neither shows in the step times themselves, so the window records both beside its rates:

- ``wait``: seconds this process's threads were ready to run but waiting for a CPU, per second of the
  window, summed over its threads (``/proc/self/task/*/schedstat``, nanoseconds). It does not depend on how
  many cores the machine has or who else runs on the rest: only on whether *this* run got the cores it
  wanted. A run that asks for more threads than it has cores (ranks x threads over the cores) waits too;
- ``steal``: the share of the machine's time the hypervisor took (``/proc/stat``; 0 on bare metal).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

MIN_TICKS = 200  # /proc/stat counts 1/100 s per CPU: below this a stray tick is over 0.5% of the window


@dataclass(frozen=True)
class CpuSnapshot:
    wall: float  # seconds (perf_counter)
    waited: float  # seconds this process's threads waited for a CPU, since they started
    steal: int  # ticks taken by the hypervisor, all CPUs
    total: int  # all ticks, all CPUs

    def share_since(self, start: CpuSnapshot) -> dict[str, float | None] | None:
        """Seconds waited per second, and the hypervisor's share (None over too short a window), between
        ``start`` and this snapshot; None if no time passed.

        >>> a, b = CpuSnapshot(10.0, 1.0, 0, 1000), CpuSnapshot(12.0, 1.5, 20, 1400)
        >>> b.share_since(a)
        {'wait': 0.25, 'steal': 0.05}
        """
        wall = self.wall - start.wall
        if wall <= 0:
            return None
        ticks = self.total - start.total
        steal = (self.steal - start.steal) / ticks if ticks >= MIN_TICKS else None
        return {"wait": max(0.0, self.waited - start.waited) / wall, "steal": steal}


def _waited(root: Path) -> float:
    """Seconds the threads of this process have waited on run queues (field 2 of each task's schedstat)."""
    nanoseconds = 0
    for task in (root / "self" / "task").iterdir():
        try:
            nanoseconds += int((task / "schedstat").read_text().split()[1])
        except (OSError, IndexError, ValueError):  # a thread that ended meanwhile
            continue
    return nanoseconds / 1e9


def _steal(root: Path) -> tuple[int, int]:
    fields = (root / "stat").read_text().split("\n", 1)[0].split()
    ticks = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
    return ticks[7], sum(ticks)


def snapshot(root: Path = Path("/proc")) -> CpuSnapshot | None:
    """This process's CPU waiting and the machine's steal now; None where ``/proc`` can't tell (not Linux)."""
    try:
        steal, total = _steal(root)
        return CpuSnapshot(time.perf_counter(), _waited(root), steal, total)
    except Exception:  # no /proc, or one that reads differently: the window goes without these figures
        return None


def usable_cores() -> int:
    """The cores this process may run on (its affinity; the machine's count where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def reference_seconds(repeats: int = 9) -> float:
    """Seconds this machine takes now for a fixed CPU workload (a 256 x 256 fp32 matmul and GELU, 20 times,
    on torch's threads): the median of ``repeats``. Timed beside a window, it tells a machine that got slower
    (a busy VM host, a throttled CPU) from a setting that is slower: the workload never changes."""
    import statistics

    import torch

    generator = torch.Generator().manual_seed(0)
    a = torch.randn(256, 256, generator=generator)
    b = torch.randn(256, 256, generator=generator)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        for _ in range(20):
            torch.nn.functional.gelu(a @ b)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])  # the first warms the kernels up
