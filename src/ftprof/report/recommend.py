"""Recommendations from measured points: pure rules over records, no I/O.

Settings are compared like with like: at one sequence length (the data's, not a free choice) and one
world size (more GPUs are always faster in total). Within that cohort:

* fastest: the highest samples/s whose peak fits the budget;
* largest_effective_batch: the largest micro-batch × accumulation × ranks that fits (faster on ties);
* memory_optimal: the smallest peak among measured points (the safest choice on a shared device).

Each comes with the ds_config to use and the command that trains with it. The fastest pick is marked as
within noise of every point whose throughput interval overlaps its own, and of every point slower by less than
the machine's own drift: how far one point's throughput moved when it was measured again later in the sweep
(:func:`worst_repeat`). A shared machine's speed wanders over minutes by more than any window's spread shows.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field, replace
from typing import Any

from ftprof.records.results import Record, Remeasured
from ftprof.report.commands import train_command
from ftprof.runtime.deepspeed_config import ds_config_for, shipped_config

# Peaks vary a little run to run (allocator, sampling); keep this much of the budget free.
SAFETY_MARGIN = 0.05
TITLES = {
    "fastest": "Fastest under the budget",
    "largest_effective_batch": "Largest effective batch",
    "memory_optimal": "Least memory",
}


@dataclass(frozen=True)
class Cohort:
    """The settings a recommendation was chosen among: one sequence length and one world size."""

    seq_len: int
    world_size: int

    def __str__(self) -> str:
        return f"seq {self.seq_len}, {self.world_size} rank{'s' if self.world_size > 1 else ''}"


#: Why a point was measured again (``run.remeasured``) when that measurement says how repeatable the
#: machine is: the sweep's repeat of its first point, and the longer windows of close calls. A re-measure
#: because the first window waited for CPUs says nothing about the machine's drift.
REPEATABILITY_EVIDENCE: tuple[Remeasured, ...] = ("repeat", "close call")


@dataclass(frozen=True)
class Repeat:
    """One point measured twice in a sweep, the second time later: how far the machine's speed moved."""

    key: str
    first: float  # samples/s
    again: float

    @property
    def change(self) -> float:
        return self.again / self.first - 1

    @property
    def drift(self) -> float:
        """The faster figure over the slower, less one: measured as two points are compared."""
        return max(self.first, self.again) / min(self.first, self.again) - 1

    def __str__(self) -> str:
        return f"{self.key} measured again: {self.first:.1f} → {self.again:.1f} samples/s ({self.change:+.1%})"


def repeats(records: list[Record]) -> list[Repeat]:
    """Each uncontended re-measure in :data:`REPEATABILITY_EVIDENCE` against its point's first uncontended
    measurement; ``records`` in the order measured (the whole results file, not only the latest per point)."""
    first: dict[str, Record] = {}
    out = []
    for r in records:
        if r.status != "ok" or not r.samples_per_s or (r.profile and r.profile.contended):
            continue
        reason = r.run.remeasured
        if reason is None and r.point.key not in first:
            first[r.point.key] = r
        elif reason in REPEATABILITY_EVIDENCE and r.point.key in first:
            out.append(Repeat(r.point.key, first[r.point.key].samples_per_s, r.samples_per_s))
    return out


def worst_repeat(records: list[Record]) -> Repeat | None:
    """The re-measure that moved the most (the sweep's evidence of how repeatable its throughput is)."""
    return max(repeats(records), key=lambda x: x.drift, default=None)


@dataclass(frozen=True)
class Recommendation:
    kind: str
    record: Record
    cohort: Cohort
    ds_config: dict[str, Any] | None  # None: HF Trainer without DeepSpeed (``--zero none``)
    config_path: str | None  # a shipped ds_configs/ file, or where the report writes ``ds_config``
    within_noise_of: list[str] = field(default_factory=list)  # keys it can't be told apart from
    repeat: Repeat | None = None  # fastest only: the machine's drift that within_noise_of allowed for

    @property
    def command(self) -> str:
        record = self.record
        return train_command(record.model, record.point, self.config_path, record.task, record.lora, record.optim)

    @property
    def title(self) -> str:
        return TITLES[self.kind]


def fitting(records: list[Record], budget: int | None) -> list[Record]:
    """Measured points whose peak leaves :data:`SAFETY_MARGIN` of ``budget`` free."""
    ok = [r for r in records if r.status == "ok" and r.peak_bytes]
    if budget is None:
        return ok
    return [r for r in ok if (r.peak_bytes or 0) <= budget * (1 - SAFETY_MARGIN)]


def per_rank_samples_per_s(record: Record) -> float:
    return record.samples_per_s / record.point.world_size


def throughput_range(record: Record) -> tuple[float, float]:
    """Samples/s at the ends of the median step period's ~95% interval (narrower the longer the window);
    the median figure twice when unknown."""
    prof = record.profile
    if prof is None or not prof.samples_per_step or not prof.step_time_median_high_s or not prof.step_time_median_low_s:
        return record.samples_per_s, record.samples_per_s
    return prof.samples_per_step / prof.step_time_median_high_s, prof.samples_per_step / prof.step_time_median_low_s


def within_noise(a: Record, b: Record, drift: float = 0.0) -> bool:
    """Whether the measurements can't order two points: their throughput intervals overlap, or they differ
    by less than ``drift``, the fraction by which the machine's own speed moved during the sweep."""
    (a_low, a_high), (b_low, b_high) = throughput_range(a), throughput_range(b)
    slow, fast = sorted((a.samples_per_s, b.samples_per_s))
    return (a_low <= b_high and b_low <= a_high) or (slow > 0 and fast / slow - 1 <= drift)


def pareto_front(records: list[Record]) -> list[Record]:
    """Points no other point beats on both peak memory (lower) and samples/s (higher), by rising memory.
    Pass one cohort's records: across sequence lengths or world sizes the comparison means nothing."""
    front: list[Record] = []
    best = -1.0
    for r in sorted(
        (r for r in records if r.status == "ok" and r.peak_bytes), key=lambda r: (r.peak_bytes, -r.samples_per_s)
    ):
        if r.samples_per_s > best:
            front.append(r)
            best = r.samples_per_s
    return front


def choose_cohort(
    records: list[Record], budget: int | None, seq_len: int | None = None, world_size: int | None = None
) -> Cohort | None:
    """The cohort to recommend in: by default the longest sequence length at which something fits (inputs
    are padded up to ``--max_length``), then the largest world size measured there."""
    candidates = fitting(records, budget)
    if seq_len is None and candidates:
        seq_len = max(r.point.seq_len for r in candidates)
    candidates = [r for r in candidates if r.point.seq_len == seq_len]
    if world_size is None and candidates:
        world_size = max(r.point.world_size for r in candidates)
    if seq_len is None or world_size is None or not any(r.point.world_size == world_size for r in candidates):
        return None
    return Cohort(seq_len, world_size)


def in_cohort(records: list[Record], cohort: Cohort) -> list[Record]:
    return [r for r in records if (r.point.seq_len, r.point.world_size) == (cohort.seq_len, cohort.world_size)]


def recommend(
    records: list[Record],
    budget: int | None,
    seq_len: int | None = None,
    world_size: int | None = None,
    config_dir: str = ".",
    write_configs: bool = False,
    repeat: Repeat | None = None,
) -> list[Recommendation]:
    """Up to three recommendations in one :class:`Cohort` (none when nothing fits). ``repeat``: the sweep's
    :func:`worst_repeat`, whose drift widens what the fastest pick is within noise of.

    Commands name ``config_dir/recommended_<kind>.json`` with ``write_configs`` (the report writes those
    files), else the shipped ``ds_configs/`` file for the setting, else where the report writes it.
    """
    cohort = choose_cohort(records, budget, seq_len, world_size)
    if cohort is None:
        return []
    candidates = in_cohort(fitting(records, budget), cohort)
    drift = repeat.drift if repeat else 0.0
    fastest = max(candidates, key=lambda r: (r.samples_per_s, -(r.peak_bytes or 0)))
    picks = {
        "fastest": fastest,
        "largest_effective_batch": max(candidates, key=lambda r: (r.point.effective_batch(), r.samples_per_s)),
        "memory_optimal": min(candidates, key=lambda r: (r.peak_bytes or 0, -r.samples_per_s)),
    }
    out = []
    for kind, record in picks.items():
        ds_config, path = _config_of(record, kind, config_dir, write_configs)
        ties = (
            [r.point.key for r in candidates if r is not record and within_noise(record, r, drift)]
            if kind == "fastest"
            else []
        )
        out.append(
            Recommendation(
                kind=kind,
                record=record,
                cohort=cohort,
                config_path=path,
                within_noise_of=ties,
                ds_config=ds_config,
                repeat=repeat if kind == "fastest" else None,
            )
        )
    return out


def _config_of(
    record: Record, kind: str, config_dir: str, write_configs: bool
) -> tuple[dict[str, Any] | None, str | None]:
    """The DeepSpeed config a recommended point trains with, and the path its command names: the shipped
    ``ds_configs/`` file where it holds exactly what ran (a user's --ds_config travels with the record), else
    ``config_dir/recommended_<kind>.json``. (None, None) without DeepSpeed."""
    p = record.point
    if not p.deepspeed:
        return None, None
    ds_config = record.ds_config or ds_config_for(p.zero, p.offload_optimizer, p.offload_param)
    shipped = shipped_config(p) if ds_config == ds_config_for(p.zero, p.offload_optimizer, p.offload_param) else None
    return (
        ds_config,
        f"ds_configs/{shipped}" if shipped and not write_configs else f"{config_dir}/recommended_{kind}.json",
    )


# The memory levers the report prices: (name, the Point field, its value when the lever is not pulled).
LEVERS: tuple[tuple[str, str, Any], ...] = (
    ("gradient checkpointing", "gradient_checkpointing", False),
    ("offload", "offload", "none"),
)


def lever_notes(records: list[Record], budget: int | None) -> list[str]:
    """What each memory lever costs and buys, from points measured with and without it, all else equal:
    "fits only with gradient checkpointing (batch 8), at 0.71x the speed", "offload optimizer buys batch 64
    (vs 16) at 0.42x the speed". Speed ratios compare the same micro-batch; one line per lever setting,
    from the setting where it changes the most."""
    ok = [r for r in records if r.status == "ok"]
    fit = {r.point.key for r in fitting(records, budget)}
    notes = []
    for name, attr, unpulled in LEVERS:
        pulled_values = sorted({getattr(r.point, attr) for r in ok} - {unpulled}, key=str)
        for value in pulled_values:
            label = name if isinstance(value, bool) else f"{name} {value}"
            best: tuple[int, str] | None = None
            sides: dict[Any, dict[bool, dict[int, Record]]] = {}
            for r in ok:
                lever = getattr(r.point, attr)
                if lever not in (value, unpulled):
                    continue
                base = replace(r.point, batch_size=1, **{attr: unpulled})
                sides.setdefault(base, {True: {}, False: {}})[lever == value][r.point.batch_size] = r
            for base, (on, off) in ((b, (s[True], s[False])) for b, s in sides.items()):
                if not on or not off:
                    continue
                ratios = [
                    on[b].samples_per_s / off[b].samples_per_s for b in on.keys() & off.keys() if off[b].samples_per_s
                ]
                speed = f" at {statistics.median(ratios):.2f}x the speed" if ratios else ""
                max_on = max((b for b, r in on.items() if r.point.key in fit), default=0)
                max_off = max((b for b, r in off.items() if r.point.key in fit), default=0)
                where = f"{base.precision} {base.engine} seq {base.seq_len}" + (
                    f" x{base.world_size}" if base.world_size > 1 else ""
                )
                where += f" LoRA r={base.lora_r}" if base.peft == "lora" else ""
                if max_on and not max_off:
                    text = f"{where}: fits only with {label} (batch {max_on}){speed}"
                elif max_on > max_off:
                    text = f"{where}: {label} buys batch {max_on} (vs {max_off}){speed}"
                elif ratios:
                    text = f"{where}: {label} fits no larger batch{speed}"
                else:
                    continue
                gain = max_on - max_off
                if best is None or gain > best[0]:
                    best = (gain, text)
            if best:
                notes.append(best[1])
    return notes
