"""Who else used the CPUs during a measurement window (Linux ``/proc``; nothing elsewhere).

A throughput is only as good as the machine was quiet. On a CPU run, one other busy process on the cores
torch's OpenMP threads use can slow a step a hundredfold (threads wait at every parallel region for a peer
the scheduler took away), and on a virtual machine the hypervisor can take time from all of them (steal).
Neither shows in the step times themselves, so the window records both beside its rates:

- ``foreign``: the share of the machine's CPU time that processes outside this run's session used (the run's
  ranks, the launcher and the sweep's forked point share one session, so all ranks on a node count as ours);
- ``steal``: the share the hypervisor took (``/proc/stat``'s steal column; 0 on bare metal).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class CpuSnapshot:
    busy: int  # ticks the machine ran anything (user, nice, system, irq, softirq), all CPUs
    steal: int  # ticks taken by the hypervisor
    total: int  # all ticks, idle included
    ours: int  # ticks of this session's processes

    def share_since(self, start: CpuSnapshot) -> dict[str, float] | None:
        """(foreign, steal) shares of the machine's time between ``start`` and this snapshot; None if no time
        passed.

        >>> a, b = CpuSnapshot(100, 0, 400, 90), CpuSnapshot(300, 20, 800, 240)
        >>> b.share_since(a)
        {'foreign': 0.125, 'steal': 0.05}
        """
        total = self.total - start.total
        if total <= 0:
            return None
        foreign = (self.busy - start.busy) - (self.ours - start.ours)
        return {"foreign": max(0.0, foreign / total), "steal": (self.steal - start.steal) / total}


def _proc_stat(root: Path) -> tuple[int, int, int] | None:
    try:
        fields = (root / "stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    busy = user + nice + system + irq + softirq
    return busy, steal, busy + idle + iowait + steal


def _session_ticks(root: Path, session: int) -> int:
    """utime + stime of every process in ``session`` (threads included: /proc/PID/stat sums them)."""
    ticks = 0
    for entry in root.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) ": state is fields[0]
        if int(fields[3]) == session:
            ticks += int(fields[11]) + int(fields[12])
    return ticks


def snapshot(root: Path = Path("/proc")) -> CpuSnapshot | None:
    """The machine's and this session's CPU ticks now; None where ``/proc`` can't tell (not Linux)."""
    machine = _proc_stat(root)
    if machine is None:
        return None
    busy, steal, total = machine
    return CpuSnapshot(busy, steal, total, _session_ticks(root, os.getsid(0)))


def reference_seconds(repeats: int = 9) -> float:
    """Seconds this machine takes now for a fixed CPU workload (a 256 x 256 fp32 matmul and GELU, 20 times,
    on torch's threads): the median of ``repeats``. Timed beside a window, it tells a machine that got slower
    (a busy VM host, a throttled CPU) from a setting that is slower: the workload never changes."""
    import statistics
    import time

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
