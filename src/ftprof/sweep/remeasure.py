"""Measuring points again: the close calls of the fastest pick, points whose CPUs were busy, and the one
repeat that gauges this machine's drift. Each re-measure is a new record that replaces the earlier one in
reports."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace

from ftprof.point import Point
from ftprof.records.results import Record, Remeasured, append_record, latest
from ftprof.report.recommend import recommend, worst_repeat
from ftprof.sweep.executors import PointExecutor, SerialExecutor
from ftprof.sweep.point_run import SweepConfig, run_point


def close_calls(records: list[Record], budget: int | None) -> list[Point]:
    """The fastest recommendation and the points whose throughput is within noise of it: the ones to measure
    again, longer, before the report picks between them. A point is re-measured once: one measured twice
    already (a resumed sweep) stays as it is; a re-measure because the CPUs were busy, or the repeat that
    gauges the machine's drift, doesn't count."""
    recs = recommend(latest(records), budget, repeat=worst_repeat(records))
    if not recs or not recs[0].within_noise_of:
        return []
    measured = [r.point.key for r in records if r.status == "ok" and r.run.remeasured not in ("contended", "repeat")]
    by_key = {r.point.key: r.point for r in records}
    close = [recs[0].record.point.key, *recs[0].within_noise_of]
    return [by_key[k] for k in close if measured.count(k) < 2]


def repeat_point(records: list[Record]) -> Point | None:
    """The sweep's first uncontended ok point, to measure again once the sweep is through: how far its
    throughput moves says how repeatable this machine's figures are (:func:`ftprof.report.recommend.worst_repeat`).
    None once the results hold such a repeat (a resumed sweep) or nothing to repeat."""
    if any(r.run.remeasured == "repeat" for r in records):
        return None
    return next(
        (
            r.point
            for r in records
            if r.status == "ok"
            and r.samples_per_s
            and r.run.remeasured is None
            and not (r.profile and r.profile.contended)
            and r.run.concurrent_points == 1
        ),
        None,
    )


def contended_points(records: list[Record]) -> list[Point]:
    """Points whose window didn't have the CPUs to itself (its threads waited for a CPU, or the hypervisor
    took time): the ones to measure again. A point is re-measured once: one measured twice already stays as
    it is. Points run side by side (``--parallel``) waited for each other: they are flagged as such in the
    report, not re-measured one by one."""
    measured = [r.point.key for r in records if r.status == "ok"]
    return [
        r.point
        for r in latest(records)
        if r.status == "ok"
        and r.profile
        and r.profile.contended
        and r.run.concurrent_points == 1
        and measured.count(r.point.key) < 2
    ]


def remeasure(
    cfg: SweepConfig,
    points: list[Point],
    run: Callable[[SweepConfig, Point], Record] = run_point,
    executor: PointExecutor | None = None,
    window: int = 3,
    reason: Remeasured = "close call",
) -> Iterator[Record]:
    """Measure ``points`` again over a window ``window`` times as long; each new record (``run.remeasured``
    says why) is appended and, being the latest for its point, replaces the earlier measurement in reports."""
    longer = replace(cfg, steps=window * cfg.steps, min_seconds=window * cfg.min_seconds)
    pool = executor or SerialExecutor(run)
    queue = list(points)
    try:
        while queue or pool.running():
            while queue and pool.can_start(queue[0]):
                pool.start(longer, queue.pop(0))
            for record in pool.wait():
                record.ds_config = cfg.ds_config(record.point)
                record.run.remeasured = reason
                predicted = cfg.predict(record.point) if cfg.predict else None
                if predicted:  # as the first measurement had it: the report shows it beside the peak
                    record.predicted_bytes = predicted
                append_record(cfg.results_path, record)
                yield record
    except BaseException:
        pool.cancel()
        raise
