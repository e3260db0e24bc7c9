"""The estimator against the committed H200 sweeps (measured 2026-12-04 by launch/gpu_check.sh; runs on CPU).

bert-base-uncased calibrates; distilbert-base-uncased is the held-out family, never fitted to. The bounds on whole
figures are the errors docs/benchmarks.md reports (bench/bench_gpu_profiles.py), kept as regression guards: issue
24's goals (allocated 2%, reserved and NVML 5% median) are not met yet and the docs say so.
"""

import statistics
import sys

import pytest

from ftprof.estimate.architecture import arch_for
from ftprof.estimate.estimator import MODEL_STATES, Calibration, estimate, measured_bytes
from ftprof.records.results import latest, read_records
from tests.conftest import ROOT

H200 = {"bert-base-uncased": ROOT / "profiles" / "h200-bert-base-uncased"}
HELD_OUT = {"distilbert-base-uncased": ROOT / "profiles" / "h200-distilbert-base-uncased"}
sys.path.insert(0, str(ROOT / "bench"))


def records(folder):
    return [r for r in latest(read_records(folder / "results.jsonl")) if r.status == "ok"]


@pytest.mark.parametrize("folder", [*H200.values(), *HELD_OUT.values()], ids=lambda f: f.name)
def test_model_states_and_saved_activations_match_each_measured_gpu_point(folder):
    recs = records(folder)
    assert len(recs) >= 2
    arch = arch_for(recs[0].model)
    for r in recs:
        (rank,) = r.profile.ranks
        est = estimate(arch, r.point, Calibration(), "gpu")
        for item in MODEL_STATES:  # exact: bytes of tensors that exist
            assert est.items.get(item, 0) == pytest.approx(measured_bytes(rank.breakdown, item), rel=0.01), item
        # SDPA on an H200: what autograd keeps, hooked on the real forward; distilbert is the held-out family.
        saved = rank.breakdown["saved_activations"]
        assert est.items["saved_activations"] == pytest.approx(saved, rel=0.005 if folder in H200.values() else 0.04)


def test_nvml_sees_the_reserved_segments_plus_the_cuda_context():
    for folder in [*H200.values(), *HELD_OUT.values()]:
        for r in records(folder):
            (rank,) = r.profile.ranks
            assert rank.figure == "process"  # NVML listed the point's process: its own memory, not the device's
            extra = r.peak_bytes - rank.peak("torch_reserved_bytes")
            assert 0.3 * 2**30 < extra <= 2 * 2**30, (r.point.key, extra)
            if r.point.zero < 3:  # ZeRO-3 builds the model on the GPU (zero.Init): then it holds weights too
                context = rank.phases["model_load"]["nvml_process_bytes"]  # before any tensor: context alone
                assert 0.3 * 2**30 < context <= extra, (r.point.key, context, extra)


def test_calibrated_on_bert_base_the_held_out_family_is_predicted_within_the_reported_error():
    from bench_gpu_profiles import fitted_calibration, rows

    fit = records(H200["bert-base-uncased"])
    judged = records(HELD_OUT["distilbert-base-uncased"])
    archs = {r.model: arch_for(r.model) for r in fit + judged}
    table = rows(judged, archs, fitted_calibration(fit, archs))
    worst = {k: max(abs(r[f"e_{k}"]) for r in table) for k in ("allocated", "reserved", "nvml")}
    median = {k: statistics.median(abs(r[f"e_{k}"]) for r in table) for k in ("allocated", "reserved", "nvml")}
    assert worst["allocated"] < 0.08, worst
    assert worst["reserved"] < 0.14, worst
    assert worst["nvml"] < 0.10, worst
    assert median["nvml"] < 0.07, median
    # The peers count model states only: both under-predict every measured point.
    assert all(r["e_deepspeed"] < -0.2 and r["e_accelerate"] < -0.6 for r in table)


def test_the_shipped_gpu_constants_are_those_the_h200_measurements_give():
    import json

    from bench_gpu_profiles import fitted_calibration

    from ftprof.estimate.calibration import SHIPPED_GPU

    # Plain Trainer on the H200: NVML beyond the allocator's segments is the runtime, with no NCCL in it.
    runs = {r["variant"]: r for r in map(json.loads, (ROOT / "profiles/h200-check/trainer_vs_deepspeed.jsonl").open())}
    plain = runs["plain"]
    assert SHIPPED_GPU.runtime_bytes == plain["peak_bytes"] - plain["torch_reserved_peak_bytes"]
    # The DeepSpeed sweep, fitted with the NCCL term held: the same runtime again (to 5%), and the allocator factor.
    fit = records(H200["bert-base-uncased"])
    cal = fitted_calibration(fit, {r.model: arch_for(r.model) for r in fit})
    assert cal.runtime_bytes + cal.deepspeed_runtime_bytes == pytest.approx(1_717_537_861, rel=1e-3)
    assert SHIPPED_GPU.runtime_bytes == pytest.approx(cal.runtime_bytes, rel=1e-3)
    assert SHIPPED_GPU.reserved_factor == pytest.approx(cal.reserved_factor, rel=1e-3)
    assert (SHIPPED_GPU.activation_factor, SHIPPED_GPU.zero_runtime_bytes) == (cal.activation_factor, 0.0)
    assert SHIPPED_GPU.fitted_on == len(fit)
    # DeepSpeed's extra is what the launcher's ZeRO-0 shows beyond plain Trainer at the same point, to 10%.
    zero0 = runs["zero0"]
    extra = (zero0["peak_bytes"] - zero0["torch_reserved_peak_bytes"]) - SHIPPED_GPU.runtime_bytes
    assert SHIPPED_GPU.deepspeed_runtime_bytes == pytest.approx(extra, rel=0.10)
