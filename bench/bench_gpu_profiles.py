r"""The estimator judged on committed GPU sweeps, beside DeepSpeed's and accelerate's estimators.

    python bench/bench_gpu_profiles.py                                   # the H200 profiles
    python bench/bench_gpu_profiles.py --fit profiles/h200-bert-base-uncased \
        --judge profiles/h200-distilbert-base-uncased

ftprof's constants (runtime bytes, activation factor, ZeRO runtime; the allocator's reserved/allocated factor) are
fitted on the ``--fit`` sweep's points only and judged on every point of the ``--judge`` sweeps (another model
family: never fitted to). For each point: the measured ``max_memory_allocated``, ``max_memory_reserved`` and NVML
peak against ftprof's allocated, reserved and device-used figures, and, against ``max_memory_allocated``, DeepSpeed's
model-state estimators (``estimate_zero2_model_states_mem_needs`` for ZeRO-0/2: one GPU partitions nothing;
``estimate_zero3_model_states_mem_needs`` for ZeRO-3; no offload) and accelerate's ``estimate_training_usage``
(what ``accelerate estimate-memory`` prints for training with Adam). Neither peer counts activations; the table
shows what a user sizing a run from each would have been told.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import replace
from pathlib import Path

from ftprof.estimate.architecture import arch_for
from ftprof.estimate.calibration import SHIPPED_GPU, calibrate, fit_reserved_factor, observations_from_records
from ftprof.estimate.estimator import Arch, Calibration, estimate
from ftprof.records.results import Record, latest, read_records, results_path

ROOT = Path(__file__).resolve().parents[1]
FIT = ROOT / "profiles" / "h200-bert-base-uncased"
JUDGE = [ROOT / "profiles" / "h200-distilbert-base-uncased"]
GIB = 2**30


def ok_records(folder: Path) -> list[Record]:
    return [r for r in latest(read_records(results_path(folder))) if r.status == "ok" and r.peak_bytes]


def fitted_calibration(records: list[Record], archs: dict[str, Arch]) -> Calibration:
    """The constants ``ftprof estimate --calibrate`` fits, from these records alone (nothing saved)."""
    device = records[0].device or "gpu"
    base = Calibration(deepspeed_runtime_bytes=SHIPPED_GPU.deepspeed_runtime_bytes)  # measured apart (plain Trainer)
    factor = fit_reserved_factor(records)
    if factor is not None:
        base = replace(base, reserved_factor=factor, reserved_fitted_on=len(records))
    return calibrate(observations_from_records(records, archs.__getitem__), device, base)


def peers(arch: Arch, zero: int) -> dict[str, int]:
    from accelerate.commands.estimate import estimate_training_usage
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    if zero == 3:
        _, ds, _ = estimate_zero3_model_states_mem_needs(
            arch.params, arch.largest_param, cpu_offload=False, cpu_offload_params=False
        )
    else:
        _, ds = estimate_zero2_model_states_mem_needs(arch.params, cpu_offload=False)
    accelerate = max(estimate_training_usage(arch.params * 4, "bfloat16").values())
    return {"deepspeed": int(ds), "accelerate": int(accelerate)}


def rows(records: list[Record], archs: dict[str, Arch], cal: Calibration) -> list[dict]:
    out = []
    for r in records:
        rank = r.profile.ranks[0]
        est = estimate(archs[r.model], r.point, cal, "gpu")
        measured = {
            "allocated": rank.peak("torch_allocated_bytes"),
            "reserved": rank.peak("torch_reserved_bytes"),
            "nvml": r.peak_bytes,
        }
        predicted = {"allocated": est.allocated, "reserved": est.reserved, "nvml": est.device_used}
        row = {"model": r.model, "key": r.point.key, **{f"m_{k}": v for k, v in measured.items()}}
        for k in measured:
            row[f"p_{k}"] = predicted[k]
            row[f"e_{k}"] = (predicted[k] - measured[k]) / measured[k]
        for name, value in peers(archs[r.model], r.point.zero).items():
            row[f"p_{name}"] = value
            row[f"e_{name}"] = (value - measured["allocated"]) / measured["allocated"]
        out.append(row)
    return out


def summary(label: str, table: list[dict]) -> None:
    print(f"\n{label}: median |error| / worst |error| over {len(table)} points")
    for k in ("allocated", "reserved", "nvml", "deepspeed", "accelerate"):
        errs = [abs(r[f"e_{k}"]) * 100 for r in table]
        against = "max_memory_allocated" if k in ("deepspeed", "accelerate") else k
        print(f"  {k:10} (vs {against}): {statistics.median(errs):5.1f}% / {max(errs):5.1f}%")


def print_table(table: list[dict]) -> None:
    head = (
        "| model | point | allocated GiB (ftprof err) | reserved GiB (err) | NVML GiB (err) | DeepSpeed | accelerate |"
    )
    print(head)
    print("|" + "---|" * 7)
    for r in table:
        cells = [f"{r[f'm_{k}'] / GIB:.2f} ({r[f'e_{k}'] * 100:+.1f}%)" for k in ("allocated", "reserved", "nvml")] + [
            f"{r[f'p_{k}'] / GIB:.2f} ({r[f'e_{k}'] * 100:+.0f}%)" for k in ("deepspeed", "accelerate")
        ]
        print(f"| {r['model']} | {r['key']} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fit", type=Path, default=FIT)
    parser.add_argument("--judge", type=Path, nargs="*", default=JUDGE)
    a = parser.parse_args()
    fit = ok_records(a.fit)
    judged = [r for folder in a.judge for r in ok_records(folder)]
    archs = {r.model: arch_for(r.model, task=r.task) for r in fit + judged}
    cal = fitted_calibration(fit, archs)
    print(
        f"fitted on {len(fit)} points of {a.fit.name} (DeepSpeed's NCCL runtime held at "
        f"{cal.deepspeed_runtime_bytes / GIB:.2f} GiB): runtime {cal.runtime_bytes / GIB:.3f} GiB, activation factor "
        f"{cal.activation_factor:.3f}, ZeRO runtime {cal.zero_runtime_bytes / GIB:.3f} GiB, reserved/allocated "
        f"{cal.reserved_factor:.3f}"
    )
    fitted, held_out, default = rows(fit, archs, cal), rows(judged, archs, cal), rows(judged, archs, Calibration())
    print_table(fitted + held_out)
    summary("fitted points (not a test of anything)", fitted)
    summary("held-out family, fitted constants", held_out)
    summary("held-out family, the uncalibrated constants ftprof had before (0.55 GiB runtime, factor 1.08)", default)


if __name__ == "__main__":
    main()
