"""Which sweep points to run, in what order, and which to skip: pure functions, no processes.

A point is one (precision, ZeRO stage, world size, sequence length, gradient accumulation, micro-batch).
Points that must run out of memory — a larger micro-batch or sequence than one that already did, all else
equal — are skipped instead of run; ``--find_max_batch`` bisects the largest micro-batch that fits.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import asdict, dataclass

from ftprof.errors import ConfigError

PRECISIONS = ("fp32", "fp16", "bf16")
ZERO_STAGES = (0, 1, 2, 3)
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*$", re.IGNORECASE)


@dataclass(frozen=True, order=True)
class Point:
    """One configuration to measure. Field order is the run order: small before large."""

    precision: str
    zero: int
    world_size: int
    grad_accum: int
    seq_len: int
    batch_size: int

    @property
    def key(self) -> str:
        """A stable id, used to resume and to de-duplicate.

        >>> Point("bf16", 2, 1, 1, 128, 8).key
        'bf16-z2-w1-ga1-s128-b8'
        """
        return (f"{self.precision}-z{self.zero}-w{self.world_size}-ga{self.grad_accum}-s{self.seq_len}"
                f"-b{self.batch_size}")

    @property
    def setting(self) -> tuple[str, int, int, int, int]:
        """Everything but the micro-batch: the unit of ``--find_max_batch``."""
        return self.precision, self.zero, self.world_size, self.grad_accum, self.seq_len

    def effective_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.world_size

    def as_dict(self) -> dict:
        return asdict(self)


def parse_int_list(text: str, flag: str) -> list[int]:
    """``"8,16,32"`` → ``[8, 16, 32]``; every value a positive integer.

    >>> parse_int_list("32, 8,8", "--batch_sizes")
    [8, 32]
    """
    values = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit() or int(part) <= 0:
            raise ConfigError(f"{flag} {text!r}: {part!r} is not a positive integer; use e.g. {flag} 8,16,32")
        values.append(int(part))
    return sorted(set(values))


def parse_precisions(text: str) -> list[str]:
    values = [p.strip().lower() for p in text.split(",") if p.strip()]
    for p in values:
        if p not in PRECISIONS:
            raise ConfigError(f"--precision {text!r}: unknown precision {p!r}; use fp32, fp16 or bf16")
    return sorted(set(values), key=PRECISIONS.index)


def parse_zero(text: str) -> list[int]:
    """``"0,2,3"`` → ``[0, 2, 3]``; only real ZeRO stages."""
    values = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit() or int(part) not in ZERO_STAGES:
            raise ConfigError(f"--zero {text!r}: unknown ZeRO stage {part!r}; use 0, 1, 2 or 3")
        values.append(int(part))
    return sorted(set(values))


def parse_size(text: str, flag: str = "--budget") -> int:
    """A memory size in bytes: ``24GiB``, ``24GB``, ``1.5G`` (binary units either way), or plain bytes.

    >>> parse_size("1.5GiB"), parse_size("512M"), parse_size("1000")
    (1610612736, 536870912, 1000)
    """
    match = _SIZE.match(text)
    if not match:
        raise ConfigError(f"{flag} {text!r}: not a size; use e.g. 24GiB, 80GB or 512MiB")
    number, unit = float(match.group(1)), match.group(2).upper()
    return int(number * 1024 ** " KMGT".index(unit or " "))


def plan_grid(batch_sizes: list[int], grad_accums: list[int], precisions: list[str], seq_lens: list[int],
              zeros: list[int], world_sizes: list[int], effective_batch: int | None = None) -> list[Point]:
    """All points of the grid, smallest first.

    With ``effective_batch`` the accumulation is derived from each micro-batch (``grad_accums`` ignored),
    so every point trains with the same effective batch; micro-batches that don't divide it are dropped.
    """
    points = []
    for precision, zero, world, seq, batch in itertools.product(precisions, zeros, world_sizes, seq_lens, batch_sizes):
        if effective_batch is not None:
            if effective_batch % (batch * world):
                continue
            accums = [effective_batch // (batch * world)]
        else:
            accums = grad_accums
        points += [Point(precision, zero, world, ga, seq, batch) for ga in accums]
    if not points:
        raise ConfigError(f"--effective_batch {effective_batch}: no micro-batch in {batch_sizes} times world "
                          f"size {world_sizes} divides it")
    return sorted(points)


def must_oom(point: Point, oomed: list[Point]) -> Point | None:
    """An OOMed point that proves ``point`` would OOM too: same everything, batch and sequence no larger."""
    for o in oomed:
        if ((o.precision, o.zero, o.world_size, o.grad_accum) == (point.precision, point.zero, point.world_size,
                                                                   point.grad_accum)
                and o.batch_size <= point.batch_size and o.seq_len <= point.seq_len):
            return o
    return None


def next_batch_to_try(fits: set[int], ooms: set[int], start: int, cap: int) -> int | None:
    """The next micro-batch of a doubling-then-bisection search for the largest that fits, or None when
    the answer is known (``max(fits)``, or nothing fits).

    >>> next_batch_to_try(set(), set(), 8, 1024), next_batch_to_try({8}, set(), 8, 1024)
    (8, 16)
    >>> next_batch_to_try({8, 16}, {32}, 8, 1024), next_batch_to_try({8, 16, 24}, {32}, 8, 1024)
    (24, 28)
    >>> next_batch_to_try({16}, {17}, 8, 1024) is None, next_batch_to_try(set(), {8}, 8, 1024)
    (True, 4)
    """
    if not fits and not ooms:
        return start
    if not ooms:
        nxt = max(fits) * 2
        return nxt if nxt <= cap else (cap if cap not in fits else None)
    lo = max((f for f in fits if f < min(ooms)), default=0)
    hi = min(ooms)
    if hi - lo <= 1:
        return None
    return (lo + hi) // 2
