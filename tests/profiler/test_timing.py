"""Step timing without a synchronisation per step: CUDA events are recorded, and read once per window."""

import torch

from ftprof.profiler import timing
from ftprof.profiler.timing import IntervalTimer, StepClock, median_interval


class FakeEvent:
    """Stands in for torch.cuda.Event: records a timestamp in ms; counts synchronisations."""

    clock = 0.0
    syncs = 0

    def __init__(self, enable_timing=False):
        assert enable_timing
        self.at = None

    def record(self):
        self.at = FakeEvent.clock

    def synchronize(self):
        FakeEvent.syncs += 1

    def elapsed_time(self, end):
        assert FakeEvent.syncs, "elapsed_time before synchronize"
        return end.at - self.at


def test_cuda_step_clock_records_events_and_synchronises_once(monkeypatch):
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: (_ for _ in ()).throw(AssertionError("per-step sync")))
    FakeEvent.clock, FakeEvent.syncs = 0.0, 0
    clock = StepClock(cuda=True)
    clock.start()
    for ms in (100.0, 250.0, 300.0):
        FakeEvent.clock = ms
        clock.mark()
    assert FakeEvent.syncs == 0  # nothing waited for the GPU while steps ran
    assert clock.periods() == [0.1, 0.15, 0.05]
    assert FakeEvent.syncs == 1


def test_interval_timer_on_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    FakeEvent.clock, FakeEvent.syncs = 0.0, 0
    timer = IntervalTimer(cuda=True)
    for begin, end in ((0.0, 20.0), (50.0, 80.0)):
        FakeEvent.clock = begin
        timer.begin()
        FakeEvent.clock = end
        timer.end()
    assert timer.durations() == [0.02, 0.03]
    assert FakeEvent.syncs == 1


def test_median_interval_narrows_with_more_steps():
    import random

    rng = random.Random(0)
    short = [rng.gauss(1.0, 0.1) for _ in range(10)]
    long = [rng.gauss(1.0, 0.1) for _ in range(400)]
    (a, b), (c, d) = median_interval(short), median_interval(long)
    assert a <= sorted(short)[5] <= b
    assert c <= sorted(long)[200] <= d
    assert d - c < (b - a) / 2  # 40x the steps: a much narrower interval
    assert timing.percentile([3.0, 1.0, 2.0], 0.5) == 2.0
