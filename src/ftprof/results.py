"""The sweep's record schema and its JSON Lines file: appended durably, read back strictly.

One line per finished point (``pandas.read_json(path, lines=True)`` loads it). Each line is written and
fsynced the moment its point ends, so a killed sweep loses nothing that finished; a torn last line from a
kill mid-write is the only damage tolerated on reading (and reported).
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ftprof.errors import FtprofError
from ftprof.sweep_plan import Point

SCHEMA = "ftprof.sweep/1"
Status = Literal["ok", "oom", "error", "timeout", "skipped"]
STATUSES = ("ok", "oom", "error", "timeout", "skipped")


class ResultsError(FtprofError):
    """A results file is corrupt or of another schema."""


@dataclass
class Record:
    """The outcome of one point."""

    point: Point
    status: Status
    model: str
    peak_bytes: int | None = None  # max over ranks and phases: NVML process memory on GPUs, RSS on CPUs
    metrics: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None  # why skipped / the error's last line
    stderr_tail: str | None = None
    wall_s: float | None = None
    env: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "key": self.point.key, "model": self.model, **self.point.as_dict(),
                "effective_batch": self.point.effective_batch(), "status": self.status,
                "peak_bytes": self.peak_bytes, "metrics": self.metrics, "reason": self.reason,
                "stderr_tail": self.stderr_tail, "wall_s": self.wall_s, "env": self.env}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Record:
        point = Point(data["precision"], data["zero"], data["world_size"], data["grad_accum"], data["seq_len"],
                      data["batch_size"])
        return cls(point, data["status"], data["model"], data.get("peak_bytes"), data.get("metrics") or {},
                   data.get("reason"), data.get("stderr_tail"), data.get("wall_s"), data.get("env") or {})


def append_record(path: Path, record: Record) -> None:
    """Append one line and fsync it, so it survives a kill or power loss right after."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record.to_json()) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_records(path: Path) -> list[Record]:
    """All records in ``path``.

    Raises:
        ResultsError: a line (other than a torn last one) is not JSON, or not of this schema.
    """
    if not path.is_file():
        raise ResultsError(f"{str(path)!r}: no results file; run `ftprof sweep --out {path.parent}` first")
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines) and not path.read_text(encoding="utf-8").endswith("\n"):
                continue  # torn by a kill mid-write: that point simply didn't finish
            raise ResultsError(f"{str(path)}:{number} is not valid JSON; the file is corrupt "
                               "(fix or remove that line)") from None
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            found = data.get("schema") if isinstance(data, dict) else type(data).__name__
            raise ResultsError(f"{str(path)}:{number} has schema {found!r}, expected {SCHEMA!r}; "
                               "not an ftprof sweep results file")
        try:
            records.append(Record.from_json(data))
        except (KeyError, TypeError) as err:
            raise ResultsError(f"{str(path)}:{number} lacks field {err}; the file is corrupt") from None
    return records


def environment() -> dict[str, Any]:
    """What a measurement depends on besides its settings: devices, driver, library versions."""
    import deepspeed
    import torch
    import transformers

    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "transformers": transformers.__version__, "deepspeed": deepspeed.__version__,
                           "cpu_count": os.cpu_count(), "host": platform.node()}
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name(0)
        env["device_count"] = torch.cuda.device_count()
        env["cuda"] = torch.version.cuda
        try:
            import pynvml

            pynvml.nvmlInit()
            env["driver"] = pynvml.nvmlSystemGetDriverVersion()
            env["device_memory_bytes"] = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).total
        except Exception:  # NVML missing or blocked: the rest is still useful
            pass
    else:
        env["device"] = f"cpu ({platform.processor() or platform.machine()})"
        import psutil

        env["device_memory_bytes"] = psutil.virtual_memory().total
    return env
