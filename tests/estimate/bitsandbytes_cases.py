"""bitsandbytes' 8-bit AdamW against its memory model, on real CPU steps. Not collected by the suite's own run
(bitsandbytes lives apart, in .venv/apart, so peft does not import it into every measured process):
tests/estimate/test_optimizers.py runs this file in a pytest of its own with that folder on its path."""

import pytest
import torch

from ftprof.estimate.optimizers import TRAINER_OPTIMIZERS
from ftprof.estimate.trace import measure_optimizer_step
from tests.estimate.test_optimizers import MODELS, check_against_a_real_step, forget_bitsandbytes_overrides


@pytest.mark.parametrize("model", MODELS)
def test_8bit_adamw_states_and_step_match_a_real_step_on_the_trainers_groups(model):
    check_against_a_real_step(model, "adamw_bnb_8bit")


def test_bitsandbytes_8bit_adamw_keeps_a_byte_per_moment_and_block_scales_worked_by_hand():
    """Hand-worked: a 4,096-element vector and a 300x100 matrix are 8-bit (two uint8 moments, two fp32 absmax
    per 256-element block: 16 and 118 blocks), a 100-element vector keeps fp32 moments, and the two shared
    quantisation maps are 2 KiB. A CPU step holds one parameter's moments in fp32, its gradient's copy, and the
    sqrt and quotient of the denominator: 5 x 4 bytes x 30,000 for the matrix."""
    import bitsandbytes as bnb

    shapes = [(4096,), (100,), (300, 100)]
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*s)) for s in shapes]
    forget_bitsandbytes_overrides()
    cost = measure_optimizer_step(params, bnb.optim.AdamW(params, optim_bits=8))
    expected = 2 * (4096 + 4 * 16) + 8 * 100 + 2 * (30000 + 4 * 118) + 2 * 256 * 4
    assert cost.state_bytes == TRAINER_OPTIMIZERS["adamw_bnb_8bit"].states([shapes]) == expected == 72_112
    assert cost.transient_peak == 0  # the kernel's tensors never reach the dispatcher...
    # ...but the allocator sees them (and 12 bytes of 0-dim scalars)
    assert cost.allocator_peak - 12 == TRAINER_OPTIMIZERS["adamw_bnb_8bit"].temporaries([shapes], "cpu") == 600_000
    assert TRAINER_OPTIMIZERS["adamw_bnb_8bit"].temporaries([shapes], "gpu") == 0
