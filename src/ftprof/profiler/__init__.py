"""Memory and throughput measured inside any Trainer run: peak samplers (RSS, NVML), the per-rank breakdown of
where memory goes, step timing, CPU contention, FLOPs, memory records, the machine's facts, and the
:class:`ProfilerCallback` that ties them together into a :class:`~ftprof.records.profile.Profile`."""

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
