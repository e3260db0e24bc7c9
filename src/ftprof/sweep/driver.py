"""A whole sweep, as ``ftprof sweep`` runs it: resume or start the folder, run the grid, then measure again
what needs it. No flags and no console: :class:`SweepRequest` holds plain values, and the caller hears of
progress through two callbacks (each finished point's record, and :data:`SweepEvent` s).

In order, :func:`run_sweep`:

1. clears what killed DeepSpeed runs left (a build lock every point would wait on, shared-memory buffers);
2. checks the model and the data, refuses a folder with results unless resuming, and writes or checks
   ``sweep.json`` (:mod:`~ftprof.sweep.manifest`): a resumed sweep must be measured as it began;
3. skips the points already measured (failed ones too, unless ``retry_failed``), and waits for the Slurm
   jobs an earlier driver left running instead of submitting them again;
4. orders and prunes the grid with the estimator (calibrated on this device when it can be);
5. runs the grid (:func:`~ftprof.sweep.schedule.iterate_sweep`), then three re-measure passes, each once
   per sweep (:mod:`~ftprof.sweep.remeasure`): the points whose CPUs were busy, the first clean point again
   (how repeatable this machine is), and the fastest points within noise of each other, longer.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from ftprof.errors import ConfigError
from ftprof.point import Point
from ftprof.records.results import FAILED, Record, Remeasured, latest, read_records
from ftprof.sweep.executors import PointExecutor, SerialExecutor
from ftprof.sweep.executors.local import ProcessRunner
from ftprof.sweep.executors.slurm import SlurmExecutor, SlurmOptions
from ftprof.sweep.executors.slurm_jobs import JOBS, JobEntry, JobLog
from ftprof.sweep.point_run import SweepConfig, close_fork_worker, run_point
from ftprof.sweep.remeasure import close_calls, contended_points, remeasure, repeat_point
from ftprof.sweep.schedule import iterate_sweep

if TYPE_CHECKING:
    from ftprof.estimate.adapters import LoraFacts

# The estimator's headroom before a grid point is called over budget unrun: wide until it is calibrated on
# this device, since an uncalibrated prediction can be off by tens of percent.
MARGIN_CALIBRATED = 0.10
MARGIN_UNCALIBRATED = 0.50


@dataclass(frozen=True)
class ExecutorChoice:
    """Where the points run (``--executor``, ``--parallel``, ``--slurm_*``).

    Raises:
        ConfigError: ``parallel`` below 1, or Slurm without its options.
    """

    kind: Literal["local", "slurm"] = "local"
    # local: points at once, each on its own device slots (None or 1: one at a time); slurm: jobs at once
    parallel: int | None = None
    slurm: SlurmOptions | None = None  # the jobs' shape and time limit (kind "slurm")

    def __post_init__(self) -> None:
        if self.parallel is not None and self.parallel < 1:
            raise ConfigError(f"--parallel must be at least 1, got {self.parallel}")
        if self.kind == "slurm" and self.slurm is None:
            raise ConfigError("--executor slurm needs its job options (SlurmOptions)")


@dataclass
class SweepRequest:
    """One sweep, as plain values: the CLI builds it from flags, tests by hand.

    ``config`` says what to measure; :func:`run_sweep` fills in its ``machine`` (this one), ``predict`` (the
    model's estimator), ``budget`` and ``margin``.
    """

    config: SweepConfig
    cuda: bool = False  # the points run on CUDA GPUs: the estimator's device, the local executor's slots
    budget: int | None = None  # --budget, bytes per rank (None: the device's memory)
    resume: bool = False  # --resume: continue the folder's sweep, skipping the points it holds
    retry_failed: bool = False  # --retry_failed: with resume, run error and timeout points again
    remeasure: bool = True  # False (--no_remeasure): no pass after the grid
    executor: ExecutorChoice = field(default_factory=ExecutorChoice)


@dataclass(frozen=True)
class Note:
    """A remark on the way: a Slurm job submitted or re-attached, DeepSpeed leftovers removed."""

    text: str


@dataclass(frozen=True)
class Starting:
    """The folder is ready and the grid is about to run."""

    model: str  # the model's name...
    model_type: str  # ...and its config's model type
    device: str  # this machine's, as environment() names it
    to_run: int  # grid points not measured yet
    points: int  # grid points in all
    results: Path


@dataclass(frozen=True)
class Remeasuring:
    """A re-measure pass begins (its records follow, each with ``run.remeasured == reason``)."""

    reason: Remeasured
    points: tuple[Point, ...]


SweepEvent = Note | Starting | Remeasuring


def run_sweep(
    request: SweepRequest,
    on_record: Callable[[Record], None] | None = None,
    on_event: Callable[[SweepEvent], None] | None = None,
    run: ProcessRunner = run_point,
) -> list[Record]:
    """Run ``request``'s sweep to the end (see the module's docstring for the steps).

    Args:
        request: what to measure, where, and how to resume.
        on_record: called with each record as it is appended to the results file (a re-measure's says why
            in ``run.remeasured``).
        on_event: called with each :data:`SweepEvent`.
        run: measures one point (:func:`~ftprof.sweep.point_run.run_point`; a fake in tests).

    Returns:
        The records this call appended, in order.

    Raises:
        ConfigError: the folder holds results and ``resume`` is off, it was measured with other settings, it
            has Slurm jobs still open and the executor isn't Slurm; or the model or data can't be read.
    """
    say = on_event or (lambda event: None)
    _clear_leftovers(say)
    cfg, model_type = _ready_config(request)
    done, open_jobs = _resume(request, cfg)
    executor = make_executor(request.executor, cfg.out_dir, request.cuda, run, lambda line: say(Note(line)))
    if open_jobs and isinstance(executor, SlurmExecutor):
        executor.reattach(open_jobs, cfg)
    to_run = sum(p.key not in done for p in cfg.points)
    say(Starting(cfg.model, model_type, str(cfg.machine.get("device")), to_run, len(cfg.points), cfg.results_path))
    written: list[Record] = []
    try:
        passes = _remeasure_passes(request, cfg, executor, run, say) if request.remeasure else iter(())
        for record in chain(iterate_sweep(cfg, done, executor=executor), passes):
            written.append(record)
            if on_record is not None:
                on_record(record)
    finally:
        close_fork_worker()
    return written


def make_executor(
    choice: ExecutorChoice,
    out_dir: Path,
    cuda: bool,
    run: ProcessRunner = run_point,
    on_event: Callable[[str], None] | None = None,
) -> PointExecutor:
    """The executor ``choice`` names: one point at a time through ``run`` (the default), ``parallel`` points on
    this node's device slots, or Slurm jobs (logged in ``out_dir``; ``on_event`` hears of each)."""
    if choice.kind == "slurm":
        assert choice.slurm is not None  # ExecutorChoice checks it
        return SlurmExecutor(out_dir, choice.slurm, on_event)
    if not choice.parallel or choice.parallel == 1:
        return SerialExecutor(run)
    from ftprof.sweep.executors.local import LocalExecutor, device_slots

    device_count = 0
    if cuda:
        import torch

        device_count = torch.cuda.device_count()
    slots = device_slots(choice.parallel, cuda, os.environ.get("CUDA_VISIBLE_DEVICES"), device_count)
    return LocalExecutor(slots, max_points=min(choice.parallel, len(slots)), run=run)


def _clear_leftovers(say: Callable[[SweepEvent], None]) -> None:
    """Refuse a stale DeepSpeed build lock (every point would wait on it until its timeout) and remove the
    shared-memory buffers killed DeepSpeed runs leaked (RAM under every point's feet)."""
    from ftprof.runtime.distributed import remove_stale_shm_buffers
    from ftprof.runtime.ds_ops import check_no_stale_locks

    check_no_stale_locks()
    count, size = remove_stale_shm_buffers()
    if count:
        say(Note(f"removed {count} DeepSpeed shm buffers ({size / 2**30:.1f} GiB) earlier runs left"))


def _ready_config(request: SweepRequest) -> tuple[SweepConfig, str]:
    """``request.config`` with this machine, the estimator and the budget filled in, and the model's type.

    Raises:
        ConfigError: the model or the data can't be read (here, not in every point).
    """
    from ftprof.estimate.architecture import arch_from_config
    from ftprof.estimate.calibration import predictor
    from ftprof.profiler.environment import environment
    from ftprof.train.models import resolve_model_spec

    cfg = request.config
    spec = resolve_model_spec(cfg.model, random_init=True)  # shapes only: fails fast on an unknown model
    limit, longest = spec.max_positions(), max(p.seq_len for p in cfg.points)
    if limit is not None and longest > limit:  # here, not as an error in every point of that length
        raise ConfigError(
            f"--seq_lens {longest} is above {cfg.model!r}'s limit of {limit} positions; use lengths up to {limit}"
        )
    if cfg.dataset:
        from ftprof.train.data import load_raw

        load_raw(cfg.dataset)
    machine = environment()
    memory = machine.get("device_memory_bytes")
    arch = arch_from_config(spec.name, spec.config, task=cfg.task)
    lora = _lora_facts(cfg)  # before any point runs: a target module the model lacks fails here
    predict, calibrated = predictor(arch, str(machine["device"]), request.cuda, memory, lora)
    ready = replace(
        cfg,
        machine=machine,
        predict=predict,
        budget=request.budget or memory,
        margin=MARGIN_CALIBRATED if calibrated else MARGIN_UNCALIBRATED,
    )
    return ready, str(spec.config.model_type)


def _lora_facts(cfg: SweepConfig) -> dict[int, LoraFacts]:
    """The adapters of each LoRA rank on the grid, on a meta-device model (as the points build theirs).

    Raises:
        ConfigError: a ``--lora_target_modules`` name that matches no Linear layer of the model.
    """
    from ftprof.estimate.adapters import LoraSpec, lora_facts_for

    ranks = sorted({p.lora_r for p in cfg.points if p.peft == "lora"})
    lora = cfg.lora
    return {
        r: lora_facts_for(cfg.model, LoraSpec.from_flags(r, lora.alpha, lora.dropout, lora.target_modules), cfg.task)
        for r in ranks
    }


def _resume(request: SweepRequest, cfg: SweepConfig) -> tuple[dict[str, Record], list[JobEntry]]:
    """The points the folder holds a result of (by key), and the Slurm jobs still to wait for; writes
    ``sweep.json`` in a new folder.

    Raises:
        ConfigError: results without ``resume``; other settings than the folder's; open Slurm jobs and
            another executor.
    """
    from ftprof.sweep.manifest import SweepSettings, check_or_write

    results = cfg.results_path
    if results.exists() and not request.resume:
        raise ConfigError(f"{results} already exists; pass --resume to continue that sweep, or another --out")
    base = cfg.base_ds_config.config if cfg.base_ds_config else None
    lora = asdict(cfg.lora) if any(p.peft == "lora" for p in cfg.points) else None
    settings = SweepSettings.of(
        cfg.model, cfg.steps, cfg.warmup, cfg.min_seconds, cfg.dataset, base, cfg.machine, cfg.task, lora, cfg.optim
    )
    check_or_write(cfg.out_dir, settings)
    records = read_records(results) if results.exists() else []
    # A prediction is no result: over_budget points are planned again (the budget or calibration may differ).
    done = {r.point.key: r for r in latest(records) if r.status != "over_budget"}
    if request.retry_failed:
        done = {k: r for k, r in done.items() if r.status not in FAILED}
    open_jobs = JobLog(cfg.out_dir / JOBS).open_jobs(records, set(done))
    if open_jobs and request.executor.kind != "slurm":
        raise ConfigError(
            f"{len(open_jobs)} Slurm jobs of {str(cfg.out_dir)!r} ({', '.join(e.job_id for e in open_jobs)}) were "
            "never collected; resume with --executor slurm, which waits for them"
        )
    return done, open_jobs


def _remeasure_passes(
    request: SweepRequest,
    cfg: SweepConfig,
    executor: PointExecutor,
    run: ProcessRunner,
    say: Callable[[SweepEvent], None],
) -> Iterator[Record]:
    """The passes after the grid, in order, each deciding from the results file as it then stands (so a
    resumed sweep does none twice): points whose CPUs were busy (the same window), the first clean point
    again (this machine's drift), and the fastest points within noise of each other (a longer window)."""
    # Throughput again, so one point at a time on this node; Slurm jobs have their own nodes.
    slurm = executor if request.executor.kind == "slurm" else None
    busy = contended_points(read_records(cfg.results_path))
    if busy:
        say(Remeasuring("contended", tuple(busy)))
        yield from remeasure(cfg, busy, run, executor=slurm, window=1, reason="contended")
    # The machine's own drift: one point again, on this node (a Slurm job may land on another).
    first = None if slurm else repeat_point(read_records(cfg.results_path))
    if first:
        say(Remeasuring("repeat", (first,)))
        yield from remeasure(cfg, [first], run, window=1, reason="repeat")
    close = close_calls(read_records(cfg.results_path), cfg.budget)
    if close:
        say(Remeasuring("close call", tuple(close)))
        yield from remeasure(cfg, close, run, executor=slurm)
