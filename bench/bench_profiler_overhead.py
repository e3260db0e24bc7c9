"""Where a profiled step's time goes: plain HF Trainer with and without ProfilerCallback, in one process.

    python bench/bench_profiler_overhead.py                         # bert-base bf16 b32 s128 on a GPU
    python bench/bench_profiler_overhead.py --model tiny-bert --precision fp32 --batch_size 8 --seq_len 64
    python bench/bench_profiler_overhead.py --cost --model tiny-bert --precision fp32 --batch_size 8 --seq_len 64

Runs, one after another on one model: no callback, ProfilerCallback (NVML sampler on a GPU), ProfilerCallback with
the RSS sampler, and no callback again (drift). Each variant's samples/s is timed between two synchronised marks,
steps ``--warmup`` to ``--steps``. On a GPU it also times NVML's two calls the sampler makes
(``nvmlDeviceGetMemoryInfo``, ``nvmlDeviceGetComputeRunningProcesses``). The goal: the callback costs <= 2%.

``--cost`` measures instead what the callback itself spends per steady step, a proxy for its overhead that doesn't
depend on timing a whole (noisy, launch-bound) step: wall time inside its Trainer events, inside the model hooks it
registers, and inside its wrapper of the optimizer step minus the step it wraps; the hooks still attached and the
sampler thread's readings and CPU time per step (each reading takes the GIL from the training thread). Steps up to
``--warmup`` are excluded (the first steps' one-off measurements: saved activations, model-state breakdown).
``--sampler_cost`` times a sampler's thread alone (5 ms) beside a loop of small torch ops: RSS, and NVML as
pynvml runs it over stand-in C calls (no GPU needed).
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import threading
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


def training_args(a: argparse.Namespace) -> TrainingArguments:
    """Plain Trainer's arguments for a timed run: no logging, saving or data workers in the way."""
    return TrainingArguments(
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


def run(model: Any, data: list[dict], a: argparse.Namespace, callbacks: list) -> float:
    watch = Stopwatch(a.warmup)
    args = training_args(a)
    Trainer(model=model, args=args, train_dataset=data, callbacks=[*callbacks, watch]).train()
    return watch.steps * a.batch_size / watch.seconds


class CostMeter:
    """Seconds (this thread's CPU time, and wall time) and calls per key, accumulated by :meth:`wrap`'s wrappers."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.calls: dict[str, int] = collections.defaultdict(int)

    def wrap(self, key: str, fn: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            c0, t0 = time.thread_time(), time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[key] += time.thread_time() - c0
                self.seconds[f"{key}_wall"] += time.perf_counter() - t0
                self.calls[key] += 1

        return timed

    def snapshot(self) -> tuple[dict[str, float], dict[str, int]]:
        return dict(self.seconds), dict(self.calls)


def _ftprof_hook(fn: Any) -> bool:
    return type(getattr(fn, "__self__", None)).__module__.startswith("ftprof.profiler")


def _thread_cpu(thread: Any) -> float:
    try:
        return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
    except (AttributeError, OSError, TypeError):
        return float("nan")


class CostProbe(TrainerCallback):
    """Instruments ``profiler`` (placed right after this callback) and snapshots its costs at two step ends."""

    def __init__(self, profiler: ProfilerCallback, start: int) -> None:
        self.profiler, self.start, self.meter = profiler, start, CostMeter()
        self.marks: dict[int, Any] = {}
        self.hooks: list[Any] = []  # the hook handles' dicts of ftprof's hooks, to count those still attached
        for event in ("on_step_begin", "on_step_end", "on_log", "on_prediction_step", "on_evaluate"):
            setattr(profiler, event, self.meter.wrap("events", getattr(profiler, event)))
        begin = profiler.on_train_begin

        def on_train_begin(*args: Any, **kwargs: Any) -> None:
            originals = {}
            for name in ("register_forward_pre_hook", "register_forward_hook", "register_full_backward_hook"):
                original = originals[name] = getattr(torch.nn.Module, name)
                setattr(torch.nn.Module, name, self._registrar(original))
            try:
                begin(*args, **kwargs)
            finally:
                for name, original in originals.items():
                    setattr(torch.nn.Module, name, original)
            optimizer = kwargs.get("optimizer")
            inner = getattr(optimizer, "optimizer", optimizer)
            if inner is not None:  # the profiler's wrapper, timed around the timed original
                inner.step = self.meter.wrap("optimizer_wrapped", inner.step)

        profiler.on_train_begin = on_train_begin

    def _registrar(self, original: Any) -> Any:
        meter, hooks = self.meter, self.hooks

        def register(module: torch.nn.Module, hook: Any, *args: Any, **kwargs: Any) -> Any:
            if _ftprof_hook(hook):
                hook = meter.wrap("hooks", hook)
            handle = original(module, hook, *args, **kwargs)
            hooks.append(handle)
            return handle

        return register

    def on_train_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        inner = getattr(optimizer, "optimizer", optimizer)
        if inner is not None:  # before the profiler wraps it: the step it wraps
            inner.step = self.meter.wrap("optimizer_original", inner.step)
        self.sampler = self.profiler._sampler
        thread = getattr(self.sampler, "_thread", None)
        if thread is not None:  # count the thread's readings (not the stops' on the training thread)
            update, calls = self.sampler._update, self.meter.calls

            def counted(sample: Any) -> None:
                if threading.current_thread() is thread:
                    calls["sampler_readings"] += 1
                update(sample)

            self.sampler._update = counted

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # Runs before the profiler's on_step_end: a mark covers the steps up to the previous one's events.
        step = state.global_step
        if step in (self.start, state.max_steps):
            thread = getattr(self.sampler, "_thread", None)
            attached = sum(1 for h in self.hooks if _hook_attached(h))
            cpu = _thread_cpu(thread) if thread else float("nan")
            self.marks[step] = (*self.meter.snapshot(), cpu, attached, time.perf_counter())

    def per_step(self) -> dict[str, Any]:
        (s0, c0, cpu0, _, t0), (s1, c1, cpu1, attached, t1) = self.marks[self.start], self.marks[max(self.marks)]
        steps = max(self.marks) - self.start
        us = {k: (s1.get(k, 0.0) - s0.get(k, 0.0)) / steps * 1e6 for k in s1}
        calls = {k: (c1.get(k, 0) - c0.get(k, 0)) / steps for k in c1}
        optimizer = us.get("optimizer_wrapped", 0.0) - us.get("optimizer_original", 0.0)
        wall = sum(us.get(f"{k}_wall", 0.0) for k in ("events", "hooks", "optimizer_wrapped"))
        wall -= us.get("optimizer_original_wall", 0.0)
        readings = calls.get("sampler_readings", 0)
        return {
            "steps": steps,
            "step_ms": round((t1 - t0) / steps * 1e3, 1),
            "events_us": round(us.get("events", 0.0), 1),
            "hooks_us": round(us.get("hooks", 0.0), 1),
            "hook_calls": round(calls.get("hooks", 0), 2),
            "optimizer_wrapper_us": round(optimizer, 1),
            "callback_cpu_us": round(us.get("events", 0.0) + us.get("hooks", 0.0) + optimizer, 1),
            "callback_wall_us": round(wall, 1),
            "sampler_readings": round(readings, 2),  # the thread's, per step
            "sampler_thread_cpu_us": round((cpu1 - cpu0) / steps * 1e6, 1),
            "sampler_cpu_per_reading_us": round((cpu1 - cpu0) / steps * 1e6 / readings, 1) if readings else None,
            "hooks_attached_at_end": attached,
        }


def _hook_attached(handle: Any) -> bool:
    hooks = handle.hooks_dict_ref()
    return hooks is not None and handle.id in hooks


def cost(
    model: Any, data: list[dict], a: argparse.Namespace, make_profiler: Any, zero3: bool = False
) -> dict[str, Any]:
    """The callback's costs per steady step (:class:`CostProbe`); ``zero3`` marks the parameters as ZeRO-3's
    (``ds_tensor``), so the gathered-parameter meter attaches as under DeepSpeed ZeRO-3."""
    for p in model.parameters():
        if zero3:
            p.ds_tensor = p.data
        elif hasattr(p, "ds_tensor"):
            del p.ds_tensor
    profiler = make_profiler()
    probe = CostProbe(profiler, a.warmup)
    args = training_args(a)
    Trainer(model=model, args=args, train_dataset=data, callbacks=[probe, profiler]).train()
    return probe.per_step()


def sampler_cost(make_sampler: Any, seconds: float = 2.0) -> dict[str, float]:
    """A sampler thread's cost beside a launch-like loop (small torch ops, each releasing the GIL): its CPU per
    reading, and the loop's slowdown against the same loop without it (interleaved rounds, median)."""
    a, b, out = torch.ones(16), torch.ones(16), torch.empty(16)

    def loop(n: int = 20_000) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            torch.add(a, b, out=out)
        return time.perf_counter() - t0

    loop()
    ratios, per_reading = [], []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(ratios) < 3:
        alone = loop()
        sampler = make_sampler()
        readings = [0]
        update = sampler._update

        def counted(sample: Any, readings: list[int] = readings, update: Any = update) -> None:
            readings[0] += 1
            update(sample)

        sampler._update = counted
        cpu0 = _thread_cpu(sampler._thread)
        beside = loop()
        cpu = _thread_cpu(sampler._thread) - cpu0
        sampler.close()
        ratios.append(beside / alone)
        if readings[0]:
            per_reading.append(cpu / readings[0] * 1e6)
    return {
        "loop_slowdown_pct": round((statistics.median(ratios) - 1) * 100, 2),
        "thread_cpu_per_reading_us": round(statistics.median(per_reading), 1) if per_reading else float("nan"),
    }


def fake_pynvml_sampler(interval: float = 0.005) -> Any:
    """An NvmlSampler running pynvml's own Python (struct building, process-list conversion) over stand-in C
    functions: ctypes callbacks, so each call hands the GIL over and back as a real NVML call does. One
    process (this one) holds 2 GiB; the device's used memory stands still, as in steady training."""
    import ctypes
    import os
    from types import SimpleNamespace

    import pynvml

    from ftprof.profiler.samplers import NvmlSampler

    used, uuid = 3 * 2**30, "8a2d7c4e-0b1f-4c3d-9e8f-1a2b3c4d5e6f"

    @ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(pynvml.c_nvmlMemory_t))
    def memory_info(handle: Any, memory: Any) -> int:
        memory.contents.total, memory.contents.used = 80 * 2**30, used
        return 0

    @ctypes.CFUNCTYPE(
        ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint), ctypes.POINTER(pynvml.c_nvmlProcessInfo_v3_t)
    )
    def processes(handle: Any, count: Any, procs: Any) -> int:
        count.contents.value = 1
        if not procs:
            return pynvml.NVML_ERROR_INSUFFICIENT_SIZE
        procs[0].pid, procs[0].usedGpuMemory = os.getpid(), 2 * 2**30
        return 0

    pynvml._nvmlGetFunctionPointer_cache["nvmlDeviceGetMemoryInfo"] = memory_info
    pynvml._nvmlGetFunctionPointer_cache["nvmlDeviceGetComputeRunningProcesses_v3"] = processes
    handle = ctypes.c_void_p(1)
    nvml = SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlDeviceGetCount=lambda: 1,
        nvmlDeviceGetHandleByIndex=lambda i: handle,
        nvmlDeviceGetUUID=lambda h: f"GPU-{uuid}",
        nvmlDeviceGetPciInfo=lambda h: SimpleNamespace(busId=b"00000000:3B:00.0"),
        nvmlDeviceGetMemoryInfo=pynvml.nvmlDeviceGetMemoryInfo,
        nvmlDeviceGetComputeRunningProcesses=pynvml.nvmlDeviceGetComputeRunningProcesses,
    )
    props = SimpleNamespace(uuid=uuid, pci_domain_id=0, pci_bus_id=0x3B, pci_device_id=0)
    sampler = NvmlSampler(
        device_index=0, interval=interval, nvml=nvml, device_properties=lambda i: props, has_context=lambda i: True
    )
    assert sampler.read()["nvml_process_bytes"] == 2 * 2**30
    return sampler


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
    parser.add_argument("--cost", action="store_true", help="the callback's own time per step (see above)")
    parser.add_argument("--repeats", type=int, default=3, help="--cost: runs per variant (median of each figure)")
    parser.add_argument("--sampler_cost", action="store_true", help="only the RSS sampler thread at 5 ms (see above)")
    a = parser.parse_args()
    if a.sampler_cost:
        result = {
            "rss_5ms": sampler_cost(lambda: RssSampler(interval=0.005), seconds=10.0),
            "nvml_5ms_pynvml_over_stand_in_calls": sampler_cost(fake_pynvml_sampler, seconds=10.0),
        }
        print(json.dumps(result))
        return
    config = resolve_model_spec(a.model, True).config
    model = AutoModelForSequenceClassification.from_config(config)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, config.vocab_size, (a.batch_size * (a.steps + 1), a.seq_len), generator=g)
    data = [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": i % 2} for i, row in enumerate(ids)]
    result: dict[str, Any] = {"model": a.model, "batch_size": a.batch_size, "seq_len": a.seq_len}
    if a.cost:
        default = lambda: ProfilerCallback(warmup_steps=2)  # noqa: E731  NVML on a GPU, RSS (50 ms) otherwise
        profilers = {
            "profiler": (default, False),
            "profiler_rss_5ms": (lambda: ProfilerCallback(warmup_steps=2, sampler=RssSampler(interval=0.005)), False),
            "profiler_zero3_meter": (default, True),
        }
        for name, (make, zero3) in profilers.items():
            runs = [cost(model, data, a, make, zero3) for _ in range(a.repeats)]
            result[name] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            print(name, json.dumps(result[name]), flush=True)
        print(json.dumps(result))
        return
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
