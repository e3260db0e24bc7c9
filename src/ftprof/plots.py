"""PNG plots of a sweep, saved beside its results: peak memory and throughput over micro-batch."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from ftprof.recommend import samples_per_s
from ftprof.results import Record


def _series(records: list[Record], value) -> dict[str, list[tuple[int, float]]]:
    lines: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for r in records:
        if r.status == "ok" and r.peak_bytes:
            p = r.point
            label = f"{p.precision} ZeRO-{p.zero} seq {p.seq_len}" + (f" x{p.world_size}" if p.world_size > 1 else "") \
                + (f" ga{p.grad_accum}" if p.grad_accum > 1 else "")
            lines[label].append((p.batch_size, value(r)))
    return {k: sorted(v) for k, v in sorted(lines.items(), key=lambda kv: _natural(kv[0]))}


def _natural(label: str) -> list:
    """Sort 'seq 64' before 'seq 256'."""
    return [int(t) if t.isdigit() else t for t in label.replace("-", " ").split()]


def save_plots(records: list[Record], out_dir: Path, budget: int | None = None) -> list[Path]:
    """Write ``memory.png`` (peak GiB over batch, a line per sequence length and setting; OOMs marked) and
    ``throughput.png`` (samples/s over batch). Returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for name, ylabel, value in (("memory.png", "peak memory (GiB)", lambda r: r.peak_bytes / 2**30),
                                ("throughput.png", "train samples/s", samples_per_s)):
        fig, ax = plt.subplots(figsize=(8, 5))
        for label, points in _series(records, value).items():
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", label=label)
        ooms = [r.point.batch_size for r in records if r.status == "oom"]
        if name == "memory.png":
            if ooms:
                ax.scatter(ooms, [ax.get_ylim()[1]] * len(ooms), marker="x", color="red", label="OOM", zorder=3)
            top = max((r.peak_bytes for r in records if r.peak_bytes), default=0)
            if budget and budget <= 2 * top:  # far above the data it would flatten every line
                ax.axhline(budget / 2**30, color="grey", linestyle="--", label="budget")
        ax.set_xscale("log", base=2)
        batches = sorted({r.point.batch_size for r in records})
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_xlabel("micro-batch per rank")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
