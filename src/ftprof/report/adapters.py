"""Full fine-tuning beside LoRA (``sweep --peft none,lora``): per setting, what each method fits and how fast
it runs, measured. Pure functions over records, no I/O.

For each setting measured with more than one method (everything but the micro-batch and the method equal), a
row per method: the largest micro-batch that fits the budget, its peak and samples/s, and — at the largest
micro-batch every method fits — its peak and speed relative to full fine-tuning. LoRA changes the model, not
just the memory: the report only sets it beside full fine-tuning; it is recommended only where it was on the
grid.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ftprof.point import Point
from ftprof.records.results import Record
from ftprof.report.recommend import fitting


def method(point: Point) -> str:
    """``full`` or ``LoRA r=N``.

    >>> method(Point(precision="fp32", zero=2, seq_len=64, batch_size=4, peft="lora", lora_r=16))
    'LoRA r=16'
    """
    return f"LoRA r={point.lora_r}" if point.peft == "lora" else "full"


def setting(point: Point) -> str:
    """The setting a method is compared within, in words (precision, ZeRO, ranks, sequence, levers)."""
    words = [point.precision, point.engine, f"seq {point.seq_len}"]
    words += [f"x{point.world_size}"] if point.world_size > 1 else []
    words += [f"accum {point.grad_accum}"] if point.grad_accum > 1 else []
    words += ["checkpointing"] if point.gradient_checkpointing else []
    words += [f"offload {point.offload}"] if point.offload != "none" else []
    return " ".join(words)


@dataclass(frozen=True)
class MethodRow:
    """One method of one setting, measured."""

    setting: str
    method: str
    max_batch: int | None  # the largest micro-batch that fits the budget (None: none does)
    peak_bytes: int | None  # at max_batch
    samples_per_s: float | None  # at max_batch
    common_batch: int | None  # the largest micro-batch every method of the setting fits
    peak_vs_full: float | None  # at common_batch: this method's peak / full fine-tuning's
    speed_vs_full: float | None  # at common_batch: samples/s / full fine-tuning's


def comparison(records: list[Record], budget: int | None) -> list[MethodRow]:
    """The rows of every setting measured with full fine-tuning and LoRA (or several LoRA ranks)."""
    fit = {id(r) for r in fitting(records, budget)}
    groups: dict[Point, dict[Point, list[Record]]] = {}
    for r in records:
        if r.status != "ok":
            continue
        base = replace(r.point, batch_size=1, peft="none", lora_r=0)
        groups.setdefault(base, {}).setdefault(replace(r.point, batch_size=1), []).append(r)
    rows = []
    for base, methods in sorted(groups.items()):
        if len(methods) < 2:
            continue
        fits = {m: {r.point.batch_size: r for r in recs if id(r) in fit} for m, recs in methods.items()}
        common = set.intersection(*(set(f) for f in fits.values()))
        at = max(common, default=None)
        full = fits.get(base, {}).get(at) if at is not None else None
        for m in sorted(methods, key=lambda p: (p.peft != "none", p.lora_r)):
            best = fits[m][max(fits[m])] if fits[m] else None
            mine = fits[m].get(at) if at is not None else None
            rows.append(
                MethodRow(
                    setting=setting(base),
                    method=method(m),
                    max_batch=best.point.batch_size if best else None,
                    peak_bytes=best.peak_bytes if best else None,
                    samples_per_s=best.samples_per_s if best else None,
                    common_batch=at,
                    peak_vs_full=_ratio(mine.peak_bytes, full.peak_bytes) if mine and full else None,
                    speed_vs_full=_ratio(mine.samples_per_s, full.samples_per_s) if mine and full else None,
                )
            )
    return rows


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None
