"""Where one rank's memory goes, measured item by item on the real run.

Two meters, both device-independent (they count tensor bytes, not what a sampler sees):

- :class:`SavedActivationMeter`: the bytes autograd holds for backward after one training micro-batch's
  forward (``saved_tensors_hooks``), each storage once, parameters excluded. Under gradient checkpointing
  the checkpointed layers' inputs are what stays: they are counted at each checkpointed layer's entry.
- :func:`model_state_bytes`: what the rank holds of the model state after ZeRO partitioning, walked on the
  model and the optimizer that really steps: parameters by dtype (ZeRO-3: this rank's partition),
  fp32 master weights, optimizer states, gradients and DeepSpeed's gradient buffers. Storages shared by
  several tensors (DeepSpeed's flat buffers and their views) count once, under the first item that holds them.

On CUDA the callback keeps, beside the breakdown, the caching allocator's figures the phases don't carry
(:func:`allocator_figures`: active and requested peaks, fragmentation, retries).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterable, Iterator
from typing import Any

import torch

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _storage(t: torch.Tensor) -> tuple[int, int] | None:
    """(data pointer, bytes) of the storage behind ``t``; None for tensors without one (meta, empty)."""
    if t.device.type == "meta":  # a meta storage reports bytes it does not hold (DeepSpeed keeps such buffers)
        return None
    try:
        storage = t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None
    nbytes = storage.nbytes()
    return (storage.data_ptr(), nbytes) if nbytes else None


class SavedActivationMeter:
    """Measure the saved activations of the first training forward of ``model`` (a forward pre-hook opens
    the measurement, the forward hook closes it). ``saved_bytes`` is None until then."""

    def __init__(self) -> None:
        self.saved_bytes: int | None = None
        self._seen: dict[int, int] = {}
        self._params: set[int] = set()
        self._context: Any = None
        self._handles: list[Any] = []

    def attach(self, model: torch.nn.Module) -> None:
        if self._handles or self.saved_bytes is not None:
            return
        self._handles = [
            model.register_forward_pre_hook(self._open),
            model.register_forward_hook(self._close, always_call=True),  # closes even if the forward raises
        ]
        for module in model.modules():
            if module is not model and hasattr(module, "gradient_checkpointing"):  # transformers' layers
                self._handles.append(module.register_forward_pre_hook(self._layer_input))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._context is not None:
            self._context.__exit__(None, None, None)
            self._context = None

    def _open(self, module: torch.nn.Module, args: Any) -> None:
        if not module.training or not torch.is_grad_enabled() or self._context is not None:
            return
        self._params = {s[0] for p in module.parameters() if (s := _storage(p.data)) is not None}
        self._seen.clear()
        self._context = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._context.__enter__()

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        # A parameter, or a view of one (F.linear saves weight.t()); ZeRO-3 swaps their storages in and out.
        parameter = isinstance(t, torch.nn.Parameter) or isinstance(t._base, torch.nn.Parameter)
        if not parameter and not (t.is_leaf and t.requires_grad):
            s = _storage(t)
            if s is not None and s[0] not in self._params:
                self._seen.setdefault(*s)
        return t

    def _layer_input(self, module: torch.nn.Module, args: Any) -> None:
        if self._context is None or not getattr(module, "gradient_checkpointing", False) or not args:
            return
        if isinstance(args[0], torch.Tensor) and (s := _storage(args[0])) is not None:
            self._seen.setdefault(*s)

    def _close(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if self._context is None:
            return
        self._context.__exit__(None, None, None)
        self._context = None
        if output is None:  # the forward raised (torch calls this hook anyway): measure the next one
            self._seen.clear()
            return
        self.saved_bytes = sum(self._seen.values())
        self._seen.clear()
        self.detach()


class GatheredParameterMeter:
    """ZeRO-3: the most parameter bytes gathered (whole, beside the partitions) at the end of any training
    forward, i.e. what the gathered-parameter cache keeps resident into the backward. None without ZeRO-3."""

    def __init__(self) -> None:
        self.gathered_bytes: int | None = None
        self._handle: Any = None

    def attach(self, model: torch.nn.Module) -> None:
        if self._handle is None and any(hasattr(p, "ds_tensor") for p in model.parameters()):
            self._handle = model.register_forward_hook(self._measure)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _measure(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if not module.training:
            return
        storages = {s for p in module.parameters() if (s := _storage(p.data)) is not None}
        self.gathered_bytes = max(self.gathered_bytes or 0, sum(nbytes for _, nbytes in storages))


def optimizer_chain(optimizer: Any) -> list[Any]:
    """accelerate's wrapper, DeepSpeed's ZeRO optimizer, ..., down to the torch optimizer that steps."""
    chain, seen = [], 0
    while optimizer is not None and seen < 8:
        chain.append(optimizer)
        optimizer, seen = getattr(optimizer, "optimizer", None), seen + 1
    return chain


# Where DeepSpeed's optimizers keep each item (ZeRO-1/2, ZeRO-3, the BF16 optimizer), by attribute name.
MASTER_ATTRIBUTES = ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition")
GRADIENT_ATTRIBUTES = (
    "averaged_gradients",
    "grad_partitions_flat_buffer",
    "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition",
    "fp32_groups_gradients_flat",
)
BUCKET_ATTRIBUTES = ("ipg_buckets", "ipg_buffer")


def _tensors(value: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    """Tensors in ``value`` and the lists, tuples, dicts and dataclasses it holds (parameters excluded:
    they are the model's, or ZeRO-3 placeholders)."""
    if isinstance(value, torch.nn.Parameter):
        return
    if isinstance(value, torch.Tensor):
        yield value
    elif depth < 3 and isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v, depth + 1)
    elif depth < 3 and isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v, depth + 1)
    elif depth < 3 and dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from _tensors(getattr(value, f.name, None), depth + 1)


class _Ledger:
    """Bytes by item, each storage counted once (under the first item that claims it). On a GPU machine,
    host-resident tensors (offload) go to ``<item>_host``, apart from the device's."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.items: dict[str, int] = {}
        self._claimed: set[int] = set()

    def claim(self, item: str, tensors: Iterable[torch.Tensor]) -> None:
        self.items.setdefault(item, 0)
        for t in tensors:
            s = _storage(t)
            if s is not None and s[0] not in self._claimed:
                self._claimed.add(s[0])
                key = item if t.device.type == self.device else f"{item}_host"
                self.items[key] = self.items.get(key, 0) + s[1]


def ddp_bucket_bytes(wrapped: Any) -> int:
    """Bytes of the gradient buckets of ``wrapped`` where it is a ``DistributedDataParallel`` model that keeps
    them apart from ``.grad`` (``gradient_as_bucket_view=False``, HF Trainer's and accelerate's default: each
    gradient is copied into its bucket for the all-reduce, and back), as DDP's own logging data sizes them; 0
    otherwise (where the gradients are views of the buckets, the ``gradients`` item holds those bytes)."""
    if not isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
        return 0
    data = wrapped._get_ddp_logging_data()
    if data.get("gradient_as_bucket_view"):
        return 0
    return sum(int(size) for size in str(data.get("bucket_sizes", "")).split(",") if size.strip())


def model_state_bytes(model: torch.nn.Module, optimizer: Any, wrapped: Any = None) -> dict[str, int]:
    """This rank's model-state bytes by item.

    Items: ``parameters_<dtype>`` (the model's parameters as this rank stores them: ZeRO-3 its partition;
    ``frozen_parameters_<dtype>`` those that don't train, e.g. the base weights under LoRA),
    ``master_weights`` (the fp32 copies DeepSpeed's optimizer steps, where they are a copy),
    ``optimizer_states`` (the stepping optimizer's state tensors: Adam's moments under DeepSpeed), ``gradients`` (every
    ``.grad`` and DeepSpeed's gradient partitions), ``gradient_buckets`` (DeepSpeed's reduction buckets, or
    DDP's where ``wrapped``, the model as the Trainer runs it, is a DDP model: :func:`ddp_bucket_bytes`) and
    ``other_buffers`` (any other tensor DeepSpeed's optimizer holds, e.g. offload staging buffers). Read
    just before an optimizer step for the gradients, just after it for the rest.
    """
    ledger = _Ledger("cuda" if torch.cuda.is_available() else "cpu")
    params = list(model.parameters())
    for p in params:
        local = p.ds_tensor if hasattr(p, "ds_tensor") else p.data
        dtype = DTYPE_NAMES.get(local.dtype, str(local.dtype).removeprefix("torch."))
        ledger.claim(f"{'' if p.requires_grad else 'frozen_'}parameters_{dtype}", [local])
    chain = optimizer_chain(optimizer)
    inner = chain[-1] if chain and isinstance(chain[-1], torch.optim.Optimizer) else None
    wrappers = [vars(w) for w in chain if w is not inner]
    masters = [p for g in inner.param_groups for p in g["params"]] if inner is not None else []
    ledger.claim(
        "master_weights", [*masters, *(t for w in wrappers for a in MASTER_ATTRIBUTES for t in _tensors(w.get(a)))]
    )
    if inner is not None:
        # Scalars (Adam's step counts) are bookkeeping, not state that grows with the model.
        ledger.claim("optimizer_states", [t for st in inner.state.values() for t in _tensors(st) if t.dim() > 0])
    grads = [p.grad for p in [*params, *masters] if p.grad is not None]
    for w in wrappers:
        grads += [t for a in GRADIENT_ATTRIBUTES for t in _tensors(w.get(a))]
        grads += [g.grad for a in MASTER_ATTRIBUTES for g in _tensors(w.get(a)) if g.grad is not None]
    ledger.claim("gradients", grads)
    ledger.claim("gradient_buckets", [t for w in wrappers for a in BUCKET_ATTRIBUTES for t in _tensors(w.get(a))])
    ledger.claim("other_buffers", [t for w in wrappers for v in w.values() for t in _tensors(v)])
    buckets = ddp_bucket_bytes(wrapped)
    if buckets:
        ledger.items["gradient_buckets"] = ledger.items.get("gradient_buckets", 0) + buckets
    return ledger.items


# torch.cuda.memory_stats() figures kept beside the breakdown, by short name. The allocated and reserved peaks
# are the phases' torch_allocated_bytes / torch_reserved_bytes already; these say what those don't.
ALLOCATOR_STATS = {
    "active_peak_bytes": "active_bytes.all.peak",  # allocated, or freed but still in use by another stream
    "requested_peak_bytes": "requested_bytes.all.peak",  # what tensors asked for, before the allocator's rounding
    "inactive_split_peak_bytes": "inactive_split_bytes.all.peak",  # cached but unusable pieces: fragmentation
    "alloc_retries": "num_alloc_retries",  # cudaMalloc failures that freed the cache and tried again
}


def allocator_figures(stats: dict[str, Any]) -> dict[str, int]:
    """The :data:`ALLOCATOR_STATS` figures of a ``torch.cuda.memory_stats()`` reading (those it has).

    >>> allocator_figures({"active_bytes.all.peak": 5, "num_alloc_retries": 0, "allocated_bytes.all.peak": 4})
    {'active_peak_bytes': 5, 'alloc_retries': 0}
    """
    return {name: int(stats[key]) for name, key in ALLOCATOR_STATS.items() if key in stats}


def levers_in_use(model: torch.nn.Module, optimizer: Any) -> dict[str, Any]:
    """What the run really did about the memory levers, read off the model and the optimizer."""
    chain = optimizer_chain(optimizer)
    zero = next((o for o in chain if hasattr(o, "cpu_offload") or hasattr(o, "offload_optimizer")), None)
    return {
        "gradient_checkpointing": bool(
            model.is_activation_checkpointing
            if hasattr(model, "is_activation_checkpointing")  # transformers 5; the old name warns
            else getattr(model, "is_gradient_checkpointing", False)
        ),
        "offload_optimizer": bool(
            zero and (getattr(zero, "cpu_offload", False) or getattr(zero, "offload_optimizer", False))
        ),
        "offload_param": bool(zero and getattr(zero, "offload_param", False)),
        "optimizer": type(chain[-1]).__name__ if chain else None,
        "optimizer_impl": _implementation(chain[-1]) if chain else None,
    }


def _implementation(optimizer: Any) -> str | None:
    """A torch optimizer's kernel choice: "fused", "foreach", or "auto" (torch picks foreach on CUDA, a loop
    on CPU); None for an optimizer without these flags (DeepSpeed's FusedAdam, DeepSpeedCPUAdam, ...)."""
    defaults = getattr(optimizer, "defaults", None)
    if not isinstance(defaults, dict) or ("fused" not in defaults and "foreach" not in defaults):
        return None
    if defaults.get("fused"):
        return "fused"
    return "foreach" if defaults.get("foreach") else "auto" if defaults.get("foreach") is None else "for-loop"


def parameter_counts(model: Any) -> tuple[int, int]:
    """(trainable, frozen) parameter elements, whole (ZeRO-3's ``ds_numel``, not this rank's share)."""
    trainable = frozen = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", p.numel())
        if p.requires_grad:
            trainable += n
        else:
            frozen += n
    return trainable, frozen


def adapted_modules(model: torch.nn.Module) -> list[str]:
    """Names of the layers that got a LoRA adapter (peft's ``LoraLayer``), as the base model names them;
    empty when peft was never imported (no model can hold its layers then)."""
    if "peft" not in sys.modules:
        return []
    from peft.tuners.lora import LoraLayer

    names = [name for name, m in model.named_modules() if isinstance(m, LoraLayer)]
    return [n.removeprefix("base_model.model.") for n in names]
