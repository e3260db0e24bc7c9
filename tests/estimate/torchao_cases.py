"""torchao's 8-bit AdamW (``--optim adamw_torch_8bit``) against its memory model, on real CPU steps. Not
collected by the suite's own run (torchao lives apart, in .venv/apart, beside bitsandbytes):
tests/estimate/test_optimizers.py runs this file in a pytest of its own with that folder on its path."""

import pytest
import torch

from ftprof.estimate.optimizers import TRAINER_OPTIMIZERS
from ftprof.estimate.trace import measure_optimizer_step
from tests.estimate.test_optimizers import MODELS, check_against_a_real_step

MODEL = TRAINER_OPTIMIZERS["adamw_torch_8bit"]


# Each model's shapes cost a torch.compile (about 15 s cold on 2 cores): tiny-llama's (a gated MLP, an LM head)
# and the hand-worked shapes below; tiny-bert and tiny-gpt2 matched the same way when this was written
# (docs/benchmarks.md section 1).
@pytest.mark.parametrize("model", ["tiny-llama"])
def test_torchao_8bit_adamw_states_and_step_match_a_real_step_on_the_trainers_groups(model):
    assert model in MODELS
    check_against_a_real_step(model, "adamw_torch_8bit")


def test_torchao_8bit_adamw_worked_by_hand():
    """A 512 x 512 matrix and a 128 x 128 one are quantised (uint8 codes, an fp32 scale per 256 elements and a
    1 KiB quantisation map per moment); a 4,097-element vector (not a multiple of the block) and a 100-element one
    keep fp32 moments; each parameter a 0-dim ``step``. A step holds the largest quantised parameter's two
    moments in fp32 and their new scales: 8 x 262,144 + 8 x 1,024 bytes (and at times 12 bytes of 0-dim
    scalars beside them)."""
    from torchao.optim import AdamW8bit

    shapes = [(100,), (512, 512), (4097,), (128, 128)]
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*s)) for s in shapes]
    cost = measure_optimizer_step(params, AdamW8bit(params, lr=1e-4), dispatch=False)
    quantised = 2 * (262_144 + 4 * 1_024 + 1_024) + 2 * (16_384 + 4 * 64 + 1_024)
    expected = quantised + 8 * 100 + 8 * 4_097
    assert MODEL.states([shapes]) == expected == 603_432
    assert cost.state_bytes == expected + 4 * len(shapes)
    assert MODEL.temporaries([shapes], "cpu") == 8 * 262_144 + 8 * 1_024 == 2_105_344
    assert MODEL.temporaries([shapes], "cpu") <= cost.allocator_peak <= MODEL.temporaries([shapes], "cpu") + 12
