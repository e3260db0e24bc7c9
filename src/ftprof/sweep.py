"""Run sweep points, each in a fresh process (the ``deepspeed`` launcher for world size > 1), and record them.

A point that runs out of memory is a result (``oom``); a crash is ``error`` and a hang ``timeout``, with
the tail of its output; the sweep goes on either way. Every finished point is appended to
``results.jsonl`` at once (see :mod:`ftprof.results`), and ``resume`` skips points already there.

:func:`iterate_sweep` decides what runs and when (must-OOM pruning, budgets, ``--find_max_batch``
bisection); an executor (:mod:`ftprof.executors`: one at a time, side by side on one node's devices, or
Slurm jobs) runs the points it is handed, each through :func:`run_point`.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ftprof import measure
from ftprof.deepspeed_config import DeepSpeedConfig, ds_config_for, for_point
from ftprof.distributed import free_port
from ftprof.executors import PointExecutor, SerialExecutor
from ftprof.point import Point
from ftprof.results import Record, Status, append_record, latest
from ftprof.run_profile import Profile
from ftprof.sweep_plan import must_oom, next_batch_to_try
from ftprof.units import GIB
from ftprof.worker import ForkWorker, WorkerError

# What an out-of-memory looks like in a child's output, on GPUs and CPUs.
OOM_MARKERS = (
    "CUDA out of memory",
    "OutOfMemoryError",
    "out of memory",
    "DefaultCPUAllocator: can't allocate",
    "std::bad_alloc",
    "MemoryError",
    "Cannot allocate memory",
    "CUBLAS_STATUS_ALLOC_FAILED",
)
TAIL_CHARS = 2000
SNAPSHOTS = "snapshots"  # --memory_snapshot's folder in the sweep folder


@dataclass
class SweepConfig:
    """What to measure and how (the CLI builds it from flags)."""

    model: str
    points: list[Point]
    out_dir: Path
    steps: int = 3  # at least this many measured steps...
    warmup: int = 1
    min_seconds: float = 0.0  # ...and at least this long
    task: str = "classification"  # or "causal-lm"
    dataset: str | None = None
    base_ds_config: DeepSpeedConfig | None = None
    timeout_s: float = 600.0
    find_max_batch: bool = False
    max_batch: int = 1024
    child_memory_limit: int | None = None  # RLIMIT_AS for each point's process(es), bytes
    prune: bool = True  # skip points that must OOM
    predict: Callable[[Point], int] | None = None  # the estimator's device-used bytes for a point
    budget: int | None = None  # memory per rank; with ``predict``, grid points sure to exceed it aren't run
    margin: float = 0.5  # "sure": predicted above budget x (1 + margin); 0.1 once calibrated on this device
    env: dict[str, Any] = field(default_factory=dict)
    worker: str = "fresh"  # "fork": one-rank local points fork from a pre-imported worker (ftprof.worker)
    memory_snapshot: bool = False  # each point's ranks write memory records under out_dir/snapshots

    @property
    def snapshots_dir(self) -> Path:
        return self.out_dir / SNAPSHOTS

    @property
    def results_path(self) -> Path:
        return self.out_dir / "results.jsonl"

    def ds_config(self, p: Point) -> dict[str, Any]:
        """The DeepSpeed config point ``p`` runs with: the base config (or the shipped one) at its stage."""
        return for_point(self.base_ds_config or DeepSpeedConfig(ds_config_for(p.zero)), p)


def classify(returncode: int, output: str, has_result: bool) -> tuple[Status, str | None]:
    """(status, reason) of a finished child process.

    >>> classify(0, "", True)
    ('ok', None)
    >>> classify(1, "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB", False)[0]
    'oom'
    >>> classify(-9, "", False)
    ('oom', 'killed by SIGKILL (the kernel OOM killer, most likely)')
    """
    if returncode == 0 and has_result:
        return "ok", None
    if any(marker in output for marker in OOM_MARKERS):
        line = next((ln for ln in reversed(output.splitlines()) if any(m in ln for m in OOM_MARKERS)), "")
        return "oom", line.strip()[-300:]
    if returncode == -signal.SIGKILL:
        return "oom", "killed by SIGKILL (the kernel OOM killer, most likely)"
    last = next((ln for ln in reversed(output.splitlines()) if ln.strip()), f"exit code {returncode}")
    return "error", last.strip()[-300:]


Launch = Callable[[Path, int], list[str]]  # (spec path, world size) -> the command that measures the point


def local_command(spec_path: Path, world_size: int, devices: str | None = None) -> list[str]:
    """The command that measures a point on this machine: ``python measure.py SPEC`` for one rank, the
    ``deepspeed`` launcher for more: on the first ``world_size`` GPUs, or on ``devices`` (GPU ids as
    ``CUDA_VISIBLE_DEVICES`` names them; the launcher would put ``--num_gpus N`` ranks on GPUs 0..N-1
    whatever ``CUDA_VISIBLE_DEVICES`` says)."""
    script = measure.__file__
    if world_size == 1:
        return [sys.executable, script, str(spec_path)]
    launcher = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
    where = ["--include", f"localhost:{devices}"] if devices else ["--num_gpus", str(world_size)]
    return [launcher, *where, "--master_port", str(free_port()), script, str(spec_path)]


def run_point(
    cfg: SweepConfig,
    p: Point,
    *,
    env: dict[str, str] | None = None,
    started: Callable[[int], None] | None = None,
    command: Launch = local_command,
    workdir: Path | None = None,
) -> Record:
    """Measure ``p`` in a fresh process group; never raises for the point's own failures.

    Args:
        cfg: the sweep's settings.
        p: the point.
        env: variables set for the point's processes on top of this process's (``CUDA_VISIBLE_DEVICES``
            of its device slots, ...).
        started: called with the process group id once the point's processes start (to stop them from
            another thread).
        command: builds the command line from the spec's path and the world size (``srun`` in a Slurm job).
        workdir: where the spec and result files go (a folder every node sees, for multi-node points).
    """
    with tempfile.TemporaryDirectory(prefix="ftprof-point-", dir=workdir) as tmp:
        result_path = Path(tmp) / "result.json"
        spec = measure.MeasureSpec(
            point=p,
            model=cfg.model,
            steps=cfg.steps,
            warmup=cfg.warmup,
            ds_config=cfg.ds_config(p),
            result_path=str(result_path),
            dataset=cfg.dataset,
            min_seconds=cfg.min_seconds,
            task=cfg.task,
            memory_snapshot_dir=str(cfg.snapshots_dir.absolute()) if cfg.memory_snapshot else None,
        )
        spec_path = spec.write(Path(tmp) / "spec.json")
        child_env = {**_child_env(), **(env or {})}
        forkable = p.world_size == 1 and _is_local(command) and set(env or {}) <= WORKER_ENV
        worker = fork_worker() if cfg.worker == "fork" and forkable else None
        started_at = time.perf_counter()
        if worker is not None:
            try:
                returncode, output = _run_forked(worker, cfg, spec_path, child_env, started)
            except WorkerError as err:  # the worker died: this point and the rest run in fresh processes
                _worker_lost(str(err))
                worker = None
        if worker is None:
            started_at = time.perf_counter()  # a failed fork attempt is not this point's time
            returncode, output = _run_fresh(cfg, command(spec_path, p.world_size), child_env, started)
        status: Status
        reason: str | None
        if returncode is None:
            status, reason = "timeout", f"no result after {cfg.timeout_s:.0f} s"
        else:
            status, reason = classify(returncode, output, result_path.is_file())
        wall = time.perf_counter() - started_at
        profile = Profile.from_json(json.loads(result_path.read_text())) if status == "ok" else None
        return Record(
            point=p,
            status=status,
            model=cfg.model,
            peak_bytes=(profile.peak() or None) if profile else None,
            profile=profile,
            reason=reason,
            stderr_tail=None if status == "ok" else output[-TAIL_CHARS:],
            wall_s=round(wall, 3),
            env={**cfg.env, "world_size": p.world_size, "worker": "fork" if worker else "fresh"},
        )


def _run_fresh(
    cfg: SweepConfig, argv: list[str], env: dict[str, str], started: Callable[[int], None] | None
) -> tuple[int | None, str]:
    """Run the point's command in a fresh process group: (return code, or None on timeout; its output)."""
    limit = cfg.child_memory_limit

    def preexec() -> None:
        os.setsid()  # own process group: a timeout kills every rank
        if limit:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        preexec_fn=preexec,
        env=env,
    )
    if started is not None:
        started(proc.pid)
    try:
        output, _ = proc.communicate(timeout=cfg.timeout_s)
        return proc.returncode, output
    except subprocess.TimeoutExpired:
        kill_process_group(proc.pid)
        output, _ = proc.communicate()
        return None, output
    except BaseException:  # Ctrl-C, or a signal handler's exception: leave no rank behind
        kill_process_group(proc.pid)
        proc.wait()
        raise


def _run_forked(
    worker: ForkWorker,
    cfg: SweepConfig,
    spec_path: Path,
    env: dict[str, str],
    started: Callable[[int], None] | None,
) -> tuple[int | None, str]:
    """:func:`_run_fresh` for a one-rank point, forked from the pre-imported worker."""
    output_path = spec_path.with_name("output.txt")
    pid = worker.start(spec_path, env, output_path, cfg.child_memory_limit)
    if started is not None:
        started(pid)
    try:
        returncode: int | None = worker.wait(pid, cfg.timeout_s)
    except subprocess.TimeoutExpired:
        kill_process_group(pid)
        with contextlib.suppress(WorkerError, subprocess.TimeoutExpired):  # it timed out: that is the result
            worker.wait(pid, 60)
        returncode = None
    except BaseException:  # Ctrl-C, or the worker died under the point: leave nothing running
        kill_process_group(pid)
        raise
    return returncode, output_path.read_text(errors="replace") if output_path.exists() else ""


def _is_local(command: Launch) -> bool:
    """Whether ``command`` is :func:`local_command` (possibly with its devices bound), not srun."""
    return getattr(command, "func", command) is local_command


# Variables a forked point may set for itself: the rest were read by the worker's imports at start-up.
WORKER_ENV = {"OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES"}
_WORKER: ForkWorker | None = None
_WORKER_FAILED = False
_RETIRED: list[ForkWorker] = []  # a worker given up on keeps its running points until the sweep ends
_WORKER_LOCK = threading.Lock()


def fork_worker() -> ForkWorker | None:
    """This process's pre-imported worker, started on first use; None (fresh processes from then on, with
    one line on stderr saying why) if it cannot start."""
    global _WORKER, _WORKER_FAILED
    with _WORKER_LOCK:
        if _WORKER is None and not _WORKER_FAILED:
            try:
                _WORKER = ForkWorker(env=_child_env())
            except WorkerError as err:
                _WORKER_FAILED = True
                print(f"ftprof: no pre-imported worker ({err}); points run in fresh processes", file=sys.stderr)
        return _WORKER


def _worker_lost(why: str) -> None:
    global _WORKER, _WORKER_FAILED
    with _WORKER_LOCK:
        if _WORKER is not None:
            _RETIRED.append(_WORKER)  # not closed: closing would stop the points other threads run in it
            _WORKER, _WORKER_FAILED = None, True
            print(f"ftprof: the pre-imported worker failed ({why}); points run in fresh processes", file=sys.stderr)


def close_fork_worker() -> None:
    """Stop this process's worker (and any retired one); the next sweep starts a new one."""
    global _WORKER, _WORKER_FAILED
    with _WORKER_LOCK:
        for worker in [*_RETIRED, *([_WORKER] if _WORKER else [])]:
            worker.close()
        _RETIRED.clear()
        _WORKER, _WORKER_FAILED = None, False


atexit.register(close_fork_worker)  # a sweep that ends without calling it (an exception) leaves no worker


def kill_process_group(pgid: int) -> None:
    """SIGKILL a point's process group (every rank), if it is still there."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT"):
        env.pop(var, None)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


class _Grid:
    """Which grid point to start next: the sweep's order (smallest predicted peak first), except that a
    point waits while a smaller point of its setting runs, whose OOM would prove it can't fit."""

    def __init__(self, cfg: SweepConfig, done: dict[str, Record], running: list[Point]) -> None:
        predict = cfg.predict
        order = sorted(cfg.points, key=lambda p: (predict(p), p)) if predict else cfg.points
        busy = {r.key for r in running}
        self.pending = [p for p in order if p.key not in done and p.key not in busy]
        self.hold = cfg.prune
        self.bisecting = False

    def next(self, running: list[Point]) -> Point | None:
        return next((p for p in self.pending if not (self.hold and must_oom(p, running))), None)

    def taken(self, p: Point) -> None:
        self.pending.remove(p)

    def finished(self, record: Record) -> None:
        pass


class _Bisection:
    """``--find_max_batch``: one doubling-then-bisection search per setting; settings search side by side,
    each one point at a time. A point already measured is read back instead of run."""

    def __init__(self, cfg: SweepConfig, done: dict[str, Record], running: list[Point]) -> None:
        self.cfg, self.done = cfg, done
        self.start_batch = min(p.batch_size for p in cfg.points)
        self.settings = sorted({p.with_batch(1) for p in cfg.points})  # one search per setting but the batch
        self.fits: dict[Point, set[int]] = {s: set() for s in self.settings}
        self.ooms: dict[Point, set[int]] = {s: set() for s in self.settings}
        self.busy = {p.with_batch(1) for p in running}
        self.over: set[Point] = set()  # settings whose search ended
        self.bisecting = True
        for r in done.values():
            setting = r.point.with_batch(1)
            if setting in self.fits and r.status == "ok":
                self.fits[setting].add(r.point.batch_size)
            elif setting in self.fits and r.status in ("oom", "skipped"):
                self.ooms[setting].add(r.point.batch_size)

    def next(self, running: list[Point]) -> Point | None:
        for setting in self.settings:
            while setting not in self.busy and setting not in self.over:
                batch = next_batch_to_try(self.fits[setting], self.ooms[setting], self.start_batch, self.cfg.max_batch)
                if batch is None:
                    self.over.add(setting)
                    break
                p = setting.with_batch(batch)
                if p.key in self.done and self.done[p.key].status != "over_budget":
                    self._learn(self.done[p.key])  # measured before: read it back, don't run it again
                    continue
                return p
        return None

    def taken(self, p: Point) -> None:
        self.busy.add(p.with_batch(1))

    def finished(self, record: Record) -> None:
        self.busy.discard(record.point.with_batch(1))
        self._learn(record)

    def _learn(self, record: Record) -> None:
        setting, batch = record.point.with_batch(1), record.point.batch_size
        if setting not in self.fits:  # a re-attached job of another grid
            return
        if record.status == "ok":
            self.fits[setting].add(batch)
        elif record.status in ("oom", "skipped"):
            self.ooms[setting].add(batch)
        else:  # an error or timeout says nothing about memory: stop searching this setting
            self.over.add(setting)


def iterate_sweep(
    cfg: SweepConfig,
    done: dict[str, Record],
    run: Callable[[SweepConfig, Point], Record] = run_point,
    executor: PointExecutor | None = None,
) -> Iterator[Record]:
    """Yield each new record (already appended to the results file), skipping points in ``done``.

    Points run through ``executor`` (default: one at a time through ``run``). Whether a point must OOM is
    decided when it is about to start, from every OOM known by then; points already running in
    ``executor`` (Slurm jobs re-attached on ``--resume``) are waited for, not started again. Ctrl-C (or
    closing the iterator) cancels the running points.
    """
    pool = executor or SerialExecutor(run)
    plan: _Grid | _Bisection = (_Bisection if cfg.find_max_batch else _Grid)(cfg, done, pool.running())
    oomed = [r.point for r in done.values() if r.status == "oom"]

    def finish(record: Record) -> Record:
        p = record.point
        predicted = cfg.predict(p) if cfg.predict else None
        if predicted:
            record.predicted_bytes = predicted
        record.ds_config = cfg.ds_config(p)
        append_record(cfg.results_path, record)
        done[p.key] = record
        if record.status == "oom":
            oomed.append(p)
        plan.finished(record)
        return record

    try:
        while True:
            while (p := plan.next(pool.running())) is not None:
                not_run = _not_run(cfg, p, oomed, plan.bisecting)
                if not_run is None and not pool.can_start(p):
                    break  # no overtaking: a wide point is never starved by narrow ones behind it
                plan.taken(p)
                if not_run is not None:
                    yield finish(not_run)
                else:
                    pool.start(cfg, p)
            if not pool.running():
                return
            for record in pool.wait():
                yield finish(record)
    except BaseException:
        pool.cancel()
        raise


def _not_run(cfg: SweepConfig, p: Point, oomed: list[Point], bisecting: bool) -> Record | None:
    """The record of a point that needn't run (it must OOM, or is predicted far over budget), else None.
    A prediction never stands in for a measurement while bisecting."""
    proof = must_oom(p, oomed) if cfg.prune else None
    if proof is not None:
        return Record(
            point=p,
            status="skipped",
            model=cfg.model,
            env=dict(cfg.env),
            reason=f"must OOM: {proof.key} did with a batch and sequence no larger",
        )
    predicted = cfg.predict(p) if cfg.predict else None
    if not bisecting and cfg.prune and predicted and cfg.budget and predicted > cfg.budget * (1 + cfg.margin):
        return Record(
            point=p,
            status="over_budget",
            model=cfg.model,
            env=dict(cfg.env),
            reason=f"not run: predicted {predicted / GIB:.2f} GiB exceeds the {cfg.budget / GIB:.1f} GiB "
            f"budget by more than {cfg.margin:.0%}",
        )
    return None


def close_calls(records: list[Record], budget: int | None) -> list[Point]:
    """The fastest recommendation and the points whose throughput is within noise of it: the ones to measure
    again, longer, before the report picks between them. A point is re-measured once: one measured twice
    already (a resumed sweep) stays as it is; a re-measure because the CPUs were busy, or the repeat that
    gauges the machine's drift, doesn't count."""
    from ftprof.recommend import recommend, worst_repeat

    recs = recommend(latest(records), budget, repeat=worst_repeat(records))
    if not recs or not recs[0].within_noise_of:
        return []
    measured = [
        r.point.key for r in records if r.status == "ok" and r.env.get("remeasured") not in ("contended", "repeat")
    ]
    by_key = {r.point.key: r.point for r in records}
    close = [recs[0].record.point.key, *recs[0].within_noise_of]
    return [by_key[k] for k in close if measured.count(k) < 2]


def repeat_point(records: list[Record]) -> Point | None:
    """The sweep's first uncontended ok point, to measure again once the sweep is through: how far its
    throughput moves says how repeatable this machine's figures are (:func:`ftprof.recommend.worst_repeat`).
    None once the results hold such a repeat (a resumed sweep) or nothing to repeat."""
    if any(r.env.get("remeasured") == "repeat" for r in records):
        return None
    return next(
        (
            r.point
            for r in records
            if r.status == "ok"
            and r.samples_per_s
            and "remeasured" not in r.env
            and not (r.profile and r.profile.contended)
            and r.env.get("concurrent_points", 1) == 1
        ),
        None,
    )


def contended_points(records: list[Record]) -> list[Point]:
    """Points whose window didn't have the CPUs to itself (its threads waited for a CPU, or the hypervisor
    took time): the ones to measure again. A point is re-measured once: one measured twice already stays as
    it is. Points run side by side (``--parallel``) waited for each other: they are flagged as such in the
    report, not re-measured one by one."""
    measured = [r.point.key for r in records if r.status == "ok"]
    return [
        r.point
        for r in latest(records)
        if r.status == "ok"
        and r.profile
        and r.profile.contended
        and r.env.get("concurrent_points", 1) == 1
        and measured.count(r.point.key) < 2
    ]


def remeasure(
    cfg: SweepConfig,
    points: list[Point],
    run: Callable[[SweepConfig, Point], Record] = run_point,
    executor: PointExecutor | None = None,
    window: int = 3,
    reason: str = "close call",
) -> Iterator[Record]:
    """Measure ``points`` again over a window ``window`` times as long; each new record (``env["remeasured"]``
    says why) is appended and, being the latest for its point, replaces the earlier measurement in reports."""
    longer = replace(cfg, steps=window * cfg.steps, min_seconds=window * cfg.min_seconds)
    pool = executor or SerialExecutor(run)
    queue = list(points)
    try:
        while queue or pool.running():
            while queue and pool.can_start(queue[0]):
                pool.start(longer, queue.pop(0))
            for record in pool.wait():
                record.ds_config = cfg.ds_config(record.point)
                record.env["remeasured"] = reason
                predicted = cfg.predict(record.point) if cfg.predict else None
                if predicted:  # as the first measurement had it: the report shows it beside the peak
                    record.predicted_bytes = predicted
                append_record(cfg.results_path, record)
                yield record
    except BaseException:
        pool.cancel()
        raise
