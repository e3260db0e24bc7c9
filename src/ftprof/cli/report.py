"""``ftprof report PROFILE_DIR``: tables, Pareto front, recommendations, exports and plots of a sweep.

    ftprof report profiles/h100-bert-base-uncased                   # rich terminal report + PNG plots
    ftprof report profiles/NAME --budget 24GiB --write_config       # + recommended ds_config files
    ftprof report profiles/NAME --format csv > points.csv            # md | json | csv to stdout
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console

from ftprof.cli.errors import run_command
from ftprof.errors import ConfigError
from ftprof.sweep_plan import parse_size


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ftprof report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("profile", help="a sweep folder (holding results.jsonl) or the results.jsonl file")
    p.add_argument("--format", default="rich", choices=["rich", "md", "json", "csv"], help="output format")
    p.add_argument("--budget", help="memory budget, e.g. 24GiB (default: the measured device's memory)")
    p.add_argument("--seq_len", type=int, help="recommend for this sequence length (default: the longest that fits)")
    p.add_argument("--write_config", action="store_true",
                   help="write recommended_<kind>.json ds_configs beside the results")
    p.add_argument("--no_plots", action="store_true", help="don't write memory.png / throughput.png")
    return p


def report(profile: Path, budget: int | None, fmt: str, write_config: bool, plots: bool, console: Console,
           seq_len: int | None = None) -> None:
    from ftprof import report as views
    from ftprof.plots import save_plots
    from ftprof.recommend import recommend
    from ftprof.results import read_records

    results = profile if profile.suffix == ".jsonl" else profile / "results.jsonl"
    records = read_records(results)
    if not records:
        raise ConfigError(f"{results} holds no points yet; run or --resume the sweep")
    if budget is None:
        budget = next((r.env.get("device_memory_bytes") for r in records if r.env.get("device_memory_bytes")), None)
    recs = recommend(records, budget, seq_len)
    written = save_plots(records, results.parent, budget) if plots else []
    if write_config:
        for rec in recs:
            path = results.parent / f"recommended_{rec.kind}.json"
            path.write_text(json.dumps(rec.ds_config, indent=2) + "\n")
            written.append(path)
    if fmt == "rich":
        console.print(views.render(records, recs, budget))
        for path in written:
            console.print(f"wrote {path}")
    else:
        text = {"md": lambda: views.to_markdown(records, recs, budget), "json": lambda: views.to_json(records, recs, budget),
                "csv": lambda: views.to_csv(records)}[fmt]()
        sys.stdout.write(text)


def main(argv: list[str] | None = None) -> int:
    def command(args: list[str]) -> None:
        a = build_parser().parse_args(args)
        budget = parse_size(a.budget) if a.budget else None
        report(Path(a.profile), budget, a.format, a.write_config, not a.no_plots, Console(), a.seq_len)

    return run_command(argv, command, uses_hub=False)
