"""A sweep point: one setting of every axis ftprof measures and predicts, the names of those axes, and the
parsers of their flags' values (``--precision``, ``--zero``, ``--offload``, ...), shared by every command.

:class:`Point` is the one type for "what was trained": the sweep plans and runs points, results store them,
the estimator predicts them and recommendations turn them into commands. Build it by keyword.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Literal, cast, get_args

from ftprof.errors import ConfigError

Precision = Literal["fp32", "fp16", "bf16"]
Offload = Literal["none", "optimizer", "optimizer+param"]  # what ZeRO moves to host memory
Task = Literal["classification", "causal-lm"]  # what the model learns: a sequence classifier, or a causal LM
PRECISIONS: tuple[Precision, ...] = get_args(Precision)
OFFLOADS: tuple[Offload, ...] = get_args(Offload)
TASKS: tuple[Task, ...] = get_args(Task)
Peft = Literal["none", "lora"]  # how the weights train: all of them, or frozen under LoRA adapters (peft)
PEFT_METHODS: tuple[Peft, ...] = get_args(Peft)
ZERO_STAGES = (0, 1, 2, 3)
Stage = int | Literal["none"]  # a ZeRO stage, or "none": HF Trainer without DeepSpeed (``--zero none``)


@dataclass(frozen=True, order=True, kw_only=True)
class Point:
    """One configuration to measure or predict, per rank. Field order is the run order: small before large.

    >>> Point(precision="bf16", zero=2, seq_len=128, batch_size=8).key
    'bf16-z2-w1-ga1-s128-b8'
    >>> Point(precision="bf16", zero=3, seq_len=128, batch_size=8, offload="optimizer+param").key
    'bf16-z3-w1-ga1-s128-b8-off_optimizer+param'
    >>> Point(precision="bf16", zero=2, seq_len=128, batch_size=8, peft="lora", lora_r=16).key
    'bf16-z2-w1-ga1-s128-b8-lora_r16'
    >>> Point(precision="fp32", zero=0, deepspeed=False, seq_len=128, batch_size=8).key
    'fp32-znone-w1-ga1-s128-b8'
    """

    precision: Precision
    zero: int  # 0 without DeepSpeed: nothing is partitioned
    deepspeed: bool = True  # False: HF Trainer without DeepSpeed (``--zero none``), its ``--optim`` stepping
    world_size: int = 1
    grad_accum: int = 1
    seq_len: int
    batch_size: int
    offload: Offload = "none"
    gradient_checkpointing: bool = False
    peft: Peft = "none"  # "lora": the weights frozen under LoRA adapters of rank ``lora_r`` (peft)
    lora_r: int = 0  # 0 without adapters

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
        if self.peft not in PEFT_METHODS:
            raise ConfigError(f"--peft {self.peft!r}: use none or lora")
        if isinstance(self.lora_r, bool) or not isinstance(self.lora_r, int) or self.lora_r < 0:
            raise ConfigError(f"--lora_r must be a positive integer, got {self.lora_r!r}")
        if not self.deepspeed and (self.zero != 0 or self.offload != "none"):
            raise ConfigError("--zero none (no DeepSpeed) partitions and offloads nothing; use --offload none")
        if (self.peft == "lora") != (self.lora_r > 0):
            raise ConfigError(f"--peft {self.peft} with --lora_r {self.lora_r}: LoRA takes a rank, full fine-tuning 0")

    @property
    def key(self) -> str:
        """A stable id, used to resume and to de-duplicate (the memory levers only when pulled)."""
        key = (
            f"{self.precision}-z{self.stage}-w{self.world_size}-ga{self.grad_accum}-s{self.seq_len}-b{self.batch_size}"
        )
        if self.offload != "none":
            key += f"-off_{self.offload}"
        key += "-gc" if self.gradient_checkpointing else ""
        return key + (f"-lora_r{self.lora_r}" if self.peft == "lora" else "")

    @property
    def stage(self) -> Stage:
        """The ``--zero`` value that trains this point: its ZeRO stage, or ``"none"`` without DeepSpeed."""
        return self.zero if self.deepspeed else "none"

    @property
    def engine(self) -> str:
        """What trains this point, in words: ``ZeRO-N``, or ``no DeepSpeed`` (HF Trainer alone)."""
        return f"ZeRO-{self.zero}" if self.deepspeed else "no DeepSpeed"

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
            "deepspeed",
            "world_size",
            "grad_accum",
            "seq_len",
            "batch_size",
            "offload",
            "gradient_checkpointing",
            "peft",
            "lora_r",
        )
        return cls(**{n: data[n] for n in names if n in data})


@dataclass(frozen=True)
class LoraOptions:
    """The LoRA settings a sweep holds fixed (the rank, ``lora_r``, is a point's axis), as ``ftprof train``'s
    flags name them; the defaults are train's."""

    alpha: int = 16  # --lora_alpha: the update is scaled by alpha / r (no memory effect)
    dropout: float = 0.05  # --lora_dropout on each adapted layer's input (its mask is saved)
    target_modules: str | None = None  # --lora_target_modules; None: the family's attention projections

    def __post_init__(self) -> None:
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int) or self.alpha <= 0:
            raise ConfigError(f"--lora_alpha must be a positive integer, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"--lora_dropout {self.dropout!r}: must be >= 0 and < 1")

    def train_flags(self) -> list[str]:
        """The ``ftprof train`` flags that set these, after ``--peft lora --lora_r N``.

        >>> LoraOptions(target_modules="attention,mlp").train_flags()
        ['--lora_alpha', '16', '--lora_dropout', '0.05', '--lora_target_modules', 'attention,mlp']
        """
        flags = ["--lora_alpha", str(self.alpha), "--lora_dropout", str(self.dropout)]
        return flags + (["--lora_target_modules", self.target_modules] if self.target_modules else [])


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


# The flags' values, parsed the same way in every command (lists where a grid is meant).


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


def parse_precisions(text: str) -> list[Precision]:
    values: list[Precision] = []
    for p in (p.strip().lower() for p in text.split(",") if p.strip()):
        if p not in PRECISIONS:
            raise ConfigError(f"--precision {text!r}: unknown precision {p!r}; use fp32, fp16 or bf16")
        values.append(cast(Precision, p))  # checked against PRECISIONS just above
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


def parse_stages(text: str) -> list[Stage]:
    """``--zero`` where ``none`` (HF Trainer without DeepSpeed) may be listed beside the stages.

    >>> parse_stages("2,none,0"), parse_stages("none")
    (['none', 0, 2], ['none'])
    """
    parts = [part.strip().lower() for part in text.split(",")]
    stages = [part for part in parts if part != "none"]
    try:
        numbered: list[Stage] = list(parse_zero(",".join(stages))) if stages else []
    except ConfigError:
        raise ConfigError(f"--zero {text!r}: use none (no DeepSpeed) or ZeRO stages 0, 1, 2, 3") from None
    plain: list[Stage] = ["none"] if "none" in parts else []
    return plain + numbered


def stage_point(stage: Stage, **fields: Any) -> Point:
    """The point of ``--zero`` value ``stage``: a ZeRO stage, or ``"none"`` (no DeepSpeed, shaped as ZeRO-0).

    >>> stage_point("none", precision="fp32", seq_len=64, batch_size=4).key
    'fp32-znone-w1-ga1-s64-b4'
    """
    return Point(zero=0, deepspeed=False, **fields) if stage == "none" else Point(zero=stage, **fields)


def parse_offloads(text: str) -> list[Offload]:
    """``"none,optimizer"`` → ``["none", "optimizer"]``; only what DeepSpeed can offload.

    >>> parse_offloads("optimizer+param, none")
    ['none', 'optimizer+param']
    """
    values: list[Offload] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if part not in OFFLOADS:
            raise ConfigError(f"--offload {text!r}: unknown offload {part!r}; use none, optimizer or optimizer+param")
        values.append(cast(Offload, part))
    return sorted(set(values), key=OFFLOADS.index)


def parse_switch(text: str, flag: str) -> list[bool]:
    """``"off,on"`` → ``[False, True]``.

    >>> parse_switch("on", "--gradient_checkpointing"), parse_switch("off, on", "--gradient_checkpointing")
    ([True], [False, True])
    """
    words = {"off": False, "false": False, "no": False, "on": True, "true": True, "yes": True}
    values = []
    for part in (p.strip().lower() for p in text.split(",") if p.strip()):
        if part not in words:
            raise ConfigError(f"{flag} {text!r}: {part!r} is not on or off; use e.g. {flag} off,on")
        values.append(words[part])
    return sorted(set(values))


def parse_task(text: str) -> Task:
    """``"causal-lm"`` → ``"causal-lm"``; only the tasks ftprof trains.

    >>> parse_task("causal-lm")
    'causal-lm'
    """
    if text not in TASKS:
        raise ConfigError(f"--task {text!r}: unknown task; use {' or '.join(TASKS)}")
    return cast(Task, text)


def parse_peft(text: str) -> list[Peft]:
    """``--peft``: a comma list of fine-tuning methods, ``none`` (full) and ``lora``.

    >>> parse_peft("none,lora"), parse_peft("lora")
    (['none', 'lora'], ['lora'])
    """
    methods = [m.strip().lower() for m in text.split(",") if m.strip()]
    if not methods or any(m not in PEFT_METHODS for m in methods):
        raise ConfigError(f"--peft {text!r}: use none, lora, or none,lora (side by side)")
    return [cast(Peft, m) for m in dict.fromkeys(methods)]  # checked against PEFT_METHODS just above
