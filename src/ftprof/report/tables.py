"""A sweep's records and recommendations as rich renderables for the terminal: the results table, the Pareto
front, the recommendations panel, where the peak goes, and the notes (:mod:`~ftprof.report.exports` writes the
same objects as md/json/csv; :mod:`~ftprof.report.sweep_report` loads a folder and prints it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich import box
from rich.console import Group
from rich.rule import Rule
from rich.table import Table
from rich.text import Text

from ftprof.records.profile import CONTENDED_STEAL, CONTENDED_WAIT, UNSTABLE_SPREAD, contention
from ftprof.records.results import STATUSES, Record
from ftprof.report.adapters import comparison
from ftprof.report.recommend import (
    SAFETY_MARGIN,
    Cohort,
    Recommendation,
    choose_cohort,
    in_cohort,
    lever_notes,
    pareto_front,
    per_rank_samples_per_s,
)
from ftprof.units import gib

STATUS_STYLE = {
    "ok": "green",
    "oom": "bold red",
    "skipped": "yellow",
    "over_budget": "yellow",
    "error": "magenta",
    "timeout": "magenta",
}
FIGURE_NAMES = {
    "rss": "process RSS",
    "process": "NVML process memory",
    "device_delta": "GPU memory used since the point started (NVML device delta)",
}
SKIP_RULES = {
    "skipped": "a smaller batch or sequence of the same setting ran out of memory (proof)",
    "over_budget": "the estimator predicted more than the budget plus the margin stated (not run)",
}
COLUMNS = [
    "precision",
    "zero",
    "world_size",
    "seq_len",
    "batch_size",
    "grad_accum",
    "effective_batch",
    "offload",
    "gradient_checkpointing",
    "peft",
    "lora_r",
    "trainable_params",
    "status",
    "peak_gib",
    "predicted_gib",
    "torch_allocated_gib",
    "samples_per_s",
    "samples_per_s_per_rank",
    "throughput_spread_pct",
    "unstable",
    "real_tokens_per_s",
    "padded_tokens_per_s",
    "step_time_median_ms",
    "step_time_p90_ms",
    "model_tflops_per_s",
    "mfu",
    "reason",
    "cpu_wait_s_per_s",
    "cpu_steal_pct",
    "reference_ms",
]


def row(record: Record) -> dict[str, Any]:
    """One flat row per record: the CSV/markdown/JSON view."""
    p, prof = record.point, record.profile

    def value(key: str) -> float | None:
        return getattr(prof, key) if prof is not None else None

    def ms(key: str) -> float | None:
        v = value(key)
        return round(v * 1000, 2) if v is not None else None

    def num(key: str, digits: int = 1) -> float | None:
        v = value(key)
        return round(v, digits) if v is not None else None

    return {
        "precision": p.precision,
        "zero": p.stage,  # "none": HF Trainer without DeepSpeed
        "world_size": p.world_size,
        "seq_len": p.seq_len,
        "batch_size": p.batch_size,
        "grad_accum": p.grad_accum,
        "effective_batch": p.effective_batch(),
        "offload": p.offload,
        "gradient_checkpointing": p.gradient_checkpointing,
        "peft": p.peft,
        "lora_r": p.lora_r or None,
        "trainable_params": next((r.trainable_parameters for r in prof.ranks), None) if prof else None,
        "status": record.status,
        "peak_gib": gib(record.peak_bytes),
        "torch_allocated_gib": gib(prof.peak("torch_allocated_bytes")) if prof else None,
        "samples_per_s": num("samples_per_s"),
        "samples_per_s_per_rank": round(per_rank_samples_per_s(record), 1) if prof else None,
        "throughput_spread_pct": round(100 * prof.step_time_spread, 1) if prof and prof.step_time_spread else None,
        "unstable": prof.unstable if prof else None,
        "cpu_wait_s_per_s": round(prof.cpu_wait_share, 3) if prof and prof.cpu_wait_share is not None else None,
        "cpu_steal_pct": round(100 * prof.cpu_steal_share, 1) if prof and prof.cpu_steal_share is not None else None,
        "reference_ms": round(1000 * prof.reference_s, 3) if prof and prof.reference_s else None,
        "real_tokens_per_s": num("real_tokens_per_s", 0),
        "padded_tokens_per_s": num("padded_tokens_per_s", 0),
        "predicted_gib": gib(record.predicted_bytes),
        "step_time_median_ms": ms("step_time_median_s"),
        "step_time_p90_ms": ms("step_time_p90_s"),
        "model_tflops_per_s": num("model_tflops_per_s", 3),
        "mfu": num("mfu", 4),
        "reason": record.reason,
    }


def fmt_cell(value: Any) -> str:
    return "" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def results_table(records: list[Record], figure: str) -> Table:
    """Peak memory and throughput per point; OOM and skipped cells marked. Fits 80 columns; the exports
    carry every figure (p90 step time, padded tokens, TFLOP/s, MFU)."""
    table = Table(
        title=f"Measured points (peak = {figure}, max over ranks and phases)",
        header_style="bold",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        show_edge=False,
        collapse_padding=True,
    )
    for name in ("setting", "seq", "batch", "accum", "status", "peak GiB", "pred.", "samples/s", "spread%", "step ms"):
        table.add_column(
            name, justify="left" if name in ("setting", "status") else "right", no_wrap=True, min_width=len(name)
        )
    for r in sorted(records, key=lambda r: r.point):
        d, p = row(r), r.point
        setting = f"{p.precision} z{p.stage}" + (f" x{p.world_size}" if p.world_size > 1 else "")
        setting += (" gc" if p.gradient_checkpointing else "") + (f" off:{p.offload}" if p.offload != "none" else "")
        setting += f" lora{p.lora_r}" if p.peft == "lora" else ""
        status = Text(r.status if r.status == "ok" else r.status.upper(), style=STATUS_STYLE[r.status])
        table.add_row(
            setting,
            str(p.seq_len),
            str(p.batch_size),
            str(p.grad_accum),
            status,
            fmt_cell(d["peak_gib"]),
            fmt_cell(round(d["predicted_gib"], 2) if d["predicted_gib"] else None),
            fmt_cell(d["samples_per_s"]),
            Text(fmt_cell(d["throughput_spread_pct"]), style="bold yellow" if d["unstable"] else ""),
            fmt_cell(d["step_time_median_ms"]),
        )
    return table


def pareto_table(records: list[Record], cohort: Cohort | None) -> Table:
    """The Pareto front of one cohort (one sequence length and world size)."""
    where = f" at {cohort}" if cohort else ""
    table = Table(
        title=f"Pareto front{where}: nothing measured is both leaner and faster",
        header_style="bold",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    for name in ("peak GiB", "samples/s", "setting"):
        table.add_column(name, justify="right" if name != "setting" else "left")
    for r in pareto_front(in_cohort(records, cohort) if cohort else []):
        table.add_row(fmt_cell(gib(r.peak_bytes)), fmt_cell(round(r.samples_per_s, 1)), r.point.key)
    return table


BREAKDOWN_COLUMNS = {  # column -> the measured items it sums (parameters_<dtype> all go under "params")
    "master": ("master_weights",),
    "optimizer": ("optimizer_states",),
    "grads+buffers": ("gradients", "gradient_buckets", "other_buffers"),
    "gathered": ("gathered_parameters",),  # ZeRO-3: whole 16-bit weights kept through the backward
    "saved act.": ("saved_activations",),
}


def breakdown(record: Record) -> dict[str, int] | None:
    """The measured breakdown of the point's highest-peak rank, in bytes: params, master, optimizer,
    grads+buffers, gathered (ZeRO-3's whole 16-bit weights through the backward), saved act. (one
    micro-batch), ``rest`` = the peak minus those (interpreter and CUDA
    runtime, temporaries, allocator slack) and, where something was offloaded from a GPU, ``host`` (items in
    host memory: not part of the device peak). None for records without one."""
    profile = record.profile
    if profile is None or not profile.ranks or not record.peak_bytes:
        return None
    figure = record.run.peak_figure or profile.primary_figure
    rank = max(profile.ranks, key=lambda r: r.peak(figure))
    if not rank.breakdown:
        return None
    on_device = {k: v for k, v in rank.breakdown.items() if not k.endswith("_host")}
    parts = {"params": sum(v for k, v in on_device.items() if k.startswith(("parameters_", "frozen_parameters_")))}
    parts |= {column: sum(on_device.get(item, 0) for item in items) for column, items in BREAKDOWN_COLUMNS.items()}
    if not parts["gathered"]:  # ZeRO-3 only
        del parts["gathered"]
    parts["rest"] = rank.peak(figure) - sum(parts.values())
    host = sum(v for k, v in rank.breakdown.items() if k.endswith("_host"))
    if host:
        parts["host"] = host
    return parts


def breakdown_rows(recs: list[Recommendation]) -> tuple[list[tuple[str, dict[str, int]]], list[str]]:
    """(recommendation kind, its :func:`breakdown`) for each recommendation measured with one, and every
    column any of them has, in order."""
    rows = [(rec.kind, parts) for rec in recs if (parts := breakdown(rec.record))]
    return rows, list(dict.fromkeys(k for _, parts in rows for k in parts))


def breakdown_table(recs: list[Recommendation]) -> Table | None:
    """Where each recommended point's peak goes (MiB, the highest rank), measured item by item."""
    rows, columns = breakdown_rows(recs)
    if not rows:
        return None
    table = Table(
        title="Where the peak goes, measured (MiB, highest rank; saved activations of one micro-batch)",
        header_style="bold",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    table.add_column("pick")
    for name in columns:
        table.add_column(name, justify="right")
    for kind, parts in rows:
        table.add_row(kind, *(f"{parts.get(c, 0) / 2**20:.1f}" for c in columns))
    return table


MEMORY_RECORDS_TITLE = (
    "Memory records (sweep --memory_snapshot; .pickle: https://pytorch.org/memory_viz, .html: a browser)"
)


def memory_records(recs: list[Recommendation], folder: Path | None = None) -> list[str]:
    """One line per recommended point measured with ``--memory_snapshot`` (the picks it is, then the files its
    highest-peak rank wrote, under ``folder``, the sweep folder), saying which other ranks wrote theirs."""
    picks: dict[str, list[str]] = {}
    lines: dict[str, str] = {}
    for rec in recs:
        record, profile = rec.record, rec.record.profile
        ranks = [r for r in (profile.ranks if profile else []) if r.memory_files]
        if profile is None or not ranks:
            continue
        picks.setdefault(record.point.key, []).append(rec.kind)
        top = max(ranks, key=lambda r: r.peak(record.run.peak_figure or profile.primary_figure))
        files = ", ".join(str(folder / f) if folder else f for f in top.memory_files)
        others = [str(r.rank) for r in ranks if r is not top]
        beside = f" (rank{'s' if len(others) > 1 else ''} {', '.join(others)} beside it)" if others else ""
        lines[record.point.key] = f"rank {top.rank}: {files}{beside}"
    return [f"{', '.join(picks[key])}: {line}" for key, line in lines.items()]


def recommendations_panel(recs: list[Recommendation], budget: int | None, records: list[Record]) -> Group:
    """Recommendations as plain lines under a rule: no border, so a command copies as one piece; then what
    the memory levers cost and buy."""
    budget_text = f"{gib(budget)} GiB" if budget else "no budget"
    at = f", chosen among points at {recs[0].cohort}" if recs else ""
    rule = Rule(f"Recommendations (budget {budget_text}, {SAFETY_MARGIN:.0%} kept free{at})")
    if not recs:
        return Group(
            rule,
            Text(f"No measured point fits {budget_text}; try smaller batches, ZeRO-3 or offload.", style="bold red"),
        )
    parts: list[Any] = []
    for rec in recs:
        r = rec.record
        parts.append(Text(f"{rec.title}: {r.point.key} — {summary(rec)}", style="bold"))
        if noise := noise_line(rec):
            parts.append(Text(f"  {noise}", style="yellow"))
        parts.append(Text(f"  {rec.command}", style="cyan"))
    levers = lever_notes(records, budget)
    if levers:
        parts.append(Text("Memory levers: " + "; ".join(levers) + ".", style="italic"))
    return Group(rule, *parts)


def noise_line(rec: Recommendation) -> str:
    """What the pick can't be told apart from, and the machine's drift that allowed for (fastest only)."""
    if not rec.repeat and not rec.within_noise_of:
        return ""
    ties = f"within measurement noise of {', '.join(rec.within_noise_of)}" if rec.within_noise_of else ""
    drift = f"this machine's drift: {rec.repeat}" if rec.repeat else ""
    return "; ".join(x for x in (ties, drift) if x)


def summary(rec: Recommendation) -> str:
    """Peak, throughput (total and per rank, with its spread) and effective batch of a recommendation."""
    r = rec.record
    spread = r.profile.step_time_spread if r.profile else None
    spread_text = f" (step spread {100 * spread:.0f}%)" if spread else ""
    per_rank = f" ({per_rank_samples_per_s(r):.1f} per rank)" if r.point.world_size > 1 else ""
    return (
        f"peak {gib(r.peak_bytes)} GiB, {r.samples_per_s:.1f}{spread_text} samples/s{per_rank}, "
        f"effective batch {r.point.effective_batch()}"
    )


def notes(records: list[Record]) -> Text:
    counts = {s: sum(r.status == s for r in records) for s in STATUSES}
    text = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    profiles = [r.profile for r in records if r.profile]
    random_init = any(p.random_init for p in profiles)
    lines = [f"{len(records)} points: {text}."]
    for status, rule in SKIP_RULES.items():
        skipped = [r for r in records if r.status == status]
        if skipped:
            example = f" E.g. {skipped[0].point.key}: {skipped[0].reason}." if status == "over_budget" else ""
            lines.append(f"{status.upper()} ({rule}): {', '.join(r.point.key for r in skipped)}.{example}")
    shared = sorted(
        {
            r.run.concurrent_points
            for r in records
            if r.run.concurrent_points > 1 and r.profile and r.profile.sampler == "rss"
        }
    )
    if shared:
        lines.append(
            f"Throughput was measured with up to {shared[-1]} points sharing the CPU cores (--parallel "
            f"{shared[-1]}): compare their memory, not their speed."
        )
    unstable = [r.point.key for r in records if r.profile and r.profile.unstable]
    if unstable:
        lines.append(
            f"Unstable throughput (p10-p90 step times spread over {UNSTABLE_SPREAD:.0%} of the median; spread% "
            "column): "
            f"{', '.join(unstable)}; measure longer with --min_seconds."
        )
    contended = [r for r in records if r.profile and r.profile.contended]
    if contended:
        lines.append(
            f"Not the CPUs to themselves (threads waiting for a CPU over {CONTENDED_WAIT:g} s per s: other processes, "
            f"or more threads than cores; or the hypervisor taking over {CONTENDED_STEAL:.0%}): "
            + "; ".join(f"{r.point.key} ({contention(r.profile)})" for r in contended if r.profile)
            + ". Their throughput is the machine's as much as the setting's (the sweep measures such a point once "
            "more unless --no_remeasure or --parallel)."
        )
    if random_init:
        lines.append(
            "Models were built from their configs with random weights: memory and speed don't depend on weight values."
        )
    formula = next((p.flop_formula for p in profiles if p.flop_formula), None)
    if formula:
        lines.append(f"Model FLOPs: {formula}.")
    return Text("\n".join(lines))


def adapters_table(records: list[Record], budget: int | None) -> Table | None:
    """Full fine-tuning beside LoRA, per setting measured with both (:func:`ftprof.report.adapters.comparison`)."""
    rows = comparison(records, budget)
    if not rows:
        return None
    table = Table(
        title="Full fine-tuning beside LoRA, measured (largest micro-batch that fits; ratios at the largest batch "
        "every method fits)",
        header_style="bold",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    for name in ("setting", "method", "max batch", "peak GiB", "samples/s", "at batch", "peak ×", "speed ×"):
        table.add_column(name, justify="left" if name in ("setting", "method") else "right")
    for x in rows:
        table.add_row(
            x.setting,
            x.method,
            fmt_cell(x.max_batch) or "none fits",
            fmt_cell(gib(x.peak_bytes)),
            fmt_cell(round(x.samples_per_s, 1) if x.samples_per_s else None),
            fmt_cell(x.common_batch),
            fmt_cell(round(x.peak_vs_full, 2) if x.peak_vs_full else None),
            fmt_cell(round(x.speed_vs_full, 2) if x.speed_vs_full else None),
        )
    return table


def render(records: list[Record], recs: list[Recommendation], budget: int | None, folder: Path | None = None) -> Group:
    """The whole terminal report (``folder``: the sweep's, where its memory records are)."""
    figures = {r.profile.figure for r in records if r.profile}
    figure = " / ".join(FIGURE_NAMES[f] for f in sorted(figures)) or "process RSS"
    cohort = recs[0].cohort if recs else choose_cohort(records, None)
    parts: list[Any] = [results_table(records, figure), pareto_table(records, cohort)]
    parts.append(recommendations_panel(recs, budget, records))
    for table in (adapters_table(records, budget), breakdown_table(recs)):
        if table is not None:
            parts.append(table)
    if lines := memory_records(recs, folder):
        parts.append(Text("\n".join([MEMORY_RECORDS_TITLE + ":", *(f"  {line}" for line in lines)])))
    return Group(*parts, notes(records))
