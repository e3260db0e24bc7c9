"""A sweep point: one setting of every axis ftprof measures and predicts, and the names of those axes.

:class:`Point` is the one type for "what was trained": the sweep plans and runs points, results store them,
the estimator predicts them and recommendations turn them into commands. Build it by keyword.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Literal, get_args

from ftprof.errors import ConfigError

Precision = Literal["fp32", "fp16", "bf16"]
Offload = Literal["none", "optimizer", "optimizer+param"]  # what ZeRO moves to host memory
PRECISIONS: tuple[Precision, ...] = get_args(Precision)
OFFLOADS: tuple[Offload, ...] = get_args(Offload)
ZERO_STAGES = (0, 1, 2, 3)


@dataclass(frozen=True, order=True, kw_only=True)
class Point:
    """One configuration to measure or predict, per rank. Field order is the run order: small before large.

    >>> Point(precision="bf16", zero=2, seq_len=128, batch_size=8).key
    'bf16-z2-w1-ga1-s128-b8'
    >>> Point(precision="bf16", zero=3, seq_len=128, batch_size=8, offload="optimizer+param").key
    'bf16-z3-w1-ga1-s128-b8-off_optimizer+param'
    """

    precision: Precision
    zero: int
    world_size: int = 1
    grad_accum: int = 1
    seq_len: int
    batch_size: int
    offload: Offload = "none"
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        for name in ("world_size", "grad_accum", "seq_len", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"--{name} must be a positive integer, got {value!r}")
        if self.zero not in ZERO_STAGES:
            raise ConfigError(f"--zero {self.zero!r}: unknown ZeRO stage; use 0, 1, 2 or 3")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision {self.precision!r}: use fp32, fp16 or bf16")
        if self.offload not in OFFLOADS:
            raise ConfigError(f"--offload {self.offload!r}: use one of {', '.join(OFFLOADS)}")
        if self.offload == "optimizer+param" and self.zero != 3:
            raise ConfigError(f"--offload optimizer+param needs ZeRO stage 3, not {self.zero}; use --offload optimizer")
        if self.offload == "optimizer" and self.zero == 0:
            raise ConfigError("--offload optimizer needs ZeRO stage 1, 2 or 3, not 0")

    @property
    def key(self) -> str:
        """A stable id, used to resume and to de-duplicate (the memory levers only when pulled)."""
        key = f"{self.precision}-z{self.zero}-w{self.world_size}-ga{self.grad_accum}-s{self.seq_len}-b{self.batch_size}"
        if self.offload != "none":
            key += f"-off_{self.offload}"
        return key + ("-gc" if self.gradient_checkpointing else "")

    @property
    def offload_optimizer(self) -> bool:
        return self.offload != "none"

    @property
    def offload_param(self) -> bool:
        return self.offload == "optimizer+param"

    def effective_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.world_size

    def with_batch(self, batch_size: int) -> Point:
        """The same setting at another micro-batch (the unit of ``--find_max_batch``)."""
        return replace(self, batch_size=batch_size)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Point:
        """The point stored in ``data`` (extra keys, such as a record's other columns, are ignored)."""
        names = (
            "precision",
            "zero",
            "world_size",
            "grad_accum",
            "seq_len",
            "batch_size",
            "offload",
            "gradient_checkpointing",
        )
        return cls(**{n: data[n] for n in names if n in data})


def offload_within(offload: Offload, zero: int) -> Offload:
    """The part of ``offload`` that ZeRO ``zero`` supports: a base ds_config's offload applies to the stages
    that can offload, and is dropped for the others (stage 0 keeps everything on the device).

    >>> offload_within("optimizer+param", 2), offload_within("optimizer+param", 0)
    ('optimizer', 'none')
    """
    if zero == 0:
        return "none"
    if zero < 3 and offload == "optimizer+param":
        return "optimizer"
    return offload
