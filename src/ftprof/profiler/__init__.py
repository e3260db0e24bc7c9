"""Memory and throughput measurement for Trainer runs: samplers (RSS, NVML), FLOPs, and a TrainerCallback."""

from ftprof.profiler.callback import ProfilerCallback, add_profiler
from ftprof.profiler.samplers import MemorySampler, NvmlSampler, RssSampler, make_sampler
from ftprof.profiler.tokens import BatchCounter

__all__ = [
    "BatchCounter",
    "MemorySampler",
    "NvmlSampler",
    "ProfilerCallback",
    "RssSampler",
    "add_profiler",
    "make_sampler",
]
