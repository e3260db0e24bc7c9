"""``ftprof estimate``: predict peak memory per rank before running, and calibrate against a sweep.

    ftprof estimate --model bert-base-uncased --batch_size 32 --seq_len 512 --precision bf16 --zero 2 \\
        --world_size 8 --gpu h100-80gb --margin 0.1                # keep 10% of the card free
    ftprof estimate --model bert-large-uncased --zero 0,2,3 --offload optimizer --gpu a10g-24gb  # side by side
    ftprof estimate --model meta-llama/Llama-3.2-1B --task causal-lm --peft none,lora --lora_r 16   # LoRA vs full
    ftprof estimate --model gpt2 --grid --seq_lens 128,512,1024 --zero 0,2,3 --gpu a100-40gb --effective_batch 256
    ftprof estimate --model gpt2 --zero 0,2,3 --format json | jq '.settings[].device_used_bytes'   # for scripts
    ftprof estimate --model bert-base-uncased --zero none --precision bf16 --trace --gpu h100-80gb  # traced step
    ftprof estimate --calibrate profiles/h100-bert-base-uncased      # fit constants, report per-point error
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console

from ftprof.cli import flags
from ftprof.cli.runner import run_command
from ftprof.errors import ConfigError
from ftprof.estimate.adapters import LoraSpec
from ftprof.estimate.estimator import GPUS
from ftprof.estimate.optimizers import DEFAULT_TRAINER_OPTIM
from ftprof.estimate.request import (
    EstimateRequest,
    Estimates,
    answer,
    calibrate_on_sweep,
    check_margin,
    target_for,
)
from ftprof.point import parse_zero
from ftprof.report.estimate_json import estimates_json, grid_json
from ftprof.report.estimate_tables import calibration_renderables, estimates_renderables, grid_renderables

SUPPRESS = argparse.SUPPRESS


def build_parser() -> argparse.ArgumentParser:
    p = flags.parser("ftprof estimate", __doc__)
    model = flags.add_model_group(p, required=False, model_help="Hub id, local directory or known architecture")
    model.add_argument("--attention", choices=["eager", "sdpa"], help="default: the config's implementation")
    setting = p.add_argument_group("setting (per rank)")
    setting.add_argument("--batch_size", type=int, default=8, help="micro-batch per rank (default: 8)")
    setting.add_argument("--seq_len", type=int, default=512, help="tokens per sequence (default: 512)")
    setting.add_argument("--world_size", type=int, default=1, help="ranks (default: 1)")
    levers = flags.add_lever_group(
        p, defaults={"precision": "bf16", "zero": "2", "offload": None, "gradient_checkpointing": "off"}
    )
    # Deprecated spellings, kept working with a note: --zeros / --zero_stages (now --zero, a list everywhere),
    # --offload_optimizer / --offload_param (now --offload optimizer / optimizer+param).
    levers.add_argument(
        "--optim",
        help="without DeepSpeed (--zero none): TrainingArguments' --optim: adamw_torch (foreach), "
        "adamw_torch_fused (the default), sgd, adafactor, adamw_bnb_8bit, adamw_torch_8bit",
    )
    levers.add_argument(
        "--trace",
        action="store_true",
        help="trace the real model's step on fake tensors: --zero none settings from the trace and a replay of "
        "torch's CUDA caching allocator (autocast, --precision bf16/fp16, needs it); DeepSpeed settings take its "
        "saved activations",
    )
    levers.add_argument("--zeros", "--zero_stages", dest="zeros_alias", help=SUPPRESS)
    levers.add_argument("--offload_optimizer", action="store_true", help=SUPPRESS)
    levers.add_argument("--offload_param", action="store_true", help=SUPPRESS)
    flags.add_peft_group(p)
    target = p.add_argument_group("target (what fits means)")
    target.add_argument("--gpu", help=f"target GPU: {', '.join(GPUS)} (or --budget)")
    target.add_argument("--cpu", action="store_true", help="target this host's process memory (RSS)")
    target.add_argument("--budget", help="memory per rank, e.g. 24GiB (overrides --gpu's size)")
    target.add_argument(
        "--margin",
        type=float,
        default=0.05,
        help="fraction of the budget kept free: fits means predicted <= budget x (1 - margin) (default: 0.05)",
    )
    grid = p.add_argument_group("grid (largest micro-batch)")
    grid.add_argument(
        "--grid", action="store_true", help="largest micro-batch that fits, per --seq_lens and setting (--zero ...)"
    )
    grid.add_argument(
        "--seq_lens", type=flags.int_list("--seq_lens"), default="128,256,512", help="for --grid (default: 128,256,512)"
    )
    grid.add_argument("--effective_batch", type=int, help="with --grid: gradient accumulation to reach this batch")
    output = p.add_argument_group("output")
    output.add_argument(
        "--format", choices=["rich", "json"], default="rich", help="rich tables, or one JSON object (every item)"
    )
    calibration = p.add_argument_group("calibration")
    calibration.add_argument("--calibrate", metavar="SWEEP_DIR", help="fit constants to a sweep's measured points")
    return p


def _deprecated_aliases(a: argparse.Namespace, argv: list[str]) -> None:
    """Map the old spellings onto ``--zero`` / ``--offload``, with a one-line note each."""
    if a.zeros_alias is not None:
        old = "--zero_stages" if any(x.startswith("--zero_stages") for x in argv) else "--zeros"
        flags.note(f"{old} is deprecated; --zero takes the list: --zero {a.zeros_alias}")
        if any(x == "--zero" or x.startswith("--zero=") for x in argv):
            raise ConfigError(f"{old} {a.zeros_alias!r} and --zero both name the stages; pass --zero only")
        a.zero = parse_zero(a.zeros_alias)
    if a.offload_optimizer or a.offload_param:
        old = "--offload_param" if a.offload_param else "--offload_optimizer"
        value = "optimizer+param" if a.offload_param else "optimizer"
        flags.note(f"{old} is deprecated; use --offload {value}")
        if a.offload is not None and a.offload != [value]:
            raise ConfigError(f"{old} and --offload {','.join(a.offload)} disagree; pass --offload only")
        a.offload = [value]


def request_from_args(a: argparse.Namespace) -> EstimateRequest:
    """The request the flags describe."""
    if a.optim and "none" not in a.zero:
        flags.note("--optim applies without DeepSpeed (--zero none); the shipped DeepSpeed configs step FusedAdam")
    return EstimateRequest(
        model=a.model,
        target=target_for(a.gpu, a.cpu, a.budget, a.margin),
        task=a.task,
        attention=a.attention,
        batch_size=a.batch_size,
        seq_len=a.seq_len,
        world_size=a.world_size,
        precisions=tuple(a.precision),
        zeros=tuple(a.zero),
        optim=a.optim or DEFAULT_TRAINER_OPTIM,
        trace=a.trace,
        offloads=tuple(a.offload or ["none"]),
        checkpointing=tuple(a.gradient_checkpointing),
        grid_seq_lens=tuple(a.seq_lens) if a.grid else (),
        effective_batch=a.effective_batch,
        peft=tuple(a.peft),
        lora=LoraSpec.from_flags(a.lora_r, a.lora_alpha, a.lora_dropout, a.lora_target_modules),
    )


def run(argv: list[str], console: Console) -> None:
    a = build_parser().parse_args(argv)
    _deprecated_aliases(a, argv)
    check_margin(a.margin)
    if a.calibrate:
        renderables = calibration_renderables(calibrate_on_sweep(Path(a.calibrate)))
    elif not a.model:
        raise ConfigError("--model is required (or --calibrate SWEEP_DIR)")
    else:
        request = request_from_args(a)
        if request.trace:  # seconds per setting (a grid: a few traces per cell); the spinner on stderr
            with Console(stderr=True).status(f"tracing {request.model}'s training step on fake tensors ..."):
                result = answer(request)
        else:
            result = answer(request)
        if a.format == "json":
            payload = estimates_json(result) if isinstance(result, Estimates) else grid_json(result)
            print(json.dumps(payload, indent=1))
            return
        renderables = estimates_renderables(result) if isinstance(result, Estimates) else grid_renderables(result)
    for renderable in renderables:
        console.print(renderable)


def main(argv: list[str] | None = None) -> int:
    return run_command(argv, lambda args: run(args, Console()))
