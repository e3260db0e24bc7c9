"""``ProfilerCallback``: peak memory per phase and rank, and steady-state throughput, inside any Trainer.

    trainer = Trainer(..., callbacks=[ProfilerCallback()])      # records; the profile goes to trainer_state.json
    add_profiler(trainer)                                       # same, and its figures reach TensorBoard/W&B

Phases: ``setup`` (Trainer and DeepSpeed initialisation up to the first step), ``first_step`` (includes the
optimizer state allocation), ``steady`` (steps after ``warmup_steps``), ``optimizer`` (inside the real
optimizer step: under DeepSpeed that is the engine's, which accelerate runs inside ``backward``; the highest
of the steps up to the window's and until :data:`OPTIMIZER_QUIET_STEPS` steps in a row raised nothing) and
``evaluation``. Each phase records the sampler's peaks (RSS, or NVML device/process) and, on CUDA, torch's
``max_memory_allocated`` / ``max_memory_reserved``.

Per steady step the callback does little, so that it doesn't slow what it measures: the model hooks that
measure saved activations and ZeRO-3's gathered parameters are gone after the first step(s)
(:attr:`ProfilerCallback.measuring_steps`), nothing synchronises the GPU, and the allocator's statistics are
read per phase, not per step. What remains per step: the batch counter's forward pre-hook (one reduction
launched, on the device), a CUDA event at each step end and two around the optimizer step, and the sampler
thread's readings.

Throughput is measured over a window after the warm-up: samples and tokens are counted as the model
consumes them (:class:`~ftprof.profiler.tokens.BatchCounter`), step periods are timed without
synchronising each step (:class:`~ftprof.profiler.timing.StepClock`), and rates are per-step counts over
the *median* step period, so one slow step doesn't rule the figure; the p10–p90 spread is kept beside it.
With ``min_steps`` / ``min_seconds`` the callback ends training once the window is long enough.

With a :class:`~ftprof.profiler.memory_records.MemoryRecorder` (``ftprof sweep --memory_snapshot``), one more
step runs after the window, under the profiler, and then training stops. That step is neither measured nor
timed: the window's phases (``steady``) are closed and its samples counted before it starts, and no phase is
open while it runs. The step after the window was chosen over a warm-up step because it is representative
(gradients, optimizer states and activations all exist, as in every steady step; the first step also
allocates the optimizer states), and because the profiler's own bookkeeping (host memory, time) lands outside
every measured figure: profiling a warm-up step would add it to ``first_step``'s peak on a CPU.
"""

from __future__ import annotations

import math
import os
import statistics
from typing import TYPE_CHECKING, Any

import torch
from transformers import TrainerCallback

from ftprof.profiler import cpu_share
from ftprof.profiler.breakdown import (
    GatheredParameterMeter,
    SavedActivationMeter,
    adapted_modules,
    allocator_figures,
    levers_in_use,
    model_state_bytes,
    parameter_counts,
)
from ftprof.profiler.cpu_share import CpuSnapshot
from ftprof.profiler.flops import model_shape, peak_tflops, training_flops_per_token
from ftprof.profiler.memory_records import MemoryRecorder
from ftprof.profiler.samplers import MemorySampler, make_sampler
from ftprof.profiler.timing import IntervalTimer, StepClock, summarize_periods
from ftprof.profiler.tokens import BatchCounter
from ftprof.records.profile import Profile, RankProfile

if TYPE_CHECKING:
    from transformers import Trainer, TrainerControl, TrainerState, TrainingArguments

FLOP_FORMULA = "6*N + 12*L*H*Q*T per token (PaLM), N = non-embedding parameters, on padded tokens"

# The ``optimizer`` phase is sampled on every optimizer step until the window has opened and this many steps
# in a row raised none of its figures: steady steps repeat the same allocations, and its start/stop (two
# readings, each a GIL hand-off to and from NVML or /proc) would otherwise cost every measured step.
OPTIMIZER_QUIET_STEPS = 3


class ProfilerCallback(TrainerCallback):
    """Measure memory and throughput of a Trainer run; see the module docstring.

    Args:
        warmup_steps: optimizer steps excluded from throughput (allocator warm-up, first-step state creation).
        sampler: a :class:`MemorySampler`; by default NVML on CUDA (this rank's GPU), RSS otherwise.
        min_steps: with ``min_seconds``, stop training once the window has at least this many steps...
        min_seconds: ...and lasted at least this long (0 and 0: train to ``max_steps``, the default).
        memory_recorder: profile one step after the window into these memory records, then stop training
            (Trainer's ``max_steps`` must leave room for that step). Its :meth:`~MemoryRecorder.start` is the
            caller's, before the model is built; :meth:`~MemoryRecorder.finish` is called at the end of training.
    """

    def __init__(
        self,
        warmup_steps: int = 2,
        sampler: MemorySampler | None = None,
        min_steps: int = 0,
        min_seconds: float = 0.0,
        memory_recorder: MemoryRecorder | None = None,
    ) -> None:
        self.warmup_steps = warmup_steps
        self.min_steps = min_steps
        self.min_seconds = min_seconds
        self._sampler = sampler
        self.cuda = torch.cuda.is_available()
        self.phases: dict[str, dict[str, int]] = {}
        self.counter = BatchCounter()
        self.clock = StepClock(self.cuda)
        self.optimizer_timer = IntervalTimer(self.cuda)
        self._target_steps = 0
        self._window_counts: tuple[int, int, int] | None = None
        self._evaluating = False
        self.profile: Profile | None = None
        self._model: Any = None
        self.trainer: Any = None  # the Trainer, where known (add_profiler): its model_wrapped shows DDP's buckets
        self.activations = SavedActivationMeter()
        self.gathered = GatheredParameterMeter()
        self.breakdown: dict[str, int] = {}
        self.levers: dict[str, Any] = {}
        self.trained: dict[str, Any] = {}  # RankProfile's trainable_parameters, frozen_parameters, adapted_modules
        self.allocator: dict[str, int] = {}  # CUDA: allocator figures not in the phases (max over phases)
        self.recorder = memory_recorder
        self._window_end: tuple[int, int, int] | None = None  # the counts when the window closed early
        self._cpu_start: CpuSnapshot | None = None  # the CPU waiting and steal at the window's start and end
        self._cpu_end: CpuSnapshot | None = None
        self._reference: list[float] = []  # CPU runs: the reference workload's time at the window's start and end
        self._cpu_run = False
        self._profile_next = False  # the step after the window is profiled
        self._profiling = False
        self._optimizer_quiet = 0  # optimizer steps in a row whose sampled phase raised no figure
        self._meters_attached = False  # the saved-activation and gathered-parameter meters' hooks

    @property
    def sampler(self) -> MemorySampler:
        if self._sampler is None:
            raise RuntimeError("ProfilerCallback has not started: the Trainer hasn't initialised it yet")
        return self._sampler

    # -- phases ----------------------------------------------------------------------------------------
    def _begin(self, name: str) -> None:
        self.sampler.start(name)
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def _end(self, name: str) -> None:
        peaks = self.sampler.stop(name)
        if self.cuda:
            peaks["torch_allocated_bytes"] = torch.cuda.max_memory_allocated()
            peaks["torch_reserved_bytes"] = torch.cuda.max_memory_reserved()
            for k, v in allocator_figures(torch.cuda.memory_stats()).items():
                self.allocator[k] = max(v, self.allocator.get(k, 0))
        self._merge(name, peaks)

    def _merge(self, name: str, peaks: dict[str, int]) -> bool:
        """Keep the highest figures seen for phase ``name`` (phases like ``optimizer`` recur every step);
        whether any figure rose (or is new)."""
        previous = self.phases.get(name)
        if previous is None:
            self.phases[name] = dict(peaks)
            return True
        raised = False
        for k, v in peaks.items():
            if v > previous.get(k, -1):
                previous[k], raised = v, True
        return raised

    @property
    def measuring_steps(self) -> int:
        """The optimizer steps the per-step meters (saved activations, ZeRO-3 gathered parameters) run for:
        the warm-up, and at least two (ZeRO-3 traces the module order in the first, prefetches from the
        second on). Their hooks are removed at the end of the last."""
        return max(2, self.warmup_steps)

    def _detach_meters(self) -> None:
        self.activations.detach()
        self.gathered.detach()
        self._meters_attached = False

    def _sampling_optimizer(self) -> bool:
        """Whether this optimizer step's ``optimizer`` phase is sampled (see :data:`OPTIMIZER_QUIET_STEPS`)."""
        return self._window_counts is None or self._optimizer_quiet < OPTIMIZER_QUIET_STEPS

    def _wrap_optimizer_step(self, optimizer: Any) -> None:
        """Record the ``optimizer`` phase around the optimizer step that really runs.

        Trainer's ``optimizer`` is accelerate's wrapper; the object inside it is what steps: torch's optimizer,
        or DeepSpeed's (ZeRO) optimizer, whose ``step`` the engine calls inside ``backward``. Its ``step`` is
        replaced on the instance, so whoever calls it is measured.
        """
        inner = getattr(optimizer, "optimizer", optimizer)
        if inner is None or getattr(inner.step, "_ftprof_wrapped", False):
            return
        original = inner.step

        def step(*args: Any, **kwargs: Any) -> Any:
            if self._profiling:  # the profiled step after the window is not measured
                return original(*args, **kwargs)
            first = not self.breakdown and self._model is not None
            if first:  # gradients exist now (ZeRO-1/2 free them in the step); states after it
                before = model_state_bytes(self._model, optimizer)
                gradients = {k: v for k, v in before.items() if k.startswith("gradients")}
            sampled = self._sampling_optimizer()
            if sampled:
                self.sampler.start("optimizer")
            self.optimizer_timer.begin()
            try:
                return original(*args, **kwargs)
            finally:
                self.optimizer_timer.end()
                if sampled:
                    raised = self._merge("optimizer", self.sampler.stop("optimizer"))
                    self._optimizer_quiet = 0 if raised else self._optimizer_quiet + 1
                if first:
                    wrapped = getattr(self.trainer, "model_wrapped", None)  # DDP's buckets, read once
                    after = model_state_bytes(self._model, optimizer, wrapped)
                    self.breakdown = {**{k: v for k, v in after.items() if not k.startswith("gradients")}, **gradients}
                    self.levers = levers_in_use(self._model, optimizer)
                    trainable, frozen = parameter_counts(self._model)
                    self.trained = {
                        "trainable_parameters": trainable,
                        "frozen_parameters": frozen,
                        "adapted_modules": adapted_modules(self._model),
                    }

        step._ftprof_wrapped = True  # type: ignore[attr-defined]
        inner.step = step

    # -- Trainer events --------------------------------------------------------------------------------
    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._attach(args)

    def _attach(self, args: TrainingArguments) -> None:
        """Start sampling; the first reading is the memory held once the model is loaded."""
        if self._sampler is None:
            index = args.device.index if args.device.type == "cuda" else None
            self._sampler = make_sampler("auto", device_index=index)
        self.phases["model_load"] = self.sampler.read()
        self._begin("setup")

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        **kwargs: Any,
    ) -> None:
        if "model_load" not in self.phases:  # added with trainer.add_callback after Trainer.__init__
            self._attach(args)
        self._model = model
        if model is not None:
            self.counter.attach(model)
            self.activations.attach(model)
            self.gathered.attach(model)
            self._meters_attached = True
        if optimizer is not None:
            self._wrap_optimizer_step(optimizer)
        self._end("setup")
        self._cpu_run = args.device.type == "cpu"  # the machine's speed is timed beside CPU windows only
        if self.warmup_steps == 0:
            self._time_reference()  # before any memory phase opens
        self._begin("first_step")
        if self.warmup_steps == 0:
            self._open_window(reference_taken=True)

    def _time_reference(self) -> None:
        if self._cpu_run:
            self._reference.append(cpu_share.reference_seconds())

    def _open_window(self, reference_taken: bool = False) -> None:
        if not reference_taken:
            self._time_reference()
        self._cpu_start = cpu_share.snapshot()  # the CPU window starts after the reference, with the steps
        self._begin("steady")
        self._window_counts = self.counter.snapshot()
        self.clock.start()

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._profile_next and self.recorder is not None:
            self._profile_next, self._profiling = False, True
            self.recorder.begin_step()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self._profiling:
            self._profiling = False
            assert self.recorder is not None
            self.recorder.end_step()
            control.should_training_stop = True
            return
        if state.global_step == 1:
            self._end("first_step")
        if self._meters_attached and state.global_step >= self.measuring_steps:  # (>=: a resumed run)
            self._detach_meters()  # their figures are taken: no more hooks per forward
        if self._window_counts is None:
            if state.global_step >= self.warmup_steps:
                self._open_window()
            return
        self.clock.mark()
        if self._window_long_enough(len(self.clock) - 1):
            self._cpu_end = cpu_share.snapshot()
            if self.recorder is None:
                control.should_training_stop = True
            else:  # close the window now; the next step is profiled (every rank agreed on this step)
                self._close_window()
                self._profile_next = True

    def _close_window(self) -> None:
        self._end("steady")
        self._window_end = self.counter.snapshot()

    def _window_long_enough(self, steps: int) -> bool:
        """Whether the window reached ``min_steps`` and ``min_seconds``. Ranks must stop at the same step, so
        at ``min_steps`` they agree (one all-reduce) on the steps ``min_seconds`` needs at the pace so far, and
        check again there: a few collectives per window, not one per step (that would synchronise the GPU)."""
        if not (self.min_steps or self.min_seconds) or steps < max(1, self.min_steps, self._target_steps):
            return False
        pace = self.clock.elapsed() / steps
        needed = max(self.min_steps, math.ceil(self.min_seconds / pace) if self.min_seconds and pace > 0 else 0)
        self._target_steps = int(_reduce_over_ranks([float(needed)], "max")[0])
        return steps >= self._target_steps

    def on_prediction_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if not self._evaluating:
            self._evaluating = True
            self.sampler.start("evaluation")

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self._evaluating:
            self._evaluating = False
            self._merge("evaluation", self.sampler.stop("evaluation"))

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if logs is not None and len(self.clock) > 1:
            logs.update(
                {
                    f"profile/{k}": v
                    for k, v in self._throughput(args, local_only=True).items()
                    if isinstance(v, (int, float))
                }
            )

    def on_train_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        if self._window_counts is not None and self._window_end is None:
            self._end("steady")
        self.counter.detach()
        self._detach_meters()
        if self.recorder is not None:
            self.recorder.finish()
        if self._reference:  # after the window and every memory phase
            self._time_reference()
        self.profile = self._summarize(args, model or self._model)
        entry: dict[str, Any] = {"profile": self.profile.to_json(), "step": state.global_step}
        state.log_history.append(entry)  # transformers types log entries as float-valued; this one holds a dict
        self.sampler.close()

    # -- results ---------------------------------------------------------------------------------------
    def _throughput(self, args: TrainingArguments, local_only: bool = False) -> dict[str, Any]:
        """Steady-window figures: per-step counts over the median step period (rates summed over ranks)."""
        periods = self.clock.periods()
        if not periods or self._window_counts is None:
            return {}
        now = self._window_end or self.counter.snapshot()
        counts = [float(a - b) for a, b in zip(now, self._window_counts, strict=True)]
        if not local_only:
            counts = _reduce_over_ranks(counts, "sum")
        samples, real, padded = counts
        timing = summarize_periods(periods)
        median, total = timing["step_time_median_s"], timing["window_s"]
        optimizer_steps = self.optimizer_timer.durations()
        return {
            "steady_steps": len(periods),
            **timing,
            "optimizer_step_median_s": statistics.median(optimizer_steps) if optimizer_steps else None,
            "samples_per_step": samples / len(periods),
            "samples_per_s": samples / len(periods) / median,
            # Token counts differ from step to step with real data: totals over the window's time.
            "real_tokens_per_s": real / total if padded else None,
            "padded_tokens_per_s": padded / total if padded else None,
        }

    def _summarize(self, args: TrainingArguments, model: torch.nn.Module | None) -> Profile:
        profile = Profile(
            sampler=self.sampler.kind,
            warmup_steps=self.warmup_steps,
            world_size=args.world_size,
            **self._throughput(args),
        )
        if model is not None and profile.padded_tokens_per_s and profile.samples_per_s:
            n, layers, heads, head_dim = model_shape(model)
            seq = profile.padded_tokens_per_s / profile.samples_per_s  # mean padded length per sample
            flops_per_s = training_flops_per_token(n, layers, heads, head_dim, round(seq)) * profile.padded_tokens_per_s
            profile.model_tflops_per_s = flops_per_s / 1e12
            profile.flop_formula = FLOP_FORMULA
            if self.cuda:
                precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
                peak = peak_tflops(torch.cuda.get_device_name(), precision)
                if peak:
                    profile.mfu = flops_per_s / 1e12 / (peak * args.world_size)
        profile.longest_input_tokens = int(_reduce_over_ranks([float(self.counter.longest)], "max")[0]) or None
        start = self._cpu_start
        end = self._cpu_end or (cpu_share.snapshot() if start else None)  # or the run ended before the window did
        shares = end.share_since(start) if start and end else None
        if self._reference:
            profile.reference_s = _reduce_over_ranks([statistics.fmean(self._reference)], "max")[0]
        measured = _reduce_over_ranks([float(shares is not None)], "min")[0]
        if measured:  # every rank could tell: the figures of the rank that waited most (steal: its node's)
            assert shares is not None
            steal = -1.0 if shares["steal"] is None else shares["steal"]
            wait, steal = _reduce_over_ranks([shares["wait"] or 0.0, steal], "max")
            profile.cpu_wait_share, profile.cpu_steal_share = wait, steal if steal >= 0 else None
            # Ranks x threads over this node's cores wait by construction: the setting's own, not contention.
            local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or args.world_size)
            profile.cpu_oversubscribed = local_ranks * torch.get_num_threads() > cpu_share.usable_cores()
        # The sampler's figure (process list or device delta on GPUs) is decided once the process has a CUDA
        # context, so it is read here, at the end, and kept per rank.
        breakdown = dict(self.breakdown)
        if self.activations.saved_bytes is not None:
            breakdown["saved_activations"] = self.activations.saved_bytes
        if self.gathered.gathered_bytes is not None:
            breakdown["gathered_parameters"] = self.gathered.gathered_bytes
        mine = {
            "rank": args.process_index,
            "figure": self.sampler.figure,
            "phases": self.phases,
            "breakdown": breakdown,
            "levers": self.levers,
            **self.trained,
            "allocator": self.allocator,
            "memory_files": [str(f) for f in self.recorder.files] if self.recorder else [],
            "memory_notes": list(self.recorder.notes) if self.recorder else [],
        }
        profile.ranks = [RankProfile(**r) for r in _gather_over_ranks(mine)]
        return profile


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _reduce_over_ranks(values: list[float], op: str) -> list[float]:
    """``values`` summed (``op="sum"``), maximised (``"max"``) or minimised (``"min"``) over ranks; unchanged on
    one process."""
    if not _distributed():
        return values
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return [float(v) for v in tensor.tolist()]


def _gather_over_ranks(record: dict[str, Any]) -> list[dict[str, Any]]:
    if not _distributed():
        return [record]
    import torch.distributed as dist

    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, record)
    return sorted(gathered, key=lambda r: r["rank"])


def add_profiler(trainer: Trainer, **kwargs: Any) -> ProfilerCallback:
    """Put a :class:`ProfilerCallback` first in ``trainer``'s callbacks, so reporting integrations
    (TensorBoard, W&B) see the ``profile/*`` figures it adds to each log."""
    callback = ProfilerCallback(**kwargs)
    callback.trainer = trainer
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback
