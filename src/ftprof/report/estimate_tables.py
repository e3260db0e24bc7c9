"""``ftprof estimate``'s tables: one setting itemised with its verdict, several settings side by side, the
largest micro-batch per length and setting (``--grid``), and a calibration's per-point errors.

Each function returns renderables; the CLI owns the console. The figures come from
:mod:`ftprof.estimate.request`.
"""

from __future__ import annotations

from rich.console import RenderableType
from rich.table import Table
from rich.text import Text

from ftprof.estimate.estimator import ITEM_LABELS, Estimate
from ftprof.estimate.request import EstimateRequest, Estimates, MaxBatchCell, MaxBatchGrid, SweepCalibration
from ftprof.point import Point
from ftprof.units import GIB


def percent(fraction: float) -> str:
    """
    >>> percent(0.05), percent(0.125), percent(0)
    ('5%', '12.5%', '0%')
    """
    return f"{100 * fraction:.3g}%"


def verdict(used: int, budget: int, margin: float) -> tuple[bool, str]:
    """Whether ``used`` bytes fit ``budget`` with ``margin`` (a fraction of it) kept free, said in GiB."""
    usable = budget * (1 - margin)
    if used <= usable:
        return True, f"fits (predicted {used / GIB:.1f} GiB of {budget / GIB:.1f} GiB, {percent(margin)} margin kept)"
    return False, (
        f"does NOT fit (predicted {used / GIB:.1f} GiB of {budget / GIB:.1f} GiB; "
        f"with {percent(margin)} kept free, {usable / GIB:.1f} GiB is usable)"
    )


def setting_label(point: Point, varying: set[str], peft: str = "none") -> str:
    """A column's name: its ZeRO stage, and the other levers that differ between the columns (``peft``: the
    fine-tuning method, named when ``"peft"`` varies).

    >>> setting_label(Point(precision="bf16", zero=3, seq_len=8, batch_size=1, offload="optimizer"), {"offload"})
    'ZeRO-3 offload optimizer'
    >>> setting_label(Point(precision="bf16", zero=2, seq_len=8, batch_size=1), {"peft"}, "lora")
    'ZeRO-2 LoRA'
    """
    parts: list[str] = [point.precision] if "precision" in varying else []
    parts.append(point.engine)
    if "offload" in varying:
        parts.append("no offload" if point.offload == "none" else f"offload {point.offload}")
    if "gradient_checkpointing" in varying:
        parts.append("checkpointing" if point.gradient_checkpointing else "no checkpointing")
    if "peft" in varying:
        parts.append("LoRA" if peft == "lora" else "full")
    return " ".join(parts)


def _methods(result: Estimates | MaxBatchGrid) -> list[str]:
    """Each column's fine-tuning method ("none" where the result names none)."""
    count = len(result.points) if isinstance(result, Estimates) else len(result.settings)
    return list(result.peft) or ["none"] * count


def lora_line(result: Estimates | MaxBatchGrid) -> str | None:
    """What the LoRA columns adapt and train, in one line; None without any.

    Counts as peft builds the model: the adapters, and a classifier's head (a trainable copy; the original
    stays among the frozen weights).
    """
    facts = result.lora
    if facts is None:
        return None
    spec, total = facts.spec, facts.params
    targets = ",".join(sorted({layer.name.rsplit(".", 1)[-1] for layer in facts.layers}))
    head = f" + {facts.head_params:,} in the classifier head" if facts.head_params else ""
    return (
        f"LoRA r={spec.r}, alpha={spec.alpha}, dropout={spec.dropout:g} on {len(facts.layers)} layers ({targets}): "
        f"{facts.trainable_params:,} trainable ({facts.adapter_params:,} in adapters{head}; "
        f"{percent(facts.trainable_params / total)} of {total:,}), {facts.frozen_params:,} frozen"
    )


def varying_levers(points: list[Point]) -> set[str]:
    """The levers whose value differs between ``points``."""
    return {
        lever
        for lever in ("precision", "offload", "gradient_checkpointing")
        if len({getattr(p, lever) for p in points}) > 1
    }


def _common(points: list[Point]) -> str:
    """The levers all ``points`` share, for a title: precision, and offload or checkpointing when pulled."""
    first, varying = points[0], varying_levers(points)
    parts: list[str] = [] if "precision" in varying else [first.precision]
    if len({p.stage for p in points}) == 1:
        parts.append(first.engine)
    if "offload" not in varying and first.offload != "none":
        parts.append(f"offload {first.offload}")
    if "gradient_checkpointing" not in varying and first.gradient_checkpointing:
        parts.append("gradient checkpointing")
    return ", ".join(parts)


def _plain(common: str, req: EstimateRequest) -> str:
    """``common`` with the optimizer HF Trainer steps where it names no DeepSpeed (``--zero none``)."""
    return common.replace("no DeepSpeed", f"no DeepSpeed, --optim {req.optim}")


def _source(result: Estimates | MaxBatchGrid) -> str:
    cal = result.calibration
    return f"calibrated on {cal.fitted_on} points" if cal.fitted_on else "default constants (uncalibrated)"


def _constant_lines(constants: list[tuple[str, str, str]]) -> list[str]:
    return [f"[dim]{name} {figure} — {source}[/]" for name, figure, source in constants]


def breakdown_table(
    est: Estimate,
    budget: int | None,
    title: str,
    margin: float = 0.05,
    constants: list[tuple[str, str, str]] | None = None,
) -> Table:
    """One setting itemised: the items, the three peaks, the constants in use and the verdict."""
    table = Table(title=title, header_style="bold")
    table.add_column("item")
    table.add_column("GiB, fullest rank", justify="right")
    for name, value in est.items.items():
        label = est.label(name)
        if name == "parameters" and "frozen_parameters" in est.items:
            label = "trainable parameters (LoRA)"
        if value or name != "zero_runtime":
            table.add_row(label, f"{value / GIB:.3f}")
        if name == "saved_activations":
            for part, nbytes in est.activation_parts.items():
                table.add_row(f"[dim]  {part}[/]", f"[dim]{nbytes / GIB:.3f}[/]")
    for name, value in est.host_items.items():
        table.add_row(f"{est.label(name)} (host memory, offloaded)", f"[dim]{value / GIB:.3f}[/]")
    table.add_row("[bold]tensor peak (max_memory_allocated)[/]", f"[bold]{est.allocated / GIB:.3f}[/]")
    table.add_row("[bold]allocator peak (max_memory_reserved)[/]", f"[bold]{est.reserved / GIB:.3f}[/]")
    table.add_row("[bold]device used (NVML / RSS)[/]", f"[bold]{est.device_used / GIB:.3f}[/]")
    if constants:
        table.add_section()
        for line in _constant_lines(constants):
            table.add_row(line, "")
    if budget:
        table.add_section()
        fits, text = verdict(est.device_used, budget, margin)
        style = "green" if fits else "bold red"
        table.add_row(f"[{style}]{text}[/]", f"headroom {(budget - est.device_used) / GIB:+.3f}")
    return table


def comparison_table(result: Estimates, title: str) -> Table:
    """Several settings itemised side by side, a column each, with each one's verdict."""
    points, ests, methods = result.points, result.estimates, _methods(result)
    varying = varying_levers(points) | ({"peft"} if len(set(methods)) > 1 else set())
    table = Table(title=title, header_style="bold")
    table.add_column("GiB, fullest rank")
    for point, method in zip(points, methods, strict=True):
        table.add_column(_plain(setting_label(point, varying, method), result.request), justify="right")

    def row(label: str, values: list[int] | list[int | None], style: str = "") -> None:
        cells = ["-" if v is None else f"{v / GIB:.3f}" for v in values]
        table.add_row(f"[{style}]{label}[/]" if style else label, *(f"[{style}]{c}[/]" if style else c for c in cells))

    for name in ITEM_LABELS:
        label = " / ".join(dict.fromkeys(e.label(name) for e in ests))
        if name == "parameters" and "lora" in methods:
            label = "trainable parameters (LoRA)"
        values = [e.items.get(name, 0) for e in ests]
        if any(values) or any(name in e.items and name != "zero_runtime" for e in ests):
            row(label, values)
        if name == "saved_activations":
            for part in dict.fromkeys(p for e in ests for p in e.activation_parts):
                # "-": a traced setting (--trace) has no formula parts
                row(
                    f"  {part}",
                    [e.activation_parts.get(part, None if not e.activation_parts else 0) for e in ests],
                    "dim",
                )
    for name in dict.fromkeys(n for e in ests for n in e.host_items):
        row(f"{ITEM_LABELS[name]} (host memory, offloaded)", [e.host_items.get(name, 0) for e in ests], "dim")
    row("tensor peak (max_memory_allocated)", [e.allocated for e in ests], "bold")
    row("allocator peak (max_memory_reserved)", [e.reserved for e in ests], "bold")
    row("device used (NVML / RSS)", [e.device_used for e in ests], "bold")
    target = result.request.target
    if target.budget:
        table.add_section()
        usable = target.usable or 0
        table.add_row(
            f"fits {target.budget / GIB:.1f} GiB with {percent(target.margin)} kept free ({usable / GIB:.1f} GiB)?",
            *("[green]fits[/]" if e.device_used <= usable else "[bold red]does NOT fit[/]" for e in ests),
        )
        table.add_row("headroom", *(f"{(target.budget - e.device_used) / GIB:+.3f}" for e in ests))
    return table


def estimates_renderables(result: Estimates) -> list[RenderableType]:
    """What ``ftprof estimate`` prints for settings: one itemised table (columns for several settings)."""
    req, points = result.request, result.points
    head = f"{req.model}: {result.params / 1e6:.1f}M params, batch {req.batch_size} x seq {req.seq_len}"
    lora = [Text(line)] if (line := lora_line(result)) else []
    if len(points) == 1:
        p = points[0]
        method = ", LoRA" if _methods(result)[0] == "lora" else ""
        title = f"{head}, {p.precision}, {_plain(p.engine, req)}{method}, {p.world_size} rank(s) — {_source(result)}"
        budget, margin = req.target.budget, req.target.margin
        return [breakdown_table(result.estimates[0], budget, title, margin, result.constants), *lora]
    common = _plain(_common(points), req)
    title = f"{head}, {common + ', ' if common else ''}{req.world_size} rank(s) — {_source(result)}"
    constants = (Text.from_markup(line) for line in _constant_lines(result.constants))
    return [comparison_table(result, title), *lora, *constants]


def _cell(cell: MaxBatchCell) -> str:
    if cell.micro is not None:
        return f"{cell.micro} x{cell.accum} accum (max {cell.best})"
    return str(cell.best) if cell.best else "[red]none[/]"


def grid_renderables(grid: MaxBatchGrid) -> list[RenderableType]:
    """``--grid``: the largest micro-batch per rank, a row per sequence length and a column per setting."""
    req, target = grid.request, grid.request.target
    budget, usable = target.budget or 0, target.usable or 0
    common = _plain(_common(grid.settings), req)
    table = Table(
        title=f"Largest micro-batch per rank that fits {budget / GIB:.1f} GiB with a {percent(target.margin)} margin "
        f"kept free ({usable / GIB:.1f} GiB) — {req.model}, {common + ', ' if common else ''}"
        f"{req.world_size} rank(s), {_source(grid)}",
        header_style="bold",
    )
    table.add_column("seq")
    methods = _methods(grid)
    varying = varying_levers(grid.settings) | ({"peft"} if len(set(methods)) > 1 else set())
    for point, method in zip(grid.settings, methods, strict=True):
        table.add_column(_plain(setting_label(point, varying, method), req), justify="right")
    for seq in req.grid_seq_lens:
        table.add_row(str(seq), *(_cell(grid.cells[seq, column]) for column in range(len(grid.settings))))
    lora = [Text(line)] if (line := lora_line(grid)) else []
    return [table, *lora, *(Text.from_markup(line) for line in _constant_lines(grid.constants))]


def calibration_renderables(result: SweepCalibration) -> list[RenderableType]:
    """``--calibrate``: measured against predicted per point, then the fitted constants and where they went."""
    from ftprof.estimate.calibration import error_summary

    table = Table(title=f"Calibration on {result.device}: {len(result.records)} points", header_style="bold")
    for col in ("point", "measured GiB", "predicted GiB", "error %"):
        table.add_column(col, justify="right" if col != "point" else "left")
    for r, measured, predicted, err in zip(
        result.records, result.measured, result.predicted, result.errors, strict=True
    ):
        table.add_row(
            f"{r.model} {r.point.key}", f"{measured / GIB:.3f}", f"{predicted / GIB:.3f}", f"{100 * err:+.1f}"
        )
    cal, summary = result.calibration, error_summary(result.errors)
    line = (
        f"runtime {cal.runtime_bytes / GIB:.3f} GiB, activation factor {cal.activation_factor:.3f}, "
        f"ZeRO runtime {cal.zero_runtime_bytes / GIB:.3f} GiB, allocator reserved/allocated factor "
        f"{cal.reserved_factor:.3f} ({result.allocator}); median |error| {summary['median_abs_pct']:.1f}%, worst "
        f"{summary['worst_abs_pct']:.1f}% (on the fitted points) — saved to {result.saved_to}"
    )
    return [table, line]
