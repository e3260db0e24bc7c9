"""What ``--executor slurm`` keeps and asks about its jobs: the sweep folder's ``jobs.jsonl``, and Slurm's
job states turned into sweep statuses.

``jobs.jsonl`` holds one line per submitted job (its id, point, submitit folder and name, appended and
fsynced right after ``sbatch`` answers) and one per job cancelled by Ctrl-C. ``--resume`` re-attaches to
every job whose outcome was never recorded (no record carries its id) and whose point still needs one:
finished jobs are read back from their result files, running and pending ones are waited for, and
cancelled ones run again. Nothing is submitted twice.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftprof.point import Point
from ftprof.records.results import Record, Status, repair_torn_tail

JOBS = "jobs.jsonl"
# States in which a job may still produce its result (COMPLETING: its processes are being cleaned up).
LIVE_STATES = {
    "PENDING",
    "CONFIGURING",
    "RUNNING",
    "COMPLETING",
    "REQUEUED",
    "REQUEUE_FED",
    "REQUEUE_HOLD",
    "RESIZING",
    "SUSPENDED",
    "SIGNALING",
    "STAGE_OUT",
    "STOPPED",
    "RESV_DEL_HOLD",
}


@dataclass(frozen=True)
class JobState:
    """What Slurm says about one job (``squeue``, else ``sacct``)."""

    state: str  # Slurm's word: RUNNING, TIMEOUT, OUT_OF_MEMORY, ... ("CANCELLED by 0" shortened to CANCELLED)
    name: str = ""
    reason: str = ""  # squeue's %r (TimeLimit, NodeFail, Resources, ...) or sacct's ExitCode
    nodes: str = ""

    @property
    def live(self) -> bool:
        return self.state in LIVE_STATES


def status_for_state(state: JobState, job_id: str, time_limit_min: int | None = None) -> tuple[Status, str]:
    """The sweep status and reason of a job Slurm ended without a result from the point.

    >>> status_for_state(JobState("TIMEOUT", reason="TimeLimit"), "42", 30)
    ('timeout', 'Slurm stopped job 42 at its time limit (--slurm_time 30 min)')
    >>> status_for_state(JobState("OUT_OF_MEMORY"), "42")[0], status_for_state(JobState("NODE_FAIL"), "42")[0]
    ('oom', 'error')
    """
    limit = f" (--slurm_time {time_limit_min} min)" if time_limit_min else ""
    detail = f" ({state.reason})" if state.reason and state.reason != "None" else ""
    on = f" on {state.nodes}" if state.nodes and state.nodes != "None assigned" else ""
    if state.state in ("TIMEOUT", "DEADLINE"):
        return "timeout", f"Slurm stopped job {job_id} at its time limit{limit}"
    if state.state == "OUT_OF_MEMORY":
        return "oom", f"Slurm killed job {job_id}{on} for exceeding its memory allocation (OUT_OF_MEMORY)"
    if state.state in ("NODE_FAIL", "BOOT_FAIL"):
        return "error", f"job {job_id} lost its node{on} ({state.state}); --retry_failed runs it again"
    if state.state == "CANCELLED":
        return "error", f"job {job_id} was cancelled outside this sweep (scancel or an administrator)"
    if state.state == "PREEMPTED":
        return "error", f"job {job_id} was preempted{on}; --retry_failed runs it again"
    if state.state == "FAILED":
        return "error", f"job {job_id} failed{on}{detail} before the point could report"
    if state.state == "COMPLETED":
        return "error", f"job {job_id} completed without a result file"
    return "error", f"job {job_id} ended in state {state.state}{detail}"


def parse_squeue(text: str) -> dict[str, JobState]:
    """``squeue -h -o '%i|%j|%T|%r|%N'`` lines by job id.

    >>> parse_squeue("7|ftprof-a|RUNNING|None|node1\\n8|ftprof-b|COMPLETING|TimeLimit|node2\\n")["8"].reason
    'TimeLimit'
    """
    states = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 5:
            job_id, name, state, reason, nodes = parts
            states[job_id] = JobState(state.split()[0], name, reason, nodes)
    return states


def parse_sacct(text: str) -> dict[str, JobState]:
    """``sacct -X -n -P -o JobID,JobName,State,ExitCode,NodeList`` lines by job id.

    >>> parse_sacct("9|ftprof-a|CANCELLED by 1000|0:15|node3\\n")["9"]
    JobState(state='CANCELLED', name='ftprof-a', reason='exit 0:15', nodes='node3')
    """
    states = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 5 and parts[2]:
            job_id, name, state, exit_code, nodes = parts
            states[job_id] = JobState(state.split()[0], name, f"exit {exit_code}", nodes)
    return states


def query_states(job_ids: list[str]) -> dict[str, JobState]:
    """Slurm's state of each job it still knows: ``squeue`` for jobs in the controller's memory (running
    ones and those ended in the last ``MinJobAge`` seconds), ``sacct`` for older ones where the cluster keeps
    accounting. A job neither knows is absent from the answer."""
    if not job_ids:
        return {}
    states = parse_squeue(_call(["squeue", "-h", "--states=all", "-j", ",".join(job_ids), "-o", "%i|%j|%T|%r|%N"]))
    missing = [j for j in job_ids if j not in states]
    if missing:
        fields = "JobID,JobName,State,ExitCode,NodeList"
        states.update(parse_sacct(_call(["sacct", "-X", "-n", "-P", "-j", ",".join(missing), "-o", fields])))
    return {j: s for j, s in states.items() if j in job_ids}


def _call(command: list[str]) -> str:
    """A Slurm command's output; empty when it fails (an id Slurm forgot, no accounting storage)."""
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


@dataclass(frozen=True)
class JobEntry:
    """One submitted job, as ``jobs.jsonl`` keeps it."""

    job_id: str
    point: Point
    folder: str  # submitit's folder of this job: its pickles and logs
    name: str  # the Slurm job name, checked on re-attach (a restarted test cluster reuses ids)
    submitted: float


class JobLog:
    """``jobs.jsonl``: every job this sweep submitted, and those it cancelled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def submitted(self, entry: JobEntry) -> None:
        self._append(
            {
                "event": "submitted",
                "job_id": entry.job_id,
                "key": entry.point.key,
                "point": entry.point.to_json(),
                "folder": entry.folder,
                "name": entry.name,
                "time": entry.submitted,
            }
        )

    def cancelled(self, job_ids: list[str]) -> None:
        for job_id in job_ids:
            self._append({"event": "cancelled", "job_id": job_id, "time": time.time()})

    def lines(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line torn by a kill mid-write: that job's id never reached the log
        return out

    def entries(self) -> list[JobEntry]:
        return [
            JobEntry(d["job_id"], Point.from_json(d["point"]), d["folder"], d["name"], d["time"])
            for d in self.lines()
            if d.get("event") == "submitted"
        ]

    def open_jobs(self, records: list[Record], done: set[str]) -> list[JobEntry]:
        """Jobs whose outcome no record holds, whose point still needs one, and that were not cancelled."""
        recorded = {r.run.slurm_job_id for r in records if r.run.slurm_job_id}
        cancelled = {d["job_id"] for d in self.lines() if d.get("event") == "cancelled"}
        return [
            e
            for e in self.entries()
            if e.job_id not in recorded and e.job_id not in cancelled and e.point.key not in done
        ]

    def _append(self, data: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        repair_torn_tail(self.path)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(data) + "\n")
            f.flush()
            os.fsync(f.fileno())
