"""One sweep folder's report: load its records, draw the recommendations, print them (rich or an export),
and write the plots and the ds_configs the recommended commands name."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console, Group

from ftprof.errors import ConfigError
from ftprof.records.results import Record, latest, read_records, results_path
from ftprof.report.exports import to_csv, to_json, to_markdown
from ftprof.report.recommend import Recommendation, recommend, worst_repeat
from ftprof.report.tables import breakdown_rows, render


@dataclass
class SweepReport:
    """A sweep folder's records and the recommendations drawn from them."""

    folder: Path
    records: list[Record]
    recommendations: list[Recommendation]
    budget: int | None

    @classmethod
    def load(
        cls,
        sweep: Path,
        budget: int | None = None,
        seq_len: int | None = None,
        world_size: int | None = None,
        write_configs: bool = False,
    ) -> SweepReport:
        """Read ``sweep`` (a folder or its results.jsonl); the budget defaults to the measured device's memory.

        Raises:
            ConfigError: the folder holds no points yet.
        """
        results = results_path(sweep)
        measured = read_records(results)
        records = latest(measured)
        if not records:
            raise ConfigError(f"{results} holds no points yet; run or --resume the sweep")
        if budget is None:
            budget = next((r.device_memory_bytes for r in records if r.device_memory_bytes), None)
        recs = recommend(
            records, budget, seq_len, world_size, str(results.parent), write_configs, worst_repeat(measured)
        )
        return cls(results.parent, records, recs, budget)

    def write_configs(self) -> list[Path]:
        """Write each recommendation's ds_config where its command expects it (shipped files are left alone)."""
        written = []
        for rec in self.recommendations:
            if rec.config_path is None or rec.ds_config is None:
                continue  # no DeepSpeed, no config
            path = Path(rec.config_path)
            if path.parent == self.folder:
                path.write_text(json.dumps(rec.ds_config, indent=2) + "\n")
                written.append(path)
        return written

    def render(self) -> Group:
        return render(self.records, self.recommendations, self.budget, self.folder)

    def export(self, fmt: str) -> str:
        """The report as ``md``, ``json`` or ``csv`` text."""
        if fmt == "md":
            return to_markdown(self.records, self.recommendations, self.budget, self.folder)
        if fmt == "json":
            return to_json(self.records, self.recommendations, self.budget)
        return to_csv(self.records)


def print_report(
    sweep: Path,
    console: Console,
    budget: int | None = None,
    seq_len: int | None = None,
    world_size: int | None = None,
    fmt: str = "rich",
    write_config: bool = False,
    plots: bool = True,
) -> None:
    """Print a sweep's report and write its plots and the ds_configs its commands name."""
    from ftprof.report.plots import save_breakdown, save_plots  # matplotlib: only when plotting

    report = SweepReport.load(sweep, budget, seq_len, world_size, write_config)
    written = save_plots(report.records, report.folder, report.budget) if plots else []
    rows, _ = breakdown_rows(report.recommendations)
    if plots and (path := save_breakdown(rows, report.folder)) is not None:
        written.append(path)
    written += report.write_configs()
    if fmt != "rich":
        sys.stdout.write(report.export(fmt))
        return
    console.print(report.render())
    for path in written:
        console.print(f"wrote {path}")
