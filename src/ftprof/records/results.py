"""The sweep's record schema and its JSON Lines file: appended durably, read back strictly.

One line per finished point (``pandas.read_json(path, lines=True)`` loads it). Each line is written and
fsynced the moment its point ends, so a killed sweep loses nothing that finished; a torn last line from a
kill mid-write is the only damage tolerated on reading (and reported).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from ftprof.errors import FtprofError
from ftprof.point import Point
from ftprof.records.profile import Profile

SCHEMA = "ftprof.sweep/2"
OLD_SCHEMAS = ("ftprof.sweep/1",)  # read, never written: its flat "metrics" dict holds the profile's fields
# skipped: a smaller point of the same setting ran out of memory (proof); over_budget: the estimator predicts
# more than the budget with a margin (a prediction, never used as an OOM by --find_max_batch).
Status = Literal["ok", "oom", "error", "timeout", "skipped", "over_budget"]
FAILED: tuple[Status, ...] = ("error", "timeout")  # --retry_failed runs these again
STATUSES: tuple[Status, ...] = get_args(Status)


class ResultsError(FtprofError):
    """A results file is corrupt or of another schema."""


@dataclass
class Record:
    """The outcome of one point."""

    point: Point
    status: Status
    model: str
    peak_bytes: int | None = None  # max over ranks and phases: NVML process memory on GPUs, RSS on CPUs
    profile: Profile | None = None  # what the point's run measured (``ok`` points)
    predicted_bytes: int | None = None  # the estimator's device-used figure, when a predictor was used
    ds_config: dict[str, Any] | None = None  # the DeepSpeed config the point ran (or would run) with
    reason: str | None = None  # why skipped / the error's last line
    stderr_tail: str | None = None
    wall_s: float | None = None
    env: dict[str, Any] = field(default_factory=dict)

    @property
    def task(self) -> str:
        """What the point trained: ``classification`` or ``causal-lm`` (kept in ``env`` by the sweep)."""
        return str(self.env.get("task", "classification"))

    @property
    def samples_per_s(self) -> float:
        """Measured samples/s over all ranks (0 when not measured)."""
        return float(self.profile.samples_per_s or 0.0) if self.profile else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "key": self.point.key,
            "model": self.model,
            **self.point.to_json(),
            "effective_batch": self.point.effective_batch(),
            "status": self.status,
            "peak_bytes": self.peak_bytes,
            "ds_config": self.ds_config,
            "predicted_bytes": self.predicted_bytes,
            "profile": self.profile.to_json() if self.profile else None,
            "reason": self.reason,
            "stderr_tail": self.stderr_tail,
            "wall_s": self.wall_s,
            "env": self.env,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Record:
        profile = data.get("profile")
        predicted = data.get("predicted_bytes")
        if data.get("schema") in OLD_SCHEMAS:
            metrics = data.get("metrics") or {}
            profile = metrics or None
            predicted = metrics.get("predicted_bytes")
        return cls(
            point=Point.from_json(data),
            status=data["status"],
            model=data["model"],
            peak_bytes=data.get("peak_bytes"),
            profile=Profile.from_json(profile) if profile else None,
            predicted_bytes=predicted,
            ds_config=data.get("ds_config"),
            reason=data.get("reason"),
            stderr_tail=data.get("stderr_tail"),
            wall_s=data.get("wall_s"),
            env=data.get("env") or {},
        )


def append_record(path: Path, record: Record) -> None:
    """Append one line and fsync it, so it survives a kill or power loss right after. A torn last line
    (a kill mid-write) is cut off first, so the new line never glues onto it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    repair_torn_tail(path)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record.to_json()) + "\n")
        f.flush()
        os.fsync(f.fileno())


def repair_torn_tail(path: Path) -> int:
    """Cut a last line that has no newline (torn by a kill mid-write), keeping every complete line.

    Returns:
        The number of bytes removed (0 when the file is whole or absent).
    """
    if not path.is_file():
        return 0
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return 0
    keep = data.rfind(b"\n") + 1
    with open(path, "r+b") as f:
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    return len(data) - keep


def read_records(path: Path) -> list[Record]:
    """All records in ``path``.

    Raises:
        ResultsError: a line (other than a torn last one) is not JSON, or not of this schema.
    """
    if not path.is_file():
        raise ResultsError(f"{str(path)!r}: no results file; run `ftprof sweep --out {path.parent}` first")
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines) and not text.endswith("\n"):
                continue  # torn by a kill mid-write: that point simply didn't finish
            raise ResultsError(
                f"{str(path)}:{number} is not valid JSON; the file is corrupt (fix or remove that line)"
            ) from None
        if not isinstance(data, dict) or data.get("schema") not in (SCHEMA, *OLD_SCHEMAS):
            found = data.get("schema") if isinstance(data, dict) else type(data).__name__
            raise ResultsError(
                f"{str(path)}:{number} has schema {found!r}, expected {SCHEMA!r}; not an ftprof sweep results file"
            )
        try:
            records.append(Record.from_json(data))
        except (KeyError, TypeError) as err:
            raise ResultsError(f"{str(path)}:{number} lacks field {err}; the file is corrupt") from None
    return records


def latest(records: list[Record]) -> list[Record]:
    """One record per point, the last written (a retried point's new outcome replaces its failure)."""
    return list({r.point.key: r for r in records}.values())
