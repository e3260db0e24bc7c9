"""The profile of one training run: what :class:`~ftprof.profiler.ProfilerCallback` measured, as a type.

A profile holds per-rank, per-phase memory peaks (bytes, keyed by figure: ``rss_bytes``,
``nvml_process_bytes``, ``torch_allocated_bytes``, ...) and the steady-state throughput. It travels as JSON
from a sweep point's process to the sweep, and is stored inside each results record. No torch here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

# Each kind of process-level figure a sampler reports, by its reading key (as ftprof.profiler.samplers).
FIGURE_KEYS = {"rss": "rss_bytes", "process": "nvml_process_bytes", "device_delta": "nvml_device_delta_bytes"}
# Records written before ranks named their figure: the sampler's usual one.
PRIMARY_FIGURE = {"nvml": "nvml_process_bytes", "rss": "rss_bytes"}
# A throughput whose p10-p90 step periods differ by more than this fraction of the median is "unstable".
UNSTABLE_SPREAD = 0.25
# A window whose threads waited for a CPU more than this many seconds per second (other processes, or more
# threads than cores), or during which the hypervisor took more than CONTENDED_STEAL of the machine,
# measured the machine as much as the setting: "contended".
CONTENDED_WAIT = 0.25  # alone a point waits a few hundredths of a second per second; beside a busy process, ~1
CONTENDED_STEAL = 0.05


def contention(profile: Profile) -> str:
    """Why a contended window's rates are the machine's as much as the setting's, in words.

    >>> contention(Profile(sampler="rss", cpu_wait_share=0.493, cpu_steal_share=0.0))
    'threads waited for a CPU 0.49 s per s'
    >>> contention(Profile(sampler="rss", cpu_wait_share=0.01, cpu_steal_share=0.08))
    'the hypervisor took 8% of the CPUs'
    """
    why = []
    if not profile.cpu_oversubscribed and (profile.cpu_wait_share or 0.0) > CONTENDED_WAIT:
        why.append(f"threads waited for a CPU {profile.cpu_wait_share:.2f} s per s")
    if (profile.cpu_steal_share or 0.0) > CONTENDED_STEAL:
        why.append(f"the hypervisor took {profile.cpu_steal_share:.0%} of the CPUs")
    return ", ".join(why)


@dataclass
class RankProfile:
    """One rank's peaks: ``phases[phase][figure]`` in bytes."""

    rank: int
    figure: str = ""  # "rss", "process" (NVML lists this PID) or "device_delta" (it doesn't); "" in old records
    phases: dict[str, dict[str, int]] = field(default_factory=dict)
    # Measured bytes by item (:mod:`ftprof.profiler.breakdown`): parameters_<dtype>, master_weights,
    # optimizer_states, gradients, saved_activations (one micro-batch); empty in old records.
    breakdown: dict[str, int] = field(default_factory=dict)
    # What the run really did: gradient_checkpointing, offload_optimizer, offload_param, optimizer (class name).
    levers: dict[str, Any] = field(default_factory=dict)
    # What it trained: parameter elements whole (ZeRO-3's ds_numel, not this rank's share), and the layers that
    # got a LoRA adapter (``--peft lora``; empty for full fine-tuning), as the base model names them. None and
    # empty in old records.
    trainable_parameters: int | None = None
    frozen_parameters: int | None = None
    adapted_modules: list[str] = field(default_factory=list)
    # CUDA: the caching allocator's figures the phases don't carry (ftprof.profiler.breakdown.ALLOCATOR_STATS):
    # active_peak_bytes, requested_peak_bytes, inactive_split_peak_bytes, alloc_retries; empty elsewhere.
    allocator: dict[str, int] = field(default_factory=dict)
    # ``sweep --memory_snapshot``: the memory records this rank wrote (paths relative to the sweep folder), and
    # one line for each record it could not write.
    memory_files: list[str] = field(default_factory=list)
    memory_notes: list[str] = field(default_factory=list)

    def peak(self, figure: str) -> int:
        """The highest ``figure`` over this rank's phases (0 when never recorded)."""
        return max((phase.get(figure, 0) for phase in self.phases.values()), default=0)


@dataclass
class Profile:
    """Memory per rank and phase, and throughput after the warm-up (rates summed over ranks)."""

    sampler: str  # "rss" or "nvml"
    world_size: int = 1
    warmup_steps: int = 0
    steady_steps: int = 0
    window_s: float | None = None  # the measured steps' total time
    step_time_median_s: float | None = None
    step_time_median_low_s: float | None = None  # ~95% interval of the median (order statistics)
    step_time_median_high_s: float | None = None
    step_time_p10_s: float | None = None
    step_time_p90_s: float | None = None
    step_time_spread: float | None = None  # (p90 - p10) / median of the window's step periods
    optimizer_step_median_s: float | None = None  # the real optimizer step alone (DeepSpeed's included)
    samples_per_step: float | None = None  # counted over the window, all ranks
    samples_per_s: float | None = None  # samples_per_step / median step period
    real_tokens_per_s: float | None = None
    padded_tokens_per_s: float | None = None
    longest_input_tokens: int | None = None  # the longest padded input trained on, warm-up included
    model_tflops_per_s: float | None = None
    mfu: float | None = None
    flop_formula: str | None = None
    # Seconds a rank's threads waited for a CPU per second of the window (the most of any rank), and the share
    # of the machine the hypervisor took (ftprof.profiler.cpu_share; Linux); None where unknown.
    cpu_wait_share: float | None = None
    cpu_steal_share: float | None = None
    cpu_oversubscribed: bool = False  # the node's ranks x torch threads exceed its cores: waiting is the setting's
    # CPU runs: seconds a fixed workload took at the window's start and end (mean; the slowest rank's), the
    # machine's speed at the time (ftprof.profiler.cpu_share.reference_seconds); None on GPUs.
    reference_s: float | None = None
    random_init: bool = False
    ranks: list[RankProfile] = field(default_factory=list)

    @property
    def unstable(self) -> bool:
        """Whether the window's step periods spread too widely for its rates to be trusted."""
        return self.step_time_spread is not None and self.step_time_spread > UNSTABLE_SPREAD

    @property
    def contended(self) -> bool:
        """Whether something else used the machine during the window enough to count in its rates."""
        return bool(contention(self))

    @property
    def figure(self) -> str:
        """The kind of process figure the point's peak is: one kind for all ranks. If any rank could only
        measure the device's growth (NVML hides PIDs in containers), every rank's device delta is used."""
        kinds = {r.figure for r in self.ranks}
        if not kinds or "" in kinds:
            return next(k for k, key in FIGURE_KEYS.items() if key == PRIMARY_FIGURE.get(self.sampler, "rss_bytes"))
        return "device_delta" if "device_delta" in kinds else kinds.pop()

    @property
    def primary_figure(self) -> str:
        """The reading key of :attr:`figure`."""
        return FIGURE_KEYS[self.figure]

    def peak(self, figure: str | None = None) -> int:
        """Max over ranks and phases of ``figure`` (default: the sampler's process figure); 0 if absent."""
        figure = figure or self.primary_figure
        return max((r.peak(figure) for r in self.ranks), default=0)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Profile:
        """Built by keyword from :meth:`to_json`'s output; keys of other versions are ignored."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known and k != "ranks"}
        rank_fields = {f.name for f in fields(RankProfile)}
        ranks = [RankProfile(**{k: v for k, v in r.items() if k in rank_fields}) for r in data.get("ranks", [])]
        return cls(**values, ranks=ranks)
