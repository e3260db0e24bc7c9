"""``ftprof report SWEEP_DIR``: tables, Pareto front, recommendations, exports and plots of a sweep.

ftprof report profiles/h100-bert-base-uncased                   # rich terminal report + PNG plots
ftprof report profiles/NAME --budget 24GiB --write_config       # + recommended ds_config files
ftprof report profiles/NAME --format csv > points.csv            # md | json | csv to stdout
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from ftprof.cli import flags
from ftprof.cli.runner import run_command
from ftprof.report.sweep_report import print_report
from ftprof.units import parse_size


def build_parser() -> argparse.ArgumentParser:
    p = flags.parser("ftprof report", __doc__)
    p.add_argument("sweep", metavar="SWEEP_DIR", help="a sweep folder (holding results.jsonl) or its results.jsonl")
    select = p.add_argument_group("what to recommend")
    select.add_argument("--budget", help="memory budget, e.g. 24GiB (default: the measured device's memory)")
    select.add_argument(
        "--seq_len", type=int, help="recommend for this sequence length (default: the longest that fits)"
    )
    select.add_argument("--world_size", type=int, help="recommend among points of this many ranks (default: the most)")
    output = p.add_argument_group("output")
    output.add_argument("--format", default="rich", choices=["rich", "md", "json", "csv"], help="output format")
    output.add_argument(
        "--write_config",
        action="store_true",
        help="write recommended_<kind>.json ds_configs beside the results (commands then name them)",
    )
    output.add_argument("--no_plots", action="store_true", help="don't write memory.png / throughput.png")
    return p


def main(argv: list[str] | None = None) -> int:
    def command(args: list[str]) -> None:
        a = build_parser().parse_args(args)
        budget = parse_size(a.budget) if a.budget else None
        print_report(
            Path(a.sweep), Console(), budget, a.seq_len, a.world_size, a.format, a.write_config, not a.no_plots
        )

    return run_command(argv, command, uses_hub=False)
