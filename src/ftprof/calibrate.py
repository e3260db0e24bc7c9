"""Fit the estimator's overhead constants to measured sweep points (least squares), and judge its error."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, replace

import numpy as np

from ftprof.estimate import Arch, Calibration, Setting, estimate


@dataclass(frozen=True)
class Observation:
    """One measured point: what ran, and its measured device-used peak (NVML or RSS) in bytes."""

    arch: Arch
    setting: Setting
    measured: int


def calibrate(observations: list[Observation], device: str, base: Calibration | None = None) -> Calibration:
    """Fit runtime bytes, the activation factor and ZeRO's runtime bytes so that predicted device-used peaks
    match ``observations`` in the least-squares sense.

    The prediction is linear in the three constants once it is known which moment (forward activations or
    the optimizer step) is the peak, so the fit alternates: decide each point's regime, solve, repeat.
    """
    cal = replace(base or Calibration(), device=device, fitted_on=len(observations))
    for _ in range(4):
        rows, targets = [], []
        for ob in observations:
            # Which moment peaks depends on the current activation factor; the columns use unit factors.
            current = estimate(ob.arch, ob.setting, replace(cal, runtime_bytes=0, zero_runtime_bytes=0.0))
            step_peak = "optimizer step (fp32 grads)" in current.items
            est = estimate(ob.arch, ob.setting, replace(cal, runtime_bytes=0, activation_factor=1.0,
                                                        zero_runtime_bytes=0.0))
            acts = sum(v for k, v in est.items.items() if k.startswith(("activations", "logits")))
            states = sum(v for k, v in est.items.items() if not k.startswith(("activations", "logits", "optimizer step")))
            if step_peak:  # the peak is states + the step's fp32 gradients, whatever the activations
                states = current.allocated
            r = cal.reserved_factor
            rows.append([1.0, 0.0 if step_peak else acts * r, r if ob.setting.zero >= 1 else 0.0])
            targets.append(ob.measured - states * r)
        solution, *_ = np.linalg.lstsq(np.array(rows, dtype=float), np.array(targets, dtype=float), rcond=None)
        runtime, act_factor, zero_runtime = (float(x) for x in solution)
        cal = replace(cal, runtime_bytes=max(0.0, runtime), activation_factor=max(0.1, act_factor),
                      zero_runtime_bytes=max(0.0, zero_runtime))
    return cal


def errors(observations: list[Observation], cal: Calibration) -> list[float]:
    """Signed relative error of each prediction: (predicted − measured) / measured."""
    return [(estimate(ob.arch, ob.setting, cal).device_used - ob.measured) / ob.measured for ob in observations]


def error_summary(errs: list[float]) -> dict[str, float]:
    """Median and worst absolute percentage error.

    >>> error_summary([0.01, -0.03, 0.02])
    {'median_abs_pct': 2.0, 'worst_abs_pct': 3.0}
    """
    absolute = [abs(e) * 100 for e in errs]
    return {"median_abs_pct": round(statistics.median(absolute), 3), "worst_abs_pct": round(max(absolute), 3)}


def observations_from_records(records, arch_of) -> list[Observation]:
    """Measured sweep points (``ok`` with a peak) as observations; ``arch_of(model_name) -> Arch``."""
    out = []
    for r in records:
        if r.status != "ok" or not r.peak_bytes:
            continue
        device = "cpu" if str(r.env.get("device", "")).startswith("cpu") else "gpu"
        p = r.point
        out.append(Observation(arch_of(r.model), Setting(p.batch_size, p.seq_len, p.precision, p.zero, p.world_size,
                                                         device=device), r.peak_bytes))
    return out


def split_holdout(observations: list[Observation]) -> tuple[list[Observation], list[Observation]]:
    """Every other point (in a stable order) to fit, the rest to judge: errors are on unseen points."""
    ordered = sorted(observations, key=lambda o: (o.arch.name, o.setting.zero, o.setting.seq_len, o.setting.batch_size))
    return ordered[::2], ordered[1::2]
