"""Where one rank's memory goes, measured item by item on the real run.

Two meters, both device-independent (they count tensor bytes, not what a sampler sees):

- :class:`SavedActivationMeter`: the bytes autograd holds for backward after one training micro-batch's
  forward (``saved_tensors_hooks``), each storage once, parameters excluded. Under gradient checkpointing
  the checkpointed layers' inputs are what stays: they are counted at each checkpointed layer's entry.
- :func:`model_state_bytes`: what the rank holds of the model state after ZeRO partitioning, walked on the
  model and the optimizer that really steps: parameters by dtype (ZeRO-3: this rank's partition),
  fp32 master weights, optimizer states, gradients and DeepSpeed's gradient buffers. Storages shared by
  several tensors (DeepSpeed's flat buffers and their views) count once, under the first item that holds them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _storage(t: torch.Tensor) -> tuple[int, int] | None:
    """(data pointer, bytes) of the storage behind ``t``; None for tensors without one (meta, empty)."""
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
            model.register_forward_hook(self._close),
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
        self._context = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._context.__enter__()

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if not (t.is_leaf and t.requires_grad):  # a parameter (ZeRO-3 swaps its storage in and out)
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
        self.saved_bytes = sum(self._seen.values())
        self._seen.clear()
        self.detach()


def optimizer_chain(optimizer: Any) -> list[Any]:
    """accelerate's wrapper, DeepSpeed's ZeRO optimizer, ..., down to the torch optimizer that steps."""
    chain, seen = [], 0
    while optimizer is not None and seen < 8:
        chain.append(optimizer)
        optimizer, seen = getattr(optimizer, "optimizer", None), seen + 1
    return chain


def _tensors(value: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    """Tensors in ``value`` and the lists, tuples and dicts it holds (not inside other objects)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif depth < 3 and isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v, depth + 1)
    elif depth < 3 and isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v, depth + 1)


class _Ledger:
    """Bytes by item, each storage counted once (under the first item that claims it)."""

    def __init__(self) -> None:
        self.items: dict[str, int] = {}
        self._claimed: set[int] = set()

    def claim(self, item: str, tensors: Iterator[torch.Tensor] | list[torch.Tensor]) -> None:
        for t in tensors:
            s = _storage(t)
            if s is not None and s[0] not in self._claimed:
                self._claimed.add(s[0])
                self.items[item] = self.items.get(item, 0) + s[1]
        self.items.setdefault(item, 0)


def model_state_bytes(model: torch.nn.Module, optimizer: Any) -> dict[str, int]:
    """This rank's model-state bytes by item, read after an optimizer step (states exist, gradients may not).

    Items: ``parameters_<dtype>`` (the model's parameters as this rank stores them), ``master_weights``
    (parameters the optimizer steps that are not the model's: DeepSpeed's fp32 partitions),
    ``optimizer_states`` (the stepping optimizer's state tensors: Adam's moments) and ``gradients`` (every
    ``.grad`` and the tensors DeepSpeed's optimizer keeps beside its parameters: partitioned gradients and
    reduction buckets).
    """
    ledger = _Ledger()
    for p in model.parameters():
        local = p.ds_tensor if hasattr(p, "ds_tensor") else p.data
        ledger.claim(f"parameters_{DTYPE_NAMES.get(local.dtype, str(local.dtype).removeprefix('torch.'))}", [local])
    chain = optimizer_chain(optimizer)
    inner = chain[-1] if chain and isinstance(chain[-1], torch.optim.Optimizer) else None
    if inner is not None:
        ledger.claim("master_weights", [p for g in inner.param_groups for p in g["params"]])
        # Scalars (Adam's step counts) are bookkeeping, not state that grows with the model.
        states = [t for state in inner.state.values() for t in _tensors(state) if t.dim() > 0]
        ledger.claim("optimizer_states", states)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if inner is not None:
        grads += [p.grad for g in inner.param_groups for p in g["params"] if p.grad is not None]
    ledger.claim("gradients", grads)
    for wrapper in chain[:-1]:  # DeepSpeed's ZeRO optimizer: flat gradient partitions, buckets, ...
        ledger.claim("gradients", [t for v in vars(wrapper).values() for t in _tensors(v)])
    return ledger.items


def levers_in_use(model: torch.nn.Module, optimizer: Any) -> dict[str, Any]:
    """What the run really did about the memory levers, read off the model and the optimizer."""
    chain = optimizer_chain(optimizer)
    zero = next((o for o in chain if hasattr(o, "cpu_offload") or hasattr(o, "offload_optimizer")), None)
    return {
        "gradient_checkpointing": bool(getattr(model, "is_gradient_checkpointing", False)),
        "offload_optimizer": bool(
            zero and (getattr(zero, "cpu_offload", False) or getattr(zero, "offload_optimizer", False))
        ),
        "offload_param": bool(zero and getattr(zero, "offload_param", False)),
        "optimizer": type(chain[-1]).__name__ if chain else None,
    }
