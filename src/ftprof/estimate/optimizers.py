"""The torch optimizers HF Trainer builds from ``--optim``, as memory: their states and their step's transients.

Under DeepSpeed with the shipped configs the optimizer is the config's ``optimizer`` block (FusedAdam on a GPU,
DeepSpeedCPUAdam with offload: 8 bytes of moments per trained parameter, updated in place), which
:func:`ftprof.estimate.estimator.model_states` counts. Without DeepSpeed (``ftprof estimate --zero none``) the
Trainer's ``--optim`` steps, and implementations differ in what a step allocates. Each entry says where its
figures were read (torch 2.13's sources under ``torch/optim``; transformers' ``trainer_optimizer.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from ftprof.errors import ConfigError

Shape = tuple[int, ...]
# The trained parameters' shapes, grouped as HF Trainer groups them for its optimizer (weight decay, then the
# rest: biases and norms) and in the order each group steps them.
Groups = Sequence[Sequence[Shape]]
Device = Literal["gpu", "cpu"]  # what a prediction is for; on a CPU, "offloaded" state still counts in the process


@dataclass(frozen=True)
class TrainerOptimizer:
    """One ``--optim`` value: bytes of state and of a steady step's temporaries, from the trained parameters'
    shapes in HF Trainer's groups, and the device."""

    name: str
    label: str
    states_label: str  # what its state is, for the optimizer-states row of a table
    states: Callable[[Groups], int]
    temporaries: Callable[[Groups, Device], int]  # bytes a step allocates and frees, at its peak
    source: str


def _numel(shape: Shape) -> int:
    return math.prod(shape)


def _all(groups: Groups) -> list[Shape]:
    return [shape for group in groups for shape in group]


def _none(groups: Groups, device: Device = "gpu") -> int:
    return 0


def _adam_moments(groups: Groups) -> int:
    """exp_avg and exp_avg_sq, fp32 like the parameters (the 0-dim ``step`` counters are not counted)."""
    return 8 * sum(map(_numel, _all(groups)))


def _loop_peak(shapes: Sequence[Shape], own: Callable[[Shape], int], previous: Callable[[Shape], int]) -> int:
    """A per-parameter loop's peak: ``own(shape)`` bytes while a parameter steps, plus ``previous`` of the one
    before it (its last temporary, still bound to a Python variable until the next one replaces it)."""
    peak, held = 0, 0
    for shape in shapes:
        peak = max(peak, own(shape) + held)
        held = previous(shape)
    return peak


def _adamw_torch(groups: Groups, device: Device) -> int:
    if device == "gpu":
        # _multi_tensor_adam, called once per group: exp_avg_sq_sqrt = torch._foreach_sqrt(device_exp_avg_sqs), an
        # fp32 copy of the group's second moments, alive until _foreach_addcdiv_ (what follows on it is in place).
        return max((4 * sum(map(_numel, group)) for group in groups), default=0)
    # _single_tensor_adam (the CPU default, foreach=None), once per group: denom = (exp_avg_sq.sqrt() /
    # bias_correction2_sqrt) holds the sqrt and the quotient at once, beside the previous parameter's denom.
    return max(
        (_loop_peak(group, lambda s: 8 * _numel(s), lambda s: 4 * _numel(s)) for group in groups),
        default=0,
    )


def _factors(shape: Shape) -> int:
    """Elements of Adafactor's row and column statistics of a matrix (0 for a vector)."""
    return _numel(shape[:-1]) + _numel(shape[:-2] + shape[-1:]) if len(shape) >= 2 else 0


def _adafactor_states(groups: Groups) -> int:
    """Adafactor without a first moment (beta1 None, the Trainer's default): a matrix keeps fp32 row and column
    means of the squared gradient (exp_avg_sq_row: shape[:-1], exp_avg_sq_col: shape[:-2] + shape[-1:]), a
    vector its full exp_avg_sq; the 0-dim ``RMS`` tensor per parameter is not counted."""
    return sum(4 * (_factors(s) if len(s) >= 2 else _numel(s)) for s in _all(groups))


def _adafactor_step(groups: Groups, device: Device) -> int:
    # transformers/optimization.py Adafactor.step, one parameter at a time on every device, over all groups in
    # one loop: update = (grad**2) + eps holds two gradient-sized tensors while the previous parameter's update
    # is still bound; a matrix's _approx_sq_grad then makes the r x c product beside the old update, with its
    # row and column factors alive.
    peak, held = 0, 0
    for shape in _all(groups):
        peak = max(peak, 8 * _numel(shape) + max(held, 4 * _factors(shape)))
        held = 4 * _numel(shape)
    return peak


TRAINER_OPTIMIZERS: dict[str, TrainerOptimizer] = {
    "adamw_torch": TrainerOptimizer(
        "adamw_torch",
        "torch AdamW (foreach on a GPU, a loop on a CPU)",
        "Adam moments",
        _adam_moments,
        _adamw_torch,
        "torch/optim/adam.py: _multi_tensor_adam, _single_tensor_adam",
    ),
    "adamw_torch_fused": TrainerOptimizer(
        "adamw_torch_fused",
        "torch AdamW, fused",
        "Adam moments",
        _adam_moments,
        _none,
        "torch/optim/adam.py: _fused_adam (one kernel, in place; the Trainer's default with torch >= 2.8)",
    ),
    "sgd": TrainerOptimizer(
        "sgd",
        "torch SGD (no momentum)",
        "SGD: none",
        lambda groups: 0,
        _none,
        # transformers' _get_sgd passes lr only (momentum 0: no momentum_buffer); _multi_tensor_sgd then does
        # _foreach_add_(params, grads, alpha=-lr) in place (weight decay, 0 by default, would add a copy).
        "torch/optim/sgd.py: _multi_tensor_sgd; transformers/trainer_optimizer.py: _get_sgd",
    ),
    "adafactor": TrainerOptimizer(
        "adafactor",
        "transformers Adafactor (factored second moment, no first moment)",
        "Adafactor's second-moment statistics",
        _adafactor_states,
        _adafactor_step,
        "transformers/optimization.py: Adafactor.step; trainer_optimizer.py: _get_adafactor",
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
