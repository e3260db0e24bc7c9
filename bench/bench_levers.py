"""What the memory levers cost and buy, measured side by side in one run: gradient checkpointing and
optimizer offload, for one classifier and one decoder.

    .venv/bin/python bench/bench_levers.py          # ~10 min on a 2-core CPU

For each model, one `ftprof sweep` at ZeRO-2, fp32, sequence 512 over batch 8..128 with
`--gradient_checkpointing off,on` and `--offload none,optimizer` (four levers, each batch measured once,
in fresh processes, in the sweep's order). Printed per lever, as ratios to no lever at the same batch: the
measured peak (RSS), the measured saved activations of one micro-batch, and samples/s (median step
period); and the largest batch whose measured peak stays under a budget fixed by rule before any lever is
seen: the peak of no lever at the middle batch of the grid. Extra flags go to every sweep.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from ftprof.records.results import Record, latest, read_records, results_path  # noqa: E402

BATCHES = [8, 16, 32, 64, 128]
MODELS = {"tiny-bert": "classification", "tiny-llama": "causal-lm"}
LEVERS = [("none", False), ("none", True), ("optimizer", False), ("optimizer", True)]


def lever_name(offload: str, checkpointing: bool) -> str:
    names = ([] if offload == "none" else [f"offload {offload}"]) + (["checkpointing"] if checkpointing else [])
    return " + ".join(names) or "no lever"


def sweep(model: str, task: str, out: Path, extra: list[str]) -> list[Record]:
    command = [sys.executable, "-m", "ftprof.cli.main", "sweep", "--model", model, "--task", task]
    command += ["--zero", "2", "--precision", "fp32", "--seq_lens", "512", "--batch_sizes", ",".join(map(str, BATCHES))]
    command += ["--offload", "none,optimizer", "--gradient_checkpointing", "off,on", "--no_skip"]
    command += ["--out", str(out), "--no_report", "--no_remeasure", *extra]
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return [r for r in latest(read_records(results_path(out))) if r.status == "ok"]


def saved(r: Record) -> int:
    assert r.profile is not None
    return max(rank.breakdown.get("saved_activations", 0) for rank in r.profile.ranks)


def largest_batch_interpolated(peaks: dict[int, int], budget: int) -> float | None:
    """The batch at which the measured peaks, joined linearly between neighbouring batches, reach the budget
    (the grid's step is coarse: batch 32 and 64 may both miss a lever's real answer)."""
    batches = sorted(peaks)
    if not batches or peaks[batches[0]] > budget:
        return None
    for lo, hi in zip(batches, batches[1:], strict=False):
        if peaks[hi] > budget:
            return lo + (budget - peaks[lo]) / (peaks[hi] - peaks[lo]) * (hi - lo) if peaks[hi] > peaks[lo] else lo
    return float(batches[-1])


def analyse(model: str, records: list[Record]) -> dict:
    at = {(r.point.offload, r.point.gradient_checkpointing, r.point.batch_size): r for r in records}
    middle = BATCHES[len(BATCHES) // 2]
    budget = at[("none", False, middle)].peak_bytes
    assert budget
    rows = {}
    for offload, ckpt in LEVERS:
        fits = [b for b in BATCHES if (r := at.get((offload, ckpt, b))) and r.peak_bytes and r.peak_bytes <= budget]
        ratios: dict[str, list[float]] = {"peak": [], "saved_activations": [], "samples_per_s": []}
        for b in BATCHES:
            base, lever = at.get(("none", False, b)), at.get((offload, ckpt, b))
            if base is None or lever is None:
                continue
            ratios["peak"].append(lever.peak_bytes / base.peak_bytes)
            ratios["saved_activations"].append(saved(lever) / saved(base))
            ratios["samples_per_s"].append(lever.samples_per_s / base.samples_per_s)
        peaks = {b: r.peak_bytes for b in BATCHES if (r := at.get((offload, ckpt, b))) and r.peak_bytes}
        interpolated = largest_batch_interpolated(peaks, budget)
        rows[lever_name(offload, ckpt)] = {
            "largest_batch_under_budget": max(fits, default=None),
            "largest_batch_interpolated": round(interpolated, 1) if interpolated else None,
            **{f"{k}_ratio_b{BATCHES[-1]}": round(v[-1], 3) for k, v in ratios.items() if v},
            **{f"{k}_ratio_range": [round(min(v), 3), round(max(v), 3)] for k, v in ratios.items() if v},
        }
    return {
        "model": model,
        "budget_gib": round(budget / 2**30, 3),
        "budget_rule": f"no lever's peak at b{middle}",
        "levers": rows,
    }


def main() -> None:
    extra = sys.argv[1:]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for model, task in MODELS.items():
            records = sweep(model, task, Path(tmp) / model, extra)
            results.append(analyse(model, records))
            for r in sorted(records, key=lambda r: r.point):
                print(
                    f"{model:<11}{r.point.key:<44}{r.peak_bytes / 2**30:>7.3f} GiB {saved(r) / 2**20:>8.1f} MiB saved "
                    f"{r.samples_per_s:>8.1f} samples/s"
                )
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
