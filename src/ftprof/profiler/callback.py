"""``ProfilerCallback``: peak memory per phase and rank, and steady-state throughput, inside any Trainer.

    trainer = Trainer(..., callbacks=[ProfilerCallback()])      # records; summary in trainer_state.json
    add_profiler(trainer)                                       # same, and its figures reach TensorBoard/W&B

Phases: ``setup`` (Trainer and DeepSpeed initialisation up to the first step), ``first_step`` (includes the
optimizer state allocation), ``steady`` (steps after ``warmup_steps``), ``optimizer`` (inside optimizer steps)
and ``evaluation``. Each phase records the sampler's peaks (RSS, or NVML device/process) and, on CUDA,
torch's ``max_memory_allocated`` / ``max_memory_reserved``.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from transformers import TrainerCallback

from ftprof.profiler.flops import model_shape, peak_tflops, training_flops_per_token
from ftprof.profiler.samplers import MemorySampler, make_sampler
from ftprof.profiler.tokens import TokenCountingCollator

FLOP_FORMULA = "6*N + 12*L*H*Q*T per token (PaLM), N = non-embedding parameters, on padded tokens"


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


class ProfilerCallback(TrainerCallback):
    """Measure memory and throughput of a Trainer run; see the module docstring.

    Args:
        warmup_steps: optimizer steps excluded from throughput (allocator warm-up, first-step state creation).
        sampler: a :class:`MemorySampler`; by default NVML on CUDA (this rank's GPU), RSS otherwise.
        counter: the :class:`TokenCountingCollator` the Trainer uses, for real vs padded tokens.
    """

    def __init__(self, warmup_steps: int = 2, sampler: MemorySampler | None = None,
                 counter: TokenCountingCollator | None = None) -> None:
        self.warmup_steps = warmup_steps
        self.sampler = sampler
        self.counter = counter
        self.cuda = torch.cuda.is_available()
        self.phases: dict[str, dict[str, int]] = {}
        self.step_times: list[float] = []
        self._t0 = 0.0
        self._steady_counts: tuple[int, int, int] | None = None
        self._steady_started = False
        self._evaluating = False
        self.summary: dict[str, Any] | None = None
        self._model = None

    # -- helpers ---------------------------------------------------------------------------------------
    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def _begin(self, name: str) -> None:
        self.sampler.start(name)
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def _end(self, name: str) -> None:
        peaks = self.sampler.stop(name)
        if self.cuda:
            peaks["torch_allocated_bytes"] = torch.cuda.max_memory_allocated()
            peaks["torch_reserved_bytes"] = torch.cuda.max_memory_reserved()
        self._merge(name, peaks)

    def _merge(self, name: str, peaks: dict[str, int]) -> None:
        """Keep the highest figures seen for phase ``name`` (phases like ``optimizer`` recur every step)."""
        previous = self.phases.get(name, {})
        self.phases[name] = {k: max(v, previous.get(k, 0)) for k, v in peaks.items()}

    # -- Trainer events --------------------------------------------------------------------------------
    def on_init_end(self, args, state, control, **kwargs):
        self._attach(args)

    def _attach(self, args) -> None:
        """Start sampling; the first reading is the memory held once the model is loaded."""
        if self.sampler is None:
            self.sampler = make_sampler("auto", device_index=max(0, args.local_process_index))
        self.phases["model_load"] = self.sampler.read()
        self._begin("setup")

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if "model_load" not in self.phases:  # added with trainer.add_callback after Trainer.__init__
            self._attach(args)
        self._model = model
        self._end("setup")
        self._begin("first_step")

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        if state.global_step == self.warmup_steps and not self._steady_started:
            self._steady_started = True
            self._begin("steady")
            self._steady_counts = self.counter.snapshot() if self.counter else None
        self._t0 = time.perf_counter()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.sampler.start("optimizer")

    def on_optimizer_step(self, args, state, control, **kwargs):
        self._merge("optimizer", self.sampler.stop("optimizer"))

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        elapsed = time.perf_counter() - self._t0
        if state.global_step == 1:
            self._end("first_step")
        if state.global_step > self.warmup_steps:
            self.step_times.append(elapsed)

    def on_prediction_step(self, args, state, control, **kwargs):
        if not self._evaluating:
            self._evaluating = True
            self.sampler.start("evaluation")

    def on_evaluate(self, args, state, control, **kwargs):
        if self._evaluating:
            self._evaluating = False
            self._merge("evaluation", self.sampler.stop("evaluation"))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self.step_times:
            logs.update({f"profile/{k}": v for k, v in self._throughput(args, local_only=True).items()
                         if isinstance(v, (int, float))})

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self._steady_started:
            self._end("steady")
        self.summary = self._summarize(args, model or self._model)
        state.log_history.append({"profile": self.summary, "step": state.global_step})
        self.sampler.close()

    # -- results ---------------------------------------------------------------------------------------
    def _throughput(self, args, local_only: bool = False) -> dict[str, Any]:
        steps = len(self.step_times)
        if steps == 0:
            return {}
        total = sum(self.step_times)
        out: dict[str, Any] = {"steady_steps": steps, "step_time_median_s": statistics.median(self.step_times),
                               "step_time_p90_s": _percentile(self.step_times, 0.9)}
        world = args.world_size
        if self.counter is not None and self._steady_counts is not None:
            now = self.counter.snapshot()
            counts = [a - b for a, b in zip(now, self._steady_counts)]
            if not local_only:
                counts = _sum_over_ranks(counts)
            samples, real, padded = counts
        else:
            samples = args.per_device_train_batch_size * args.gradient_accumulation_steps * world * steps
            real = padded = None
        out["samples_per_s"] = samples / total
        if real is not None:
            out["real_tokens_per_s"] = real / total
            out["padded_tokens_per_s"] = padded / total
        return out

    def _summarize(self, args, model) -> dict[str, Any]:
        throughput = self._throughput(args)
        summary: dict[str, Any] = {"sampler": self.sampler.kind, "warmup_steps": self.warmup_steps,
                                   "world_size": args.world_size, **throughput}
        if model is not None and throughput.get("padded_tokens_per_s"):
            n, layers, heads, head_dim = model_shape(model)
            samples_per_s = throughput["samples_per_s"]
            seq = throughput["padded_tokens_per_s"] / samples_per_s  # mean padded length per sample
            flops_per_s = training_flops_per_token(n, layers, heads, head_dim, round(seq)) * throughput["padded_tokens_per_s"]
            summary["model_tflops_per_s"] = flops_per_s / 1e12
            summary["flop_formula"] = FLOP_FORMULA
            if self.cuda:
                precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
                peak = peak_tflops(torch.cuda.get_device_name(), precision)
                if peak:
                    summary["mfu"] = flops_per_s / 1e12 / (peak * args.world_size)
        summary["ranks"] = _gather_over_ranks({"rank": args.process_index, "phases": self.phases})
        return summary


def _sum_over_ranks(values: list[int]) -> list[int]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64,
                          device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(tensor)
    return [int(v) for v in tensor.tolist()]


def _gather_over_ranks(record: dict[str, Any]) -> list[dict[str, Any]]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [record]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, record)
    return sorted(gathered, key=lambda r: r["rank"])


def add_profiler(trainer, **kwargs) -> ProfilerCallback:
    """Put a :class:`ProfilerCallback` first in ``trainer``'s callbacks, so reporting integrations
    (TensorBoard, W&B) see the ``profile/*`` figures it adds to each log."""
    callback = ProfilerCallback(**kwargs)
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback
