"""The estimator against real measurements on this CPU: median error on held-out points must stay <= 15%."""

import pytest

from ftprof.calibrate import calibrate, error_summary, errors, observations_from_records, split_holdout
from ftprof.estimate import Calibration
from ftprof.model_facts import arch_for
from ftprof.results import latest, read_records
from tests.integration.test_sweep_cli import sweep


@pytest.mark.slow
def test_cpu_peak_rss_prediction_on_unseen_points(tmp_path):
    records = []
    for model in ("tiny-bert", "tiny-gpt2"):  # an encoder and a decoder
        out = tmp_path / model
        sweep(
            [
                "--model",
                model,
                "--zero",
                "0,2",
                "--batch_sizes",
                "4,32",
                "--seq_lens",
                "128,512",
                "--out",
                str(out),
                "--no_report",
            ]
        )
        records += latest(read_records(out / "results.jsonl"))
    observations = observations_from_records(records, lambda m: arch_for(m))
    assert len(observations) == 16
    fit, held_out = split_holdout(observations)
    cal = calibrate(fit, "cpu", Calibration(device="cpu", reserved_factor=1.0))
    summary = error_summary(errors(held_out, cal))
    print(summary, cal)
    assert summary["median_abs_pct"] <= 15.0
