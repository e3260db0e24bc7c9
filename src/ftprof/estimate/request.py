"""What ``ftprof estimate`` computes, apart from its flags and its tables: the settings a request names, each
one's itemised prediction, the largest micro-batch per setting and sequence length, and constants fitted to a
sweep's measurements.

:func:`answer` is the estimate command's one call (:class:`Estimates` for settings, :class:`MaxBatchGrid` for
``--grid``); :func:`calibrate_on_sweep` is ``--calibrate``'s. Rendering is :mod:`ftprof.report.estimate_tables`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from pathlib import Path

from ftprof.errors import ConfigError
from ftprof.estimate.adapters import LoraFacts, LoraSpec
from ftprof.estimate.calibration import load_calibration
from ftprof.estimate.estimator import GPUS, Arch, Calibration, Device, Estimate, estimate, max_batch
from ftprof.estimate.optimizers import DEFAULT_TRAINER_OPTIM, TrainerOptimizer
from ftprof.point import Offload, Peft, Point, Precision, Stage, Task, offload_within, stage_point
from ftprof.records.results import Record
from ftprof.units import parse_size


def check_margin(margin: float) -> float:
    """``margin``, if it is a fraction of the budget that can be kept free.

    Raises:
        ConfigError: ``margin`` is below 0, or 1 or more.
    """
    if not 0 <= margin < 1:
        raise ConfigError(f"--margin {margin:g}: must be >= 0 and < 1 (the fraction of the budget kept free)")
    return margin


@dataclass(frozen=True)
class Target:
    """What a prediction is judged against: a device kind and, when known, the memory per rank.

    >>> Target("h100-80gb", budget=100, margin=0.25).usable
    75
    """

    device: str  # "cpu" (this host's RSS), a GPUS key, or "gpu" (a GPU not named)
    budget: int | None = None  # bytes per rank; None: no verdict
    margin: float = 0.05  # fraction of the budget kept free

    def __post_init__(self) -> None:
        check_margin(self.margin)

    @property
    def kind(self) -> Device:
        return "cpu" if self.device == "cpu" else "gpu"

    @property
    def usable(self) -> int | None:
        return None if self.budget is None else int(self.budget * (1 - self.margin))


def target_for(gpu: str | None, cpu: bool, budget: str | None, margin: float) -> Target:
    """The target ``--gpu`` / ``--cpu`` / ``--budget`` / ``--margin`` name: ``--budget`` overrides the card's
    size; ``--cpu`` without it is this host's memory.

    Raises:
        ConfigError: an unknown GPU, a size that isn't one, or a margin outside [0, 1).
    """
    check_margin(margin)
    if gpu and gpu.lower() not in GPUS:
        raise ConfigError(f"--gpu {gpu!r}: unknown GPU; use one of {', '.join(GPUS)}, or --budget SIZE")
    device = "cpu" if cpu else (gpu.lower() if gpu else "gpu")
    size = parse_size(budget) if budget else (GPUS[gpu.lower()] if gpu else None)
    if cpu and size is None:
        import psutil

        size = psutil.virtual_memory().total
    return Target(device, size, margin)


@dataclass(frozen=True)
class EstimateRequest:
    """One ``ftprof estimate``: a model and the settings to predict, as plain values.

    Each lever is a list: the settings are every combination. With several ZeRO stages, or in a grid, an
    offload goes as far as each stage allows (``optimizer+param`` is ``optimizer`` under ZeRO-1/2, nothing
    under ZeRO-0); a single setting must be valid as given.
    """

    model: str
    target: Target
    task: Task = "classification"
    attention: str | None = None  # "eager" / "sdpa"; None: the config's
    batch_size: int = 8
    seq_len: int = 512
    world_size: int = 1
    precisions: tuple[Precision, ...] = ("bf16",)
    zeros: tuple[Stage, ...] = (2,)  # "none": HF Trainer without DeepSpeed, stepping ``optim``
    offloads: tuple[Offload, ...] = ("none",)
    checkpointing: tuple[bool, ...] = (False,)
    grid_seq_lens: tuple[int, ...] = ()  # --grid: the largest micro-batch per these lengths (empty: no grid)
    effective_batch: int | None = None  # --grid: the accumulation that reaches this batch
    peft: tuple[Peft, ...] = ("none",)  # "none": full fine-tuning; "lora": the adapters of ``lora``
    lora: LoraSpec = field(default_factory=LoraSpec)
    optim: str = DEFAULT_TRAINER_OPTIM  # --optim: what the Trainer steps without DeepSpeed
    trace: bool = False  # --trace: the --zero none settings from the traced step (ftprof.estimate.traced)

    @property
    def plain(self) -> bool:
        """Every setting is HF Trainer without DeepSpeed (``--zero none`` alone)."""
        return set(self.zeros) == {"none"}

    def settings(self, seq_len: int | None = None, batch_size: int | None = None) -> list[Point]:
        """Every combination of the levers, in flag order, without repeats.

        >>> t = Target("gpu")
        >>> [p.key for p in EstimateRequest("gpt2", t, zeros=(0, 2), offloads=("optimizer",)).settings()]
        ['bf16-z0-w1-ga1-s512-b8', 'bf16-z2-w1-ga1-s512-b8-off_optimizer']
        >>> [p.key for p in EstimateRequest("gpt2", t, precisions=("fp32",), zeros=("none", 2)).settings()]
        ['fp32-znone-w1-ga1-s512-b8', 'fp32-z2-w1-ga1-s512-b8']
        """
        within = len(self.zeros) > 1 or bool(self.grid_seq_lens)
        points: dict[Point, None] = {}
        for precision, zero, offload, checkpointing in itertools.product(
            self.precisions, self.zeros, self.offloads, self.checkpointing
        ):
            point = stage_point(
                zero,
                precision=precision,
                world_size=self.world_size,
                seq_len=seq_len or self.seq_len,
                batch_size=batch_size or self.batch_size,
                offload=offload_within(offload, 0 if zero == "none" else zero) if within else offload,
                gradient_checkpointing=checkpointing,
            )
            points.setdefault(point)
        return list(points)

    def columns(self, seq_len: int | None = None, batch_size: int | None = None) -> list[tuple[Point, Peft]]:
        """Every setting, with each fine-tuning method (``peft``) side by side.

        >>> t = Target("gpu")
        >>> [(p.zero, m) for p, m in EstimateRequest("gpt2", t, zeros=(0, 2), peft=("none", "lora")).columns()]
        [(0, 'none'), (0, 'lora'), (2, 'none'), (2, 'lora')]
        """
        return [(point, method) for point in self.settings(seq_len, batch_size) for method in self.peft]


@dataclass(frozen=True)
class Estimates:
    """The itemised prediction of each setting of a request (one, unless a lever was given several values)."""

    request: EstimateRequest
    params: int  # the model's parameter count
    calibration: Calibration
    points: list[Point]
    estimates: list[Estimate]
    peft: list[Peft] = field(default_factory=list)  # per point; empty: full fine-tuning throughout
    lora: LoraFacts | None = None  # what the LoRA columns adapt

    @property
    def constants(self) -> list[tuple[str, str, str]]:
        zero = max(p.zero for p in self.points)
        rows = constants_in_use(
            self.calibration, self.request.target.kind, zero, self.request.plain, self.request.world_size
        )
        return _with_traced_rows(rows, self.request, self.points)


@dataclass(frozen=True)
class MaxBatchCell:
    """The largest micro-batch that fits, and with ``effective_batch`` the micro-batch x accumulation that
    reaches it (None: no effective batch asked, or nothing fits)."""

    best: int
    micro: int | None = None
    accum: int | None = None


@dataclass(frozen=True)
class MaxBatchGrid:
    """``--grid``: per sequence length (rows) and setting (columns, at micro-batch 1), the largest batch."""

    request: EstimateRequest
    calibration: Calibration
    settings: list[Point]
    cells: dict[tuple[int, int], MaxBatchCell] = field(default_factory=dict)  # (seq_len, column) -> cell
    peft: list[Peft] = field(default_factory=list)  # per setting; empty: full fine-tuning throughout
    lora: LoraFacts | None = None

    @property
    def constants(self) -> list[tuple[str, str, str]]:
        zero = max(p.zero for p in self.settings)
        rows = constants_in_use(
            self.calibration, self.request.target.kind, zero, self.request.plain, self.request.world_size
        )
        return _with_traced_rows(rows, self.request, self.settings)


def accumulation_for(best: int, effective_batch: int, world_size: int) -> tuple[int, int]:
    """The micro-batch (at most ``best``) and the accumulation steps that reach ``effective_batch`` over
    ``world_size`` ranks: the fewest steps, then the smallest micro-batch that still reaches it.

    >>> accumulation_for(24, 256, 1), accumulation_for(64, 256, 8)
    ((24, 11), (32, 1))
    """
    accum = -(-effective_batch // (best * world_size))
    return -(-effective_batch // (accum * world_size)), accum


def answer(request: EstimateRequest) -> Estimates | MaxBatchGrid:
    """The prediction ``request`` asks for: every setting itemised, or with ``grid_seq_lens`` the largest
    micro-batch of each setting at each length; each with full fine-tuning and/or LoRA, as ``peft`` says.

    Raises:
        ConfigError: an unknown model, an invalid setting, a grid without a memory size, or a LoRA target
            that names no Linear layer of the model.
    """
    from ftprof.estimate.adapters import lora_facts_for
    from ftprof.estimate.architecture import arch_for
    from ftprof.estimate.optimizers import trainer_optimizer

    if request.grid_seq_lens and request.target.budget is None:
        raise ConfigError("--grid needs a memory size: --gpu NAME, --cpu or --budget SIZE")
    if request.trace:
        check_trace_request(request)
    columns = request.columns(batch_size=1) if request.grid_seq_lens else request.columns()
    points, methods = [p for p, _ in columns], [m for _, m in columns]
    arch = arch_for(request.model, request.attention, request.task)
    facts = lora_facts_for(request.model, request.lora, request.task) if "lora" in request.peft else None
    adapters = [facts if m == "lora" else None for m in methods]
    cal = load_calibration(request.target.device)
    kind = request.target.kind
    optim = trainer_optimizer(request.optim) if "none" in request.zeros else None

    def steps(p: Point) -> TrainerOptimizer | None:
        return None if p.deepspeed else optim

    def one(p: Point, a: LoraFacts | None) -> Estimate:
        from ftprof.estimate.traced import traced_estimate, traced_saved_activations

        if request.trace and not p.deepspeed:
            return traced_estimate(
                request.model, request.task, p, request.optim, cal, request.target.device, request.attention
            )
        if request.trace:  # DeepSpeed: the traced forward's saved activations, the formulas for the rest
            saved = traced_saved_activations(request.model, request.task, p, request.attention)
            return estimate(arch, p, cal, kind, lora=a, saved_parts=saved)
        return estimate(arch, p, cal, kind, lora=a, trainer_optim=steps(p))

    if not request.grid_seq_lens:
        ests = [one(p, a) for p, a in zip(points, adapters, strict=True)]
        return Estimates(request, arch.params, cal, points, ests, methods, facts)
    grid = MaxBatchGrid(request, cal, points, peft=methods, lora=facts)
    usable = request.target.usable or 0
    for seq, (column, point) in itertools.product(request.grid_seq_lens, enumerate(points)):
        at = replace(point, seq_len=seq)
        if request.trace:
            best = _traced_grid_cell(request, at, cal, usable, arch)
        else:
            best = max_batch(arch, at, usable, cal, kind, lora=adapters[column], trainer_optim=steps(point))
        if best and request.effective_batch:
            micro, accum = accumulation_for(best, request.effective_batch, request.world_size)
            grid.cells[seq, column] = MaxBatchCell(best, micro, accum)
        else:
            grid.cells[seq, column] = MaxBatchCell(best)
    return grid


def _with_traced_rows(
    rows: list[tuple[str, str, str]], request: EstimateRequest, points: list[Point]
) -> list[tuple[str, str, str]]:
    """The constants table of ``--trace``: the factors no traced setting uses left out, the trace's rows added."""
    if not request.trace:
        return rows
    plain, deepspeed = any(not p.deepspeed for p in points), any(p.deepspeed for p in points)
    if not deepspeed:  # every setting traced and replayed: neither factor is used
        rows = [r for r in rows if r[0] not in ("activation factor", "allocator reserved/allocated factor")]
    return rows + traced_constants(request.target.device, plain, deepspeed)


def _traced_grid_cell(request: EstimateRequest, point: Point, cal: Calibration, usable: int, arch: Arch) -> int:
    """``--grid --trace``: one cell's largest batch (traced and replayed without DeepSpeed; DeepSpeed's stages
    with the traced activations, linear in the batch, in the formulas' place)."""
    from ftprof.estimate.traced import linear_saved_activations, traced_grid_batch

    if not point.deepspeed:
        return traced_grid_batch(
            request.model, request.task, point, request.optim, cal, usable, request.target.device, request.attention
        )
    saved = linear_saved_activations(request.model, request.task, point, request.attention)
    return max_batch(arch, point, usable, cal, request.target.kind, saved_parts=saved)


def check_trace_request(request: EstimateRequest) -> None:
    """Refuse a ``--trace`` request the trace can't answer, before any tracing.

    Raises:
        ConfigError: a CPU target, LoRA, a sequence over the model's positions, or what
            :func:`ftprof.estimate.traced.check_traceable` refuses for a ``--zero none`` setting.
    """
    from ftprof.estimate.traced import check_traceable

    if "lora" in request.peft:
        raise ConfigError("--trace with --peft lora: not traced yet; drop --trace for LoRA's estimate")
    if request.target.kind == "cpu":
        raise ConfigError(
            "--trace predicts a GPU's caching allocator; for this host's memory drop --trace (or measure: ftprof sweep)"
        )
    from ftprof.estimate.traced import check_positions

    for seq in request.grid_seq_lens or (request.seq_len,):
        check_positions(request.model, seq)
    for point, method in request.columns():
        if not point.deepspeed:
            check_traceable(point, request.optim, request.world_size, method == "lora")


def traced_constants(device: str, plain: bool = True, deepspeed: bool = False) -> list[tuple[str, str, str]]:
    """The constants table's rows for traced settings (``plain``: --zero none ones; ``deepspeed``: stages)."""
    from ftprof.estimate.traced import TRACE_STEPS, cublas_workspaces

    rows = []
    if deepspeed:
        rows.append(
            ("DeepSpeed stages: saved activations", "traced", "the real model's forward on fake tensors, GPU kernels")
        )
    if plain:
        ws = cublas_workspaces(device)
        size = f"{(sum(ws.forward) + sum(ws.backward)) / 2**20:.0f} MiB"
        rows += [
            ("--zero none: activations, step", f"traced, {TRACE_STEPS} steps", "the real model's ops on fake tensors"),
            ("--zero none: reserved", "replayed", "ftprof's model of torch's CUDA caching allocator"),
            ("--zero none: BLAS workspaces", size, ws.source + " (the installed torch's; the target's may differ)"),
        ]
    return rows


def constants_in_use(
    cal: Calibration, target: Device, zero: int, plain: bool = False, world_size: int = 1
) -> list[tuple[str, str, str]]:
    """(name, value, where it comes from) of each constant the estimate rests on: fitted on how many measured
    points of this device, or assumed (and what the assumed value is)."""
    gib = 2**30
    fitted = f"fitted on {cal.fitted_on} points of {cal.device}"
    if target == "gpu":
        runtime = "assumed (the CPU interpreter's RSS; no GPU has measured it)"
    else:
        runtime = "assumed (a typical Python + torch RSS; not measured on this host)"
    rows = [
        ("runtime", f"{cal.runtime_bytes / gib:.2f} GiB", fitted if cal.fitted_on else runtime),
        (
            "activation factor",
            f"{cal.activation_factor:.2f}",
            fitted if cal.fitted_on else "assumed (no temporaries beyond the itemised tensors)",
        ),
    ]
    if target == "gpu" and cal.deepspeed_runtime_bytes and not plain:
        rows.append(("DeepSpeed runtime (NCCL)", f"{cal.deepspeed_runtime_bytes / gib:.2f} GiB", f"from {cal.device}"))
    elif target == "gpu" and cal.deepspeed_runtime_bytes and world_size > 1:
        value = f"{cal.deepspeed_runtime_bytes / gib:.2f} GiB"
        rows.append(("DDP's process group (NCCL)", value, f"assumed: DeepSpeed's, from {cal.device}"))
    if zero >= 1:
        zero_runtime = fitted if cal.fitted_on else "assumed (nothing beyond the buckets)"
        rows.append(("ZeRO runtime", f"{cal.zero_runtime_bytes / gib:.2f} GiB", zero_runtime))
    if target == "cpu":  # RSS has no caching allocator in between: the factor is 1 by definition
        return rows
    allocator = (
        f"fitted on {cal.reserved_fitted_on} points of {cal.device}"
        if cal.reserved_fitted_on
        else "assumed (no torch allocator figures measured on this device)"
    )
    rows.append(("allocator reserved/allocated factor", f"{cal.reserved_factor:.2f}", allocator))
    return rows


@dataclass(frozen=True)
class SweepCalibration:
    """``--calibrate``: the constants fitted to a sweep's measured points, and how well they fit them."""

    device: str  # as the sweep's records name it
    calibration: Calibration
    saved_to: Path
    records: list[Record]
    measured: list[int]  # bytes, per record
    predicted: list[int]  # bytes, per record, with the fitted constants
    errors: list[float]  # relative, per record
    allocator: str  # where the allocator factor comes from, in words


def calibrate_on_sweep(profile: Path) -> SweepCalibration:
    """Fit the estimator's constants to the measured points of the sweep at ``profile`` (a folder or its
    results.jsonl) and save them for its device.

    Raises:
        ConfigError: fewer than 3 measured points, or a results file that can't be read.
    """
    from ftprof.estimate.architecture import arch_for
    from ftprof.estimate.calibration import (
        calibrate,
        calibration_path,
        errors,
        fit_reserved_factor,
        observations_from_records,
        reserved_ratios,
    )
    from ftprof.records.results import latest, read_records, results_path

    results = results_path(profile)
    ok = [r for r in latest(read_records(results)) if r.status == "ok" and r.peak_bytes]
    # The constants are fitted on full fine-tuning under DeepSpeed (LoRA and --zero none points are judged only).
    records = [r for r in ok if r.point.peft == "none" and r.point.deepspeed]
    if len(records) < 3:
        skipped = len(ok) - len(records)
        other = f" ({skipped} LoRA or --zero none points are not fitted on)" if skipped else ""
        raise ConfigError(
            f"{results}: {len(records)} measured points of full fine-tuning under DeepSpeed{other}; calibration "
            "needs at least 3"
        )
    device = records[0].device or "unknown"
    memory = records[0].device_memory_bytes
    on_cpu = device.startswith("cpu")
    tasks = {r.model: r.task for r in records}
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
    return SweepCalibration(
        device,
        cal,
        path,
        records,
        [ob.measured for ob in observations],
        [ob.predict(cal) for ob in observations],
        errors(observations, cal),
        allocator,
    )
