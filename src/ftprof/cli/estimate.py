"""``ftprof estimate``: predict peak memory per rank before running, and calibrate against a sweep.

    ftprof estimate --model bert-base-uncased --batch_size 32 --seq_len 512 --precision bf16 --zero 2 \\
        --world_size 8 --gpu h100-80gb
    ftprof estimate --model gpt2 --grid --seq_lens 128,512,1024 --zero 0,2,3 --gpu a100-40gb --effective_batch 256
    ftprof estimate --calibrate profiles/h100-bert-base-uncased      # fit constants, report per-point error
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ftprof.calibrate import load_calibration
from ftprof.cli.runner import run_command
from ftprof.errors import ConfigError
from ftprof.estimate import GPUS, Device, Estimate, estimate, max_batch
from ftprof.point import PRECISIONS, Offload, Point, offload_within
from ftprof.sweep_plan import parse_int_list, parse_zero
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


def breakdown_table(est: Estimate, budget: int | None, title: str) -> Table:
    table = Table(title=title, header_style="bold")
    table.add_column("item")
    table.add_column("GiB per rank", justify="right")
    for name, value in est.items.items():
        table.add_row(name, f"{value / GIB:.3f}")
    for name, value in est.host_items.items():
        table.add_row(f"{name} (host memory, offloaded)", f"[dim]{value / GIB:.3f}[/]")
    table.add_row("[bold]tensor peak (max_memory_allocated)[/]", f"[bold]{est.allocated / GIB:.3f}[/]")
    table.add_row("[bold]allocator peak (max_memory_reserved)[/]", f"[bold]{est.reserved / GIB:.3f}[/]")
    table.add_row("[bold]device used (NVML / RSS)[/]", f"[bold]{est.device_used / GIB:.3f}[/]")
    if budget:
        headroom = budget - est.device_used
        verdict = "[green]fits[/]" if headroom >= 0 else "[bold red]does NOT fit[/]"
        table.add_row(f"budget {budget / GIB:.1f} GiB: {verdict}", f"headroom {headroom / GIB:+.3f}")
    return table


def run(argv: list[str], console: Console) -> None:
    a = build_parser().parse_args(argv)
    if a.calibrate:
        return calibrate_command(Path(a.calibrate), console)
    if not a.model:
        raise ConfigError("--model is required (or --calibrate SWEEP_DIR)")
    device, budget = _target(a)
    from ftprof.model_facts import arch_for

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
        console.print(breakdown_table(estimate(arch, s, cal, target), budget, title))
        return
    if budget is None:
        raise ConfigError("--grid needs a memory size: --gpu NAME, --cpu or --budget SIZE")
    seq_lens, zeros = parse_int_list(a.seq_lens, "--seq_lens"), parse_zero(a.zeros)
    table = Table(
        title=f"Largest micro-batch per rank that fits {budget / GIB:.1f} GiB — {a.model}, {a.precision}, "
        f"{a.world_size} rank(s), {source}",
        header_style="bold",
    )
    table.add_column("seq")
    for z in zeros:
        table.add_column(f"ZeRO-{z}", justify="right")
    for seq in seq_lens:
        cells = []
        for z in zeros:
            best = max_batch(arch, _point(a, seq_len=seq, zero=z, batch_size=1), budget, cal, target)
            if best and a.effective_batch:
                per_step = best * a.world_size
                accum = -(-a.effective_batch // per_step)
                micro = -(-a.effective_batch // (accum * a.world_size))
                cells.append(f"{micro} x{accum} accum (max {best})")
            else:
                cells.append(str(best) if best else "[red]none[/]")
        table.add_row(str(seq), *cells)
    console.print(table)


def calibrate_command(profile: Path, console: Console) -> None:
    from ftprof.calibrate import calibrate, calibration_path, error_summary, errors, observations_from_records
    from ftprof.model_facts import arch_for
    from ftprof.results import latest, read_records

    results = profile if profile.suffix == ".jsonl" else profile / "results.jsonl"
    records = [r for r in latest(read_records(results)) if r.status == "ok" and r.peak_bytes]
    if len(records) < 3:
        raise ConfigError(f"{results}: {len(records)} measured points; calibration needs at least 3")
    device = records[0].env.get("device", "unknown")
    on_cpu = device.startswith("cpu")
    archs = {m: arch_for(m) for m in {r.model for r in records}}
    observations = observations_from_records(records, archs.__getitem__)
    cal = calibrate(observations, device, load_calibration("cpu" if on_cpu else device))
    path = cal.save(calibration_path("cpu" if on_cpu else device))
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
        f"ZeRO runtime {cal.zero_runtime_bytes / GIB:.3f} GiB; median |error| {summary['median_abs_pct']:.1f}%, worst "
        f"{summary['worst_abs_pct']:.1f}% (on the fitted points) — saved to {path}"
    )


def main(argv: list[str] | None = None) -> int:
    return run_command(argv, lambda args: run(args, Console()))
