"""How a sweep's points run: one at a time, side by side on one node's devices, or as Slurm jobs.

* :class:`SerialExecutor`: one point at a time in a fresh process, as ``ftprof sweep`` always ran.
* :class:`~ftprof.sweep.executors.local.LocalExecutor` (``--executor local --parallel N``): several points at once
  on disjoint device slots of this node, each in its own process group with its own
  ``CUDA_VISIBLE_DEVICES``.
* :class:`~ftprof.sweep.executors.slurm.SlurmExecutor` (``--executor slurm``): each point a Slurm job submitted
  through submitit; jobs are logged in the sweep folder so ``--resume`` re-attaches to them.

:func:`ftprof.sweep.schedule.iterate_sweep` decides which point runs next (must-OOM pruning, budgets, bisection);
an executor only runs what it is given and hands back records as points finish.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ftprof.point import Point
    from ftprof.records.results import Record
    from ftprof.sweep.point_run import SweepConfig


class PointExecutor(Protocol):
    """Runs sweep points, several at a time where it can."""

    def can_start(self, p: Point) -> bool:
        """Whether ``p`` can start now (free device slots, jobs in flight below the limit)."""
        ...

    def start(self, cfg: SweepConfig, p: Point) -> None:
        """Start measuring ``p`` and return at once."""
        ...

    def wait(self) -> list[Record]:
        """Block until at least one started point has finished and return the records of those that have
        (an empty list when nothing runs)."""
        ...

    def running(self) -> list[Point]:
        """The points started and not yet returned by :meth:`wait`."""
        ...

    def cancel(self) -> None:
        """Stop every running point (Ctrl-C); their records are never returned."""
        ...


class SerialExecutor:
    """One point at a time, in this thread, through ``run``: the sweep as it always ran. A started point
    is measured when :meth:`wait` is called."""

    def __init__(self, run: Callable[[SweepConfig, Point], Record]) -> None:
        self.run = run
        self._queued: tuple[SweepConfig, Point] | None = None

    def can_start(self, p: Point) -> bool:
        return self._queued is None

    def start(self, cfg: SweepConfig, p: Point) -> None:
        self._queued = (cfg, p)

    def wait(self) -> list[Record]:
        if self._queued is None:
            return []
        cfg, p = self._queued
        try:
            return [self.run(cfg, p)]
        finally:
            self._queued = None

    def running(self) -> list[Point]:
        return [self._queued[1]] if self._queued else []

    def cancel(self) -> None:
        self._queued = None
