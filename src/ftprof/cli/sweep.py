"""``ftprof sweep``: measure peak memory and throughput over a grid of settings, then report.

ftprof sweep --model bert-base-uncased --batch_sizes 8,16,32 --precision bf16 --seq_lens 128,512 --zero 0,2,3
ftprof sweep --model tiny-bert                      # device-sized defaults (a few minutes on a CPU)
ftprof sweep --model gpt2 --find_max_batch --zero 2,3 --out profiles/gpt2-maxbatch
ftprof sweep --model tiny-bert --memory_snapshot     # + where each peak comes from, in <out>/snapshots/
ftprof sweep --model gpt2 --task causal-lm --peft none,lora --lora_r 8,64   # full fine-tuning beside LoRA
ftprof sweep --model bert-base-uncased --zero none,0,2 --optim adamw_torch_fused   # HF Trainer beside DeepSpeed
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from ftprof.cli import flags
from ftprof.cli.runner import run_command
from ftprof.errors import ConfigError
from ftprof.point import LoraOptions, Offload, Point, parse_int_list, parse_precisions, parse_stages
from ftprof.records.profile import contention
from ftprof.records.results import Record
from ftprof.sweep.plan import adapter_axis, plan_grid
from ftprof.units import GIB, parse_size

if TYPE_CHECKING:  # the driver is imported when a sweep runs, not for --help
    from ftprof.sweep.driver import ExecutorChoice, SweepEvent, SweepRequest

# Defaults that fit the device: a CPU grid finishes in a few minutes; a GPU gets the full grid.
CPU_DEFAULTS: dict[str, Any] = dict(
    batch_sizes="4,8",
    grad_accum="1",
    precision="fp32",
    seq_lens="64,128",
    zero="0,2",
    steps=3,
    warmup=1,
    min_seconds=2.0,
)
GPU_DEFAULTS: dict[str, Any] = dict(
    batch_sizes="8,16,32,64",
    grad_accum="1",
    precision="fp32,fp16,bf16",
    seq_lens="128,256,512",
    zero="0,2,3",
    steps=10,
    warmup=3,
    min_seconds=3.0,
)


def build_parser() -> argparse.ArgumentParser:
    p = flags.parser("ftprof sweep", __doc__)
    model = flags.add_model_group(
        p, required=True, model_help="Hub id, local model directory, or tiny preset (shapes only)"
    )
    model.add_argument("--dataset", help="measure with this data's real lengths (the longest batch is always measured)")
    grid = p.add_argument_group("grid (each a comma list)")
    grid.add_argument(
        "--batch_sizes",
        type=flags.int_list("--batch_sizes"),
        help="micro-batches per rank, e.g. 8,16,32 (CPU default 4,8; GPU 8..64)",
    )
    grid.add_argument("--grad_accum", type=flags.int_list("--grad_accum"), help="gradient accumulation steps, e.g. 1,4")
    grid.add_argument("--seq_lens", type=flags.int_list("--seq_lens"), help="sequence lengths, e.g. 128,256,512")
    grid.add_argument(
        "--world_size",
        type=flags.int_list("--world_size"),
        default="1",
        help="ranks per point, e.g. 1,2,4; >1 uses the deepspeed launcher (default: 1)",
    )
    grid.add_argument("--effective_batch", type=int, help="keep batch x accumulation x ranks fixed at this value")
    grid.add_argument(
        "--find_max_batch", action="store_true", help="bisect the largest micro-batch that fits, per setting"
    )
    grid.add_argument("--max_batch", type=int, default=1024, help="upper bound for --find_max_batch")
    grid.add_argument(
        "--batch_step",
        type=int,
        default=1,
        help="--find_max_batch to within this many samples (e.g. 8: multiples of 8)",
    )
    levers = flags.add_lever_group(p, defaults={})  # device-sized: CPU_DEFAULTS / GPU_DEFAULTS
    levers.add_argument("--ds_config", help="base DeepSpeed config (offload etc.); its stage is replaced per point")
    levers.add_argument(
        "--optim",
        help="TrainingArguments' --optim for the --zero none points (e.g. adamw_torch, adamw_torch_fused, sgd; "
        "default: the Trainer's); DeepSpeed points step their config's optimizer block",
    )
    flags.add_peft_group(p, grid=True)
    _add_measurement_group(p)
    _add_execution_groups(p)
    output = p.add_argument_group("output")
    output.add_argument("--out", help="output folder (default profiles/<model>-<device>)")
    output.add_argument("--resume", action="store_true", help="continue a sweep: skip points already in results.jsonl")
    output.add_argument("--retry_failed", action="store_true", help="with --resume: run error and timeout points again")
    output.add_argument("--no_report", action="store_true", help="don't print the report at the end")
    return p


def _add_measurement_group(p: argparse.ArgumentParser) -> None:
    """How each point is measured, and what is measured again."""
    measure = p.add_argument_group("measurement")
    measure.add_argument("--steps", type=int, help="measured optimizer steps per point, at least (CPU 3, GPU 10)")
    measure.add_argument(
        "--min_seconds",
        type=float,
        help="measure each point for at least this long, in more steps if needed (CPU 2, GPU 3)",
    )
    measure.add_argument("--warmup", type=int, help="optimizer steps before measuring")
    measure.add_argument(
        "--budget", help="memory budget for recommendations, e.g. 24GiB (default: the device's memory)"
    )
    measure.add_argument("--timeout", type=float, default=900, help="seconds before a point counts as hung")
    measure.add_argument(
        "--child_memory_limit",
        help="memory limit per point, e.g. 6GiB: its processes' address space on CPU, the CUDA allocator's cap on a "
        "GPU (what fits a smaller card)",
    )
    measure.add_argument(
        "--no_skip",
        action="store_true",
        help="run every grid point, even those a smaller OOM proves will OOM (to compare costs)",
    )
    measure.add_argument(
        "--no_remeasure",
        action="store_true",
        help="measure nothing again: not the fastest points when within noise of each other, not the first "
        "point (how repeatable the machine is), not points whose CPUs were busy",
    )
    measure.add_argument(
        "--memory_snapshot",
        action="store_true",
        help="write PyTorch memory records per point and rank to <out>/snapshots: the CUDA allocator's snapshot "
        "(.pickle, for pytorch.org/memory_viz) and one extra, unmeasured step's memory timeline (.html/.json)",
    )


def _add_execution_groups(p: argparse.ArgumentParser) -> None:
    """Where the points run: this node's executor, or Slurm jobs and their shape."""
    execution = p.add_argument_group("execution")
    execution.add_argument(
        "--executor",
        choices=("local", "slurm"),
        default="local",
        help="where points run: this node (one at a time, or --parallel on disjoint devices) or Slurm jobs",
    )
    execution.add_argument(
        "--parallel",
        type=int,
        help="local: points at once, each on its own GPUs (CPU: memory-only sweeps sharing the cores; default 1); "
        "slurm: most jobs queued or running at once (default: no limit)",
    )
    execution.add_argument(
        "--worker",
        choices=("auto", "fork", "fresh"),
        default="auto",
        help="local points: fork from a pre-imported worker (every rank), or start fresh processes (the deepspeed "
        "launcher for several ranks) "
        "(auto: fork on CPU-only machines, fresh with CUDA)",
    )
    slurm = p.add_argument_group("Slurm (with --executor slurm)")
    slurm.add_argument("--slurm_partition", help="partition of the points' jobs (default: the cluster's)")
    slurm.add_argument("--slurm_time", help="time limit per job: minutes or H:MM:SS (default: --timeout + 5 min)")
    slurm.add_argument(
        "--slurm_gpus_per_node", type=int, help="GPUs per node; a point with more ranks spans several nodes"
    )
    slurm.add_argument("--slurm_account", help="account the jobs are charged to")
    slurm.add_argument("--slurm_cpus_per_task", type=int, help="CPUs per rank (default: the cluster's)")


def plan_from_args(
    a: argparse.Namespace, cuda: bool, bf16_ok: bool, offload: Offload = "none", gpus_here: bool = True
) -> tuple[list[Point], dict[str, Any]]:
    """The grid the flags ask for (device-sized defaults), and the measurement window of each point
    (``steps``, ``warmup``, ``min_seconds``: :class:`~ftprof.sweep.point_run.SweepConfig` fields). ``gpus_here``:
    the points run on this machine's GPUs (not on a cluster's nodes), so no point may need more.

    The grid flags arrive parsed (lists, by :mod:`ftprof.cli.flags`); those not given take the device's
    defaults."""
    defaults = GPU_DEFAULTS if cuda else CPU_DEFAULTS
    precisions = a.precision or parse_precisions(defaults["precision"])
    if not a.precision and cuda and not bf16_ok:
        precisions = [p for p in precisions if p != "bf16"]
    if not cuda and "fp16" in precisions:
        raise ConfigError("--precision fp16 needs a CUDA GPU and this machine has none; use fp32 or bf16")
    if cuda and "bf16" in precisions and not bf16_ok:
        raise ConfigError("--precision bf16: this GPU has no bfloat16 support; use fp16 or fp32")
    for flag in ("steps", "warmup", "effective_batch", "max_batch", "batch_step", "min_seconds"):
        value = getattr(a, flag)
        if value is not None and value <= (-1e-9 if flag in ("warmup", "min_seconds") else 0):
            kind = "non-negative" if flag in ("warmup", "min_seconds") else "positive"
            raise ConfigError(f"--{flag} must be {kind}, got {value}")
    world_sizes = a.world_size
    if cuda and gpus_here:
        import torch

        if max(world_sizes) > torch.cuda.device_count():
            raise ConfigError(f"--world_size {max(world_sizes)} but only {torch.cuda.device_count()} GPUs are visible")

    def grid(flag: str) -> list[int]:
        return getattr(a, flag) or parse_int_list(defaults[flag], f"--{flag}")

    points = plan_grid(
        grid("batch_sizes"),
        grid("grad_accum"),
        precisions,
        grid("seq_lens"),
        a.zero or parse_stages(defaults["zero"]),
        world_sizes,
        a.effective_batch,
        offload,
        offloads=a.offload,
        checkpointing=a.gradient_checkpointing,
        adapters=adapter_axis(a.peft, a.lora_r or [8]),
    )
    window = {
        flag: getattr(a, flag) if getattr(a, flag) is not None else defaults[flag]
        for flag in ("steps", "warmup", "min_seconds")
    }
    return points, window


def run(argv: list[str], console: Console) -> None:
    a = build_parser().parse_args(argv)
    request = request_from_args(a)
    from ftprof.sweep.driver import run_sweep

    view = _SweepView(console, request)
    try:
        with view.progress:
            run_sweep(request, on_record=view.record, on_event=view.event)
    except KeyboardInterrupt:
        console.print("interrupted: the running points were stopped; --resume continues the sweep")
        raise SystemExit(130) from None
    console.print(f"sweep finished in {time.time() - view.started:.0f} s")
    if not a.no_report:
        from ftprof.report.sweep_report import print_report

        print_report(request.config.out_dir, console, request.budget)


def request_from_args(a: argparse.Namespace) -> SweepRequest:
    """The sweep the flags ask for, on this machine (its device sizes the default grid and names the folder).

    Raises:
        ConfigError: a flag's value, or flags that don't go together.
    """
    from ftprof.profiler.environment import device_kind
    from ftprof.runtime.deepspeed_config import load_ds_config
    from ftprof.sweep.driver import SweepRequest
    from ftprof.sweep.point_run import SweepConfig

    _check_executor_flags(a)
    flags.check_lora_flags(a)
    lora = LoraOptions(
        alpha=a.lora_alpha if a.lora_alpha is not None else LoraOptions.alpha,
        dropout=a.lora_dropout if a.lora_dropout is not None else LoraOptions.dropout,
        target_modules=a.lora_target_modules,
    )
    budget = parse_size(a.budget) if a.budget else None
    child_limit = parse_size(a.child_memory_limit, "--child_memory_limit") if a.child_memory_limit else None
    device, cuda, bf16_ok = device_kind()
    base = load_ds_config(a.ds_config) if a.ds_config else None
    if a.offload and base and base.offload != "none":
        raise ConfigError(
            f"--ds_config {a.ds_config!r} offloads already; sweep --offload with a config without "
            "offload_* blocks, or drop --offload"
        )
    slurm_gpus = a.executor == "slurm" and bool(a.slurm_gpus_per_node)
    if slurm_gpus:  # plan for the nodes' GPUs, not this machine's devices
        cuda, bf16_ok = True, True
    points, window = plan_from_args(a, cuda, bf16_ok, base.offload if base else "none", gpus_here=not slurm_gpus)
    _check_trainer_points(a, points)
    config = SweepConfig(
        model=a.model,
        task=a.task,
        points=points,
        out_dir=Path(a.out or f"profiles/{Path(a.model).name}-{device}"),
        **window,
        dataset=a.dataset,
        base_ds_config=base,
        timeout_s=a.timeout,
        find_max_batch=a.find_max_batch,
        max_batch=a.max_batch,
        batch_step=a.batch_step,
        child_memory_limit=child_limit,
        prune=not a.no_skip,
        worker="fresh" if a.worker == "fresh" or (a.worker == "auto" and cuda) else "fork",
        memory_snapshot=a.memory_snapshot,
        lora=lora,
        optim=a.optim,
    )
    return SweepRequest(
        config,
        cuda=cuda,
        budget=budget,
        resume=a.resume,
        retry_failed=a.retry_failed,
        remeasure=not a.no_remeasure,
        executor=_executor(a),
    )


def _check_trainer_points(a: argparse.Namespace, points: list[Point]) -> None:
    """``--optim`` a name TrainingArguments knows, installed, and said to step only the ``--zero none`` points
    (HF Trainer alone; DDP on several ranks).

    Raises:
        ConfigError: an --optim TrainingArguments does not know, or whose package is missing.
    """
    plain = [p for p in points if not p.deepspeed]
    if a.optim is None:
        return
    from transformers.training_args import OptimizerNames

    names = [o.value for o in OptimizerNames]
    if a.optim not in names:
        close = [n for n in names if n.startswith(a.optim.split("_")[0])][:6] or names[:6]
        raise ConfigError(f"--optim {a.optim!r}: not one of TrainingArguments' optimizers; e.g. {', '.join(close)}")
    if plain:
        from ftprof.train.args import check_optimizer_installed

        check_optimizer_installed(a.optim)
    if not plain:
        flags.note("--optim steps --zero none points; the DeepSpeed points step their config's optimizer block")


SLURM_FLAGS = ("slurm_partition", "slurm_time", "slurm_gpus_per_node", "slurm_account", "slurm_cpus_per_task")


def _check_executor_flags(a: argparse.Namespace) -> None:
    if a.parallel is not None and a.parallel < 1:
        raise ConfigError(f"--parallel must be at least 1, got {a.parallel}")
    if a.executor != "slurm":
        given = [f"--{n}" for n in SLURM_FLAGS if getattr(a, n) is not None]
        if given:
            raise ConfigError(f"{', '.join(given)} {'needs' if len(given) == 1 else 'need'} --executor slurm")
    for flag in ("slurm_gpus_per_node", "slurm_cpus_per_task"):
        if getattr(a, flag) is not None and getattr(a, flag) < 0:
            raise ConfigError(f"--{flag} must not be negative, got {getattr(a, flag)}")


def _executor(a: argparse.Namespace) -> ExecutorChoice:
    """Where the flags ask the points to run: one at a time (the default), ``--parallel`` points on this
    node's device slots, or Slurm jobs."""
    from ftprof.sweep.driver import ExecutorChoice

    if a.executor != "slurm":
        return ExecutorChoice("local", a.parallel)
    from ftprof.sweep.executors.slurm import SlurmOptions, parse_slurm_time

    options = SlurmOptions(
        time_min=parse_slurm_time(a.slurm_time) if a.slurm_time else math.ceil(a.timeout / 60) + 5,
        partition=a.slurm_partition,
        account=a.slurm_account,
        gpus_per_node=a.slurm_gpus_per_node,
        cpus_per_task=a.slurm_cpus_per_task,
        max_jobs=a.parallel,
    )
    return ExecutorChoice("slurm", a.parallel, options)


# What each re-measure pass says as it begins.
REMEASURE_LINES: dict[str, Callable[[tuple[Point, ...]], str]] = {
    "contended": lambda points: f"{len(points)} point(s) did not have the CPUs to themselves: measuring them again",
    "repeat": lambda points: f"how repeatable is this machine: measuring {points[0].key} again",
    "close call": lambda points: f"fastest points within noise of each other: measuring {len(points)} again, longer",
}


class _SweepView:
    """The sweep on the console: a line per finished point above a progress bar over the grid, the driver's
    notes dimmed, and a line as each re-measure pass begins."""

    def __init__(self, console: Console, request: SweepRequest) -> None:
        self.request = request
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self.task: TaskID | None = None
        self.said: set[str] = set()  # each memory-record note once per sweep
        self.started = time.time()  # again when the grid starts: the sweep's time, not its set-up's

    def event(self, event: SweepEvent) -> None:
        from ftprof.sweep.driver import Note, Remeasuring, Starting

        out, cfg = self.progress.console, self.request.config
        if isinstance(event, Note):
            out.print(f"  [dim]{event.text}[/]")
        elif isinstance(event, Remeasuring):
            out.print(f"  {REMEASURE_LINES[event.reason](event.points)}")
        elif isinstance(event, Starting):
            out.print(
                f"[bold]ftprof sweep[/] {event.model} ({event.model_type}, shapes from its config) on "
                f"{event.device}: {event.to_run} of {event.points} points to run"
                f"{' (bisecting max batch)' if cfg.find_max_batch else ''} → {event.results}"
            )
            if cfg.memory_snapshot:
                out.print(f"  [dim]{memory_snapshot_line(cfg.snapshots_dir, self.request.cuda)}[/]")
            self.task = self.progress.add_task("starting", total=None if cfg.find_max_batch else event.to_run)
            self.started = time.time()

    def record(self, record: Record) -> None:
        line, peak = _progress_line(record)
        out = self.progress.console
        if record.run.remeasured is not None:
            out.print(line + ("  (repeat)" if record.run.remeasured == "repeat" else "  (re-measured)"))
            return
        out.print(line)
        for note in _new_memory_notes(record, self.said):
            out.print(f"  [yellow]memory records: {note}[/]")
        if self.task is not None:
            self.progress.update(self.task, advance=1, description=f"last {record.point.key}: {peak}")


def memory_snapshot_line(folder: Path, cuda: bool) -> str:
    """What ``--memory_snapshot`` writes on this device, said once at the start of the sweep."""
    timeline = "the memory timeline of one extra, unmeasured step after the window (-timeline.html plot, .json)"
    if cuda:
        return (
            f"--memory_snapshot, per point and rank in {folder}/: the CUDA allocator's snapshot (.pickle, open it "
            f"in https://pytorch.org/memory_viz) and {timeline}"
        )
    return (
        "--memory_snapshot: no allocator snapshot (.pickle) here, it records the CUDA caching allocator and the "
        f"points run without a GPU; per point and rank in {folder}/: {timeline}"
    )


def _new_memory_notes(record: Record, said: set[str]) -> list[str]:
    """The record's memory-record notes (what was not written, and why) not said yet in this sweep."""
    notes = [n for r in (record.profile.ranks if record.profile else []) for n in r.memory_notes]
    new = [n for n in dict.fromkeys(notes) if n not in said]
    said.update(new)
    return new


def _progress_line(record: Record) -> tuple[str, str]:
    """The line printed as a point finishes, and its peak (or status) for the progress bar."""
    peak = f"{record.peak_bytes / GIB:.2f} GiB" if record.peak_bytes else record.status.upper()
    speed = f", {record.samples_per_s:.1f} samples/s" if record.samples_per_s else ""
    reason = f"  [dim]{record.reason}[/]" if record.reason and record.status != "ok" else ""
    prof = record.profile
    if prof and prof.contended:
        reason = f"  [yellow]{contention(prof)}[/]"
    return f"  {record.point.key:<28} {record.status:<8} {peak}{speed}{reason}", peak


def main(argv: list[str] | None = None) -> int:
    return run_command(argv, lambda args: run(args, Console()))
