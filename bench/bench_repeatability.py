"""Do two back-to-back quickstart sweeps agree? Throughput repeatability of `ftprof sweep`, in one run.

    .venv/bin/python bench/bench_repeatability.py            # ~4 min on a 2-core CPU
    .venv/bin/python bench/bench_repeatability.py --min_seconds 0 --steps 3   # the old 3-step window

Runs the quickstart's sweep (tiny-bert, its CPU defaults: batch 4/8, sequence 64/128, ZeRO 0/2, fp32) twice
into fresh folders, one right after the other (no re-measuring: each point once per sweep), and prints each
ok point's samples/s in both, their ratio, and the worst disagreement (goal: every point within 10%). Extra
flags go to both sweeps.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from ftprof.results import latest, read_records  # noqa: E402


def sweep(out: Path, extra: list[str]) -> dict[str, float]:
    command = [
        sys.executable,
        "-m",
        "ftprof.cli.main",
        "sweep",
        "--model",
        "tiny-bert",
        "--out",
        str(out),
        "--no_report",
        "--no_remeasure",
        *extra,
    ]
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return {r.point.key: r.samples_per_s for r in latest(read_records(out / "results.jsonl")) if r.status == "ok"}


def main() -> None:
    extra = sys.argv[1:]
    with tempfile.TemporaryDirectory() as tmp:
        first = sweep(Path(tmp) / "first", extra)
        second = sweep(Path(tmp) / "second", extra)
    print(f"{'point':<28}{'first':>10}{'second':>10}{'ratio':>8}")
    ratios = {}
    for key in sorted(first.keys() & second.keys()):
        ratios[key] = second[key] / first[key]
        print(f"{key:<28}{first[key]:>10.1f}{second[key]:>10.1f}{ratios[key]:>8.3f}")
    worst = max(ratios, key=lambda k: abs(ratios[k] - 1))
    summary = {
        "points": len(ratios),
        "worst_point": worst,
        "worst_ratio": round(ratios[worst], 3),
        "within_10pct": all(abs(r - 1) <= 0.10 for r in ratios.values()),
        "flags": extra,
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
