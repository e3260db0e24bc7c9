"""A sweep's records and recommendations as text anyone can load: CSV (one row per point), Markdown (the table,
recommendations and where the peak goes) and JSON (every point, the Pareto front and each recommendation with
its command and ds_config), built from the same objects as the terminal report."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict
from pathlib import Path

from ftprof.records.results import Record
from ftprof.report.adapters import comparison
from ftprof.report.recommend import Recommendation, in_cohort, lever_notes, pareto_front
from ftprof.report.tables import (
    COLUMNS,
    MEMORY_RECORDS_TITLE,
    breakdown,
    breakdown_rows,
    fmt_cell,
    memory_records,
    noise_line,
    row,
    summary,
)
from ftprof.units import gib


def to_csv(records: list[Record]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS)
    writer.writeheader()
    for r in sorted(records, key=lambda r: r.point):
        writer.writerow(row(r))
    return buf.getvalue()


def to_markdown(
    records: list[Record], recs: list[Recommendation], budget: int | None, folder: Path | None = None
) -> str:
    cols = COLUMNS[:-1]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in sorted(records, key=lambda r: r.point):
        d = row(r)
        lines.append("| " + " | ".join(fmt_cell(d[c]) for c in cols) + " |")
    lines += ["", f"## Recommendations (budget {gib(budget) if budget else 'none'} GiB)", ""]
    for rec in recs:
        lines += [
            f"- **{rec.title}** (among {rec.cohort}): `{rec.record.point.key}`, {summary(rec)}",
            *([f"  {noise}"] if (noise := noise_line(rec)) else []),
            f"  `{rec.command}`",
        ]
    lines += [f"- {note}" for note in lever_notes(records, budget)]
    if not recs:
        lines.append("- nothing measured fits the budget")
    if methods := comparison(records, budget):
        lines += ["", "## Full fine-tuning beside LoRA (ratios at the largest batch every method fits)", ""]
        lines += ["| setting | method | max batch | peak GiB | samples/s | at batch | peak × | speed × |"]
        lines += ["|---|---|---:|---:|---:|---:|---:|---:|"]
        lines += [
            f"| {x.setting} | {x.method} | {fmt_cell(x.max_batch) or 'none fits'} | {fmt_cell(gib(x.peak_bytes))} | "
            f"{_rounded(x.samples_per_s, 1)} | {fmt_cell(x.common_batch)} | {_rounded(x.peak_vs_full, 2)} | "
            f"{_rounded(x.speed_vs_full, 2)} |"
            for x in methods
        ]
    measured, columns = breakdown_rows(recs)
    if measured:
        lines += ["", "## Where the peak goes (MiB, highest rank)", ""]
        lines += ["| pick | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
        lines += [
            f"| {kind} | " + " | ".join(f"{p.get(c, 0) / 2**20:.1f}" for c in columns) + " |" for kind, p in measured
        ]
    if files := memory_records(recs, folder):
        lines += ["", f"## {MEMORY_RECORDS_TITLE}", "", *(f"- {line}" for line in files)]
    return "\n".join(lines) + "\n"


def _rounded(value: float | None, digits: int) -> str:
    return fmt_cell(round(value, digits) if value else None)


def to_json(records: list[Record], recs: list[Recommendation], budget: int | None) -> str:
    return (
        json.dumps(
            {
                "budget_bytes": budget,
                "points": [
                    row(r) | {"key": r.point.key, "peak_bytes": r.peak_bytes}
                    for r in sorted(records, key=lambda r: r.point)
                ],
                "peft_comparison": [asdict(x) for x in comparison(records, budget)],
                "pareto": [r.point.key for r in pareto_front(in_cohort(records, recs[0].cohort))] if recs else [],
                "recommendations": [
                    {
                        "kind": x.kind,
                        "key": x.record.point.key,
                        "cohort": {"seq_len": x.cohort.seq_len, "world_size": x.cohort.world_size},
                        "within_noise_of": x.within_noise_of,
                        "repeat": {"key": x.repeat.key, "first": x.repeat.first, "again": x.repeat.again}
                        if x.repeat
                        else None,
                        "command": x.command,
                        "ds_config": x.ds_config,
                        "breakdown_bytes": breakdown(x.record),
                        "memory_files": [f for r in x.record.profile.ranks for f in r.memory_files]
                        if x.record.profile
                        else [],
                    }
                    for x in recs
                ],
            },
            indent=2,
        )
        + "\n"
    )
