"""The GPU estimate judged on GPU training memory published by others (../shared/data/gpu-truth/), never fitted to.

    python bench/bench_public_gpu.py

Each line of optimum-benchmark.jsonl is HF Trainer without DeepSpeed, fp32, batch 2 x 16 tokens, torch's AdamW
(``adamw_torch``: the foreach path on a GPU) on an MI250 or an A10G. The cases ftprof can express (a sequence
classifier or a causal LM whose architecture it knows offline) are estimated as ``ftprof estimate --zero none
--optim adamw_torch --precision fp32`` with the constants shipped for GPUs (fitted on ftprof's own H200 sweep),
and the error of each figure is printed; the rest are listed with the reason they are not judged. Beside it,
the estimate this case got before ``--zero none`` existed (DeepSpeed ZeRO-0 with its FusedAdam, the old
uncalibrated constants), DeepSpeed's model-state estimator and accelerate's, each against max_memory_allocated.

The traced estimate (``--trace``: the real model's step on fake tensors, replayed through the allocator model;
no fitted constant but the runtime outside the allocator) is judged on the same cases, with the BLAS workspaces
of the torch each case names (one row per distinct set where its version is ambiguous), and on the one plain
Trainer point of ftprof's own H200 run (bert-base, bf16 autocast, fused AdamW, batch 32 x 128:
profiles/h200-check/trainer_vs_deepspeed.jsonl), which nothing was fitted to but the runtime: its NVML figure
is not an independent check (the shipped runtime is that point's NVML minus reserved).
"""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import replace
from pathlib import Path

from ftprof.errors import FtprofError
from ftprof.estimate.architecture import arch_for
from ftprof.estimate.calibration import SHIPPED_GPU
from ftprof.estimate.estimator import Calibration, estimate
from ftprof.estimate.optimizers import trainer_optimizer
from ftprof.estimate.traced import cublas_workspaces, traced_estimate
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


def judge_traced(case: dict, task: Task, name: str) -> list[dict]:
    """The traced estimate's errors, one row per distinct set of workspaces the case's torch versions imply."""
    point = Point(precision="fp32", zero=0, seq_len=case["seq_len"], batch_size=case["batch_size"], deepspeed=False)
    gpu = "a10g-24gb" if "A10G" in case["gpu"]["name"] else "gpu"
    versions = re.findall(r"\d+\.\d+\.[\dx]+\+\w+(?:\.\d+)?", case.get("torch_version") or "") or [None]
    rows, seen = [], set()
    for version in versions:
        ws = cublas_workspaces(gpu, version)
        if (ws.forward, ws.backward) in seen:
            continue
        seen.add((ws.forward, ws.backward))
        est = traced_estimate(name, task, point, "adamw_torch", SHIPPED_GPU, gpu, workspaces=ws)
        measured = {
            "allocated": case["max_allocated_MB"],
            "reserved": case["max_reserved_MB"],
            "nvml": case["nvml_used_MB"],
        }
        predicted = {"allocated": est.allocated, "reserved": est.reserved, "nvml": est.device_used}
        row = {"model": name, "gpu": case["gpu"]["name"].split(" (")[0], "torch": version or "?"}
        for k, mb in measured.items():
            row[k] = None if mb is None else (predicted[k] - mb * MB) / (mb * MB)
        row["workspaces"] = f"{(sum(ws.forward) + sum(ws.backward)) / 2**20:.1f} MiB"
        rows.append(row)
    return rows


def judge_own_h200(padded: bool = True) -> dict:
    """The traced estimate of ftprof's own plain-Trainer H200 point (bf16 autocast), against its measurement;
    ``padded=False`` traces full-length rows, as that run's were."""
    path = ROOT / "profiles" / "h200-check" / "trainer_vs_deepspeed.jsonl"
    plain = next(json.loads(line) for line in path.read_text().splitlines() if '"plain"' in line)
    point = Point(precision="bf16", zero=0, seq_len=128, batch_size=32, deepspeed=False)
    ws = cublas_workspaces("h200-141gb", "2.11.0+cu130")  # profiles/h200-check/env.txt
    est = traced_estimate(
        "bert-base-uncased",
        "classification",
        point,
        "adamw_torch_fused",
        SHIPPED_GPU,
        "h200-141gb",
        workspaces=ws,
        padded=padded,
    )
    measured = {
        "allocated": plain["torch_allocated_peak_bytes"],
        "reserved": plain["torch_reserved_peak_bytes"],
        "nvml": plain["peak_bytes"],
    }
    predicted = {"allocated": est.allocated, "reserved": est.reserved, "nvml": est.device_used}
    rows = "padded" if padded else "full rows"
    row = {"model": f"bert-base-uncased (bf16 autocast, 32 x 128, {rows})", "gpu": "H200", "torch": "2.11.0+cu130"}
    row.update({k: (predicted[k] - v) / v for k, v in measured.items()})
    row["workspaces"] = f"{(sum(ws.forward) + sum(ws.backward)) / 2**20:.1f} MiB"
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
    traced = [
        row for case in cases() if not isinstance(what := expressible(case), str) for row in judge_traced(case, *what)
    ]
    traced += [judge_own_h200(), judge_own_h200(padded=False)]
    print("\ntraced (--trace): the step on fake tensors, the allocator replayed, the case's BLAS workspaces")
    print("| model | GPU | torch | workspaces | allocated | reserved | NVML used |")
    print("|---|---|---|---|---|---|---|")
    for r in traced:
        cells = [pct(r[k]) for k in ("allocated", "reserved", "nvml")]
        print(f"| {r['model']} | {r['gpu']} | {r['torch']} | {r['workspaces']} | " + " | ".join(cells) + " |")
    for k in ("allocated", "reserved"):
        errs = [abs(r[k]) * 100 for r in traced if r[k] is not None]
        print(
            f"traced {k}: median |error| {statistics.median(errs):.1f}%, worst {max(errs):.1f}% over {len(errs)} rows"
        )
    print("not judged:")
    for line in skipped:
        print(f"  {line}")


if __name__ == "__main__":
    main()
