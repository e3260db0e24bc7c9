"""PNG plots of a sweep, saved beside its results: peak memory and throughput over micro-batch."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ftprof.records.results import Record
from ftprof.units import GIB

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

Series = dict[str, list[tuple[int, Record]]]


def label(record: Record) -> str:
    """The line a point belongs to: everything but the micro-batch."""
    p = record.point
    text = f"{p.precision} {p.engine} seq {p.seq_len}"
    text += f" x{p.world_size}" if p.world_size > 1 else ""
    text += f" ga{p.grad_accum}" if p.grad_accum > 1 else ""
    text += f" off:{p.offload}" if p.offload != "none" else ""
    text += " ckpt" if p.gradient_checkpointing else ""
    return text + (f" LoRA r{p.lora_r}" if p.peft == "lora" else "")


def _series(records: list[Record]) -> Series:
    lines: Series = defaultdict(list)
    for r in records:
        if r.status == "ok" and r.peak_bytes:
            lines[label(r)].append((r.point.batch_size, r))
    return {k: sorted(v, key=lambda x: x[0]) for k, v in sorted(lines.items(), key=lambda kv: _natural(kv[0]))}


def _natural(text: str) -> list[int | str]:
    """Sort 'seq 64' before 'seq 256'."""
    return [int(t) if t.isdigit() else t for t in text.replace("-", " ").split()]


def throughput_spread(record: Record) -> tuple[float, float] | None:
    """Samples/s at the slow (p90) and fast (p10) step times: the spread the throughput plot shows."""
    prof = record.profile
    if prof is None or not prof.step_time_p90_s or not prof.step_time_p10_s:
        return None
    samples_per_step = prof.samples_per_step or record.point.effective_batch()  # measured, else planned
    return samples_per_step / prof.step_time_p90_s, samples_per_step / prof.step_time_p10_s


# The budget is drawn as a line only when it is at most this many times the highest measured peak: a 24 GiB
# budget over peaks of 0.7 GiB would squash every line onto the floor, so it is said in the title instead.
BUDGET_LINE_WITHIN = 3.0
PLOTS: dict[str, tuple[str, Callable[[Record], float]]] = {
    "memory.png": ("peak memory (GiB)", lambda r: (r.peak_bytes or 0) / GIB),
    "throughput.png": ("train samples/s", lambda r: r.samples_per_s),
}


def save_plots(records: list[Record], out_dir: Path, budget: int | None = None) -> list[Path]:
    """Write ``memory.png`` (peak GiB over batch, a line per setting; the budget as a line when it is near the
    peaks, else in the title; OOM and skipped points as markers) and ``throughput.png`` (samples/s over batch,
    p10-p90 spread as error bars)."""
    import matplotlib.pyplot as plt

    written = []
    for name in PLOTS:
        fig = figure(name, records, budget)
        path = out_dir / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def figure(name: str, records: list[Record], budget: int | None = None) -> Figure:
    """The figure ``name`` (a key of :data:`PLOTS`) of ``records``, not saved; the caller closes it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ylabel, value = PLOTS[name]
    fig, ax = plt.subplots(figsize=(8, 5))
    for text, points in _series(records).items():
        xs = [b for b, _ in points]
        ys = [value(r) for _, r in points]
        line = ax.plot(xs, ys, marker="o", label=text)[0]
        if name == "throughput.png":
            spreads = [throughput_spread(r) for _, r in points]
            lows = [y - s[0] if s else 0.0 for y, s in zip(ys, spreads, strict=True)]
            highs = [s[1] - y if s else 0.0 for y, s in zip(ys, spreads, strict=True)]
            ax.errorbar(
                xs,
                ys,
                yerr=[[max(0.0, v) for v in lows], [max(0.0, v) for v in highs]],
                fmt="none",
                ecolor=line.get_color(),
                capsize=3,
                alpha=0.7,
            )
    if name == "memory.png":
        _mark_failures(ax, records, budget)
    ax.set_xscale("log", base=2)
    batches = sorted({r.point.batch_size for r in records})
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_xlabel("micro-batch per rank")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _mark_failures(ax: Axes, records: list[Record], budget: int | None) -> None:
    """The budget as a dashed line (in the title when it is far above the peaks); OOM (red x) and skipped
    (orange triangle) points along the top edge."""
    if budget:
        highest = max((r.peak_bytes or 0 for r in records), default=0)
        text = f"budget {budget / GIB:.1f} GiB"
        if highest and budget > BUDGET_LINE_WITHIN * highest:
            ax.set_title(f"{text}: {budget / highest:.0f}x the highest peak, off this scale", fontsize=9)
        else:
            ax.axhline(budget / GIB, color="grey", linestyle="--", label=text)
    top = ax.get_ylim()[1]
    for status, marker, color in (("oom", "x", "red"), ("skipped", "^", "orange")):
        batches = [r.point.batch_size for r in records if r.status == status]
        if batches:
            ax.scatter(
                batches, [top] * len(batches), marker=marker, color=color, label=status.upper(), zorder=3, clip_on=False
            )


def save_breakdown(rows: list[tuple[str, dict[str, int]]], out_dir: Path) -> Path | None:
    """Write ``breakdown.png``: a stacked bar per recommended point of where its peak goes (MiB; items as
    :func:`ftprof.report.tables.breakdown` gives them, ``host`` beside the device's stack). None without rows."""
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = list(dict.fromkeys(k for _, parts in rows for k in parts))
    fig, ax = plt.subplots(figsize=(8, 1.6 + 0.6 * len(rows)))
    names = [name for name, _ in rows]
    left = [0.0] * len(rows)
    for item in items:
        widths = [max(0, parts.get(item, 0)) / 2**20 for _, parts in rows]
        ax.barh(names, widths, left=left, label=item, hatch="//" if item == "host" else None)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.set_xlabel("MiB on the highest rank (saved activations: one micro-batch)")
    ax.invert_yaxis()
    ax.legend(fontsize=7, ncol=len(items), loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    path = out_dir / "breakdown.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
