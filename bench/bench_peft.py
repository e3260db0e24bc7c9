"""Full fine-tuning against LoRA, measured side by side: peak, throughput and the largest micro-batch under a
fixed budget, per model and sequence length, and the estimator's error on the LoRA points.

    python bench/bench_peft.py                                    # tiny-llama and tiny-bert, 128-512 tokens
    python bench/bench_peft.py --models tiny-bert --seq_lens 128 --batch_sizes 4,8 --out /tmp/peft-smoke

Each model is one ``ftprof sweep --peft none,lora --lora_r 8,64`` (one rank, forked points, no re-measures),
so every point is measured exactly as a sweep measures it. The tables come from the sweep's own records
(:func:`ftprof.report.adapters.comparison`): for each sequence length and method, the largest micro-batch whose
peak fits ``--budget`` (5% kept free, as the report's recommendations), its peak and samples/s, and at the
largest batch every method fits, the peak and speed relative to full fine-tuning. The estimator's CPU constants
are fitted on full fine-tuning only (``observations_from_records`` leaves LoRA points out), so its error on the
LoRA points, printed last, is judged on points it was not tuned on.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

from ftprof.records.results import Record, latest, read_records
from ftprof.report.adapters import comparison
from ftprof.units import GIB, parse_size


def run_sweep(model: str, task: str, args: argparse.Namespace, out: Path) -> list[Record]:
    """The model's sweep over methods, lengths and batches (resumed if ``out`` holds part of it)."""
    command = [sys.executable, "-m", "ftprof.cli.main", "sweep", "--model", model, "--task", task]
    command += ["--peft", "none,lora", "--lora_r", args.lora_r, "--seq_lens", args.seq_lens]
    command += ["--batch_sizes", args.batch_sizes, "--zero", "0", "--precision", "fp32", "--no_skip"]
    command += ["--steps", "3", "--warmup", "1", "--min_seconds", str(args.min_seconds), "--no_remeasure"]
    command += ["--no_report", "--out", str(out)] + (["--resume"] if (out / "results.jsonl").exists() else [])
    subprocess.run(command, check=True)
    return latest(read_records(out / "results.jsonl"))


def markdown(model: str, records: list[Record], budget: int) -> list[str]:
    lines = [f"### {model} (budget {budget / GIB:g} GiB)", ""]
    lines += ["| setting | method | max batch | peak GiB | samples/s | at batch | peak × | speed × |"]
    lines += ["|---|---|---:|---:|---:|---:|---:|---:|"]
    for x in comparison(records, budget):
        lines.append(
            f"| {x.setting} | {x.method} | {x.max_batch or 'none fits'} | "
            f"{x.peak_bytes / GIB if x.peak_bytes else 0:.3f} | {x.samples_per_s or 0:.1f} | {x.common_batch or '-'} | "
            f"{x.peak_vs_full or 0:.3f} | {x.speed_vs_full or 0:.2f} |"
        )
    return lines


def estimator_errors(records: list[Record]) -> list[str]:
    """The sweep's own prediction (``predicted_bytes``, its CPU calibration) against each LoRA peak."""
    errors = [
        100 * (r.predicted_bytes / r.peak_bytes - 1)
        for r in records
        if r.point.peft == "lora" and r.status == "ok" and r.peak_bytes and r.predicted_bytes
    ]
    if not errors:
        return ["no LoRA point has a prediction"]
    worst = max(errors, key=abs)
    return [
        f"estimator on {len(errors)} LoRA points (not fitted on): median |error| "
        f"{statistics.median(abs(e) for e in errors):.1f}%, worst {worst:+.1f}%"
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny-llama:causal-lm,tiny-bert:classification")
    parser.add_argument("--seq_lens", default="128,256,512")  # the tiny presets' limit: 512 positions
    parser.add_argument("--batch_sizes", default="2,4,8,16")
    parser.add_argument("--lora_r", default="8,64")
    parser.add_argument("--budget", default="1.2GiB", help="the fixed memory budget the largest batch must fit")
    parser.add_argument("--min_seconds", type=float, default=1.0)
    parser.add_argument("--out", default="/tmp/ftprof-bench-peft")
    args = parser.parse_args()
    budget = parse_size(args.budget)
    report: list[str] = []
    for entry in args.models.split(","):
        model, _, task = entry.partition(":")
        records = run_sweep(model, task or "classification", args, Path(args.out) / model)
        report += [*markdown(model, records, budget), "", *estimator_errors(records), ""]
    print("\n".join(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
