"""The sweep's plots (matplotlib's Agg backend): what the memory plot's axis shows, read back from the figure."""

import matplotlib.pyplot as plt
import pytest

from ftprof.records.results import read_records
from ftprof.report.plots import BUDGET_LINE_WITHIN, figure
from ftprof.units import GIB
from tests.conftest import ROOT

# The committed tiny-bert sweep: 12 points, peaks 0.587 to 1.298 GiB.
RECORDS = read_records(ROOT / "profiles" / "cpu-2core-tiny-bert" / "results.jsonl")
LOWEST, HIGHEST = (f(r.peak_bytes for r in RECORDS) / GIB for f in (min, max))


def memory_axes(budget: int | None):
    fig = figure("memory.png", RECORDS, budget)
    (ax,) = fig.axes
    return fig, ax


def budget_lines(ax) -> list[float]:
    return [line.get_ydata()[0] for line in ax.get_lines() if line.get_linestyle() == "--"]


def test_a_budget_far_above_the_peaks_is_said_in_the_title_not_drawn():
    """The quickstart's case: a 23.5 GiB machine, peaks under 1.3 GiB. Drawn, the budget line would put every
    peak in the bottom 6% of the axis; the axis keeps to the data (matplotlib's 5% margins) instead."""
    assert (round(LOWEST, 3), round(HIGHEST, 3)) == (0.587, 1.298)
    fig, ax = memory_axes(int(23.5 * GIB))
    try:
        margin = 0.05 * (HIGHEST - LOWEST)
        assert ax.get_ylim() == pytest.approx((LOWEST - margin, HIGHEST + margin))
        assert budget_lines(ax) == []
        assert ax.get_title() == "budget 23.5 GiB: 18x the highest peak, off this scale"
    finally:
        plt.close(fig)


def test_a_budget_near_the_peaks_is_a_line_on_the_axis():
    budget = int(2.0 * GIB)  # 1.5x the highest peak: within BUDGET_LINE_WITHIN
    assert budget < BUDGET_LINE_WITHIN * HIGHEST * GIB
    fig, ax = memory_axes(budget)
    try:
        assert budget_lines(ax) == [2.0]
        bottom, top = ax.get_ylim()
        assert bottom < LOWEST
        assert top == pytest.approx(2.0 + 0.05 * (2.0 - LOWEST))
        assert ax.get_title() == ""
        assert "budget 2.0 GiB" in [t.get_text() for t in ax.get_legend().get_texts()]
    finally:
        plt.close(fig)


def test_no_budget_no_line_and_no_title():
    fig, ax = memory_axes(None)
    try:
        assert budget_lines(ax) == []
        assert ax.get_title() == ""
        assert ax.get_ylim()[1] == pytest.approx(HIGHEST + 0.05 * (HIGHEST - LOWEST))
    finally:
        plt.close(fig)
