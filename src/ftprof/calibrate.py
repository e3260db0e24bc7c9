"""Fit the estimator's overhead constants to measured sweep points (least squares), judge its error, and
keep fitted calibrations per device."""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ftprof.estimate import Arch, Calibration, Device, estimate, gpu_key
from ftprof.point import Point
from ftprof.results import Record


@dataclass(frozen=True)
class Observation:
    """One measured point: what ran where, and its measured device-used peak (NVML or RSS) in bytes."""

    arch: Arch
    point: Point
    device: Device
    measured: int

    def predict(self, cal: Calibration) -> int:
        return estimate(self.arch, self.point, cal, self.device).device_used


def calibration_dir() -> Path:
    """Where fitted constants are kept, one file per device (``$FTPROF_HOME``, default ~/.cache/ftprof)."""
    return Path(os.environ.get("FTPROF_HOME", Path.home() / ".cache" / "ftprof")) / "calibrations"


def device_slug(name: str) -> str:
    """A device name as a file name.

    >>> device_slug("NVIDIA H100 80GB HBM3")
    'nvidia-h100-80gb-hbm3'
    """
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def calibration_path(device: str) -> Path:
    """One file per device, a known GPU under its :data:`~ftprof.estimate.GPUS` key whatever it was called.

    >>> calibration_path("NVIDIA H100 80GB HBM3") == calibration_path("h100-80gb")
    True
    """
    return calibration_dir() / f"{gpu_key(device) or device_slug(device)}.json"


def load_calibration(device: str) -> Calibration:
    """The saved calibration of ``device``, else defaults (CPU defaults count host memory as RSS)."""
    path = calibration_path(device)
    if path.is_file():
        return Calibration.load(path)
    return Calibration(device=device, reserved_factor=1.0) if device.startswith("cpu") else Calibration(device=device)


def predictor(arch: Arch, device_name: str, cuda: bool) -> tuple[Callable[[Point], int], bool]:
    """The estimator's device-used bytes per rank for points on this device (with its saved calibration),
    and whether that calibration was fitted to measurements of this device."""
    cal = load_calibration(device_name if cuda else "cpu")
    device: Device = "gpu" if cuda else "cpu"
    return (lambda p: estimate(arch, p, cal, device).device_used), cal.fitted_on > 0


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
            current = estimate(ob.arch, ob.point, replace(cal, runtime_bytes=0, zero_runtime_bytes=0.0), ob.device)
            step_peak = "optimizer step (fp32 grads)" in current.items
            est = estimate(
                ob.arch,
                ob.point,
                replace(cal, runtime_bytes=0, activation_factor=1.0, zero_runtime_bytes=0.0),
                ob.device,
            )
            acts = sum(v for k, v in est.items.items() if k.startswith(("activations", "logits")))
            states = sum(
                v for k, v in est.items.items() if not k.startswith(("activations", "logits", "optimizer step"))
            )
            if step_peak:  # the peak is states + the step's fp32 gradients, whatever the activations
                states = current.allocated
            r = cal.reserved_factor
            rows.append([1.0, 0.0 if step_peak else acts * r, r if ob.point.zero >= 1 else 0.0])
            targets.append(ob.measured - states * r)
        solution, *_ = np.linalg.lstsq(np.array(rows, dtype=float), np.array(targets, dtype=float), rcond=None)
        runtime, act_factor, zero_runtime = (float(x) for x in solution)
        cal = replace(
            cal,
            runtime_bytes=max(0.0, runtime),
            activation_factor=max(0.1, act_factor),
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
    """Measured sweep points (``ok`` with a peak) as observations; ``arch_of(model_name) -> Arch``."""
    out = []
    for r in records:
        if r.status != "ok" or not r.peak_bytes:
            continue
        device: Device = "cpu" if str(r.env.get("device", "")).startswith("cpu") else "gpu"
        out.append(Observation(arch=arch_of(r.model), point=r.point, device=device, measured=r.peak_bytes))
    return out


def split_holdout(observations: list[Observation]) -> tuple[list[Observation], list[Observation]]:
    """Every other point (in a stable order) to fit, the rest to judge: errors are on unseen points."""
    ordered = sorted(observations, key=lambda o: (o.arch.name, o.point.zero, o.point.seq_len, o.point.batch_size))
    return ordered[::2], ordered[1::2]
