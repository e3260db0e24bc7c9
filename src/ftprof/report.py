"""Sweep reports: rich renderables for the terminal and md/json/csv exports, all from the same records."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from rich import box
from rich.console import Group
from rich.rule import Rule
from rich.table import Table
from rich.text import Text

from ftprof.recommend import Recommendation, pareto_front, samples_per_s
from ftprof.results import Record

STATUS_STYLE = {"ok": "green", "oom": "bold red", "skipped": "yellow", "error": "magenta", "timeout": "magenta"}
COLUMNS = ["precision", "zero", "world_size", "seq_len", "batch_size", "grad_accum", "effective_batch", "status",
           "peak_gib", "predicted_gib", "torch_allocated_gib", "samples_per_s", "real_tokens_per_s", "padded_tokens_per_s",
           "step_time_median_ms", "step_time_p90_ms", "model_tflops_per_s", "mfu", "reason"]


def gib(n: int | float | None) -> float | None:
    """Bytes to GiB, rounded for display.

    >>> gib(3 * 2**30)
    3.0
    """
    return None if not n else round(n / 2**30, 3)


def row(record: Record) -> dict[str, Any]:
    """One flat row per record: the CSV/markdown/JSON view."""
    p, m = record.point, record.metrics

    def ms(key: str) -> float | None:
        return round(m[key] * 1000, 2) if m.get(key) is not None else None

    def num(key: str, digits: int = 1) -> float | None:
        return round(m[key], digits) if m.get(key) is not None else None

    return {"precision": p.precision, "zero": p.zero, "world_size": p.world_size, "seq_len": p.seq_len,
            "batch_size": p.batch_size, "grad_accum": p.grad_accum, "effective_batch": p.effective_batch(),
            "status": record.status, "peak_gib": gib(record.peak_bytes),
            "torch_allocated_gib": gib(m.get("peak_torch_allocated_bytes")), "samples_per_s": num("samples_per_s"),
            "real_tokens_per_s": num("real_tokens_per_s", 0), "padded_tokens_per_s": num("padded_tokens_per_s", 0),
            "predicted_gib": gib(m.get("predicted_bytes")),
            "step_time_median_ms": ms("step_time_median_s"), "step_time_p90_ms": ms("step_time_p90_s"),
            "model_tflops_per_s": num("model_tflops_per_s", 3), "mfu": num("mfu", 4), "reason": record.reason}


def _fmt(value: Any) -> str:
    return "" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def results_table(records: list[Record], figure: str) -> Table:
    """Peak memory and throughput per point; OOM and skipped cells marked. Fits 80 columns; the exports
    carry every figure (p90 step time, padded tokens, TFLOP/s, MFU)."""
    table = Table(title=f"Measured points (peak = {figure}, max over ranks and phases)", header_style="bold",
                  box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, collapse_padding=True)
    for name in ("setting", "seq", "batch", "accum", "status", "peak GiB", "pred.", "samples/s", "tokens/s",
                 "step ms"):
        table.add_column(name, justify="left" if name in ("setting", "status") else "right", no_wrap=True,
                         min_width=len(name))
    for r in sorted(records, key=lambda r: r.point):
        d, p = row(r), r.point
        setting = f"{p.precision} z{p.zero}" + (f" x{p.world_size}" if p.world_size > 1 else "")
        status = Text(r.status if r.status == "ok" else r.status.upper(), style=STATUS_STYLE[r.status])
        table.add_row(setting, str(p.seq_len), str(p.batch_size), str(p.grad_accum), status, _fmt(d["peak_gib"]),
                      _fmt(round(d["predicted_gib"], 2) if d["predicted_gib"] else None), _fmt(d["samples_per_s"]), _fmt(d["real_tokens_per_s"]), _fmt(d["step_time_median_ms"]))
    return table


def pareto_table(records: list[Record]) -> Table:
    table = Table(title="Pareto front: nothing measured is both leaner and faster", header_style="bold",
                  box=box.SIMPLE_HEAD, pad_edge=False)
    for name in ("peak GiB", "samples/s", "setting"):
        table.add_column(name, justify="right" if name != "setting" else "left")
    for r in pareto_front(records):
        table.add_row(_fmt(gib(r.peak_bytes)), _fmt(round(samples_per_s(r), 1)), r.point.key)
    return table


def recommendations_panel(recs: list[Recommendation], budget: int | None) -> Group:
    """Recommendations as plain lines under a rule: no border, so a command copies as one piece."""
    budget_text = f"{gib(budget)} GiB" if budget else "no budget"
    at = f" at seq {recs[0].record.point.seq_len}" if recs else ""
    rule = Rule(f"Recommendations{at} (budget {budget_text}, 5% kept free)")
    if not recs:
        return Group(rule, Text(f"No measured point fits {budget_text}; try smaller batches, ZeRO-3 or offload.",
                                style="bold red"))
    parts: list[Any] = []
    for rec in recs:
        r = rec.record
        parts.append(Text(f"{rec.title}: {r.point.key} — peak {gib(r.peak_bytes)} GiB, "
                          f"{samples_per_s(r):.1f} samples/s, effective batch {r.point.effective_batch()}",
                          style="bold"))
        parts.append(Text(f"  {rec.command}", style="cyan"))
    return Group(rule, *parts)


def notes(records: list[Record]) -> Text:
    counts = {s: sum(r.status == s for r in records) for s in ("ok", "oom", "skipped", "error", "timeout")}
    text = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    random_init = any(r.metrics.get("random_init") for r in records)
    lines = [f"{len(records)} points: {text}."]
    if random_init:
        lines.append("Models were built from their configs with random weights: memory and speed don't depend "
                     "on weight values.")
    formula = next((r.metrics.get("flop_formula") for r in records if r.metrics.get("flop_formula")), None)
    if formula:
        lines.append(f"Model FLOPs: {formula}.")
    return Text("\n".join(lines))


def render(records: list[Record], recs: list[Recommendation], budget: int | None) -> Group:
    """The whole terminal report."""
    figure = "NVML process memory" if any(r.metrics.get("sampler") == "nvml" for r in records) else "process RSS"
    return Group(results_table(records, figure), pareto_table(records), recommendations_panel(recs, budget),
                 notes(records))


def to_csv(records: list[Record]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS)
    writer.writeheader()
    for r in sorted(records, key=lambda r: r.point):
        writer.writerow(row(r))
    return buf.getvalue()


def to_markdown(records: list[Record], recs: list[Recommendation], budget: int | None) -> str:
    cols = COLUMNS[:-1]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in sorted(records, key=lambda r: r.point):
        d = row(r)
        lines.append("| " + " | ".join(_fmt(d[c]) for c in cols) + " |")
    lines += ["", f"## Recommendations (budget {gib(budget) if budget else 'none'} GiB)", ""]
    for rec in recs:
        lines += [f"- **{rec.title}**: `{rec.record.point.key}`, peak {gib(rec.record.peak_bytes)} GiB, "
                  f"{samples_per_s(rec.record):.1f} samples/s", f"  `{rec.command}`"]
    if not recs:
        lines.append("- nothing measured fits the budget")
    return "\n".join(lines) + "\n"


def to_json(records: list[Record], recs: list[Recommendation], budget: int | None) -> str:
    return json.dumps({
        "budget_bytes": budget,
        "points": [row(r) | {"key": r.point.key, "peak_bytes": r.peak_bytes} for r in sorted(records, key=lambda r: r.point)],
        "pareto": [r.point.key for r in pareto_front(records)],
        "recommendations": [{"kind": x.kind, "key": x.record.point.key, "command": x.command, "ds_config": x.ds_config}
                            for x in recs],
    }, indent=2) + "\n"
