"""Do two back-to-back quickstart sweeps agree? Throughput repeatability of `ftprof sweep`, in one run.

    .venv/bin/python bench/bench_repeatability.py            # ~4 min on a 2-core CPU
    .venv/bin/python bench/bench_repeatability.py --min_seconds 0 --steps 3   # the old 3-step window

Runs the quickstart's sweep (tiny-bert, its CPU defaults: batch 4/8, sequence 64/128, ZeRO 0/2, fp32) twice
into fresh folders, one right after the other, exactly as the quickstart does (contended points and close
calls re-measured; ``--no_remeasure`` among the extra flags turns that off), and prints each ok point's
samples/s in both, their ratio, how long its threads waited for a CPU (s per s) in each window, the worst
disagreement (goal: every point within 10%), and the drift each sweep saw in itself (its first point measured
again at its end, and any close call measured again): the band its report warns of. Extra flags go to both
sweeps.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from ftprof.records.results import latest, read_records, results_path  # noqa: E402
from ftprof.report.recommend import worst_repeat  # noqa: E402

DRIFTS: list[str] = []  # each sweep's own repeat (the first point measured again at its end)


def sweep(out: Path, extra: list[str]) -> dict[str, tuple[float, float | None, float | None]]:
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
        *extra,
    ]
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    measured = read_records(results_path(out))
    DRIFTS.append(str(worst_repeat(measured) or "no repeat"))
    records = latest(measured)
    return {
        r.point.key: (r.samples_per_s, r.profile.cpu_wait_share, r.profile.reference_s)
        for r in records
        if r.status == "ok"
    }


def main() -> None:
    extra = sys.argv[1:]
    with tempfile.TemporaryDirectory() as tmp:
        first = sweep(Path(tmp) / "first", extra)
        second = sweep(Path(tmp) / "second", extra)
    print(
        f"{'point':<28}{'first':>10}{'second':>10}{'ratio':>8}{'wait s/s 1st':>14}{'2nd':>6}"
        f"{'reference ms 1st':>18}{'2nd':>7}{'ratio at reference speed':>26}"
    )
    ratios, normalised = {}, {}
    for key in sorted(first.keys() & second.keys()):
        (a, busy_a, ref_a), (b, busy_b, ref_b) = first[key], second[key]
        ratios[key] = b / a
        shares = "".join(f"{x:>6.3f}" if x is not None else f"{'-':>6}" for x in (busy_a, busy_b))
        line = f"{key:<28}{a:>10.1f}{b:>10.1f}{ratios[key]:>8.3f}{'':>7}{shares}"
        if ref_a and ref_b:  # samples per reference workload: the machine's speed divided out
            normalised[key] = (b * ref_b) / (a * ref_a)
            line += f"{1000 * ref_a:>18.2f}{1000 * ref_b:>7.2f}{normalised[key]:>26.3f}"
        print(line)
    worst = max(ratios, key=lambda k: abs(ratios[k] - 1))
    summary = {
        "points": len(ratios),
        "worst_point": worst,
        "worst_ratio": round(ratios[worst], 3),
        "within_10pct": all(abs(r - 1) <= 0.10 for r in ratios.values()),
        "worst_ratio_at_reference_speed": round(max(normalised.values(), key=lambda r: abs(r - 1)), 3)
        if normalised
        else None,
        "each_sweeps_own_worst_repeat": DRIFTS,
        "flags": extra,
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
