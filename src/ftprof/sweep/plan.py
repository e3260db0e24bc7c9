"""Which sweep points to run, in what order, and which to skip: pure functions, no processes.

A point is one (precision, ZeRO stage, world size, sequence length, gradient accumulation, micro-batch).
Points that must run out of memory — a larger micro-batch or sequence than one that already did, all else
equal — are skipped instead of run; ``--find_max_batch`` bisects the largest micro-batch that fits.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

from ftprof.errors import ConfigError
from ftprof.point import Offload, Peft, Point, Precision, Stage, offload_within, stage_point


def plan_grid(
    batch_sizes: list[int],
    grad_accums: list[int],
    precisions: list[Precision],
    seq_lens: list[int],
    zeros: list[Stage],
    world_sizes: list[int],
    effective_batch: int | None = None,
    offload: Offload = "none",
    offloads: list[Offload] | None = None,
    checkpointing: list[bool] | None = None,
    adapters: list[tuple[Peft, int]] | None = None,
) -> list[Point]:
    """All points of the grid, smallest first.

    With ``effective_batch`` the accumulation is derived from each micro-batch (``grad_accums`` ignored),
    so every point trains with the same effective batch; micro-batches that don't divide it are dropped.
    ``offload`` (a base ds_config's) applies to each stage as far as it supports it. ``offloads`` (the
    ``--offload`` axis) is swept where each stage supports it; an offload no listed stage supports is an error.
    ``checkpointing`` is the ``--gradient_checkpointing`` axis; ``adapters`` the ``--peft`` axis, as
    (method, LoRA rank) pairs (:func:`adapter_axis`). A ``"none"`` among ``zeros`` is HF Trainer without
    DeepSpeed, which offloads nothing.
    """
    stages = [0 if z == "none" else z for z in zeros]
    if offloads is not None:
        for o in offloads:
            if not any(offload_within(o, z) == o and zero != "none" for z, zero in zip(stages, zeros, strict=True)):
                need = "3" if o == "optimizer+param" else "1, 2 or 3"
                raise ConfigError(
                    f"--offload {o} needs ZeRO stage {need}, and --zero has {','.join(map(str, zeros))}; "
                    "add a stage that supports it or drop that offload"
                )
    points = []
    full: list[tuple[Peft, int]] = [("none", 0)]
    levers = itertools.product(offloads or [offload], checkpointing or [False], adapters or full)
    axes = itertools.product(precisions, zeros, world_sizes, seq_lens, batch_sizes, levers)
    for precision, zero, world, seq, batch, (off, ckpt, (peft, rank)) in axes:
        stage = 0 if zero == "none" else zero
        if offloads is not None and offload_within(off, stage) != off:
            continue  # this stage can't offload that much; another listed stage does
        if effective_batch is not None:
            if effective_batch % (batch * world):
                continue
            accums = [effective_batch // (batch * world)]
        else:
            accums = grad_accums
        points += [
            stage_point(
                zero,
                precision=precision,
                world_size=world,
                grad_accum=ga,
                seq_len=seq,
                batch_size=batch,
                offload=offload_within(off, stage),
                gradient_checkpointing=ckpt,
                peft=peft,
                lora_r=rank,
            )
            for ga in accums
        ]
    if not points:
        raise ConfigError(
            f"--effective_batch {effective_batch}: no micro-batch in {batch_sizes} times world "
            f"size {world_sizes} divides it"
        )
    return sorted(points)


def adapter_axis(methods: list[Peft], lora_ranks: list[int]) -> list[tuple[Peft, int]]:
    """The ``--peft`` axis: full fine-tuning and/or LoRA at each rank of ``--lora_r``.

    >>> adapter_axis(["none", "lora"], [8, 64]), adapter_axis(["lora"], [16])
    ([('none', 0), ('lora', 8), ('lora', 64)], [('lora', 16)])
    """
    return [(m, 0) for m in methods if m == "none"] + [("lora", r) for r in lora_ranks if "lora" in methods]


def must_oom(point: Point, oomed: list[Point]) -> Point | None:
    """An OOMed point that proves ``point`` would OOM too: same everything, batch and sequence no larger."""
    for o in oomed:
        if (
            o.batch_size <= point.batch_size
            and o.seq_len <= point.seq_len
            and replace(o, batch_size=1, seq_len=1) == replace(point, batch_size=1, seq_len=1)
        ):
            return o
    return None


def next_batch_to_try(fits: set[int], ooms: set[int], start: int, cap: int, step: int = 1) -> int | None:
    """The next micro-batch of a doubling-then-bisection search for the largest that fits, or None when
    the answer is known (``max(fits)``, or nothing fits). The bisection stops once the largest fitting batch
    is known to within ``step`` and tries multiples of ``step`` only.

    >>> next_batch_to_try(set(), set(), 8, 1024), next_batch_to_try({8}, set(), 8, 1024)
    (8, 16)
    >>> next_batch_to_try({8, 16}, {32}, 8, 1024), next_batch_to_try({8, 16, 24}, {32}, 8, 1024)
    (24, 28)
    >>> next_batch_to_try({16}, {17}, 8, 1024) is None, next_batch_to_try(set(), {8}, 8, 1024)
    (True, 4)
    >>> next_batch_to_try({64, 128}, {256}, 64, 1024, step=32), next_batch_to_try({128, 224}, {256}, 64, 1024, step=32)
    (192, None)
    """
    if not fits and not ooms:
        return start
    if not ooms:
        nxt = max(fits) * 2
        return nxt if nxt <= cap else (cap if cap not in fits else None)
    lo = max((f for f in fits if f < min(ooms)), default=0)
    hi = min(ooms)
    if hi - lo <= step:
        return None
    mid = (lo + hi) // 2 // step * step
    return mid if mid > lo else lo + step
