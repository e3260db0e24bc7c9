"""``ftprof sweep``: measure peak memory and throughput over a grid of settings, then report.

    ftprof sweep --model bert-base-uncased --batch_sizes 8,16,32 --precision bf16 --seq_lens 128,512 --zero 0,2,3
    ftprof sweep --model tiny-bert                      # device-sized defaults (a few minutes on a CPU)
    ftprof sweep --model gpt2 --find_max_batch --zero 2,3 --out profiles/gpt2-maxbatch
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ftprof.cli.errors import run_command
from ftprof.errors import ConfigError
from ftprof.sweep_plan import parse_int_list, parse_precisions, parse_size, parse_zero, plan_grid

# Defaults that fit the device: a CPU grid finishes in a few minutes; a GPU gets the full grid.
CPU_DEFAULTS = dict(batch_sizes="4,8", grad_accum="1", precision="fp32", seq_lens="64,128", zero="0,2", steps=3,
                    warmup=1)
GPU_DEFAULTS = dict(batch_sizes="8,16,32,64", grad_accum="1", precision="fp32,fp16,bf16", seq_lens="128,256,512",
                    zero="0,2,3", steps=10, warmup=3)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ftprof sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Hub id, local model directory, or tiny preset (shapes only)")
    p.add_argument("--batch_sizes", help="micro-batches per rank, e.g. 8,16,32 (CPU default 4,8; GPU 8..64)")
    p.add_argument("--grad_accum", help="gradient accumulation steps, e.g. 1,4")
    p.add_argument("--precision", help="fp32, fp16, bf16 (comma list)")
    p.add_argument("--seq_lens", help="sequence lengths, e.g. 128,256,512")
    p.add_argument("--zero", help="ZeRO stages, e.g. 0,2,3")
    p.add_argument("--world_size", default="1", help="ranks per point (comma list); >1 uses the deepspeed launcher")
    p.add_argument("--ds_config", help="base DeepSpeed config (offload etc.); its stage is replaced per point")
    p.add_argument("--effective_batch", type=int, help="keep batch x accumulation x ranks fixed at this value")
    p.add_argument("--find_max_batch", action="store_true", help="bisect the largest micro-batch that fits, per setting")
    p.add_argument("--max_batch", type=int, default=1024, help="upper bound for --find_max_batch")
    p.add_argument("--steps", type=int, help="measured optimizer steps per point")
    p.add_argument("--warmup", type=int, help="optimizer steps before measuring")
    p.add_argument("--budget", help="memory budget for recommendations, e.g. 24GiB (default: the device's memory)")
    p.add_argument("--dataset", help="measure with this data's real lengths (the longest batch is always measured)")
    p.add_argument("--out", help="output folder (default profiles/<model>-<device>)")
    p.add_argument("--resume", action="store_true", help="continue a sweep: skip points already in results.jsonl")
    p.add_argument("--timeout", type=float, default=900, help="seconds before a point counts as hung")
    p.add_argument("--child_memory_limit", help="address-space limit per point process (CPU testing), e.g. 6GiB")
    p.add_argument("--no_skip", action="store_true",
                   help="run every grid point, even those a smaller OOM proves will OOM (to compare costs)")
    p.add_argument("--no_report", action="store_true", help="don't print the report at the end")
    return p


def _device() -> tuple[str, bool, bool]:
    """(name for folders, has CUDA, CUDA has bf16)."""
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0).replace("NVIDIA ", "").split()[0].lower()
        return name, True, torch.cuda.is_bf16_supported()
    return "cpu", False, False


def plan_from_args(a: argparse.Namespace, cuda: bool, bf16_ok: bool):
    defaults = GPU_DEFAULTS if cuda else CPU_DEFAULTS
    precisions = parse_precisions(a.precision or defaults["precision"])
    if not a.precision and cuda and not bf16_ok:
        precisions = [p for p in precisions if p != "bf16"]
    if not cuda and "fp16" in precisions:
        raise ConfigError("--precision fp16 needs a CUDA GPU and this machine has none; use fp32 or bf16")
    if cuda and "bf16" in precisions and not bf16_ok:
        raise ConfigError("--precision bf16: this GPU has no bfloat16 support; use fp16 or fp32")
    for flag in ("steps", "warmup", "effective_batch", "max_batch"):
        value = getattr(a, flag)
        if value is not None and value <= (0 if flag != "warmup" else -1):
            raise ConfigError(f"--{flag} must be {'non-negative' if flag == 'warmup' else 'positive'}, got {value}")
    world_sizes = parse_int_list(a.world_size, "--world_size")
    if cuda:
        import torch

        if max(world_sizes) > torch.cuda.device_count():
            raise ConfigError(f"--world_size {max(world_sizes)} but only {torch.cuda.device_count()} GPUs are visible")
    points = plan_grid(parse_int_list(a.batch_sizes or defaults["batch_sizes"], "--batch_sizes"),
                       parse_int_list(a.grad_accum or defaults["grad_accum"], "--grad_accum"), precisions,
                       parse_int_list(a.seq_lens or defaults["seq_lens"], "--seq_lens"),
                       parse_zero(a.zero or defaults["zero"]), world_sizes, a.effective_batch)
    return points, a.steps or defaults["steps"], a.warmup if a.warmup is not None else defaults["warmup"]


def predictor(spec, base, env: dict, cuda: bool):
    """The estimator for this device (its saved calibration, else defaults) and the per-rank memory."""
    from ftprof.cli.estimate import load_calibration
    from ftprof.estimate import Setting, estimate
    from ftprof.model_facts import arch_from_config

    arch = arch_from_config(spec.name, spec.config)
    cal = load_calibration(env["device"] if cuda else "cpu")
    offload_opt = bool(base and base.offload_optimizer != "none")
    offload_param = bool(base and base.offload_param != "none")

    def predict(p) -> int:
        setting = Setting(p.batch_size, p.seq_len, p.precision, p.zero, p.world_size,
                          offload_optimizer=offload_opt and p.zero > 0, offload_param=offload_param and p.zero == 3,
                          device="gpu" if cuda else "cpu")
        return estimate(arch, setting, cal).device_used

    return predict, env.get("device_memory_bytes")


def run(argv: list[str], console: Console) -> None:
    a = build_parser().parse_args(argv)
    budget = parse_size(a.budget) if a.budget else None
    child_limit = parse_size(a.child_memory_limit, "--child_memory_limit") if a.child_memory_limit else None
    device, cuda, bf16_ok = _device()
    points, steps, warmup = plan_from_args(a, cuda, bf16_ok)

    from ftprof.deepspeed_config import load_ds_config
    from ftprof.models import resolve_model_spec
    from ftprof.results import environment, read_records
    from ftprof.sweep import SweepConfig, iterate_sweep

    base = load_ds_config(a.ds_config) if a.ds_config else None
    spec = resolve_model_spec(a.model, random_init=True)  # shapes only: fails fast on an unknown model
    if a.dataset:
        from ftprof.data import load_raw

        load_raw(a.dataset)  # a bad --dataset fails here, not in every point
    out = Path(a.out or f"profiles/{Path(a.model).name}-{device}")
    results = out / "results.jsonl"
    done = {}
    if results.exists():
        if not a.resume:
            raise ConfigError(f"{results} already exists; pass --resume to continue that sweep, or another --out")
        done = {r.point.key: r for r in read_records(results)}
    env = environment()
    predict, device_budget = predictor(spec, base, env, cuda)
    cfg = SweepConfig(model=a.model, points=points, out_dir=out, steps=steps, warmup=warmup, dataset=a.dataset,
                      base_ds_config=base, timeout_s=a.timeout, find_max_batch=a.find_max_batch,
                      max_batch=a.max_batch, child_memory_limit=child_limit, prune=not a.no_skip, env=env,
                      predict=predict, budget=device_budget)
    pending = [p for p in points if p.key not in done]
    console.print(f"[bold]ftprof sweep[/] {spec.name} ({spec.config.model_type}, shapes from its config) on "
                  f"{cfg.env['device']}: {len(pending)} of {len(points)} points to run"
                  f"{' (bisecting max batch)' if a.find_max_batch else ''} → {results}")
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console,
                        transient=False)
    started = time.time()
    with progress:
        task = progress.add_task("starting", total=None if a.find_max_batch else len(pending))
        for record in iterate_sweep(cfg, done):
            peak = f"{record.peak_bytes / 2**30:.2f} GiB" if record.peak_bytes else record.status.upper()
            speed = f", {record.metrics['samples_per_s']:.1f} samples/s" if record.metrics.get("samples_per_s") else ""
            progress.console.print(f"  {record.point.key:<28} {record.status:<8} {peak}{speed}"
                                   + (f"  [dim]{record.reason}[/]" if record.reason and record.status != "ok" else ""))
            progress.update(task, advance=1, description=f"last {record.point.key}: {peak}")
    console.print(f"sweep finished in {time.time() - started:.0f} s")
    if not a.no_report:
        from ftprof.cli.report import report

        report(out, budget, "rich", write_config=False, plots=True, console=console)


def main(argv: list[str] | None = None) -> int:
    return run_command(argv, lambda args: run(args, Console()))
