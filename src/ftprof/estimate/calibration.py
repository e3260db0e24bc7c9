"""Fit the estimator's overhead constants to measured sweep points (least squares), judge its error, and
keep fitted calibrations per device."""

from __future__ import annotations

import logging
import os
import statistics
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ftprof.errors import ConfigError
from ftprof.estimate.estimator import Arch, Calibration, Device, estimate, gpu_key, saved_activations
from ftprof.estimate.optimizers import DEFAULT_TRAINER_OPTIM, TRAINER_OPTIMIZERS
from ftprof.point import Point, Task
from ftprof.records.results import Record

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from ftprof.estimate.adapters import LoraFacts


@dataclass(frozen=True)
class Observation:
    """One measured point: what ran where, and its measured device-used peak (NVML or RSS) in bytes."""

    arch: Arch
    point: Point
    device: Device
    measured: int

    def predict(self, cal: Calibration) -> int:
        return estimate(self.arch, self.point, cal, self.device).device_used


#: A GPU's constants until a sweep of it is calibrated, from one NVIDIA H200 (CUDA 13, torch 2.11, 2026-12-04).
#: ``runtime_bytes`` is what NVML counts beyond the allocator's segments in plain HF Trainer (no DeepSpeed):
#: 0.74 GiB measured (profiles/h200-check/trainer_vs_deepspeed.jsonl: NVML peak − max_memory_reserved; the CUDA
#: context alone is 0.51 GiB, the rest kernel modules and cuBLAS workspaces). ``deepspeed_runtime_bytes`` is what
#: a DeepSpeed run adds to it (its NCCL process group, even on one GPU): 0.86 GiB, the runtime fitted on the 11
#: DeepSpeed points of profiles/h200-bert-base-uncased (1.60 GiB, ``python bench/bench_gpu_profiles.py``) less
#: the plain-Trainer figure. The allocator factor is fitted on the same 11 points. Other GPUs and CUDA versions
#: differ: ``ftprof estimate --calibrate`` on a sweep of yours replaces these.
SHIPPED_GPU = Calibration(
    device="an H200 sweep shipped with ftprof; calibrate on a sweep of your GPU",
    runtime_bytes=794_820_608,  # 0.74 GiB
    activation_factor=1.0,
    zero_runtime_bytes=0.0,
    reserved_factor=1.1298,
    fitted_on=11,
    reserved_fitted_on=11,
    deepspeed_runtime_bytes=1_717_537_861 - 794_820_608,  # 0.86 GiB
)


def calibration_dir() -> Path:
    """Where fitted constants are kept, one file per device (``$FTPROF_HOME``, default ~/.cache/ftprof)."""
    return Path(os.environ.get("FTPROF_HOME", Path.home() / ".cache" / "ftprof")) / "calibrations"


def device_slug(name: str) -> str:
    """A device name as a file name.

    >>> device_slug("NVIDIA H100 80GB HBM3")
    'nvidia-h100-80gb-hbm3'
    """
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def calibration_path(device: str, memory_bytes: int | None = None) -> Path:
    """One file per device, a known GPU under its :data:`~ftprof.estimate.estimator.GPUS` key whatever it was called
    (a name without its size, e.g. "NVIDIA H100 PCIe", is told apart by ``memory_bytes``).

    >>> calibration_path("NVIDIA H100 80GB HBM3") == calibration_path("h100-80gb")
    True
    >>> calibration_path("NVIDIA H100 PCIe", 85_520_809_984) == calibration_path("h100-80gb")
    True
    """
    return calibration_dir() / f"{gpu_key(device, memory_bytes) or device_slug(device)}.json"


def load_calibration(device: str, memory_bytes: int | None = None) -> Calibration:
    """The saved calibration of ``device``, else defaults (CPU defaults count host memory as RSS). A file
    fitted to an older version of the estimator is set aside with a warning."""
    path = calibration_path(device, memory_bytes)
    if path.is_file():
        cal = Calibration.load(path)
        if cal is not None:
            return cal
        logging.getLogger(__name__).warning(
            "%s was fitted to an older estimator: using default constants (run ftprof estimate --calibrate again)",
            path,
        )
    return Calibration(device=device, reserved_factor=1.0) if device.startswith("cpu") else SHIPPED_GPU


def predictor(
    arch: Arch,
    device_name: str,
    cuda: bool,
    memory_bytes: int | None = None,
    lora: Mapping[int, LoraFacts] | None = None,
    optim: str | None = None,
) -> tuple[Callable[[Point], int | None], bool]:
    """The estimator's device-used bytes per rank for points on this device (with its saved calibration),
    and whether that calibration was fitted to measurements of this device. ``lora``: the adapters of each
    LoRA rank a point may have (``point.lora_r``); ``optim``: what HF Trainer steps in ``--zero none`` points
    (None: its default). A point the estimator does not model (e.g. ``--zero none`` in bf16) gets None."""
    cal = load_calibration(device_name if cuda else "cpu", memory_bytes)
    device: Device = "gpu" if cuda else "cpu"
    adapters = lora or {}

    trainer = TRAINER_OPTIMIZERS.get(optim or DEFAULT_TRAINER_OPTIM)

    def predict(p: Point) -> int | None:
        lora = adapters[p.lora_r] if p.peft == "lora" else None
        if not p.deepspeed and trainer is None:
            return None  # an --optim the estimator does not model
        try:
            return estimate(arch, p, cal, device, lora=lora, trainer_optim=None if p.deepspeed else trainer).device_used
        except ConfigError:  # a setting the estimator refuses to answer wrongly: measured, not predicted
            return None

    return predict, cal.fitted_on > 0


def _terms(ob: Observation, cal: Calibration) -> tuple[float, float, float]:
    """The prediction of ``ob`` as ``fixed + factor·saved + zero_runtime·zero`` (allocator factor aside): bytes
    no fitted constant changes, the saved activations the activation factor multiplies (0 where the optimizer
    step is the peak), and whether ZeRO's runtime counts."""
    est = estimate(ob.arch, ob.point, replace(cal, runtime_bytes=0, zero_runtime_bytes=0.0), ob.device)
    saved = est.items["saved_activations"]
    step_peak = ob.device == "gpu" and "optimizer_step" in est.items  # activations are gone by then
    if step_peak:
        return float(est.allocated), 0.0, float(ob.point.zero >= 1)
    return est.allocated - saved * cal.activation_factor, float(saved), float(ob.point.zero >= 1)


def calibrate(observations: list[Observation], device: str, base: Calibration | None = None) -> Calibration:
    """Fit runtime bytes, the activation factor and ZeRO's runtime bytes so that predicted device-used peaks
    match ``observations`` in the least-squares sense.

    The prediction is linear in the three constants once it is known which moment (forward activations or
    the optimizer step) is the peak, so the fit alternates: decide each point's regime, solve, repeat. The
    activation factor stays at 1 or above: saved activations are measured exactly, and the peak holds them.
    """
    cal = replace(base or Calibration(), device=device, fitted_on=len(observations))
    for _ in range(4):
        rows, targets = [], []
        for ob in observations:
            fixed, saved, zero = _terms(ob, cal)
            r = cal.reserved_factor
            rows.append([1.0, saved * r, zero * r])
            targets.append(ob.measured - fixed * r - cal.deepspeed_runtime_bytes)  # sweeps run DeepSpeed
        solution, *_ = np.linalg.lstsq(np.array(rows, dtype=float), np.array(targets, dtype=float), rcond=None)
        runtime, act_factor, zero_runtime = (float(x) for x in solution)
        if act_factor < 1.0:  # pinned at 1: the other two are fitted again with it
            act_factor = 1.0
            pinned = [t - row[1] for t, row in zip(targets, rows, strict=True)]
            two = np.array([[row[0], row[2]] for row in rows], dtype=float)
            (runtime, zero_runtime), *_ = np.linalg.lstsq(two, np.array(pinned, dtype=float), rcond=None)
        cal = replace(
            cal,
            runtime_bytes=max(0.0, runtime),
            activation_factor=max(1.0, act_factor),
            zero_runtime_bytes=max(0.0, zero_runtime),
        )
    return cal


def errors(observations: list[Observation], cal: Calibration) -> list[float]:
    """Signed relative error of each prediction: (predicted − measured) / measured."""
    return [(ob.predict(cal) - ob.measured) / ob.measured for ob in observations]


def error_summary(errs: list[float]) -> dict[str, float]:
    """Median and worst absolute percentage error.

    >>> error_summary([0.01, -0.03, 0.02])
    {'median_abs_pct': 2.0, 'worst_abs_pct': 3.0}
    """
    absolute = [abs(e) * 100 for e in errs]
    return {"median_abs_pct": round(statistics.median(absolute), 3), "worst_abs_pct": round(max(absolute), 3)}


def observations_from_records(records: Iterable[Record], arch_of: Callable[[str], Arch]) -> list[Observation]:
    """Measured sweep points (``ok`` with a peak) as observations; ``arch_of(model_name) -> Arch``. The
    constants are fitted on full fine-tuning: LoRA points are left out (judged, not fitted)."""
    out = []
    for r in records:
        if r.status != "ok" or not r.peak_bytes or r.point.peft != "none":
            continue
        device: Device = "cpu" if (r.device or "").startswith("cpu") else "gpu"
        out.append(Observation(arch=arch_of(r.model), point=r.point, device=device, measured=r.peak_bytes))
    return out


def split_holdout(observations: list[Observation]) -> tuple[list[Observation], list[Observation]]:
    """Every other point (in a stable order) to fit, the rest to judge: errors are on unseen points."""
    ordered = sorted(observations, key=lambda o: (o.arch.name, o.point.zero, o.point.seq_len, o.point.batch_size))
    return ordered[::2], ordered[1::2]


def reserved_ratios(records: Iterable[Record]) -> list[float]:
    """``max_memory_reserved / max_memory_allocated`` of every rank that measured both (CUDA runs; each rank's
    highest of each figure over its phases, as :class:`~ftprof.profiler.ProfilerCallback` records them)."""
    ratios = []
    for r in records:
        for rank in r.profile.ranks if r.profile else []:
            reserved, allocated = rank.peak("torch_reserved_bytes"), rank.peak("torch_allocated_bytes")
            if reserved > 0 and allocated > 0:
                ratios.append(reserved / allocated)
    return ratios


def fit_reserved_factor(records: Iterable[Record]) -> float | None:
    """The caching allocator's overhead measured by a sweep: the median reserved / allocated ratio over the
    records' ranks (:func:`reserved_ratios`); None when no rank has both figures (CPU sweeps)."""
    ratios = reserved_ratios(records)
    return statistics.median(ratios) if ratios else None


def saved_activations_case(
    model: str,
    point: Point,
    attention: str = "sdpa",
    dropout: bool = True,
    task: Task = "classification",
) -> tuple[int, int]:
    """(predicted, measured) bytes saved for backward by one real training forward on this CPU.

    ``model`` is built from its offline config with random weights, ``attention`` implementation, every
    dropout probability zeroed unless ``dropout``, gradient checkpointing as ``point`` says, cast to
    ``point``'s precision as DeepSpeed does; measured by :class:`~ftprof.profiler.breakdown.SavedActivationMeter`.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from ftprof.estimate.architecture import arch_from_config
    from ftprof.train.models import resolve_model_spec

    config = resolve_model_spec(model, random_init=True).config
    if not dropout:
        zero_dropout(config)
    config._attn_implementation = attention
    config.num_labels = 2
    if config.pad_token_id is None:  # decoders' classification heads find each row's last token by it
        config.pad_token_id = config.eos_token_id
    arch = arch_from_config(model, config, attention=attention, task=task)
    torch.manual_seed(0)
    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    net = auto.from_config(config).train()
    if point.precision != "fp32":
        net = net.to(torch.bfloat16 if point.precision == "bf16" else torch.float16)
    predicted = sum(saved_activations(arch, point, "cpu").values())
    return predicted, measure_saved_bytes(net, int(config.vocab_size), point, task)


def zero_dropout(config: PretrainedConfig) -> None:
    """Set every dropout probability of ``config`` to 0 (``*dropout*`` and GPT-2's ``*pdrop`` fields)."""
    for name, value in vars(config).items():
        if ("dropout" in name or "pdrop" in name) and isinstance(value, float):
            setattr(config, name, 0.0)


def measure_saved_bytes(net: Any, vocab_size: int, point: Point, task: Task) -> int:
    """Bytes ``net`` saves for backward in one training forward of ``point``'s random batch (gradient
    checkpointing, non-reentrant, as ``point`` says), measured by
    :class:`~ftprof.profiler.breakdown.SavedActivationMeter`."""
    import torch

    from ftprof.profiler.breakdown import SavedActivationMeter

    if point.gradient_checkpointing:
        net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(3, vocab_size, (point.batch_size, point.seq_len))
    labels = ids if task == "causal-lm" else torch.randint(0, 2, (point.batch_size,))
    meter = SavedActivationMeter()
    meter.attach(net)
    net(input_ids=ids, labels=labels).loss.backward()
    assert meter.saved_bytes is not None
    return meter.saved_bytes
