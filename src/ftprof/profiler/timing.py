"""Step periods without perturbing the run: CUDA events read once at the end, or the CPU clock."""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

import torch


class StepClock:
    """Timestamps at the end of each optimizer step; :meth:`periods` gives the time between consecutive ones.

    On CUDA an event is recorded on the current stream at each mark and nothing synchronises until
    :meth:`periods` (once per measurement window), so the CPU keeps running ahead of the GPU as in real
    training. A period covers everything between two step ends: data loading, forward, backward, step.
    """

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self._marks: list[Any] = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._marks.append(event)
        else:
            self._marks.append(time.perf_counter())

    def __len__(self) -> int:
        return len(self._marks)

    def elapsed(self) -> float:
        """Seconds since the first mark by the CPU clock (no synchronisation; for window sizing only)."""
        return time.perf_counter() - self._first_cpu if self._marks else 0.0

    def periods(self) -> list[float]:
        """Seconds between consecutive marks (synchronises CUDA once)."""
        if len(self._marks) < 2:
            return []
        if self.cuda:
            self._marks[-1].synchronize()
            return [a.elapsed_time(b) / 1000 for a, b in zip(self._marks, self._marks[1:], strict=False)]
        return [b - a for a, b in zip(self._marks, self._marks[1:], strict=False)]

    def start(self) -> None:
        """Forget earlier marks and mark now: the window's first step starts here."""
        self._marks = []
        self._first_cpu = time.perf_counter()
        self.mark()


class IntervalTimer:
    """Durations of repeated intervals (``begin``/``end`` pairs), CUDA events on GPUs, read once at the end."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self._pairs: list[tuple[Any, Any]] = []
        self._open: Any = None

    def _now(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def begin(self) -> None:
        self._open = self._now()

    def end(self) -> None:
        if self._open is not None:
            self._pairs.append((self._open, self._now()))
            self._open = None

    def durations(self) -> list[float]:
        if not self._pairs:
            return []
        if self.cuda:
            self._pairs[-1][1].synchronize()
            return [a.elapsed_time(b) / 1000 for a, b in self._pairs]
        return [b - a for a, b in self._pairs]


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile by nearest rank.

    >>> percentile([4.0, 1.0, 3.0, 2.0, 5.0], 0.9), percentile([4.0, 1.0, 3.0, 2.0, 5.0], 0.1)
    (5.0, 1.0)
    """
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def median_interval(values: list[float]) -> tuple[float, float]:
    """A distribution-free ~95% confidence interval of the median, by order statistics (ranks
    n/2 ∓ 0.98·√n): it narrows as the window grows, unlike the p10-p90 spread of the steps themselves.

    >>> median_interval([float(v) for v in range(1, 101)])
    (40.0, 60.0)
    """
    ordered = sorted(values)
    n = len(ordered)
    half = 0.98 * math.sqrt(n)
    low = max(0, math.floor(n / 2 - half) - 1)
    high = min(n - 1, math.ceil(n / 2 + half) - 1)
    return ordered[low], ordered[high]


def summarize_periods(periods: list[float]) -> dict[str, float]:
    """Median step time with its ~95% interval, p10 and p90, the relative spread ``(p90 - p10) / median``,
    and the window's length."""
    median = statistics.median(periods)
    p10, p90 = percentile(periods, 0.1), percentile(periods, 0.9)
    low, high = median_interval(periods)
    return {
        "window_s": sum(periods),
        "step_time_median_s": median,
        "step_time_median_low_s": low,
        "step_time_median_high_s": high,
        "step_time_p10_s": p10,
        "step_time_p90_s": p90,
        "step_time_spread": (p90 - p10) / median if median > 0 else 0.0,
    }
