"""Search cost and per-point overhead of `ftprof sweep`, measured side by side in one run.

    .venv/bin/python bench/bench_sweep.py                   # ~12 min on a 2-core CPU

Finding the largest micro-batch that fits, for tiny-bert at sequence length 512 under a 4 GiB address-space
limit per point (a stand-in for a small GPU): the exhaustive grid (batch 8, 16, ..., 256, every point run,
`--no_skip`), the pruned grid (the default: points larger than an OOM are skipped), and `--find_max_batch`
(doubling, then bisection, exact to one sample). Prints each strategy's wall time, points run, answer, and the
ratio to the exhaustive grid (goal: at most 40%); then the per-point overhead, i.e. wall time per point
beyond its measured steps (process start, imports, DeepSpeed init), from the grid's successful points.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from ftprof.records.results import read_records, results_path  # noqa: E402

BASE = [
    "--model",
    "tiny-bert",
    "--zero",
    "0",
    "--seq_lens",
    "512",
    "--child_memory_limit",
    "4GiB",
    "--steps",
    "2",
    "--warmup",
    "1",
    "--no_report",
]
GRID = ",".join(str(b) for b in range(8, 257, 8))


def run(args: list[str], out: Path) -> tuple[float, list]:
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "ftprof.cli.main", "sweep", *BASE, *args, "--out", str(out)],
        check=True,
        cwd=ROOT,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - start, read_records(results_path(out))


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        results = {
            "exhaustive grid": run(["--batch_sizes", GRID, "--no_skip"], Path(tmp) / "grid"),
            "pruned grid": run(["--batch_sizes", GRID], Path(tmp) / "pruned"),
            "--find_max_batch": run(
                ["--batch_sizes", "8", "--find_max_batch", "--max_batch", "256"], Path(tmp) / "bisect"
            ),
        }
    grid_time = results["exhaustive grid"][0]
    print(f"{'strategy':<18} {'wall s':>8} {'points run':>11} {'largest fitting batch':>22} {'vs grid':>8}")
    for name, (wall, records) in results.items():
        ran = [r for r in records if r.status != "skipped"]
        best = max((r.point.batch_size for r in records if r.status == "ok"), default=None)
        print(f"{name:<18} {wall:>8.1f} {len(ran):>11} {best!s:>22} {wall / grid_time:>7.0%}")
    ok = [r for r in results["exhaustive grid"][1] if r.status == "ok"]
    overhead = [r.wall_s - (r.profile.steady_steps + r.profile.warmup_steps) * r.profile.step_time_median_s for r in ok]
    failed = [r.wall_s for r in results["exhaustive grid"][1] if r.status == "oom"]
    print(
        f"\nper-point overhead beyond measured steps: median {statistics.median(overhead):.1f} s "
        f"(min {min(overhead):.1f}, max {max(overhead):.1f}) over {len(ok)} points; an OOM point costs "
        f"{statistics.median(failed):.1f} s"
    )


if __name__ == "__main__":
    main()
