"""The estimator against real measurements on this CPU: whole peaks on held-out points within the figures
docs/benchmarks.md claims, and each rank's model states item by item."""

import pytest

import ftprof.estimate.estimator
from ftprof.estimate.architecture import arch_for
from ftprof.estimate.calibration import calibrate, error_summary, errors, observations_from_records, split_holdout
from ftprof.estimate.estimator import Calibration
from ftprof.records.results import Record, latest, read_records
from tests.conftest import ROOT
from tests.integration.test_sweep_cli import sweep

# The committed profiles' grid and window (profiles/README.md): an encoder and a decoder, 12 points each.
MODELS = ("tiny-bert", "tiny-gpt2")
GRID = ["--zero", "0,2", "--batch_sizes", "4,16,32", "--seq_lens", "128,512"]
WINDOW = ["--steps", "3", "--warmup", "1", "--min_seconds", "1", "--no_remeasure", "--no_report"]
# docs/benchmarks.md: every other point fits the constants, the other 12 are judged: 0.9% median, 3.4% worst on
# the committed sweeps. The bounds leave room for a fresh sweep's noise (RSS moves most at the largest batch),
# and no more: activations x2 give 9.6% / 26% on the same points. What this whole-peak check cannot see: a
# scale error in the activations up to about x1.5 (or any shrinking) is absorbed by the fitted activation
# factor (x0.5 to x1.5 all pass). Scale is caught item by item instead, against real forwards
# (tests/estimate/test_estimator.py::test_saved_activations_match_real_forwards_across_families, 5%).
MEDIAN_PCT, WORST_PCT = 5.0, 10.0


def held_out_accuracy(records: list[Record]) -> dict[str, float]:
    """Fit the constants on every other measured point, judge the estimator's peaks on the rest."""
    observations = observations_from_records(records, arch_for)
    assert len(observations) == 24, len(observations)
    fit, held_out = split_holdout(observations)
    cal = calibrate(fit, "cpu", Calibration(device="cpu", reserved_factor=1.0))
    summary = error_summary(errors(held_out, cal))
    print(f"held-out points: {summary}, {cal}")
    return summary


def check_accuracy(records: list[Record]) -> None:
    summary = held_out_accuracy(records)
    assert summary["median_abs_pct"] <= MEDIAN_PCT, summary
    assert summary["worst_abs_pct"] <= WORST_PCT, summary


def double_the_activations(monkeypatch: pytest.MonkeyPatch) -> None:
    """A deliberately broken estimator: every saved-activation part twice what a forward saves."""
    real = ftprof.estimate.estimator.saved_activations
    monkeypatch.setattr(
        ftprof.estimate.estimator,
        "saved_activations",
        lambda arch, s, device="gpu": {k: 2 * v for k, v in real(arch, s, device).items()},
    )


def committed_records() -> list[Record]:
    return [r for m in MODELS for r in latest(read_records(ROOT / "profiles" / f"cpu-2core-{m}" / "results.jsonl"))]


def test_the_check_passes_the_estimator_and_fails_it_with_activations_doubled(monkeypatch):
    """On the committed sweeps (the same grid as the measurement below), without running a sweep."""
    check_accuracy(committed_records())
    double_the_activations(monkeypatch)
    with pytest.raises(AssertionError):
        check_accuracy(committed_records())


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> list[Record]:
    """Both models swept once for this module (about 2 minutes on 2 cores)."""
    records = []
    for model in MODELS:
        out = tmp_path_factory.mktemp(model)
        sweep(["--model", model, *GRID, *WINDOW, "--out", str(out)])
        records += latest(read_records(out / "results.jsonl"))
    return records


@pytest.mark.slow
def test_cpu_peak_rss_prediction_on_unseen_points(measured):
    check_accuracy(measured)


@pytest.mark.slow
def test_the_check_fails_on_the_same_measurements_with_activations_doubled(measured, monkeypatch):
    double_the_activations(monkeypatch)
    with pytest.raises(AssertionError):
        check_accuracy(measured)


@pytest.mark.slow
def test_model_states_match_each_ranks_measured_breakdown_item_by_item(tmp_path):
    """ZeRO-1 and 2 on two ranks in bf16, with and without optimizer offload (tiny-gpt2, which the model-state
    arithmetic was not worked out on): each rank's parameters, gradients, master weights, optimizer states and
    offload buffers as the estimator predicts them for that rank, within 1% of what the rank really holds.
    Gradients are the telling item: a rank holds the whole gradient of every parameter that overlaps its
    partition, so the two ranks differ (an even split is off by 40% on one of them)."""
    from ftprof.estimate.estimator import MODEL_STATES, estimate, measured_bytes, zero12_gradient_elements

    out = tmp_path / "states"
    sweep(
        ["--model", "tiny-gpt2", "--zero", "1,2", "--world_size", "2", "--precision", "bf16"]
        + ["--offload", "none,optimizer", "--batch_sizes", "2", "--seq_lens", "32", "--steps", "1"]
        + ["--min_seconds", "0", "--warmup", "0", "--out", str(out), "--no_report", "--no_remeasure"]
    )
    records = latest(read_records(out / "results.jsonl"))
    assert len(records) == 4
    assert {r.status for r in records} == {"ok"}
    arch = arch_for("tiny-gpt2")
    per_rank = zero12_gradient_elements(arch, 2)
    assert per_rank[0] != per_rank[1]  # this model's partition boundary cuts a parameter
    checked = 0
    for r in records:
        for rank in r.profile.ranks:
            est = estimate(arch, r.point, device="cpu", rank=rank.rank)
            items = [*MODEL_STATES, "offload_buffers"] if r.point.offload_optimizer else MODEL_STATES
            for item in items:
                held = measured_bytes(rank.breakdown, item)
                assert est.items[item] == pytest.approx(held, rel=0.01), (r.point.key, rank.rank, item)
                checked += 1
    assert checked == 2 * 2 * (4 + 5)
