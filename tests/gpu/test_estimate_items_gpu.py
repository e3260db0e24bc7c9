"""The estimator against each rank's measured breakdown on a real GPU (`pytest -m gpu`); CI has no GPU and skips it.

On a CPU host and device are one memory, so where offload puts each item (device or host) is only told apart
here: the device items against the breakdown's, the host items against its ``<item>_host`` figures."""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.slow
def test_model_states_on_device_and_host_match_the_breakdown(tmp_path):
    from ftprof.estimate.architecture import arch_for
    from ftprof.estimate.estimator import MODEL_STATES, estimate, measured_bytes
    from ftprof.records.results import latest, read_records
    from tests.integration.test_sweep_cli import sweep

    sweep(
        ["--model", "tiny-gpt2", "--zero", "1,2,3", "--precision", "bf16", "--offload", "none,optimizer"]
        + ["--batch_sizes", "4", "--seq_lens", "64", "--out", str(tmp_path), "--no_report", "--no_remeasure"]
    )
    records = latest(read_records(tmp_path / "results.jsonl"))
    assert len(records) == 6
    assert {r.status for r in records} == {"ok"}
    arch = arch_for("tiny-gpt2")
    for r in records:
        for rank in r.profile.ranks:
            est = estimate(arch, r.point, device="gpu", rank=rank.rank)
            items = [*MODEL_STATES, "offload_buffers"] if r.point.offload_optimizer else MODEL_STATES
            for item in items:
                where = (r.point.key, rank.rank, item)
                assert est.items.get(item, 0) == pytest.approx(measured_bytes(rank.breakdown, item), rel=0.01), where
                host = measured_bytes(rank.breakdown, item, host=True)
                assert est.host_items.get(item, 0) == pytest.approx(host, rel=0.01), where
