"""The GPU estimate judged on GPU training memory published by others (../shared/data/gpu-truth/), never fitted to.

    python bench/bench_public_gpu.py

Each line of optimum-benchmark.jsonl is HF Trainer without DeepSpeed, fp32, batch 2 x 16 tokens, torch's AdamW
(``adamw_torch``: the foreach path on a GPU) on an MI250 or an A10G. The cases ftprof can express (a sequence
classifier or a causal LM whose architecture it knows offline) are estimated as ``ftprof estimate --zero none
--optim adamw_torch --precision fp32`` with the constants shipped for GPUs (fitted on ftprof's own H200 sweep),
and the error of each figure is printed; the rest are listed with the reason they are not judged. Beside it,
the estimate this case got before ``--zero none`` existed (DeepSpeed ZeRO-0 with its FusedAdam, the old
uncalibrated constants), DeepSpeed's model-state estimator and accelerate's, each against max_memory_allocated.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import replace
from pathlib import Path

from ftprof.errors import FtprofError
from ftprof.estimate.architecture import arch_for
from ftprof.estimate.calibration import SHIPPED_GPU
from ftprof.estimate.estimator import Calibration, estimate
from ftprof.estimate.optimizers import trainer_optimizer
from ftprof.point import Point, Task

ROOT = Path(__file__).resolve().parents[1]
TRUTH = ROOT.parent / "shared" / "data" / "gpu-truth" / "optimum-benchmark.jsonl"
MB = 10**6
TASKS: dict[str, Task] = {"text-classification": "classification", "text-generation": "causal-lm"}


def cases(path: Path = TRUTH) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def expressible(case: dict) -> tuple[Task, str] | str:
    """(task, model name ftprof knows) or why the case is not judged."""
    task = TASKS.get(case["task"].split(" ")[0])
    if task is None:
        return f"task {case['task'].split(' (')[0]}: ftprof trains classification and causal LM only"
    name = case["model"].split("/")[-1]
    try:
        arch_for(name, task=task)
    except FtprofError as err:
        return f"architecture not known offline ({err})"
    return task, name


def judge(case: dict, task: Task, name: str) -> dict:
    arch = arch_for(name, task=task)
    point = Point(precision="fp32", zero=0, seq_len=case["seq_len"], batch_size=case["batch_size"])
    plain = replace(point, deepspeed=False)  # HF Trainer without DeepSpeed, as the published runs were
    now = estimate(arch, plain, SHIPPED_GPU, "gpu", trainer_optim=trainer_optimizer("adamw_torch"))
    before = estimate(arch, point, Calibration(), "gpu")  # as ZeRO-0, with the constants of before
    from accelerate.commands.estimate import estimate_training_usage
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    measured = {
        "allocated": case["max_allocated_MB"],
        "reserved": case["max_reserved_MB"],
        "nvml": case["nvml_used_MB"],
    }
    predicted = {"allocated": now.allocated, "reserved": now.reserved, "nvml": now.device_used}
    row = {"model": name, "gpu": case["gpu"]["name"].split(" (")[0]}
    for k, mb in measured.items():
        row[k] = None if mb is None else (predicted[k] - mb * MB) / (mb * MB)
    row["before_allocated"] = row["deepspeed"] = row["accelerate"] = None
    if measured["allocated"] is not None:  # the A10G lines publish reserved and NVML only
        alloc = measured["allocated"] * MB
        row["before_allocated"] = (before.allocated - alloc) / alloc
        row["deepspeed"] = (estimate_zero2_model_states_mem_needs(arch.params, cpu_offload=False)[1] - alloc) / alloc
        row["accelerate"] = (max(estimate_training_usage(arch.params * 4, "float32").values()) - alloc) / alloc
    return row


def pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:+.1f}%"


def main() -> None:
    rows, skipped = [], []
    for case in cases():
        what = expressible(case)
        if isinstance(what, str):
            skipped.append(f"{case['model']} on {case['gpu']['name'].split(' (')[0]}: {what}")
            continue
        rows.append(judge(case, *what))
    print("| model | GPU | allocated | reserved | NVML used | before (allocated) | DeepSpeed | accelerate |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        cells = [pct(r[k]) for k in ("allocated", "reserved", "nvml", "before_allocated", "deepspeed", "accelerate")]
        print(f"| {r['model']} | {r['gpu']} | " + " | ".join(cells) + " |")
    for k in ("allocated", "reserved", "nvml"):
        errs = [abs(r[k]) * 100 for r in rows if r[k] is not None]
        if errs:
            print(f"{k}: median |error| {statistics.median(errs):.1f}%, worst {max(errs):.1f}% over {len(errs)} cases")
    print("not judged:")
    for line in skipped:
        print(f"  {line}")


if __name__ == "__main__":
    main()
