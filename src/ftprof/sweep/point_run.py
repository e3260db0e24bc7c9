"""Run one sweep point and turn its outcome into a record: forked from the pre-imported worker (every rank of a
point on this node), or in a fresh process (the ``deepspeed`` launcher for world size > 1, ``srun`` in a Slurm job).

A point that runs out of memory is a result (``oom``); a crash is ``error`` and a hang ``timeout``, with
the tail of its output. :mod:`ftprof.sweep.schedule` decides which points run; the executors
(:mod:`ftprof.sweep.executors`) call :func:`run_point` for each.
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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftprof.point import LoraOptions, Point, Task
from ftprof.records.profile import Profile
from ftprof.records.results import Record, RunFacts, Status, results_path
from ftprof.runtime.deepspeed_config import DeepSpeedConfig, ds_config_for, for_point
from ftprof.runtime.distributed import free_port
from ftprof.sweep import measure
from ftprof.sweep.worker import ForkWorker, WorkerError

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
    task: Task = "classification"
    dataset: str | None = None
    base_ds_config: DeepSpeedConfig | None = None
    timeout_s: float = 600.0
    find_max_batch: bool = False
    max_batch: int = 1024
    batch_step: int = 1  # --find_max_batch: the answer to within this many samples (multiples of it)
    child_memory_limit: int | None = None  # RLIMIT_AS for each point's process(es), bytes
    prune: bool = True  # skip points that must OOM
    predict: Callable[[Point], int | None] | None = None  # the estimator's device-used bytes (None: not modelled)
    budget: int | None = None  # memory per rank; with ``predict``, grid points sure to exceed it aren't run
    margin: float = 0.5  # "sure": predicted above budget x (1 + margin); 0.1 once calibrated on this device
    machine: dict[str, Any] = field(default_factory=dict)  # where the sweep runs: every record gets a copy
    worker: str = "fresh"  # "fork": local points (their ranks) fork from a pre-imported worker (ftprof.sweep.worker)
    memory_snapshot: bool = False  # each point's ranks write memory records under out_dir/snapshots
    lora: LoraOptions = field(default_factory=LoraOptions)  # the LoRA points' adapters (their rank is the point's)
    optim: str | None = None  # the Trainer's --optim (None: its default); what a --zero none point steps

    @property
    def snapshots_dir(self) -> Path:
        return self.out_dir / SNAPSHOTS

    @property
    def results_path(self) -> Path:
        return results_path(self.out_dir)

    def record(self, p: Point, status: Status, run: RunFacts | None = None, **fields: Any) -> Record:
        """A record of ``p`` in this sweep: its model, task and machine, with ``run``'s facts."""
        return Record(
            point=p,
            status=status,
            model=self.model,
            task=self.task,
            run=run or RunFacts(),
            machine=dict(self.machine),
            lora=self.lora if p.peft == "lora" else None,
            optim=self.optim,
            **fields,
        )

    def ds_config(self, p: Point) -> dict[str, Any] | None:
        """The DeepSpeed config point ``p`` runs with: the base config (or the shipped one) at its stage; None
        without DeepSpeed (``--zero none``)."""
        if not p.deepspeed:
            return None
        return for_point(self.base_ds_config or DeepSpeedConfig(ds_config_for(p.zero)), p)


def classify(returncode: int, output: str, has_result: bool) -> tuple[Status, str | None]:
    """(status, reason) of a finished child process.

    >>> classify(0, "", True)
    ('ok', None)
    >>> classify(1, "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB", False)[0]
    'oom'
    >>> classify(-9, "", False)
    ('oom', 'killed by SIGKILL (the kernel OOM killer, most likely)')
    >>> classify(247, "", False)[0]  # the deepspeed launcher's exit when one of its ranks was SIGKILLed
    'oom'
    """
    if returncode == 0 and has_result:
        return "ok", None
    if any(marker in output for marker in OOM_MARKERS):
        line = next((ln for ln in reversed(output.splitlines()) if any(m in ln for m in OOM_MARKERS)), "")
        return "oom", line.strip()[-300:]
    if returncode == -signal.SIGKILL:
        return "oom", "killed by SIGKILL (the kernel OOM killer, most likely)"
    if returncode == 256 - signal.SIGKILL:  # the deepspeed launcher exits sys.exit(-9) when a rank was SIGKILLed
        return "oom", "a rank was killed by SIGKILL (the kernel OOM killer, most likely)"
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
        spec_path = _measure_spec(cfg, p, result_path).write(Path(tmp) / "spec.json")
        child_env = {**_child_env(), **(env or {})}
        forkable = _is_local(command) and set(env or {}) <= WORKER_ENV
        worker = fork_worker() if cfg.worker == "fork" and forkable else None
        started_at = time.perf_counter()
        if worker is not None:
            try:
                returncode, output = _run_forked(worker, cfg, spec_path, child_env, started, p.world_size)
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
        return cfg.record(
            p,
            status,
            RunFacts(worker="fork" if worker else "fresh"),
            peak_bytes=(profile.peak() or None) if profile else None,
            profile=profile,
            reason=reason,
            stderr_tail=None if status == "ok" else output[-TAIL_CHARS:],
            wall_s=round(wall, 3),
        )


def _measure_spec(cfg: SweepConfig, p: Point, result_path: Path) -> measure.MeasureSpec:
    """What the point's process measures, and where its rank 0 writes the profile."""
    return measure.MeasureSpec(
        point=p,
        model=cfg.model,
        steps=cfg.steps,
        warmup=cfg.warmup,
        ds_config=cfg.ds_config(p),
        result_path=str(result_path),
        dataset=cfg.dataset,
        min_seconds=cfg.min_seconds,
        task=cfg.task,
        lora=cfg.lora,
        optim=cfg.optim,
        memory_snapshot_dir=str(cfg.snapshots_dir.absolute()) if cfg.memory_snapshot else None,
        device_memory_limit=cfg.child_memory_limit if _has_cuda() else None,
    )


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _address_space_limit(cfg: SweepConfig) -> int | None:
    """``--child_memory_limit`` as RLIMIT_AS: on CPU only (CUDA maps far more address space than it uses; on a
    GPU the limit caps the caching allocator instead, :attr:`~ftprof.sweep.measure.MeasureSpec.device_memory_limit`)."""
    return None if _has_cuda() else cfg.child_memory_limit


def _run_fresh(
    cfg: SweepConfig, argv: list[str], env: dict[str, str], started: Callable[[int], None] | None
) -> tuple[int | None, str]:
    """Run the point's command in a fresh process group: (return code, or None on timeout; its output)."""
    limit = _address_space_limit(cfg)

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
    world_size: int,
) -> tuple[int | None, str]:
    """:func:`_run_fresh` for a point on this node, forked from the pre-imported worker (its ranks too)."""
    output_path = spec_path.with_name("output.txt")
    pid = worker.start(spec_path, env, output_path, _address_space_limit(cfg), world_size)
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
