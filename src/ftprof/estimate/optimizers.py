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


class EmbeddingShape(tuple[int, ...]):
    """The shape of an ``nn.Embedding``'s weight (equal to the plain tuple): HF Trainer has bitsandbytes keep
    its 8-bit optimizers' state of these in 32 bits (``Trainer.create_optimizer``: ``register_module_override(
    module, "weight", {"optim_bits": 32})``)."""


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


#: bitsandbytes' 8-bit blockwise states (bitsandbytes/optim/optimizer.py, ``Optimizer2State.init_state``): a
#: parameter of at least ``min_8bit_size`` elements keeps each moment as one uint8 per element plus an fp32 absmax
#: per block of 256; a smaller one keeps fp32 moments, as torch's Adam does, and so does an embedding under HF
#: Trainer (:class:`EmbeddingShape`).
BNB_BLOCK = 256
BNB_MIN_8BIT_SIZE = 4096
#: The quantisation maps ``name2qmap["dynamic"]`` and ``["udynamic"]``: 256 fp32 each, one copy for every parameter.
BNB_QMAPS = 2 * 256 * 4


def _is_8bit(shape: Shape) -> bool:
    return _numel(shape) >= BNB_MIN_8BIT_SIZE and not isinstance(shape, EmbeddingShape)


def _adam_8bit_states(groups: Groups) -> int:
    """state1 and state2 (uint8) with absmax1 and absmax2 (fp32 per block) where 8-bit, else fp32 moments; the
    shared quantisation maps once (``step`` is a Python int here, not a tensor)."""
    shapes = _all(groups)
    total = 0
    for shape in shapes:
        n = _numel(shape)
        total += 2 * (n + 4 * math.ceil(n / BNB_BLOCK)) if _is_8bit(shape) else 8 * n
    return total + (BNB_QMAPS if any(map(_is_8bit, shapes)) else 0)


def _adam_8bit_step(groups: Groups, device: Device) -> int:
    if device == "gpu":
        # The CUDA kernels (cadam_8bit_blockwise_*, cadam32bit_*) dequantize, update and requantize in
        # registers: nothing is allocated.
        return 0
    # bitsandbytes/backends/cpu/ops.py, one parameter at a time (each call's tensors are freed on return):
    # _optimizer_update_8bit_blockwise_cpu dequantizes both moments to fp32 (8n bytes), makes grad = g.float() *
    # gnorm_scale (4n) and then denom = state2_fp32.sqrt() / correction2, holding the sqrt and the quotient
    # at once (8n): 20n; the 32-bit path (small parameters) holds g_float, then state2.sqrt() + eps (the sqrt
    # and the sum, 8n): 12n.
    return max((4 * _numel(s) * (5 if _is_8bit(s) else 3) for s in _all(groups)), default=0)


#: torchao's 8-bit AdamW (torchao 0.18: torchao/optim/adam.py ``_AdamBase._new_buffer``, subclass_8bit.py
#: ``OptimState8bit.zeros``; transformers' ``_get_torchao_optimizer``, block_size 256): a parameter of at least
#: 4,096 elements divisible by the block keeps each moment as uint8 codes, an fp32 scale per block and its own
#: 256-entry fp32 quantisation map; any other keeps fp32 moments. ``step`` is a 0-dim CPU tensor.
TORCHAO_BLOCK = 256
TORCHAO_QMAP = 256 * 4


def _torchao_quantized(shape: Shape) -> bool:
    n = _numel(shape)
    return n >= 4096 and n % TORCHAO_BLOCK == 0


def _torchao_8bit_states(groups: Groups) -> int:
    return sum(
        2 * (_numel(s) + 4 * (_numel(s) // TORCHAO_BLOCK) + TORCHAO_QMAP) if _torchao_quantized(s) else 8 * _numel(s)
        for s in _all(groups)
    )


def _torchao_8bit_step(groups: Groups, device: Device) -> int:
    # One torch.compile'd single_param_adam per parameter: inductor's CPU code holds both moments dequantised to
    # fp32 (exp_avg_f32, exp_avg_sq_f32: each feeds the update and the per-block amax of its requantisation) and
    # their new block scales; the fp32-moment path fuses into one kernel (no buffer). Measured on CPU steps; on a
    # GPU the same compiled graph is taken to hold the same (Triton may fuse the block reductions: not measured).
    del device
    return max(
        (8 * _numel(s) + 8 * (_numel(s) // TORCHAO_BLOCK) for s in _all(groups) if _torchao_quantized(s)), default=0
    )


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
    "adamw_bnb_8bit": TrainerOptimizer(
        "adamw_bnb_8bit",
        "bitsandbytes AdamW, 8-bit blockwise states",
        "8-bit Adam moments",
        _adam_8bit_states,
        _adam_8bit_step,
        "bitsandbytes/optim/optimizer.py: Optimizer2State; backends/cpu/ops.py; trainer_optimizer.py: "
        "_get_bitsandbytes_optimizer",
    ),
    "adamw_torch_8bit": TrainerOptimizer(
        "adamw_torch_8bit",
        "torchao AdamW8bit (blockwise 8-bit states, a torch.compile'd step)",
        "8-bit Adam moments (torchao)",
        _torchao_8bit_states,
        _torchao_8bit_step,
        "torchao/optim/adam.py, subclass_8bit.py (0.18); trainer_optimizer.py: _get_torchao_optimizer; the step's "
        "buffers measured on CPU (inductor), assumed the same on a GPU",
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


def check_plain_trainer(precision: str, offload: str, gradient_checkpointing: bool) -> None:
    """Refuse what the plain-Trainer estimate does not model yet, rather than answer wrongly.

    fp32 only: under ``--bf16``/``--fp16`` without DeepSpeed, autocast keeps fp32 weights and casts them per op
    (the casts are saved for backward), so activations and weight copies differ from DeepSpeed's 16-bit model;
    ``--trace`` estimates it from the traced step (:mod:`ftprof.estimate.traced`), ``ftprof sweep`` measures it.
    Several ranks are DDP (its gradient buckets are an item of their own).
    """
    if precision != "fp32":
        raise ConfigError(
            f"--zero none with --precision {precision}: autocast's fp32 weights and per-op casts are estimated from "
            "the traced step: add --trace (GPU targets), or use --precision fp32, or a DeepSpeed stage"
        )
    if offload != "none":
        raise ConfigError("--zero none: offload needs DeepSpeed; use --offload none")
    del gradient_checkpointing  # modelled as with DeepSpeed: each layer's input saved, one layer recomputed
