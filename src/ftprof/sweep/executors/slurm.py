"""``--executor slurm``: each point a Slurm job, submitted through submitit.

The job runs :func:`measure_in_job` once, in its batch step: the same :func:`~ftprof.sweep.point_run.run_point` as a
local sweep (spec, :func:`~ftprof.sweep.point_run.classify`, profile), with the ranks of a multi-rank point started as
one job step (``srun --ntasks N python -m ftprof.sweep.measure SPEC``; :mod:`ftprof.runtime.distributed` maps the step's
``SLURM_*`` variables to torch's, so the step is one world, across nodes when the point is wider than
one). The record comes back through submitit's result file; the driver appends it to ``results.jsonl``
as each job finishes. A job Slurm ends itself (time limit, node failure, out-of-memory kill) leaves no
result: its Slurm state becomes the point's status (:func:`~ftprof.sweep.executors.slurm_jobs.status_for_state`).

Every submitted job is logged in ``jobs.jsonl`` (see :mod:`ftprof.sweep.executors.slurm_jobs`); ``--resume``
re-attaches to those still open, and Ctrl-C cancels them.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ftprof.errors import ConfigError, FtprofError
from ftprof.point import Point
from ftprof.records.results import Record, RunFacts, Status
from ftprof.sweep.executors.slurm_jobs import JOBS, JobEntry, JobLog, JobState, query_states, status_for_state
from ftprof.sweep.point_run import TAIL_CHARS, SweepConfig, kill_process_group, local_command, run_point

RESULT_POLL_S = 0.5  # result files are looked for this often (a file system call)...
STATE_POLL_S = 5.0  # ...and Slurm is asked about the jobs without one this often
RESULT_GRACE_S = 15.0  # how long a result file may lag behind the job's end on a network file system
GRACE_S = 30.0  # a job Slurm no longer knows, with no result after this long, is given up


class SlurmError(FtprofError):
    """Slurm refused a job, or isn't reachable from here."""


def parse_slurm_time(text: str) -> int:
    """``--slurm_time`` in whole minutes, from any of Slurm's time formats.

    >>> [parse_slurm_time(t) for t in ("30", "1:30:00", "2-00:00:00", "0:45", "1-12")]
    [30, 90, 2880, 1, 2160]
    """
    try:
        days, _, clock = text.strip().rpartition("-")
        parts = [int(x) for x in clock.split(":")]
        if days:  # days-hours[:minutes[:seconds]]
            hours, minutes, seconds = (parts + [0, 0])[:3]
            total = (int(days) * 24 + hours) * 60 + minutes + seconds / 60
        elif len(parts) == 1:  # minutes
            total = parts[0]
        elif len(parts) == 2:  # minutes:seconds
            total = parts[0] + parts[1] / 60
        elif len(parts) == 3:  # hours:minutes:seconds
            total = parts[0] * 60 + parts[1] + parts[2] / 60
        else:
            raise ValueError(text)
    except ValueError:
        raise ConfigError(
            f"--slurm_time {text!r}: not a Slurm time; use minutes (30), H:MM:SS (1:30:00) or D-HH:MM:SS"
        ) from None
    if total <= 0:
        raise ConfigError(f"--slurm_time {text!r} must be positive")
    return math.ceil(total)


@dataclass(frozen=True)
class SlurmOptions:
    """Where and how long the jobs run (the ``--slurm_*`` flags)."""

    time_min: int  # --slurm_time
    partition: str | None = None
    account: str | None = None
    gpus_per_node: int | None = None  # None or 0: CPU nodes, every rank of a point on one node
    cpus_per_task: int | None = None  # per rank; Slurm's default (1) when None
    max_jobs: int | None = None  # --parallel: jobs queued or running at once (None: no limit)

    def shape(self, p: Point) -> tuple[int, int]:
        """(nodes, tasks per node) of ``p``'s job: one task per rank, at most a node's GPUs per node.

        >>> SlurmOptions(10, gpus_per_node=8).shape(Point(precision="bf16", zero=3, world_size=16, seq_len=8,
        ...     batch_size=1))
        (2, 8)
        """
        if not self.gpus_per_node or p.world_size <= self.gpus_per_node:
            return 1, p.world_size
        nodes = math.ceil(p.world_size / self.gpus_per_node)
        if p.world_size % nodes:
            raise ConfigError(
                f"{p.key}: {p.world_size} ranks don't split evenly over {nodes} nodes of "
                f"--slurm_gpus_per_node {self.gpus_per_node}; use a --world_size that does"
            )
        return nodes, p.world_size // nodes

    def parameters(self, p: Point) -> dict[str, Any]:
        """submitit's ``update_parameters`` for ``p``'s job (``use_srun=False``: :func:`measure_in_job` runs
        once, in the batch step, and starts the ranks itself)."""
        nodes, per_node = self.shape(p)
        params: dict[str, Any] = {
            "job_name": job_name(p),
            "time": self.time_min,
            "nodes": nodes,
            "ntasks_per_node": per_node,
            "use_srun": False,
        }
        if self.gpus_per_node:
            params["gpus_per_node"] = per_node
        optional = {"partition": self.partition, "account": self.account, "cpus_per_task": self.cpus_per_task}
        return params | {k: v for k, v in optional.items() if v}


def job_name(p: Point) -> str:
    return f"ftprof-{p.key}"


def srun_command(spec_path: Path, world_size: int) -> list[str]:
    """Inside a job: one rank runs in the batch step; several are one ``srun`` job step over the allocation."""
    if world_size == 1:
        return local_command(spec_path, 1)
    command = ["srun", f"--ntasks={world_size}", "--kill-on-bad-exit=1"]
    if os.environ.get("SLURM_CPUS_PER_TASK"):  # srun doesn't take it from sbatch's environment (Slurm 22.05)
        command.append(f"--cpus-per-task={os.environ['SLURM_CPUS_PER_TASK']}")
    return [*command, sys.executable, "-m", "ftprof.sweep.measure", str(spec_path)]


def measure_in_job(cfg: SweepConfig, p: Point) -> Record:
    """What a point's job runs (submitit calls it on the node and returns its value to the driver)."""
    from ftprof.profiler.environment import environment

    folder = Path(os.environ.get("SUBMITIT_FOLDER") or ".")  # shared with every node of the job
    # As many threads per rank as the job gave it CPUs (torch would take every core of the node).
    threads = {} if "OMP_NUM_THREADS" in os.environ else {"OMP_NUM_THREADS": os.environ.get("SLURM_CPUS_PER_TASK", "1")}
    groups: list[int] = []

    def ending(signum: int, frame: object) -> None:
        """Slurm ends the job (time limit, scancel, preemption) with SIGTERM to every process. The point's
        own death would read as a crash: leave no result instead, so the driver records Slurm's reason."""
        for pgid in groups:
            kill_process_group(pgid)
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, ending)
    record = run_point(cfg, p, env=threads, started=groups.append, command=srun_command, workdir=folder)
    record.machine = environment()  # the node's devices and versions, not the driver's
    record.run.slurm_job_id = os.environ.get("SLURM_JOB_ID")
    record.run.slurm_nodes = os.environ.get("SLURM_JOB_NODELIST")
    return record


def _submitit_executor(folder: Path) -> Any:
    import submitit

    class Sbatch(submitit.SlurmExecutor):
        """submitit asks Slurm for SIGUSR2 90 s before the time limit, so that checkpointable jobs can
        requeue. A point can't resume, and the signal would kill its srun ranks early: the time limit
        alone ends the job (state TIMEOUT, the point's ``timeout``)."""

        def _make_submission_file_text(self, command: str, uid: str) -> str:
            text = super()._make_submission_file_text(command, uid)
            return "\n".join(line for line in text.splitlines() if not line.startswith("#SBATCH --signal=")) + "\n"

    try:
        return Sbatch(folder=folder)
    except RuntimeError as err:  # submitit: no srun on PATH
        raise SlurmError(
            f"--executor slurm: {err}; run the sweep where sbatch and srun work (a login node, or with SLURM_CONF)"
        ) from None


@dataclass
class _Job:
    entry: JobEntry
    job: Any  # submitit.SlurmJob
    cfg: SweepConfig
    state: JobState | None = None
    gone_since: float | None = None  # first seen ended (or unknown to Slurm) without a result file


class SlurmExecutor:
    """Points as Slurm jobs: submitted as the sweep reaches them, collected as they finish.

    Args:
        out_dir: the sweep folder (``jobs.jsonl`` and ``slurm/<run>/``, submitit's pickles and logs).
        options: the ``--slurm_*`` flags.
        on_event: called with one line per submission, start and re-attachment (live progress).
    """

    def __init__(self, out_dir: Path, options: SlurmOptions, on_event: Callable[[str], None] | None = None) -> None:
        self.options = options
        self.on_event = on_event or (lambda line: None)
        self.folder = (out_dir / "slurm" / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}").absolute()
        self.log = JobLog(out_dir / JOBS)
        self._sbatch = _submitit_executor(self.folder)
        self._jobs: dict[str, _Job] = {}
        self._next_query = 0.0

    def can_start(self, p: Point) -> bool:
        self.options.shape(p)  # a point that can't be laid out on nodes is an error now, not in the queue
        return self.options.max_jobs is None or len(self._jobs) < self.options.max_jobs

    def start(self, cfg: SweepConfig, p: Point) -> None:
        import submitit

        self._sbatch.update_parameters(**self.options.parameters(p))
        try:
            # The estimator (a closure) stays here: the job only measures.
            submitted = self._sbatch.submit(measure_in_job, replace(cfg, predict=None), p)
        except submitit.core.utils.FailedJobError as err:
            last = next((ln for ln in reversed(str(err).splitlines()) if ln.strip()), "no message")
            raise SlurmError(
                f"sbatch refused the job of {p.key}: {last.strip()}; check --slurm_partition, --slurm_account, "
                "--slurm_time and --slurm_gpus_per_node"
            ) from None
        # submitit counts one task per rank; only task 0 runs the function (use_srun=False) and has a result.
        job = submitted.task(0)
        entry = JobEntry(job.job_id, p, str(self.folder), job_name(p), time.time())
        self.log.submitted(entry)
        self._jobs[job.job_id] = _Job(entry, job, cfg)
        self._next_query = 0.0
        self.on_event(f"{p.key}: submitted as Slurm job {job.job_id}")

    def reattach(self, entries: list[JobEntry], cfg: SweepConfig) -> None:
        """Follow jobs a previous driver submitted (``--resume``): they are waited for, not submitted again."""
        from submitit import SlurmJob

        for e in entries:
            self._jobs[e.job_id] = _Job(e, SlurmJob(folder=e.folder, job_id=e.job_id), cfg)
            self.on_event(f"{e.point.key}: re-attached to Slurm job {e.job_id}")

    def running(self) -> list[Point]:
        return [j.entry.point for j in self._jobs.values()]

    def wait(self) -> list[Record]:
        while self._jobs:
            finished = [self._result(j) for j in self._jobs.values() if j.job.paths.result_pickle.exists()]
            if not finished and time.monotonic() >= self._next_query:
                finished = self._ended_by_slurm()
                self._next_query = time.monotonic() + STATE_POLL_S
            if finished:
                for record in finished:
                    self._jobs.pop(str(record.run.slurm_job_id))
                return finished
            time.sleep(RESULT_POLL_S)
        return []

    def cancel(self) -> None:
        ids = list(self._jobs)
        if ids:
            subprocess.run(["scancel", *ids], capture_output=True, timeout=60)
            self.log.cancelled(ids)
            self.on_event(f"cancelled Slurm jobs {', '.join(ids)}")
        self._jobs.clear()

    def _result(self, j: _Job) -> Record:
        """The record a finished job returned, or an error record with its traceback's last line."""
        try:
            record: Record = j.job.result()
        except Exception as err:  # the job function raised: a broken environment on the node, or a bug
            trace = str(err).split("-" * 22)
            lines = [ln for ln in (trace[1] if len(trace) > 2 else str(err)).splitlines() if ln.strip()]
            record = self._failure(j, "error", lines[-1].strip()[-300:] if lines else "the job raised")
        record.run.slurm_job_id = j.entry.job_id
        return record

    def _ended_by_slurm(self) -> list[Record]:
        """Records of the jobs Slurm ended (or forgot) without a result file; progress lines for the others."""
        states = query_states(list(self._jobs))
        now, ended = time.monotonic(), []
        for job_id, j in self._jobs.items():
            state = states.get(job_id)
            if state is not None and state.name and state.name != j.entry.name:
                state = None  # another job under a reused id (a restarted cluster): ours is gone
            if state is not None and state.state == "RUNNING" and (j.state is None or j.state.state != "RUNNING"):
                self.on_event(f"{j.entry.point.key}: job {job_id} running on {state.nodes}")
            j.state = state or j.state
            if state is not None and state.live:
                j.gone_since = None
                continue
            j.gone_since = j.gone_since or now
            grace = RESULT_GRACE_S if state is not None else GRACE_S
            if now - j.gone_since < grace:
                continue  # a result file may still appear
            if state is None:
                reason = f"Slurm no longer knows job {job_id} and it left no result"
                ended.append(self._failure(j, "error", reason))
            else:
                status, reason = status_for_state(state, job_id, self.options.time_min)
                ended.append(self._failure(j, status, reason))
        return ended

    def _failure(self, j: _Job, status: Status, reason: str) -> Record:
        p = j.entry.point
        log = "\n".join(x for x in (j.job.stdout(), j.job.stderr()) if x)
        facts = RunFacts(slurm_job_id=j.entry.job_id, slurm_state=j.state.state if j.state else "UNKNOWN")
        return j.cfg.record(
            p,
            status,
            facts,
            reason=reason,
            stderr_tail=log[-TAIL_CHARS:] or None,
            wall_s=round(time.time() - j.entry.submitted, 3),
        )
