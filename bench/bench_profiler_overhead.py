"""Where a profiled step's time goes: plain HF Trainer with and without ProfilerCallback, in one process.

    python bench/bench_profiler_overhead.py                         # bert-base bf16 b32 s128 on a GPU
    python bench/bench_profiler_overhead.py --model tiny-bert --precision fp32 --batch_size 8 --seq_len 64

Runs, one after another on one model: no callback, ProfilerCallback (NVML sampler on a GPU), ProfilerCallback with
the RSS sampler, and no callback again (drift). Each variant's samples/s is timed between two synchronised marks,
steps ``--warmup`` to ``--steps``. On a GPU it also times NVML's two calls the sampler makes
(``nvmlDeviceGetMemoryInfo``, ``nvmlDeviceGetComputeRunningProcesses``). The goal: the callback costs <= 2%.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch
from transformers import AutoModelForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

from ftprof.profiler import ProfilerCallback
from ftprof.profiler.samplers import RssSampler
from ftprof.train.models import resolve_model_spec


class Stopwatch(TrainerCallback):
    """Seconds from the end of step ``start`` to the end of the last step, synchronised at both ends only."""

    def __init__(self, start: int) -> None:
        self.start, self.t0, self.seconds, self.steps = start, 0.0, 0.0, 0

    def _sync(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.start:
            self._sync()
            self.t0 = time.perf_counter()
        elif state.global_step == state.max_steps:
            self._sync()
            self.seconds, self.steps = time.perf_counter() - self.t0, state.global_step - self.start


def run(model: Any, data: list[dict], a: argparse.Namespace, callbacks: list) -> float:
    watch = Stopwatch(a.warmup)
    args = TrainingArguments(
        output_dir="/tmp/ftprof-bench-overhead",
        per_device_train_batch_size=a.batch_size,
        max_steps=a.steps,
        bf16=a.precision == "bf16",
        report_to="none",
        disable_tqdm=True,
        logging_steps=10_000,
        save_strategy="no",
        dataloader_num_workers=0,
    )
    Trainer(model=model, args=args, train_dataset=data, callbacks=[*callbacks, watch]).train()
    return watch.steps * a.batch_size / watch.seconds


def nvml_call_times() -> dict[str, float]:
    import pynvml

    from ftprof.profiler.samplers import nvml_handle_for_torch_device

    pynvml.nvmlInit()
    handle = nvml_handle_for_torch_device(pynvml, torch.cuda.current_device())
    out = {}
    for name, call in (
        ("memory_info_ms", lambda: pynvml.nvmlDeviceGetMemoryInfo(handle)),
        ("running_processes_ms", lambda: pynvml.nvmlDeviceGetComputeRunningProcesses(handle)),
    ):
        times = []
        for _ in range(30):
            t0 = time.perf_counter()
            call()
            times.append((time.perf_counter() - t0) * 1e3)
        out[name] = statistics.median(times)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bert-base-uncased")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    a = parser.parse_args()
    config = resolve_model_spec(a.model, True).config
    model = AutoModelForSequenceClassification.from_config(config)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, config.vocab_size, (a.batch_size * (a.steps + 1), a.seq_len), generator=g)
    data = [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": i % 2} for i, row in enumerate(ids)]
    result: dict[str, Any] = {"model": a.model, "batch_size": a.batch_size, "seq_len": a.seq_len}
    if torch.cuda.is_available():
        result.update(nvml_call_times())
    variants = {
        "none": lambda: [],
        "profiler": lambda: [ProfilerCallback(warmup_steps=2)],
        "profiler_rss": lambda: [ProfilerCallback(warmup_steps=2, sampler=RssSampler())],
        "none_again": lambda: [],
    }
    for name, callbacks in variants.items():
        result[f"{name}_samples_per_s"] = run(model, data, a, callbacks())
        print(name, round(result[f"{name}_samples_per_s"], 1), flush=True)
    base = (result["none_samples_per_s"] + result["none_again_samples_per_s"]) / 2
    result["profiler_ratio"] = result["profiler_samples_per_s"] / base
    result["profiler_rss_ratio"] = result["profiler_rss_samples_per_s"] / base
    print(json.dumps(result))


if __name__ == "__main__":
    main()
