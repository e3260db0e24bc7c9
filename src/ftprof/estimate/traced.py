"""``ftprof estimate --trace``: HF Trainer's step without DeepSpeed predicted from the real model's traced step
on fake tensors, replayed through the caching-allocator model, instead of the hand formulas.

What it adds over :func:`ftprof.estimate.estimator.estimate`: any architecture transformers builds (no
per-family formula), autocast (``--bf16``/``--fp16`` over fp32 weights, which the formulas don't model) and
``max_memory_reserved`` from :func:`ftprof.estimate.allocator.replay` rather than a fitted factor. What it
models: :func:`ftprof.estimate.trace.trace_training_step` with the GPU's kernels (bool dropout masks, SDPA's
log-sum-exp), HF Trainer's two AdamW groups, a padded batch's attention mask, ``TRACE_STEPS`` steps (the
allocator's blocks settle once the optimizer state exists), the AdamW implementation ``--optim`` names, and
the cuBLAS workspaces torch allocates through the same allocator (:func:`cublas_workspaces`). What stays
outside the allocator (the CUDA context, NCCL) is the calibration's runtime, as in the formula estimate.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ftprof.errors import ConfigError
from ftprof.estimate.allocator import Event, replay
from ftprof.estimate.estimator import Calibration, Estimate
from ftprof.estimate.trace import (
    Optimizer,
    StepRun,
    Trace,
    batch_factory,
    known_model_factory,
    model_config,
    trace_training_step,
)
from ftprof.point import Point, Task

MIB = 2**20
TRACE_STEPS = 3
#: ``--optim`` values the trace steps, and the torch AdamW implementation each runs on a GPU.
TRACED_OPTIMIZERS: dict[str, Optimizer] = {"adamw_torch": "foreach", "adamw_torch_fused": "fused"}
#: GPUs (keys of :data:`~ftprof.estimate.estimator.GPUS`) of compute capability 9.0, whose cuBLAS workspace is 32 MiB.
SM90 = ("h100-80gb", "h100-94gb", "h200-141gb")


@dataclass(frozen=True)
class Workspaces:
    """The cuBLAS workspaces a training step allocates through torch's caching allocator, in bytes."""

    forward: tuple[int, ...]
    """Allocated at the forward's first matmul: the main thread's cuBLAS workspace, and its cuBLASLt one."""
    backward: tuple[int, ...]
    """Allocated at the backward's first matmul: the autograd engine's device thread has its own handle."""
    source: str


def cublas_workspaces(gpu: str = "gpu", torch_version: str | None = None) -> Workspaces:
    """The workspaces on ``gpu`` (a GPUS key, or "gpu" for one not named) under ``torch_version`` (by default
    the installed torch's; its local tag names the backend: ``+cu121``, ``+rocm5.7``), as torch's
    ``aten/src/ATen/cuda/CublasHandlePool.cpp`` sizes them.

    One workspace per (BLAS handle, stream), handles per thread: the forward's and the autograd thread's.
    ``parseChosenWorkspaceSize``: 32 MiB on compute capability 9.0, ``:4096:2:16:8`` (8 MiB + 128 KiB) on other
    NVIDIA GPUs, 32 MiB under ROCm (``CUBLAS_WORKSPACE_CONFIG`` overrides these: not read here); cuBLASLt's own
    1 MiB (``CUBLASLT_WORKSPACE_SIZE``) for addmm's bias epilogue in the forward. When it goes through the
    caching allocator: CUDA always, except torch 2.2-2.3 built for CUDA >= 12.2 (pytorch#113994 left the
    workspace to cuBLAS's own cudaMallocAsync, #124250 restored it in 2.4); ROCm from torch 2.6 (#138791). An
    unnamed GPU is taken as not Hopper.

    >>> [size // 1024 for size in cublas_workspaces("a10g-24gb", "2.4.1+cu124").forward]
    [8320, 1024]
    >>> cublas_workspaces("gpu", "2.3.1+rocm5.7").forward, cublas_workspaces("h100-80gb", "2.3.1+cu121").backward
    ((), (33554432,))
    """
    version = torch_version or _installed_torch()
    release, _, local = version.partition("+")
    numbers = re.match(r"(\d+)\.(\d+)", release)
    major_minor = (int(numbers[1]), int(numbers[2])) if numbers else (99, 0)  # unparsable: today's torch
    source = f"torch {version}'s CublasHandlePool.cpp: a BLAS workspace per thread (forward, autograd)"
    if local.startswith("rocm"):
        if major_minor < (2, 6):
            return Workspaces((), (), f"torch {version} on ROCm: hipBLAS's workspace is its own, outside the allocator")
        return Workspaces((32 * MIB,), (32 * MIB,), source)
    digits = local[2:] if re.fullmatch(r"cu\d{3,}", local) else ""  # cu121: CUDA 12.1
    cuda = (int(digits[:-1]), int(digits[-1])) if digits else ()
    if (2, 2) <= major_minor < (2, 4) and cuda >= (12, 2):
        return Workspaces((), (), f"torch {version}: cuBLAS allocates its own workspace (cudaMallocAsync)")
    cublas = 32 * MIB if gpu in SM90 else 8 * MIB + 128 * 1024
    return Workspaces((cublas, 1 * MIB), (cublas,), source + ", cuBLASLt 1 MiB")


def _installed_torch() -> str:
    """The installed torch's version with its backend as a local tag (``2.5.1+cu124``; a PyPI or conda build
    without one gets it from ``torch.version.cuda`` / ``torch.version.hip``)."""
    release, _, local = torch.__version__.partition("+")
    if torch.version.hip:
        local = "rocm" + ".".join(str(torch.version.hip).split(".")[:2])
    elif torch.version.cuda:
        local = "cu" + "".join(str(torch.version.cuda).split(".")[:2])
    return f"{release}+{local}" if local else release


def check_positions(model: str, seq_len: int) -> None:
    """Refuse a sequence longer than ``model``'s learned position embeddings before tracing it: the real forward
    would fail, a fake one would not notice. Rotary models (``rope_*`` in the config) have no such table and
    are not limited; RoBERTa-style embeddings start after the pad index, so ``pad_token_id + 1`` fewer fit.

    Raises:
        ConfigError: ``seq_len`` is over what the position embeddings hold.
    """
    config = model_config(model)
    if any(getattr(config, name, None) for name in ("rope_parameters", "rope_theta", "rope_scaling")):
        return
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if not limit:
        return
    if config.model_type in ("roberta", "xlm-roberta", "camembert", "longformer"):
        limit -= int(config.pad_token_id or 0) + 1
    if seq_len > int(limit):
        raise ConfigError(f"--seq_len {seq_len}: {model} has {limit} positions; use --seq_len {limit} or less")


def check_traceable(point: Point, optim: str, world_size: int, lora: bool) -> Optimizer:
    """The AdamW implementation to trace for ``point``, or a one-line refusal of what the trace doesn't cover.

    Raises:
        ConfigError: a DeepSpeed point, an optimizer other than torch's AdamW, several ranks, LoRA or offload.
    """
    if point.deepspeed:
        raise ConfigError("--trace predicts HF Trainer without DeepSpeed: use --zero none (or drop --trace)")
    if optim not in TRACED_OPTIMIZERS:
        names = " or ".join(TRACED_OPTIMIZERS)
        raise ConfigError(f"--trace with --optim {optim}: the trace steps torch's AdamW; use --optim {names}")
    if world_size > 1:
        raise ConfigError("--trace predicts one rank without DDP; use --world_size 1, or drop --trace for DDP")
    if lora:
        raise ConfigError("--trace with --peft lora: not traced yet; drop --trace for LoRA's estimate")
    if point.offload != "none":
        raise ConfigError("--zero none: offload needs DeepSpeed; use --offload none")
    return TRACED_OPTIMIZERS[optim]


def traced_saved_activations(model: str, task: Task, point: Point, attention: str | None = None) -> dict[str, int]:
    """``--trace`` for a DeepSpeed setting: the bytes the real model saves for backward in one forward, traced on
    fake tensors in the training dtype (DeepSpeed casts the model), with the GPU's kernels and a padded batch's
    mask, as :func:`ftprof.estimate.estimator.estimate`'s ``saved_parts``. Model states, buckets and the step
    stay the formulas' (DeepSpeed's own allocations are not traced). One trace per shape (ZeRO stages share it)."""
    key = (model, task, point.precision, point.seq_len, point.batch_size, point.gradient_checkpointing, attention)
    return {"traced forward": _saved_bytes(*key)}


@functools.lru_cache(maxsize=256)
def _saved_bytes(
    model: str, task: Task, precision: str, seq_len: int, batch: int, checkpointing: bool, attention: str | None
) -> int:
    check_positions(model, seq_len)
    factory = known_model_factory(model, task, precision, attention or "sdpa", checkpointing=checkpointing)
    inputs = batch_factory(int(model_config(model).vocab_size), batch, seq_len, task, attention_mask=True)
    return _traced(model, lambda: trace_training_step(factory, inputs, "fused", run=StepRun(gpu=True))).saved_bytes


def _traced(model: str, run: Callable[[], Trace]) -> Trace:
    """``run()``, with a model the tracer can't run (an op fake tensors don't support, a forward that fails on
    these shapes) refused in one line; the tracer's own failures (checkpoint's recompute check, assertions)
    are raised as they are.

    Raises:
        ConfigError: the trace failed in the model.
    """
    from torch.utils.checkpoint import CheckpointError

    try:
        return run()
    except CheckpointError:
        raise
    except (RuntimeError, NotImplementedError, TypeError, ValueError) as err:
        reason = (str(err).strip().splitlines() or [""])[0][:300]
        raise ConfigError(
            f"--trace: tracing {model} failed ({type(err).__name__}: {reason}); drop --trace for the formulas"
        ) from err


def _with_workspaces(events: tuple[Event, ...], bounds: tuple[tuple[int, str], ...], ws: Workspaces) -> list[Event]:
    """``events`` with the workspaces allocated where the first forward and the first backward begin."""
    first = {phase: index for index, phase in reversed(bounds)}
    inserts = {first["forward"]: ws.forward, first["backward"]: ws.backward}
    out: list[Event] = []
    for index, event in enumerate(events):
        for n, size in enumerate(inserts.get(index, ())):
            out.append(("alloc", f"workspace-{index}-{n}", size))
        out.append(event)
    return out


def traced_estimate(
    model: str,
    task: Task,
    point: Point,
    optim: str,
    cal: Calibration,
    gpu: str = "gpu",
    attention: str | None = None,
    workspaces: Workspaces | None = None,
    padded: bool = True,
) -> Estimate:
    """Predict ``point`` (HF Trainer without DeepSpeed, one rank) on ``gpu`` from the traced step.

    Items are the trace's storages alive at its peak, by category, plus the workspaces and, as
    ``block_rounding``, what the replay's allocated peak holds beyond them (512-byte rounding, remainders of
    blocks not split, and a peak at another moment than the trace's); ``allocated`` and ``reserved`` are the
    replay's peaks; device used adds the calibration's runtime (the CUDA context: outside the allocator).
    ``workspaces``: other than :func:`cublas_workspaces` gives for ``gpu`` (another vendor's BLAS). ``padded``:
    the batch has padding (its attention mask is built and kept), as dynamic padding gives; False: full rows.

    Raises:
        ConfigError: what :func:`check_traceable` refuses, a sequence over the model's positions, a failed trace.
    """
    optimizer = check_traceable(point, optim, point.world_size, point.peft != "none")
    check_positions(model, point.seq_len)
    autocast = None if point.precision == "fp32" else point.precision
    config = model_config(model)
    factory = known_model_factory(model, task, "fp32", attention or "sdpa", checkpointing=point.gradient_checkpointing)
    batch = batch_factory(int(config.vocab_size), point.batch_size, point.seq_len, task, attention_mask=padded)
    run = StepRun(steps=TRACE_STEPS, autocast=autocast, gpu=True, trainer_groups=True)
    trace = _traced(model, lambda: trace_training_step(factory, batch, optimizer, run=run))
    ws = workspaces or cublas_workspaces(gpu)
    stats = replay(_with_workspaces(trace.events, trace.bounds, ws))
    at_peak = trace.peak_breakdown
    items = {
        "parameters": at_peak.get("parameter", 0) + at_peak.get("buffer", 0),
        "gradients": at_peak.get("gradient", 0),
        "optimizer_states": at_peak.get("optimizer_state", 0),
        "saved_activations": at_peak.get("activation", 0),
        "temporaries": at_peak.get("temporary", 0) + at_peak.get("input", 0),
        "gpu_workspaces": sum(ws.forward) + sum(ws.backward),
    }
    items["block_rounding"] = max(stats.max_allocated - sum(items.values()), 0)
    labels = {
        "optimizer_states": f"optimizer states (torch AdamW, {optimizer})",
        "saved_activations": "saved activations (traced, at the peak)",
        "temporaries": "temporaries and the batch (traced, at the peak)",
    }
    device_used = stats.max_reserved + int(cal.runtime_bytes)
    return Estimate(items, {}, stats.max_allocated, stats.max_reserved, device_used, {}, labels)


def linear_saved_activations(
    model: str, task: Task, point: Point, attention: str | None = None
) -> Callable[[int], dict[str, int]]:
    """The traced saved activations of any batch at ``point``'s other settings, from two traces (batch 1 and 2):
    every tensor a forward saves scales with the batch (checked on bert-base and gpt2 up to batch 8: exact to
    48 bytes), so a grid's search needs no trace per batch."""
    one = traced_saved_activations(model, task, point.with_batch(1), attention)["traced forward"]
    two = traced_saved_activations(model, task, point.with_batch(2), attention)["traced forward"]
    return lambda batch: {"traced forward": one + (batch - 1) * (two - one)}


def traced_max_batch(used: Callable[[int], int], budget: int, limit: int = 1 << 16) -> int:
    """The largest batch with ``used(batch) <= budget`` (``used`` grows with the batch), 0 if none, each probe one
    call (a trace). Secant steps from the samples nearest the budget (the traced peak is about linear), and a
    bisection wherever a step fails to halve the bracket (the allocator's steps make the peak a staircase,
    where a secant crawls); doubling where the peak has not grown yet.

    >>> calls = []
    >>> def used(b):
    ...     calls.append(b)
    ...     return 1000 + 37 * b + (b % 3)  # about linear, with a wobble
    >>> traced_max_batch(used, budget=5000), len(calls) <= 6
    (108, True)
    >>> calls.clear()
    >>> def stairs(b):
    ...     calls.append(b)
    ...     return 10**6 + 20 * 2**20 * (b // 64) + 1000 * b  # segment-sized steps every 64
    >>> best = traced_max_batch(stairs, budget=10**6 + 20 * 2**20 * 90)
    >>> best, stairs(best) <= 10**6 + 20 * 2**20 * 90 < stairs(best + 1), len(calls) <= 24
    (5759, True, True)
    >>> traced_max_batch(lambda b: 10 * b, budget=5), traced_max_batch(lambda b: b, budget=10**9, limit=64)
    (0, 64)
    >>> traced_max_batch(lambda b: 100 if b < 500 else 10**9, budget=1000)  # flat at first: doubles, no leap
    499
    """
    limit = max(limit, 1)
    seen: dict[int, int] = {}

    def probe(batch: int) -> int:
        if batch not in seen:
            seen[batch] = used(batch)
        return seen[batch]

    if probe(1) > budget:
        return 0
    probe(min(8, limit))
    width = None
    for _ in range(64):
        lo = max(b for b, u in seen.items() if u <= budget)
        over = [b for b, u in seen.items() if u > budget]
        hi = min(over) if over else limit + 1
        if hi - lo <= 1:
            return min(lo, limit)
        below = [b for b in seen if b < lo]
        other = hi if over else (max(below) if below else lo)
        slope = (seen[other] - seen[lo]) / (other - lo) if other != lo else 0.0
        if over and width is not None and hi - lo > width // 2:
            guess = (lo + hi) // 2  # the last step did not halve the bracket
        elif slope > 0:
            guess = lo + int((budget - seen[lo]) / slope)
        else:
            guess = (lo + hi) // 2 if over else 2 * lo  # flat so far: double
        width = hi - lo if over else None
        probe(min(max(guess, lo + 1), hi - 1))
    return max(b for b, u in seen.items() if u <= budget)


def traced_grid_batch(
    model: str,
    task: Task,
    point: Point,
    optim: str,
    cal: Calibration,
    budget: int,
    gpu: str = "gpu",
    attention: str | None = None,
) -> int:
    """``--grid --trace`` for a ``--zero none`` setting: the largest batch whose traced device-used peak fits
    ``budget``: a secant search over traced estimates (:func:`traced_max_batch`), since the traced peak grows
    about linearly with the batch (the allocator's replay adds a wobble)."""

    def used(batch: int) -> int:
        return traced_estimate(model, task, point.with_batch(batch), optim, cal, gpu, attention).device_used

    return traced_max_batch(used, budget)
