"""``ftprof sweep``: measure peak memory and throughput over a grid of settings, then report.

ftprof sweep --model bert-base-uncased --batch_sizes 8,16,32 --precision bf16 --seq_lens 128,512 --zero 0,2,3
ftprof sweep --model tiny-bert                      # device-sized defaults (a few minutes on a CPU)
ftprof sweep --model gpt2 --find_max_batch --zero 2,3 --out profiles/gpt2-maxbatch
ftprof sweep --model tiny-bert --memory_snapshot     # + where each peak comes from, in <out>/snapshots/
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ftprof.cli.runner import run_command
from ftprof.errors import ConfigError
from ftprof.point import Offload, Point, parse_int_list, parse_offloads, parse_precisions, parse_switch, parse_zero
from ftprof.records.profile import contention
from ftprof.records.results import Record
from ftprof.sweep.plan import plan_grid
from ftprof.units import GIB, parse_size

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
    p = argparse.ArgumentParser(
        prog="ftprof sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True, help="Hub id, local model directory, or tiny preset (shapes only)")
    p.add_argument("--batch_sizes", help="micro-batches per rank, e.g. 8,16,32 (CPU default 4,8; GPU 8..64)")
    p.add_argument("--grad_accum", help="gradient accumulation steps, e.g. 1,4")
    p.add_argument("--precision", help="fp32, fp16, bf16 (comma list)")
    p.add_argument("--seq_lens", help="sequence lengths, e.g. 128,256,512")
    p.add_argument("--zero", help="ZeRO stages, e.g. 0,2,3")
    p.add_argument("--world_size", default="1", help="ranks per point (comma list); >1 uses the deepspeed launcher")
    p.add_argument("--ds_config", help="base DeepSpeed config (offload etc.); its stage is replaced per point")
    p.add_argument(
        "--offload",
        help="what ZeRO offloads to CPU memory, swept: none,optimizer,optimizer+param (param offload: ZeRO-3 only)",
    )
    p.add_argument("--gradient_checkpointing", help="off, on or off,on: recompute activations in backward")
    p.add_argument(
        "--task",
        default="classification",
        choices=["classification", "causal-lm"],
        help="causal-lm: a decoder's LM head, blocks of --seq_lens tokens (packed with --dataset)",
    )
    p.add_argument("--effective_batch", type=int, help="keep batch x accumulation x ranks fixed at this value")
    p.add_argument(
        "--find_max_batch", action="store_true", help="bisect the largest micro-batch that fits, per setting"
    )
    p.add_argument("--max_batch", type=int, default=1024, help="upper bound for --find_max_batch")
    p.add_argument("--steps", type=int, help="measured optimizer steps per point, at least (CPU 3, GPU 10)")
    p.add_argument(
        "--min_seconds",
        type=float,
        help="measure each point for at least this long, in more steps if needed (CPU 2, GPU 3)",
    )
    p.add_argument("--warmup", type=int, help="optimizer steps before measuring")
    p.add_argument("--budget", help="memory budget for recommendations, e.g. 24GiB (default: the device's memory)")
    p.add_argument("--dataset", help="measure with this data's real lengths (the longest batch is always measured)")
    p.add_argument("--out", help="output folder (default profiles/<model>-<device>)")
    p.add_argument("--resume", action="store_true", help="continue a sweep: skip points already in results.jsonl")
    p.add_argument("--retry_failed", action="store_true", help="with --resume: run error and timeout points again")
    p.add_argument("--timeout", type=float, default=900, help="seconds before a point counts as hung")
    p.add_argument("--child_memory_limit", help="address-space limit per point process (CPU testing), e.g. 6GiB")
    p.add_argument(
        "--no_skip",
        action="store_true",
        help="run every grid point, even those a smaller OOM proves will OOM (to compare costs)",
    )
    p.add_argument(
        "--executor",
        choices=("local", "slurm"),
        default="local",
        help="where points run: this node (one at a time, or --parallel on disjoint devices) or Slurm jobs",
    )
    p.add_argument(
        "--parallel",
        type=int,
        help="local: points at once, each on its own GPUs (CPU: memory-only sweeps sharing the cores; default 1); "
        "slurm: most jobs queued or running at once (default: no limit)",
    )
    p.add_argument("--slurm_partition", help="partition of the points' jobs (default: the cluster's)")
    p.add_argument("--slurm_time", help="time limit per job: minutes or H:MM:SS (default: --timeout + 5 min)")
    p.add_argument("--slurm_gpus_per_node", type=int, help="GPUs per node; a point with more ranks spans several nodes")
    p.add_argument("--slurm_account", help="account the jobs are charged to")
    p.add_argument("--slurm_cpus_per_task", type=int, help="CPUs per rank (default: the cluster's)")
    p.add_argument(
        "--worker",
        choices=("auto", "fork", "fresh"),
        default="auto",
        help="one-rank local points: fork from a pre-imported worker, or start a fresh process each "
        "(auto: fork on CPU-only machines, fresh with CUDA)",
    )
    p.add_argument(
        "--memory_snapshot",
        action="store_true",
        help="write PyTorch memory records per point and rank to <out>/snapshots: the CUDA allocator's snapshot "
        "(.pickle, for pytorch.org/memory_viz) and one extra, unmeasured step's memory timeline (.html/.json)",
    )
    p.add_argument("--no_report", action="store_true", help="don't print the report at the end")
    p.add_argument(
        "--no_remeasure",
        action="store_true",
        help="measure nothing again: not the fastest points when within noise of each other, not the first "
        "point (how repeatable the machine is), not points whose CPUs were busy",
    )
    return p


def plan_from_args(
    a: argparse.Namespace, cuda: bool, bf16_ok: bool, offload: Offload = "none", gpus_here: bool = True
) -> tuple[list[Point], dict[str, Any]]:
    """The grid the flags ask for (device-sized defaults), and the measurement window of each point
    (``steps``, ``warmup``, ``min_seconds``: :class:`~ftprof.sweep.point_run.SweepConfig` fields). ``gpus_here``:
    the points run on this machine's GPUs (not on a cluster's nodes), so no point may need more."""
    defaults = GPU_DEFAULTS if cuda else CPU_DEFAULTS
    precisions = parse_precisions(a.precision or defaults["precision"])
    if not a.precision and cuda and not bf16_ok:
        precisions = [p for p in precisions if p != "bf16"]
    if not cuda and "fp16" in precisions:
        raise ConfigError("--precision fp16 needs a CUDA GPU and this machine has none; use fp32 or bf16")
    if cuda and "bf16" in precisions and not bf16_ok:
        raise ConfigError("--precision bf16: this GPU has no bfloat16 support; use fp16 or fp32")
    for flag in ("steps", "warmup", "effective_batch", "max_batch", "min_seconds"):
        value = getattr(a, flag)
        if value is not None and value <= (-1e-9 if flag in ("warmup", "min_seconds") else 0):
            kind = "non-negative" if flag in ("warmup", "min_seconds") else "positive"
            raise ConfigError(f"--{flag} must be {kind}, got {value}")
    world_sizes = parse_int_list(a.world_size, "--world_size")
    if cuda and gpus_here:
        import torch

        if max(world_sizes) > torch.cuda.device_count():
            raise ConfigError(f"--world_size {max(world_sizes)} but only {torch.cuda.device_count()} GPUs are visible")
    points = plan_grid(
        parse_int_list(a.batch_sizes or defaults["batch_sizes"], "--batch_sizes"),
        parse_int_list(a.grad_accum or defaults["grad_accum"], "--grad_accum"),
        precisions,
        parse_int_list(a.seq_lens or defaults["seq_lens"], "--seq_lens"),
        parse_zero(a.zero or defaults["zero"]),
        world_sizes,
        a.effective_batch,
        offload,
        offloads=parse_offloads(a.offload) if a.offload else None,
        checkpointing=parse_switch(a.gradient_checkpointing, "--gradient_checkpointing")
        if a.gradient_checkpointing
        else None,
    )
    window = {
        flag: getattr(a, flag) if getattr(a, flag) is not None else defaults[flag]
        for flag in ("steps", "warmup", "min_seconds")
    }
    return points, window


def run(argv: list[str], console: Console) -> None:
    a = build_parser().parse_args(argv)
    _check_executor_flags(a)
    budget = parse_size(a.budget) if a.budget else None
    child_limit = parse_size(a.child_memory_limit, "--child_memory_limit") if a.child_memory_limit else None
    from ftprof.profiler.environment import device_kind

    device, cuda, bf16_ok = device_kind()
    from ftprof.runtime.deepspeed_config import load_ds_config
    from ftprof.runtime.ds_ops import check_no_stale_locks

    check_no_stale_locks()  # else every point would wait on it until its timeout
    from ftprof.runtime.distributed import remove_stale_shm_buffers

    count, size = remove_stale_shm_buffers()  # RAM that earlier DeepSpeed runs leaked, under every point's feet
    if count:
        console.print(f"  [dim]removed {count} DeepSpeed shm buffers ({size / 2**30:.1f} GiB) earlier runs left[/]")

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

    from ftprof.estimate.architecture import arch_from_config
    from ftprof.estimate.calibration import predictor
    from ftprof.profiler.environment import environment
    from ftprof.records.results import FAILED, latest, read_records
    from ftprof.sweep.executors.slurm_jobs import JOBS, JobLog
    from ftprof.sweep.manifest import SweepSettings, check_or_write
    from ftprof.sweep.point_run import SweepConfig, close_fork_worker
    from ftprof.sweep.remeasure import close_calls, contended_points, remeasure, repeat_point
    from ftprof.sweep.schedule import iterate_sweep
    from ftprof.train.models import resolve_model_spec

    spec = resolve_model_spec(a.model, random_init=True)  # shapes only: fails fast on an unknown model
    if a.dataset:
        from ftprof.train.data import load_raw

        load_raw(a.dataset)  # a bad --dataset fails here, not in every point
    out = Path(a.out or f"profiles/{Path(a.model).name}-{device}")
    results = out / "results.jsonl"
    if results.exists() and not a.resume:
        raise ConfigError(f"{results} already exists; pass --resume to continue that sweep, or another --out")
    env = {**environment(), "task": a.task}  # the task travels with every record (its command needs it)
    check_or_write(
        out,
        SweepSettings.of(
            a.model, dataset=a.dataset, ds_config=base.config if base else None, env=env, task=a.task, **window
        ),
    )
    records = read_records(results) if results.exists() else []
    # A prediction is no result: over_budget points are planned again (the budget or calibration may differ).
    done = {r.point.key: r for r in latest(records) if r.status != "over_budget"}
    if a.retry_failed:
        done = {k: r for k, r in done.items() if r.status not in FAILED}
    open_jobs = JobLog(out / JOBS).open_jobs(records, set(done))
    if open_jobs and a.executor != "slurm":
        raise ConfigError(
            f"{len(open_jobs)} Slurm jobs of {str(out)!r} ({', '.join(e.job_id for e in open_jobs)}) were never "
            "collected; resume with --executor slurm, which waits for them"
        )
    predict, calibrated = predictor(
        arch_from_config(spec.name, spec.config, task=a.task), env["device"], cuda, env.get("device_memory_bytes")
    )
    cfg = SweepConfig(
        model=a.model,
        task=a.task,
        points=points,
        out_dir=out,
        **window,
        dataset=a.dataset,
        base_ds_config=base,
        timeout_s=a.timeout,
        find_max_batch=a.find_max_batch,
        max_batch=a.max_batch,
        child_memory_limit=child_limit,
        prune=not a.no_skip,
        env=env,
        predict=predict,
        budget=budget or env.get("device_memory_bytes"),
        margin=0.10 if calibrated else 0.50,
        worker="fresh" if a.worker == "fresh" or (a.worker == "auto" and cuda) else "fork",
        memory_snapshot=a.memory_snapshot,
    )
    executor = _executor(a, out, cuda, lambda line: console.print(f"  [dim]{line}[/]"))
    if open_jobs:
        executor.reattach(open_jobs, cfg)
    pending = [p for p in points if p.key not in done]
    console.print(
        f"[bold]ftprof sweep[/] {spec.name} ({spec.config.model_type}, shapes from its config) on "
        f"{cfg.env['device']}: {len(pending)} of {len(points)} points to run"
        f"{' (bisecting max batch)' if a.find_max_batch else ''} → {results}"
    )
    if a.memory_snapshot:
        console.print(f"  [dim]{memory_snapshot_line(cfg.snapshots_dir, cuda)}[/]")
    said: set[str] = set()  # each memory-record note once per sweep
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
    started = time.time()
    try:
        with progress:
            task = progress.add_task("starting", total=None if a.find_max_batch else len(pending))
            for record in iterate_sweep(cfg, done, executor=executor):
                line, peak = _progress_line(record)
                progress.console.print(line)
                for note in _new_memory_notes(record, said):
                    progress.console.print(f"  [yellow]memory records: {note}[/]")
                progress.update(task, advance=1, description=f"last {record.point.key}: {peak}")
            busy = [] if a.no_remeasure else contended_points(read_records(results))
            if busy:
                progress.console.print(
                    f"  {len(busy)} point(s) did not have the CPUs to themselves: measuring them again"
                )
                again = executor if a.executor == "slurm" else None
                for record in remeasure(cfg, busy, executor=again, window=1, reason="contended"):
                    progress.console.print(_progress_line(record)[0] + "  (re-measured)")
            # The machine's own drift: one point again, on this node (a Slurm job may land on another).
            first = None if a.no_remeasure or a.executor == "slurm" else repeat_point(read_records(results))
            if first:
                progress.console.print(f"  how repeatable is this machine: measuring {first.key} again")
                for record in remeasure(cfg, [first], window=1, reason="repeat"):
                    progress.console.print(_progress_line(record)[0] + "  (repeat)")
            budget_now = budget or env.get("device_memory_bytes")
            close = [] if a.no_remeasure else close_calls(read_records(results), budget_now)
            if close:
                progress.console.print(
                    f"  fastest points within noise of each other: measuring {len(close)} again, longer"
                )
                # Throughput again, so one point at a time on this node; Slurm jobs have their own nodes.
                again = executor if a.executor == "slurm" else None
                for record in remeasure(cfg, close, executor=again):
                    progress.console.print(_progress_line(record)[0] + "  (re-measured)")
    except KeyboardInterrupt:
        console.print("interrupted: the running points were stopped; --resume continues the sweep")
        raise SystemExit(130) from None
    finally:
        close_fork_worker()
    console.print(f"sweep finished in {time.time() - started:.0f} s")
    if not a.no_report:
        from ftprof.report.tables import print_report

        print_report(out, console, budget)


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


def _executor(a: argparse.Namespace, out: Path, cuda: bool, on_event: Callable[[str], None]) -> Any:
    """The executor the flags ask for: one point at a time (the default), ``--parallel`` points on this
    node's device slots, or Slurm jobs."""
    if a.executor == "slurm":
        from ftprof.sweep.executors.slurm import SlurmExecutor, SlurmOptions, parse_slurm_time

        options = SlurmOptions(
            time_min=parse_slurm_time(a.slurm_time) if a.slurm_time else math.ceil(a.timeout / 60) + 5,
            partition=a.slurm_partition,
            account=a.slurm_account,
            gpus_per_node=a.slurm_gpus_per_node,
            cpus_per_task=a.slurm_cpus_per_task,
            max_jobs=a.parallel,
        )
        return SlurmExecutor(out, options, on_event)
    from ftprof.sweep.executors import SerialExecutor
    from ftprof.sweep.point_run import run_point

    if not a.parallel or a.parallel == 1:
        return SerialExecutor(run_point)
    import os

    from ftprof.sweep.executors.local import LocalExecutor, device_slots

    device_count = 0
    if cuda:
        import torch

        device_count = torch.cuda.device_count()
    slots = device_slots(a.parallel, cuda, os.environ.get("CUDA_VISIBLE_DEVICES"), device_count)
    return LocalExecutor(slots, max_points=min(a.parallel, len(slots)))


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
