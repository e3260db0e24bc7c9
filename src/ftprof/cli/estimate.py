"""``ftprof estimate``: predict peak memory per rank before running, and calibrate against a sweep.

    ftprof estimate --model bert-base-uncased --batch_size 32 --seq_len 512 --precision bf16 --zero 2 \\
        --world_size 8 --gpu h100-80gb --margin 0.1                # keep 10% of the card free
    ftprof estimate --model gpt2 --grid --seq_lens 128,512,1024 --zero 0,2,3 --gpu a100-40gb --effective_batch 256
    ftprof estimate --calibrate profiles/h100-bert-base-uncased      # fit constants, report per-point error
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ftprof.cli.runner import run_command
from ftprof.errors import ConfigError
from ftprof.estimate.calibration import load_calibration
from ftprof.estimate.estimator import GPUS, ITEM_LABELS, Calibration, Device, Estimate, estimate, max_batch
from ftprof.point import PRECISIONS, Offload, Point, offload_within, parse_int_list, parse_zero
from ftprof.units import GIB, parse_size


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ftprof estimate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", help="Hub id, local directory or known architecture (config only)")
    p.add_argument("--batch_size", type=int, default=8, help="micro-batch per rank")
    p.add_argument("--seq_len", type=int, default=512)
    p.add_argument("--precision", default="bf16", choices=PRECISIONS)
    p.add_argument("--zero", type=int, default=2, help="ZeRO stage 0-3")
    p.add_argument("--world_size", type=int, default=1)
    p.add_argument("--offload_optimizer", action="store_true")
    p.add_argument("--offload_param", action="store_true")
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument(
        "--task",
        default="classification",
        choices=["classification", "causal-lm"],
        help="causal-lm: logits over the vocabulary at every position",
    )
    p.add_argument("--attention", choices=["eager", "sdpa"], help="default: the config's implementation")
    p.add_argument("--gpu", help=f"target GPU: {', '.join(GPUS)} (or --budget)")
    p.add_argument("--cpu", action="store_true", help="target this host's process memory (RSS)")
    p.add_argument("--budget", help="memory per rank, e.g. 24GiB (overrides --gpu's size)")
    p.add_argument(
        "--margin",
        type=float,
        default=0.05,
        help="fraction of the budget kept free: fits means predicted <= budget x (1 - margin) (default: 0.05)",
    )
    p.add_argument("--grid", action="store_true", help="largest micro-batch that fits, per --seq_lens and --zero")
    p.add_argument("--seq_lens", default="128,256,512", help="for --grid")
    p.add_argument("--zeros", "--zero_stages", dest="zeros", default="0,1,2,3", help="for --grid")
    p.add_argument("--effective_batch", type=int, help="with --grid: gradient accumulation to reach this batch")
    p.add_argument("--calibrate", metavar="SWEEP_DIR", help="fit constants to a sweep's measured points")
    return p


def _target(a: argparse.Namespace) -> tuple[str, int | None]:
    if a.gpu and a.gpu.lower() not in GPUS:
        raise ConfigError(f"--gpu {a.gpu!r}: unknown GPU; use one of {', '.join(GPUS)}, or --budget SIZE")
    device = "cpu" if a.cpu else (a.gpu.lower() if a.gpu else "gpu")
    budget = parse_size(a.budget) if a.budget else (GPUS[a.gpu.lower()] if a.gpu else None)
    if a.cpu and budget is None:
        import psutil

        budget = psutil.virtual_memory().total
    return device, budget


def _point(a: argparse.Namespace, **overrides) -> Point:
    """The point the flags describe; in a grid (``overrides``), offload as far as each stage allows."""
    offload: Offload = "optimizer+param" if a.offload_param else "optimizer" if a.offload_optimizer else "none"
    values = dict(
        batch_size=a.batch_size,
        seq_len=a.seq_len,
        precision=a.precision,
        zero=a.zero,
        world_size=a.world_size,
        offload=offload,
        gradient_checkpointing=a.gradient_checkpointing,
    )
    values.update(overrides)
    if overrides:
        values["offload"] = offload_within(offload, values["zero"])
    return Point(**values)


def _percent(fraction: float) -> str:
    """
    >>> _percent(0.05), _percent(0.125), _percent(0)
    ('5%', '12.5%', '0%')
    """
    return f"{100 * fraction:.3g}%"


def verdict(used: int, budget: int, margin: float) -> tuple[bool, str]:
    """Whether ``used`` bytes fit ``budget`` with ``margin`` (a fraction of it) kept free, said in GiB."""
    usable = budget * (1 - margin)
    if used <= usable:
        return True, f"fits (predicted {used / GIB:.1f} GiB of {budget / GIB:.1f} GiB, {_percent(margin)} margin kept)"
    return False, (
        f"does NOT fit (predicted {used / GIB:.1f} GiB of {budget / GIB:.1f} GiB; "
        f"with {_percent(margin)} kept free, {usable / GIB:.1f} GiB is usable)"
    )


def constants_in_use(cal: Calibration, target: Device, zero: int) -> list[tuple[str, str, str]]:
    """(name, value, where it comes from) of each constant the estimate rests on: fitted on how many measured
    points of this device, or assumed (and what the assumed value is)."""
    fitted = f"fitted on {cal.fitted_on} points"
    if target == "gpu":
        runtime = "assumed (the CPU interpreter's RSS; no GPU has measured it)"
    else:
        runtime = "assumed (a typical Python + torch RSS; not measured on this host)"
    rows = [
        ("runtime", f"{cal.runtime_bytes / GIB:.2f} GiB", fitted if cal.fitted_on else runtime),
        (
            "activation factor",
            f"{cal.activation_factor:.2f}",
            fitted if cal.fitted_on else "assumed (no temporaries beyond the itemised tensors)",
        ),
    ]
    if zero >= 1:
        rows.append(
            (
                "ZeRO runtime",
                f"{cal.zero_runtime_bytes / GIB:.2f} GiB",
                fitted if cal.fitted_on else "assumed (nothing beyond the buckets)",
            )
        )
    if target == "cpu":  # RSS has no caching allocator in between: the factor is 1 by definition
        return rows
    rows.append(
        (
            "allocator reserved/allocated factor",
            f"{cal.reserved_factor:.2f}",
            f"fitted on {cal.reserved_fitted_on} points"
            if cal.reserved_fitted_on
            else "assumed (no torch allocator figures measured on this device)",
        )
    )
    return rows


def breakdown_table(
    est: Estimate,
    budget: int | None,
    title: str,
    margin: float = 0.05,
    constants: list[tuple[str, str, str]] | None = None,
) -> Table:
    table = Table(title=title, header_style="bold")
    table.add_column("item")
    table.add_column("GiB, fullest rank", justify="right")
    for name, value in est.items.items():
        if value or name != "zero_runtime":
            table.add_row(ITEM_LABELS[name], f"{value / GIB:.3f}")
        if name == "saved_activations":
            for part, nbytes in est.activation_parts.items():
                table.add_row(f"[dim]  {part}[/]", f"[dim]{nbytes / GIB:.3f}[/]")
    for name, value in est.host_items.items():
        table.add_row(f"{ITEM_LABELS[name]} (host memory, offloaded)", f"[dim]{value / GIB:.3f}[/]")
    table.add_row("[bold]tensor peak (max_memory_allocated)[/]", f"[bold]{est.allocated / GIB:.3f}[/]")
    table.add_row("[bold]allocator peak (max_memory_reserved)[/]", f"[bold]{est.reserved / GIB:.3f}[/]")
    table.add_row("[bold]device used (NVML / RSS)[/]", f"[bold]{est.device_used / GIB:.3f}[/]")
    if constants:
        table.add_section()
        for constant, figure, source in constants:
            table.add_row(f"[dim]{constant} {figure} — {source}[/]", "")
    if budget:
        table.add_section()
        fits, text = verdict(est.device_used, budget, margin)
        style = "green" if fits else "bold red"
        table.add_row(f"[{style}]{text}[/]", f"headroom {(budget - est.device_used) / GIB:+.3f}")
    return table


def run(argv: list[str], console: Console) -> None:
    a = build_parser().parse_args(argv)
    if not 0 <= a.margin < 1:
        raise ConfigError(f"--margin {a.margin:g}: must be >= 0 and < 1 (the fraction of the budget kept free)")
    if a.calibrate:
        return calibrate_command(Path(a.calibrate), console)
    if not a.model:
        raise ConfigError("--model is required (or --calibrate SWEEP_DIR)")
    device, budget = _target(a)
    from ftprof.estimate.architecture import arch_for

    arch = arch_for(a.model, a.attention, a.task)
    cal = load_calibration(device)
    target: Device = "cpu" if device == "cpu" else "gpu"
    source = f"calibrated on {cal.fitted_on} points" if cal.fitted_on else "default constants (uncalibrated)"
    if not a.grid:
        s = _point(a)
        title = (
            f"{a.model}: {arch.params / 1e6:.1f}M params, batch {s.batch_size} x seq {s.seq_len}, {s.precision}, "
            f"ZeRO-{s.zero}, {s.world_size} rank(s) — {source}"
        )
        constants = constants_in_use(cal, target, s.zero)
        console.print(breakdown_table(estimate(arch, s, cal, target), budget, title, a.margin, constants))
        return
    if budget is None:
        raise ConfigError("--grid needs a memory size: --gpu NAME, --cpu or --budget SIZE")
    seq_lens, zeros = parse_int_list(a.seq_lens, "--seq_lens"), parse_zero(a.zeros)
    usable = int(budget * (1 - a.margin))
    constants = constants_in_use(cal, target, max(zeros))
    table = Table(
        title=f"Largest micro-batch per rank that fits {budget / GIB:.1f} GiB with a {_percent(a.margin)} margin kept "
        f"free ({usable / GIB:.1f} GiB) — {a.model}, {a.precision}, {a.world_size} rank(s), {source}",
        header_style="bold",
    )
    table.add_column("seq")
    for z in zeros:
        table.add_column(f"ZeRO-{z}", justify="right")
    for seq in seq_lens:
        cells = []
        for z in zeros:
            best = max_batch(arch, _point(a, seq_len=seq, zero=z, batch_size=1), usable, cal, target)
            if best and a.effective_batch:
                per_step = best * a.world_size
                accum = -(-a.effective_batch // per_step)
                micro = -(-a.effective_batch // (accum * a.world_size))
                cells.append(f"{micro} x{accum} accum (max {best})")
            else:
                cells.append(str(best) if best else "[red]none[/]")
        table.add_row(str(seq), *cells)
    console.print(table)
    for name, value, src in constants:
        console.print(f"[dim]{name} {value} — {src}[/]")


def calibrate_command(profile: Path, console: Console) -> None:
    from ftprof.estimate.architecture import arch_for
    from ftprof.estimate.calibration import (
        calibrate,
        calibration_path,
        error_summary,
        errors,
        fit_reserved_factor,
        observations_from_records,
        reserved_ratios,
    )
    from ftprof.records.results import latest, read_records

    results = profile if profile.suffix == ".jsonl" else profile / "results.jsonl"
    records = [r for r in latest(read_records(results)) if r.status == "ok" and r.peak_bytes]
    if len(records) < 3:
        raise ConfigError(f"{results}: {len(records)} measured points; calibration needs at least 3")
    device = records[0].env.get("device", "unknown")
    memory = records[0].env.get("device_memory_bytes")
    on_cpu = device.startswith("cpu")
    tasks = {r.model: r.env.get("task", "classification") for r in records}
    archs = {model: arch_for(model, task=task) for model, task in tasks.items()}  # one meta-model build each
    observations = observations_from_records(records, archs.__getitem__)
    base = load_calibration("cpu" if on_cpu else device, memory)
    reserved_factor = fit_reserved_factor(records)  # None on CPUs: no torch allocator figures
    if reserved_factor is not None:
        measured = sum(1 for r in records if reserved_ratios([r]))
        base = replace(base, reserved_factor=reserved_factor, reserved_fitted_on=measured)
        allocator = f"fitted on {measured} points"
    elif base.reserved_fitted_on:
        allocator = f"kept from an earlier sweep, fitted on {base.reserved_fitted_on} points"
    else:
        allocator = "assumed: no torch allocator figures in this sweep"
    cal = calibrate(observations, device, base)
    path = cal.save(calibration_path("cpu" if on_cpu else device, memory))
    errs = errors(observations, cal)
    table = Table(title=f"Calibration on {device}: {len(records)} points", header_style="bold")
    for col in ("point", "measured GiB", "predicted GiB", "error %"):
        table.add_column(col, justify="right" if col != "point" else "left")
    for r, ob, err in zip(records, observations, errs, strict=True):
        table.add_row(
            f"{r.model} {r.point.key}", f"{ob.measured / GIB:.3f}", f"{ob.predict(cal) / GIB:.3f}", f"{100 * err:+.1f}"
        )
    console.print(table)
    summary = error_summary(errs)
    console.print(
        f"runtime {cal.runtime_bytes / GIB:.3f} GiB, activation factor {cal.activation_factor:.3f}, "
        f"ZeRO runtime {cal.zero_runtime_bytes / GIB:.3f} GiB, allocator reserved/allocated factor "
        f"{cal.reserved_factor:.3f} ({allocator}); median |error| {summary['median_abs_pct']:.1f}%, worst "
        f"{summary['worst_abs_pct']:.1f}% (on the fitted points) — saved to {path}"
    )


def main(argv: list[str] | None = None) -> int:
    return run_command(argv, lambda args: run(args, Console()))
