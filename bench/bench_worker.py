"""Pre-imported worker vs a fresh process per point: overhead and peaks on the same points, in one run.

    .venv/bin/python bench/bench_worker.py               # 3 rounds, ~8 min on a 2-core CPU
    .venv/bin/python bench/bench_worker.py --rounds 2 --world_size 1,2   # two-rank points too

Runs the same small grid (tiny-bert classification and tiny-llama causal-LM, ZeRO 0/2, batch 4/16, seq
128, fp32; ``--world_size 1,2`` adds each on two ranks: the ``deepspeed`` launcher against forked ranks) as
`ftprof sweep --worker fresh` and `--worker fork`, alternating which goes first each round,
each into a fresh folder. Per point: the overhead (wall time minus the measured window: process start or
fork, imports, DeepSpeed set-up, warm-up step) and the peak (RSS). Prints the median overhead of each and
their ratio (goal: fork <= 0.5x fresh), the sweeps' end-to-end wall times (the worker's own start
included), and per point the median peak of each, their ratio (goal: within 1%) beside a fresh process's
own spread over the rounds (the noise floor of that comparison).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from ftprof.records.results import Record, latest, read_records, results_path  # noqa: E402

GRID = ["--zero", "0,2", "--batch_sizes", "4,16", "--seq_lens", "128", "--precision", "fp32"]
MODELS = {"tiny-bert": "classification", "tiny-llama": "causal-lm"}


def sweep(model: str, task: str, worker: str, out: Path, walls: dict[str, list[float]], world: str) -> list[Record]:
    command = [sys.executable, "-m", "ftprof.cli.main", "sweep", "--model", model, "--task", task, *GRID]
    command += ["--world_size", world]
    command += ["--worker", worker, "--out", str(out), "--no_report", "--no_remeasure", "--no_skip"]
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    walls[worker].append(time.perf_counter() - started)  # end to end: the worker's own start included
    records = [r for r in latest(read_records(results_path(out))) if r.status == "ok"]
    assert all(r.run.worker == worker for r in records), "the sweep did not use the worker asked for"
    return records


def overhead(r: Record) -> float:
    assert r.wall_s is not None
    assert r.profile is not None
    assert r.profile.window_s is not None
    return r.wall_s - r.profile.window_s


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--world_size", default="1", help="the sweeps' --world_size (e.g. 1,2)")
    args = parser.parse_args()
    rounds = args.rounds
    overheads: dict[str, list[float]] = {"fresh": [], "fork": []}
    peaks: dict[str, dict[str, list[int]]] = {"fresh": {}, "fork": {}}
    walls: dict[str, list[float]] = {"fresh": [], "fork": []}
    speeds: dict[str, dict[str, list[float]]] = {"fresh": {}, "fork": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(rounds):
            order = ["fresh", "fork"] if i % 2 == 0 else ["fork", "fresh"]
            for worker in order:
                for model, task in MODELS.items():
                    out = Path(tmp) / f"{worker}-{model}-{i}"
                    for r in sweep(model, task, worker, out, walls, args.world_size):
                        overheads[worker].append(overhead(r))
                        assert r.peak_bytes
                        peaks[worker].setdefault(f"{model} {r.point.key}", []).append(r.peak_bytes)
                        speeds[worker].setdefault(f"{model} {r.point.key}", []).append(r.samples_per_s or 0.0)
    print(f"{'point':<40}{'fresh GiB (min-max)':>22}{'fork GiB (min-max)':>22}{'fork/fresh':>12}{'fresh spread':>14}")
    diffs, spreads = {}, {}
    for key in sorted(peaks["fresh"]):
        fresh, fork = peaks["fresh"][key], peaks["fork"][key]
        diffs[key] = statistics.median(fork) / statistics.median(fresh)
        spreads[key] = max(fresh) / min(fresh) - 1  # a fresh process against itself: the noise floor
        print(
            f"{key:<40}{min(fresh) / 2**30:>11.3f}-{max(fresh) / 2**30:.3f}{min(fork) / 2**30:>12.3f}-"
            f"{max(fork) / 2**30:.3f}{diffs[key]:>12.4f}{spreads[key]:>13.2%}"
        )
    worst = max(diffs, key=lambda k: abs(diffs[k] - 1))
    speed = {k: statistics.median(speeds["fork"][k]) / statistics.median(speeds["fresh"][k]) for k in diffs}
    median = {w: statistics.median(v) for w, v in overheads.items()}
    print(
        json.dumps(
            {
                "points_per_worker": len(overheads["fresh"]),
                "median_overhead_s": {w: round(v, 2) for w, v in median.items()},
                "overhead_range_s": {w: [round(min(v), 2), round(max(v), 2)] for w, v in overheads.items()},
                "fork_over_fresh_overhead": round(median["fork"] / median["fresh"], 3),
                "sweep_wall_s": {w: [round(x, 1) for x in v] for w, v in walls.items()},
                "fork_over_fresh_sweep_wall": round(sum(walls["fork"]) / sum(walls["fresh"]), 3),
                "worst_fresh_vs_fresh_spread": round(max(spreads.values()), 4),
                "worst_peak_point": worst,
                "worst_peak_ratio": round(diffs[worst], 4),
                "peaks_within_1pct": all(abs(d - 1) <= 0.01 for d in diffs.values()),
                # Throughput is not what the worker should change: median samples/s, fork over fresh.
                "samples_per_s_fork_over_fresh": {k: round(v, 3) for k, v in speed.items()},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
