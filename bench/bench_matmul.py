"""The device's measured matrix-multiply ceiling, the denominator of a measured MFU.

    python bench/bench_matmul.py                       # bf16 8192^3 on a GPU; fp32 2048^3 on a CPU
    python bench/bench_matmul.py --n 4096 --dtype bf16 --json matmul.json

Times ``--repeats`` products of two random n x n matrices after ``--warmup`` untimed ones (CUDA events on a GPU,
wall clock on a CPU) and prints the median and spread of TFLOP/s (2 n^3 flops per product), with the device's
datasheet peak beside it where ftprof knows it (ftprof.profiler.flops.GPU_PEAK_TFLOPS).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from ftprof.profiler.flops import peak_tflops

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def time_products(n: int, dtype: torch.dtype, device: str, warmup: int, repeats: int) -> list[float]:
    """Seconds per product, one figure per timed product."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(warmup):
        a @ b
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=8192 if cuda else 2048)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16" if cuda else "fp32")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", type=Path, help="also write the result here")
    a = parser.parse_args()
    device = "cuda" if cuda else "cpu"
    times = time_products(a.n, DTYPES[a.dtype], device, a.warmup, a.repeats)
    tflops = sorted(2 * a.n**3 / t / 1e12 for t in times)
    name = torch.cuda.get_device_name() if cuda else "cpu"
    result = {
        "device": name,
        "dtype": a.dtype,
        "n": a.n,
        "repeats": a.repeats,
        "tflops_median": statistics.median(tflops),
        "tflops_min": tflops[0],
        "tflops_max": tflops[-1],
        "datasheet_tflops": peak_tflops(name, a.dtype) if cuda else None,
        "torch": torch.__version__,
    }
    print(json.dumps(result))
    if a.json:
        a.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
