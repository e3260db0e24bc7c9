"""Which point runs next, and its record appended as it finishes: the grid in predicted-peak order with
must-OOM pruning and budgets, or ``--find_max_batch``'s doubling-then-bisection per setting.

An executor (:mod:`ftprof.sweep.executors`: one at a time, side by side on one node's devices, or Slurm jobs)
runs the points it is handed; every finished point is appended to ``results.jsonl`` at once, and points
already there are skipped (``--resume``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from ftprof.point import Point
from ftprof.records.results import Record, append_record
from ftprof.sweep.executors import PointExecutor, SerialExecutor
from ftprof.sweep.plan import must_oom, next_batch_to_try
from ftprof.sweep.point_run import SweepConfig, run_point
from ftprof.units import GIB


class _Grid:
    """Which grid point to start next: the sweep's order (smallest predicted peak first), except that a
    point waits while a smaller point of its setting runs, whose OOM would prove it can't fit."""

    def __init__(self, cfg: SweepConfig, done: dict[str, Record], running: list[Point]) -> None:
        predict = cfg.predict
        order = sorted(cfg.points, key=lambda p: (predict(p) or 0, p)) if predict else cfg.points
        busy = {r.key for r in running}
        self.pending = [p for p in order if p.key not in done and p.key not in busy]
        self.hold = cfg.prune
        self.bisecting = False

    def next(self, running: list[Point]) -> Point | None:
        return next((p for p in self.pending if not (self.hold and must_oom(p, running))), None)

    def taken(self, p: Point) -> None:
        self.pending.remove(p)

    def finished(self, record: Record) -> None:
        pass


class _Bisection:
    """``--find_max_batch``: one doubling-then-bisection search per setting; settings search side by side,
    each one point at a time. A point already measured is read back instead of run."""

    def __init__(self, cfg: SweepConfig, done: dict[str, Record], running: list[Point]) -> None:
        self.cfg, self.done = cfg, done
        self.start_batch = min(p.batch_size for p in cfg.points)
        self.settings = sorted({p.with_batch(1) for p in cfg.points})  # one search per setting but the batch
        self.fits: dict[Point, set[int]] = {s: set() for s in self.settings}
        self.ooms: dict[Point, set[int]] = {s: set() for s in self.settings}
        self.busy = {p.with_batch(1) for p in running}
        self.over: set[Point] = set()  # settings whose search ended
        self.bisecting = True
        for r in done.values():
            setting = r.point.with_batch(1)
            if setting in self.fits and r.status == "ok":
                self.fits[setting].add(r.point.batch_size)
            elif setting in self.fits and r.status in ("oom", "skipped"):
                self.ooms[setting].add(r.point.batch_size)

    def next(self, running: list[Point]) -> Point | None:
        for setting in self.settings:
            while setting not in self.busy and setting not in self.over:
                batch = next_batch_to_try(
                    self.fits[setting], self.ooms[setting], self.start_batch, self.cfg.max_batch, self.cfg.batch_step
                )
                if batch is None:
                    self.over.add(setting)
                    break
                p = setting.with_batch(batch)
                if p.key in self.done and self.done[p.key].status != "over_budget":
                    self._learn(self.done[p.key])  # measured before: read it back, don't run it again
                    continue
                return p
        return None

    def taken(self, p: Point) -> None:
        self.busy.add(p.with_batch(1))

    def finished(self, record: Record) -> None:
        self.busy.discard(record.point.with_batch(1))
        self._learn(record)

    def _learn(self, record: Record) -> None:
        setting, batch = record.point.with_batch(1), record.point.batch_size
        if setting not in self.fits:  # a re-attached job of another grid
            return
        if record.status == "ok":
            self.fits[setting].add(batch)
        elif record.status in ("oom", "skipped"):
            self.ooms[setting].add(batch)
        else:  # an error or timeout says nothing about memory: stop searching this setting
            self.over.add(setting)


def iterate_sweep(
    cfg: SweepConfig,
    done: dict[str, Record],
    run: Callable[[SweepConfig, Point], Record] = run_point,
    executor: PointExecutor | None = None,
) -> Iterator[Record]:
    """Yield each new record (already appended to the results file), skipping points in ``done``.

    Points run through ``executor`` (default: one at a time through ``run``). Whether a point must OOM is
    decided when it is about to start, from every OOM known by then; points already running in
    ``executor`` (Slurm jobs re-attached on ``--resume``) are waited for, not started again. Ctrl-C (or
    closing the iterator) cancels the running points.
    """
    pool = executor or SerialExecutor(run)
    plan: _Grid | _Bisection = (_Bisection if cfg.find_max_batch else _Grid)(cfg, done, pool.running())
    oomed = [r.point for r in done.values() if r.status == "oom"]

    def finish(record: Record) -> Record:
        p = record.point
        predicted = cfg.predict(p) if cfg.predict else None
        if predicted:
            record.predicted_bytes = predicted
        record.ds_config = cfg.ds_config(p)
        append_record(cfg.results_path, record)
        done[p.key] = record
        if record.status == "oom":
            oomed.append(p)
        plan.finished(record)
        return record

    try:
        while True:
            while (p := plan.next(pool.running())) is not None:
                not_run = _not_run(cfg, p, oomed, plan.bisecting)
                if not_run is None and not pool.can_start(p):
                    break  # no overtaking: a wide point is never starved by narrow ones behind it
                plan.taken(p)
                if not_run is not None:
                    yield finish(not_run)
                else:
                    pool.start(cfg, p)
            if not pool.running():
                return
            for record in pool.wait():
                yield finish(record)
    except BaseException:
        pool.cancel()
        raise


def _not_run(cfg: SweepConfig, p: Point, oomed: list[Point], bisecting: bool) -> Record | None:
    """The record of a point that needn't run (it must OOM, or is predicted far over budget), else None.
    A prediction never stands in for a measurement while bisecting."""
    proof = must_oom(p, oomed) if cfg.prune else None
    if proof is not None:
        return cfg.record(
            p,
            "skipped",
            reason=f"must OOM: {proof.key} did with a batch and sequence no larger",
        )
    predicted = cfg.predict(p) if cfg.predict else None
    if not bisecting and cfg.prune and predicted and cfg.budget and predicted > cfg.budget * (1 + cfg.margin):
        return cfg.record(
            p,
            "over_budget",
            reason=f"not run: predicted {predicted / GIB:.2f} GiB exceeds the {cfg.budget / GIB:.1f} GiB "
            f"budget by more than {cfg.margin:.0%}",
        )
    return None
