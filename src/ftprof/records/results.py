"""The sweep's record schema and its JSON Lines file: appended durably, read back strictly.

One line per finished point (``pandas.read_json(path, lines=True)`` loads it). Each line is written and
fsynced the moment its point ends, so a killed sweep loses nothing that finished; a torn last line from a
kill mid-write is the only damage tolerated on reading (and reported).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args

from ftprof.errors import FtprofError
from ftprof.point import TASKS, LoraOptions, Point, Task
from ftprof.records.profile import Profile

SCHEMA = "ftprof.sweep/5"
# Read, never written. 4: every point under DeepSpeed (no ``deepspeed`` or ``optim`` fields); 3: no peft axis
# (every point full fine-tuning); 2: the run's facts and the machine in one flat "env" dict; 1: a flat "metrics"
# dict holds the profile's fields too.
OLD_SCHEMAS = ("ftprof.sweep/4", "ftprof.sweep/3", "ftprof.sweep/2", "ftprof.sweep/1")
RESULTS = "results.jsonl"  # a sweep folder's results file
# skipped: a smaller point of the same setting ran out of memory (proof); over_budget: the estimator predicts
# more than the budget with a margin (a prediction, never used as an OOM by --find_max_batch).
Status = Literal["ok", "oom", "error", "timeout", "skipped", "over_budget"]
FAILED: tuple[Status, ...] = ("error", "timeout")  # --retry_failed runs these again
STATUSES: tuple[Status, ...] = get_args(Status)
# Why a point was measured a second time: its CPUs were busy the first time, the sweep's one repeat that
# gauges the machine's drift, or one of the fastest points within noise of each other (a longer window).
Remeasured = Literal["contended", "repeat", "close call"]
REMEASURED: tuple[Remeasured, ...] = get_args(Remeasured)
Worker = Literal["fork", "fresh"]  # forked from the sweep's pre-imported worker, or a fresh process
WORKERS: tuple[Worker, ...] = get_args(Worker)


class ResultsError(FtprofError):
    """A results file is corrupt or of another schema."""


def results_path(folder_or_file: Path | str) -> Path:
    """A sweep's results file: ``folder_or_file`` itself when it names a ``.jsonl`` file, else the
    :data:`RESULTS` file in that folder.

    >>> str(results_path("profiles/x")), str(results_path("profiles/x/results.jsonl"))
    ('profiles/x/results.jsonl', 'profiles/x/results.jsonl')
    """
    path = Path(folder_or_file)
    return path if path.suffix == ".jsonl" else path / RESULTS


@dataclass
class RunFacts:
    """How and where a point ran, as the sweep and its executors saw it (its figures are in the profile)."""

    worker: Worker | None = None  # None: not run (skipped, over budget), or lost with its Slurm job
    remeasured: Remeasured | None = None  # why this is a second measurement of its point (None: the first)
    concurrent_points: int = 1  # --parallel: the most points that ran side by side with it (1: alone)
    cuda_visible_devices: str | None = None  # --parallel on GPUs: the devices it had to itself
    peak_figure: str | None = None  # the profile figure ``peak_bytes`` is, when not the sampler's own
    slurm_job_id: str | None = None  # --executor slurm: its job...
    slurm_nodes: str | None = None  # ...the nodes it ran on...
    slurm_state: str | None = None  # ...and, for a job Slurm ended without a result, its final state

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunFacts:
        """Read back :func:`dataclasses.asdict`'s dict.

        Raises:
            ValueError: a key that is no fact (a corrupt line, or one of a newer ftprof).
        """
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown run facts {sorted(unknown)}")
        facts = cls(**data)
        _check_one_of("worker", facts.worker, (None, *WORKERS))
        _check_one_of("remeasured", facts.remeasured, (None, *REMEASURED))
        return facts


def _check_one_of(name: str, value: object, allowed: tuple[object, ...]) -> None:
    """Refuse a field read back with a value its type doesn't allow (None among ``allowed``: optional).

    >>> _check_one_of("status", "napping", ("ok", "oom"))
    Traceback (most recent call last):
    ...
    ValueError: status 'napping' is none of ['ok', 'oom']
    """
    if value not in allowed:
        raise ValueError(f"{name} {value!r} is none of {[a for a in allowed if a is not None]}")


@dataclass
class Record:
    """The outcome of one point."""

    point: Point
    status: Status
    model: str
    task: Task = "classification"  # what the point trained
    peak_bytes: int | None = None  # max over ranks and phases: NVML process memory on GPUs, RSS on CPUs
    profile: Profile | None = None  # what the point's run measured (``ok`` points)
    predicted_bytes: int | None = None  # the estimator's device-used figure, when a predictor was used
    ds_config: dict[str, Any] | None = None  # the DeepSpeed config the point ran (or would run) with
    reason: str | None = None  # why skipped / the error's last line
    stderr_tail: str | None = None
    wall_s: float | None = None
    run: RunFacts = field(default_factory=RunFacts)
    # Where it ran: devices, memory, library versions (:func:`ftprof.profiler.environment.environment`).
    machine: dict[str, Any] = field(default_factory=dict)
    lora: LoraOptions | None = None  # a LoRA point's adapter settings besides its rank (``point.lora_r``)
    # The Trainer's ``--optim`` the sweep passed (None: the Trainer's default). It steps a point without DeepSpeed;
    # under a ds_config with an "optimizer" block DeepSpeed's optimizer steps instead (the profile's levers say).
    optim: str | None = None

    @property
    def samples_per_s(self) -> float:
        """Measured samples/s over all ranks (0 when not measured)."""
        return float(self.profile.samples_per_s or 0.0) if self.profile else 0.0

    @property
    def device(self) -> str | None:
        """The device the point ran on, as :func:`~ftprof.profiler.environment.environment` names it."""
        device = self.machine.get("device")
        return str(device) if device is not None else None

    @property
    def device_memory_bytes(self) -> int | None:
        """The memory of the device the point ran on (the host's for CPU points), when known."""
        memory = self.machine.get("device_memory_bytes")
        return int(memory) if memory else None

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "key": self.point.key,
            "model": self.model,
            "task": self.task,
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
            "run": asdict(self.run),
            "machine": self.machine,
            "lora": asdict(self.lora) if self.lora else None,
            "optim": self.optim,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Record:
        """Read one line of this schema or an older one (:data:`OLD_SCHEMAS`).

        Raises:
            KeyError: a required field is missing.
            ValueError: a field holds what it can't (unknown run facts, a status, task, worker or
                ``remeasured`` of none of its values).
        """
        profile = data.get("profile")
        predicted = data.get("predicted_bytes")
        if data.get("schema") == "ftprof.sweep/1":
            metrics = data.get("metrics") or {}
            profile = metrics or None
            predicted = metrics.get("predicted_bytes")
        if data.get("schema") in ("ftprof.sweep/2", "ftprof.sweep/1"):  # one flat "env"
            task, run, machine = split_old_env(data.get("env") or {})
        else:
            task, run, machine = data["task"], RunFacts.from_json(data["run"]), data["machine"]
        _check_one_of("status", data["status"], STATUSES)
        _check_one_of("task", task, TASKS)
        return cls(
            point=Point.from_json(data),
            status=data["status"],
            model=data["model"],
            task=task,
            peak_bytes=data.get("peak_bytes"),
            profile=Profile.from_json(profile) if profile else None,
            predicted_bytes=predicted,
            ds_config=data.get("ds_config"),
            reason=data.get("reason"),
            stderr_tail=data.get("stderr_tail"),
            wall_s=data.get("wall_s"),
            run=run,
            machine=machine,
            lora=LoraOptions(**data["lora"]) if data.get("lora") else None,
            optim=data.get("optim"),
        )


def split_old_env(env: dict[str, Any]) -> tuple[Task, RunFacts, dict[str, Any]]:
    """An old schema's flat ``env`` as (task, run facts, machine): the facts' keys become :class:`RunFacts`,
    ``world_size`` (the point's own) is dropped, the rest is the machine.

    >>> task, run, machine = split_old_env({"device": "cpu", "task": "causal-lm", "world_size": 2,
    ...     "remeasured": "repeat"})
    >>> task, run.remeasured, run.concurrent_points, machine
    ('causal-lm', 'repeat', 1, {'device': 'cpu'})
    """
    names = {f.name for f in fields(RunFacts)}
    machine = {k: v for k, v in env.items() if k not in names and k not in ("task", "world_size")}
    facts = {k: v for k, v in env.items() if k in names}
    if facts.get("slurm_job_id") is not None:
        facts["slurm_job_id"] = str(facts["slurm_job_id"])
    return env.get("task", "classification"), RunFacts.from_json(facts), machine


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
        except ValueError as err:
            raise ResultsError(f"{str(path)}:{number}: {err}; the file is corrupt") from None
    return records


def latest(records: list[Record]) -> list[Record]:
    """One record per point, the last written (a retried point's new outcome replaces its failure)."""
    return list({r.point.key: r for r in records}.values())
