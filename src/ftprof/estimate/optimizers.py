"""The torch optimizers HF Trainer builds from ``--optim``, as memory: their states and their step's transients.

Under DeepSpeed with the shipped configs the optimizer is the config's ``optimizer`` block (FusedAdam on a GPU,
DeepSpeedCPUAdam with offload: 8 bytes of moments per trained parameter, updated in place), which
:func:`ftprof.estimate.estimator.model_states` counts. Without DeepSpeed (``ftprof estimate --zero none``) the
Trainer's ``--optim`` steps, and implementations differ in what a step allocates. Each entry says where its
figures were read (torch 2.13's sources under ``torch/optim``; transformers' ``trainer_optimizer.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ftprof.errors import ConfigError


@dataclass(frozen=True)
class TrainerOptimizer:
    """One ``--optim`` value: bytes of state and of step temporaries, from the trained parameter count."""

    name: str
    label: str
    state_bytes_per_param: int
    temporaries: Callable[[int], int]  # trained parameters -> bytes a step allocates and frees
    source: str


def _none(params: int) -> int:
    return 0


def _one_fp32_copy(params: int) -> int:
    return 4 * params


TRAINER_OPTIMIZERS: dict[str, TrainerOptimizer] = {
    "adamw_torch": TrainerOptimizer(
        "adamw_torch",
        "torch AdamW, foreach",
        8,
        _one_fp32_copy,
        # adam.py _multi_tensor_adam: exp_avg_sq_sqrt = torch._foreach_sqrt(device_exp_avg_sqs), one tensor per
        # parameter, alive until torch._foreach_addcdiv_; the moments are updated in place (_foreach_lerp_,
        # _foreach_mul_, _foreach_addcmul_). The GPU default of foreach=None (the CPU default is a loop).
        "torch/optim/adam.py: _multi_tensor_adam",
    ),
    "adamw_torch_fused": TrainerOptimizer(
        "adamw_torch_fused",
        "torch AdamW, fused",
        8,
        _none,
        "torch/optim/adam.py: _fused_adam (one kernel, in place; the Trainer's default with torch >= 2.8)",
    ),
    "sgd": TrainerOptimizer(
        "sgd",
        "torch SGD (no momentum)",
        0,
        _none,
        # transformers' _get_sgd passes lr only (momentum 0: no momentum_buffer); _multi_tensor_sgd then does
        # _foreach_add_(params, grads, alpha=-lr) in place (weight decay, 0 by default, would add a copy).
        "torch/optim/sgd.py: _multi_tensor_sgd; transformers/trainer_optimizer.py: _get_sgd",
    ),
}
#: The Trainer's default ``--optim`` with torch >= 2.8 (transformers' TrainingArguments.default_optim).
DEFAULT_TRAINER_OPTIM = "adamw_torch_fused"


def trainer_optimizer(name: str) -> TrainerOptimizer:
    """The model of ``--optim NAME``.

    Raises:
        ConfigError: an optimizer this estimator does not model.
    """
    if name not in TRAINER_OPTIMIZERS:
        raise ConfigError(
            f"--optim {name!r}: not modelled by ftprof estimate yet; use one of {', '.join(TRAINER_OPTIMIZERS)} "
            "(or measure it: ftprof sweep)"
        )
    return TRAINER_OPTIMIZERS[name]


def check_plain_trainer(precision: str, world_size: int, offload: str, gradient_checkpointing: bool) -> None:
    """Refuse what the plain-Trainer estimate does not model yet, rather than answer wrongly.

    fp32 only: under ``--bf16``/``--fp16`` without DeepSpeed, autocast keeps fp32 weights and casts them per op
    (the casts are saved for backward), so activations and weight copies differ from DeepSpeed's 16-bit model.
    One rank only: DDP adds gradient buckets. Both are measured by ``ftprof sweep`` instead.
    """
    if precision != "fp32":
        raise ConfigError(
            f"--zero none with --precision {precision}: autocast's fp32 weights and per-op casts are not modelled "
            "yet; use --precision fp32, or a DeepSpeed stage"
        )
    if world_size != 1:
        raise ConfigError("--zero none on several ranks (DDP) is not modelled yet; use --world_size 1")
    if offload != "none":
        raise ConfigError("--zero none: offload needs DeepSpeed; use --offload none")
    del gradient_checkpointing  # modelled as with DeepSpeed: each layer's input saved, one layer recomputed
