"""A traced memory profile of one training step: the real model's forward, backward and optimizer step run
under a dispatch-mode tracker, each storage's allocation and free recorded, so that saved activations and
the phases' transients come from the model itself instead of a hand formula (the formulas in
:mod:`ftprof.estimate.estimator` stay as the cross-check).

How. :func:`trace_training_step` builds the model (by default under
:class:`~torch._subclasses.fake_tensor.FakeTensorMode`: shapes and dtypes, no data, so a 7B config traces
without its memory) and runs forward, ``loss.backward()`` and a torch AdamW step inside :class:`_Tracker`, a
:class:`~torch.utils._python_dispatch.TorchDispatchMode`, as torch's
``torch.distributed._tools.mem_tracker.MemTracker`` does: every op's output storage not seen before is an
allocation; a weak reference on the untyped storage reports its free. Storages alive before the step
(parameters, buffers, the batch) open the trace. Each storage is tagged with the phase and the innermost
module (:class:`~torch.distributed._tools.mod_tracker.ModTracker`) that allocated it, the op, and a
category: parameter, buffer, input, gradient (what becomes ``p.grad``), optimizer state (what the optimizer
keeps in ``state``), activation (saved for backward: seen by ``saved_tensors_hooks``) or temporary. The
event list is exactly what :func:`ftprof.estimate.allocator.replay` takes.

Not seen: buffers a kernel allocates and frees inside itself (the CPU SDPA kernels' scratch, a reduction's
workspace) never reach the dispatcher. Storages are counted at their byte size (no allocator rounding: the
replay adds it). Not traced: DeepSpeed (ZeRO partitions, fp32 master weights beside bf16 parameters, its
flat buffers) and autocast; the model runs in one dtype, as ``calibration.saved_activations_case`` casts it.
Fake and real runs agree op for op (the tests check it) except where Python code branches on data, which
transformers skips on fake tensors: its packed-sequence check is answered for both (:func:`_unpacked_rows`);
``warn_if_padding_and_no_attention_mask`` (with a pad token set) still costs a real run a few bytes of
``eq``/``any`` a fake one doesn't allocate (:func:`known_model_factory` sets no pad token on a causal LM).

What differs on a GPU (the trace runs on CPU fake tensors: on this CPU-only torch, autograd over fake CUDA
tensors aborts), as named adjustments a GPU profile would apply to a CPU trace; none is applied here, each
names the traced storages it would touch:

- ``SDPA_LOGSUMEXP``: on CUDA the flash and memory-efficient SDPA kernels save the output and a log-sum-exp
  of ``batch x heads x seq`` fp32 (memory-efficient pads ``seq`` to a multiple of 32), with dropout too
  (Philox seed and offset, no mask), never the ``batch x heads x seq x seq`` probabilities. The CPU's flash
  kernel (``_scaled_dot_product_flash_attention_for_cpu``) already saves that log-sum-exp, but under
  dropout the CPU falls back to the math path, whose ``_safe_softmax`` probabilities and their dropout mask
  are saved. Mapping: replace each attention's saved ``_safe_softmax`` output and its mask by ``b x h x s x
  4`` bytes when the GPU run would pick flash or memory-efficient.
- ``DROPOUT_MASK``: the CPU's dropout (``empty_like(x).bernoulli_()`` then ``x * mask``) saves its mask
  in the activation's dtype, 4 bytes an element in fp32 (the traced ``empty_like`` activations); CUDA's
  ``native_dropout`` saves a bool mask, 1 byte an element. Mapping: scale those storages by
  ``1 / element_size``.
- ``FUSED_ADAMW``: the foreach AdamW (the default traced here) allocates a list of parameter-sized
  temporaries in the step (``_foreach_sqrt(exp_avg_sqs)``, all tensors of a group at once: exactly the
  parameter bytes at the step's peak); the for-loop holds one parameter's worth; ``fused=True`` updates in
  place and allocates none, on CUDA as in the CPU kernel traced with ``optimizer="fused"``. Mapping: trace
  with the implementation the run uses (:attr:`Trace.optimizer` records it).
- ``FUSED_KERNELS``: fused GPU kernels (cross-entropy, RMSNorm, rotary in Liger or apex) save fewer tensors
  than the eager ops traced here; such a model has to be traced with the kernels it will run.
- ``ALLOCATOR``: every CUDA block is rounded to 512 bytes and cached: replay :attr:`Trace.events` through
  :func:`ftprof.estimate.allocator.replay`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch.distributed._tools.mod_tracker import ModTracker
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary
from transformers import PretrainedConfig

from ftprof.estimate.allocator import Event
from ftprof.estimate.calibration import zero_dropout
from ftprof.point import Task

Category = Literal["parameter", "buffer", "input", "gradient", "optimizer_state", "activation", "temporary"]
Phase = Literal["setup", "forward", "backward", "optimizer_step"]
Optimizer = Literal["foreach", "fused", "for-loop"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TracedStorage:
    """One storage of the trace: its bytes, when, where and by which op it was allocated, and its role."""

    id: int
    nbytes: int
    phase: Phase
    module: str
    op: str
    category: Category


@dataclass(frozen=True)
class Trace:
    """The allocation events of one training step and what they add up to."""

    storages: tuple[TracedStorage, ...]
    """Every storage the step allocated (and those alive before it), indexed by id."""
    events: tuple[Event, ...]
    """``("alloc", id, nbytes)`` and ``("free", id)`` in order: :func:`ftprof.estimate.allocator.replay`'s input."""
    phase_starts: Mapping[Phase, int]
    """Index in ``events`` where each phase begins."""
    optimizer: Optimizer
    """Which AdamW implementation stepped: foreach, fused or the for-loop."""
    saved_bytes: int
    """Bytes saved for backward that are alive at the end of the forward (parameters excluded)."""
    peak: int = 0
    """Most bytes alive at once."""
    peak_breakdown: Mapping[Category, int] = field(default_factory=dict)
    """The bytes alive at the peak, by category."""
    phase_peaks: Mapping[Phase, int] = field(default_factory=dict)
    """Most bytes alive at once within each phase (over every step)."""
    steps: int = 1
    """Training steps traced; ``phase_starts`` are the last one's."""
    bounds: tuple[tuple[int, Phase], ...] = ()
    """Where each phase of every step begins in ``events``, in order."""
    host: frozenset[int] = frozenset()
    """Storages a GPU run keeps in host memory (AdamW's ``step`` counts outside its fused path): left out of
    ``events`` and every figure."""

    def category_bytes(self, category: Category) -> int:
        """Bytes of every storage of ``category`` the step allocated (alive at the end or not)."""
        return sum(s.nbytes for s in self.storages if s.category == category and s.id not in self.host)

    def alloc_sizes(self) -> list[int]:
        """The allocation sizes in order (fake and real runs of the same step must agree on them)."""
        return [int(e[2]) for e in self.events if e[0] == "alloc"]  # type: ignore[call-overload]


def _storage(t: torch.Tensor) -> torch.UntypedStorage | None:
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse and other storage-less tensors
        return None


class _Tracker(TorchDispatchMode):
    """Records each new output storage of every op as an allocation and its finalizer as the free."""

    def __init__(self) -> None:
        super().__init__()
        self.storages: list[TracedStorage] = []
        self.events: list[Event] = []
        self.saved: set[int] = set()
        self.saved_live: set[int] = set()
        """The saved storages still alive at the end of the forward."""
        self.phase: Phase = "setup"
        self.mods = ModTracker()
        self._ids: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._refs: dict[int, weakref.ref[torch.UntypedStorage]] = {}
        self._open = True
        self.host: set[int] = set()
        """Storages a GPU run holds in host memory."""

    def track(self, t: torch.Tensor, category: Category, op: str = "") -> int | None:
        """The id of ``t``'s storage, recording its allocation (as ``category``) when new."""
        st = _storage(t)
        if st is None:
            return None
        nbytes, known = st.nbytes(), self._ids.get(st)
        if known is not None and self.storages[known].nbytes == nbytes:
            return int(known)
        if known is not None:  # resized (an out= op): a new block, then the old one's free, as on CUDA
            category = self.storages[known].category
        if nbytes == 0:
            if known is not None:
                self._free(known)
                del self._ids[st]
            return None
        sid = len(self.storages)
        module = max(self.mods.parents, key=len)
        self.storages.append(TracedStorage(sid, nbytes, self.phase, module, op, category))
        self._ids[st] = sid
        self._refs[sid] = weakref.ref(st, functools.partial(self._free, sid))
        self.events.append(("alloc", sid, nbytes))
        if known is not None:
            self._free(known)
        return sid

    def _free(self, sid: int, _: object = None) -> None:
        if self._open:
            self.events.append(("free", sid))
        self._refs.pop(sid, None)

    def close(self) -> None:
        self._open = False

    def recategorize(self, t: torch.Tensor, category: Category) -> None:
        sid = self.track(t, category)
        if sid is not None:
            self.storages[sid].category = category

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        """saved_tensors_hooks' pack: what autograd saves is an activation unless it is a parameter."""
        parameter = isinstance(t, torch.nn.Parameter) or isinstance(t._base, torch.nn.Parameter)
        if parameter or (t.is_leaf and t.requires_grad):
            return t
        sid = self.track(t, "activation")
        if sid is not None:
            self.saved.add(sid)
            if self.storages[sid].category == "temporary":  # inputs stay inputs (saved all the same)
                self.storages[sid].category = "activation"
        return t

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.track(t, "temporary", str(func.overloadpacket.__name__))
        return out


def _live_after(events: tuple[Event, ...] | list[Event], end: int) -> set[int]:
    """Ids alive after the first ``end`` events."""
    live: set[int] = set()
    for event in events[:end]:
        if event[0] == "alloc":
            live.add(int(event[1]))  # type: ignore[call-overload]
        else:
            live.discard(int(event[1]))  # type: ignore[call-overload]
    return live


def _peaks(
    tracker: _Tracker, starts: dict[Phase, int] | list[tuple[int, Phase]]
) -> tuple[int, dict[Category, int], dict[Phase, int]]:
    """(peak bytes, the breakdown at the peak, each phase's peak) walked over the events; ``starts``: where each
    phase begins (a list where phases repeat, step after step)."""
    sizes = [s.nbytes for s in tracker.storages]
    pairs = starts.items() if isinstance(starts, dict) else [(phase, index) for index, phase in starts]
    bounds = sorted((index, phase) for phase, index in pairs)
    total = peak = peak_at = 0
    phase_peaks: dict[Phase, int] = {}
    for index, event in enumerate(tracker.events):
        phase = next(p for i, p in reversed(bounds) if i <= index)
        sid = int(event[1])  # type: ignore[call-overload]
        total += sizes[sid] if event[0] == "alloc" else -sizes[sid]
        phase_peaks[phase] = max(phase_peaks.get(phase, 0), total)
        if total > peak:
            peak, peak_at = total, index + 1
    breakdown: dict[Category, int] = {}
    for sid in _live_after(tracker.events, peak_at):
        category = tracker.storages[sid].category
        breakdown[category] = breakdown.get(category, 0) + sizes[sid]
    return peak, breakdown, phase_peaks


def _adamw(model: torch.nn.Module, optimizer: Optimizer, trainer_groups: bool = False) -> torch.optim.AdamW:
    """AdamW over the trained parameters: one group, or HF Trainer's two (decayed weights, then the rest)."""
    params: Any = [p for p in model.parameters() if p.requires_grad]
    if trainer_groups:
        from transformers.trainer_pt_utils import get_parameter_names

        from ftprof.estimate.architecture import DECAY_EXCLUDED

        decay = set(get_parameter_names(model, [torch.nn.LayerNorm], DECAY_EXCLUDED))
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        params = [
            {"params": [p for n, p in named if n in decay], "weight_decay": 0.0},
            {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
        ]
    if optimizer == "fused":
        return torch.optim.AdamW(params, lr=1e-4, fused=True)
    return torch.optim.AdamW(params, lr=1e-4, foreach=optimizer == "foreach")


# CUDA autocast's fp32 policies (aten/src/ATen/autocast_mode.cpp; the installed torch's
# torch/testing/_internal/autocast_test_lists.py lists them for CUDA, and a test checks these cover it). CPU
# autocast leaves most of these in the input's dtype. Casts: 16-bit inputs are copied to fp32 and the op runs
# there. Output dtype: the op reads 16 bits and writes fp32 (``fp32_set_opt_dtype``: no copy of the input).
CUDA_FP32_CASTS = (  # noqa: SIM905 (a list of names, kept readable)
    "acos asin cosh erfinv exp expm1 log log10 log2 log1p reciprocal rsqrt sinh tan pow __pow__ __rpow__ "
    "softplus layer_norm rms_norm group_norm norm cosine_similarity poisson_nll_loss cosine_embedding_loss "
    "nll_loss nll_loss2d hinge_embedding_loss kl_div l1_loss smooth_l1_loss huber_loss mse_loss margin_ranking_loss "
    "multilabel_margin_loss soft_margin_loss triplet_margin_loss multi_margin_loss "
    "binary_cross_entropy_with_logits dist pdist cdist renorm logsumexp"
).split()
CUDA_FP32_OUTPUT = ["softmax", "log_softmax", "cumprod", "cumsum", "prod", "sum"]
_HALF = (torch.bfloat16, torch.float16)


@functools.cache
def _cuda_policies() -> tuple[frozenset[Any], frozenset[Any]]:
    """The torch, Tensor and functional callables of :data:`CUDA_FP32_CASTS` and :data:`CUDA_FP32_OUTPUT`."""
    spaces = (torch, torch.Tensor, torch.nn.functional, torch.special)

    def callables(names: list[str]) -> frozenset[Any]:
        return frozenset(getattr(m, n) for m in spaces for n in names if callable(getattr(m, n, None)))

    return callables(CUDA_FP32_CASTS), callables(CUDA_FP32_OUTPUT)


def _to_fp32(value: Any) -> Any:
    return value.float() if isinstance(value, torch.Tensor) and value.dtype in _HALF else value


class _GpuKernels(TorchFunctionMode):
    """Run, on CPU tensors, the kernels a CUDA training step runs where they save other tensors than the CPU's.

    - Dropout as ``native_dropout``, which saves a bool mask as CUDA's fused dropout does (the CPU's
      ``at::dropout`` saves ``empty_like(x).bernoulli_()``, a mask in the activation's dtype).
    - SDPA with dropout without it: the CPU then picks its flash kernel, saving the output and a ``batch x heads
      x seq`` fp32 log-sum-exp as CUDA's flash and memory-efficient kernels do (those draw their dropout inside
      from a Philox seed and offset: no mask, no probabilities), where the CPU's math path (its only one with
      dropout) saves the ``seq x seq`` probabilities and their mask. Not mapped: the memory-efficient kernel
      (fp32, or an attention mask) pads the log-sum-exp's ``seq`` to a multiple of 32.
    - Under autocast, CUDA's fp32 policies (:data:`CUDA_FP32_CASTS`, :data:`CUDA_FP32_OUTPUT`): e.g. GPT-2's
      ``gelu_new`` (``pow``) and eager attention's ``softmax`` run in fp32 on a GPU, in 16 bits under CPU autocast.
    """

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = dict(kwargs or {})
        if func is torch.nn.functional.dropout:
            bound = inspect.signature(func).bind(*args, **kwargs)
            bound.apply_defaults()
            x, p, training, inplace = bound.args
            if training and p > 0 and not inplace:
                return torch.native_dropout(x, p, True)[0]
        elif func is torch.nn.functional.scaled_dot_product_attention:
            if len(args) > 4:  # (query, key, value, attn_mask, dropout_p, ...)
                args = (*args[:4], 0.0, *args[5:])
            else:
                kwargs["dropout_p"] = 0.0
        elif torch.is_autocast_enabled("cpu"):
            casts, output = _cuda_policies()
            if func in casts:
                args = tuple(_to_fp32(a) for a in args)
                kwargs = {k: _to_fp32(v) for k, v in kwargs.items()}
            elif func in output and kwargs.get("dtype") is None and not any(isinstance(a, torch.dtype) for a in args):
                first = next((a for a in args if isinstance(a, torch.Tensor)), None)
                if first is not None and first.dtype in _HALF:
                    kwargs["dtype"] = torch.float32
        return func(*args, **kwargs)


@contextlib.contextmanager
def _unpacked_rows() -> Iterator[None]:
    """Tell transformers the batch holds one sequence a row, as the traced batches do.

    Without an attention mask and a cache (training under gradient checkpointing), transformers looks for
    packed sequences in the position ids, a check on the data (``(mask[:, -1] == 0).all()``) that it skips
    on fake tensors, building a ``batch x seq x seq`` mask and running masked attention a real run doesn't.
    ``find_packed_sequence_indices`` returns None ("not packed") for such rows: it is made to say so on
    fake and real runs alike, without the check's few small tensors.
    """
    masking: Any = importlib.import_module("transformers.masking_utils")
    original = getattr(masking, "find_packed_sequence_indices", None)
    if original is None:
        yield
        return
    masking.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking.find_packed_sequence_indices = original


def _step(
    tracker: _Tracker,
    model: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    optimizer: Optimizer,
    run: StepRun | None = None,
) -> list[tuple[int, Phase]]:
    """Forward, backward and an AdamW step (``run.steps`` times) under ``tracker``; returns where each phase's
    events begin."""
    run = run or StepRun()
    if run.gpu:
        _recompute_with_gpu_kernels(model)
    for t, category in _apply_order(model) if run.gpu else _model_order(model):
        tracker.track(t, category)
    for t in inputs.values():
        tracker.track(t, "input")
    opt = _adamw(model, optimizer, run.trainer_groups)
    starts: list[tuple[int, Phase]] = [(0, "setup")]
    saved_hooks = torch.autograd.graph.saved_tensors_hooks(tracker.pack, lambda t: t)
    autocast = torch.autocast("cpu", DTYPES[run.autocast]) if run.autocast else contextlib.nullcontext()
    kernels = _GpuKernels() if run.gpu else contextlib.nullcontext()
    with warnings.catch_warnings(), _unpacked_rows(), tracker.mods, tracker:
        # ModTracker warns when a module is re-entered while active (Llama's decoder calls its rotary module
        # inside its own forward); the innermost module name stays right.
        warnings.filterwarnings("ignore", "The module hierarchy tracking", UserWarning)
        for step in range(run.steps):
            if step:  # HF Trainer: model.zero_grad() after each optimizer step (set_to_none)
                model.zero_grad(set_to_none=True)
            tracker.phase = "forward"
            starts.append((len(tracker.events), "forward"))
            with saved_hooks, autocast, kernels:
                loss = model(**inputs).loss
            live = _live_after(tracker.events, len(tracker.events))
            tracker.saved_live = {s for s in tracker.saved if s in live}
            tracker.phase = "backward"
            starts.append((len(tracker.events), "backward"))
            loss.backward()
            del loss
            for p in model.parameters():
                if p.grad is not None:
                    tracker.recategorize(p.grad, "gradient")
            tracker.phase = "optimizer_step"
            starts.append((len(tracker.events), "optimizer_step"))
            opt.step()
            for state in opt.state.values():
                for key, value in state.items():
                    if isinstance(value, torch.Tensor):
                        tracker.recategorize(value, "optimizer_state")
                        if run.gpu and key == "step" and optimizer != "fused":  # a CPU scalar unless fused
                            tracker.host.add(tracker.track(value, "optimizer_state") or -1)
    tracker.close()  # what the step keeps (parameters, gradients, optimizer state) has no free in the trace
    return starts


def _recompute_with_gpu_kernels(model: torch.nn.Module) -> None:
    """Have gradient checkpointing recompute its layers under :class:`_GpuKernels` too: the recompute runs
    inside the backward, where no torch function mode entered around it applies, and checkpoint refuses a
    recompute that saves other tensors than the forward did. Non-reentrant checkpoint's ``context_fn`` gives
    the recompute its context."""

    def contexts() -> tuple[contextlib.AbstractContextManager[Any], contextlib.AbstractContextManager[Any]]:
        return contextlib.nullcontext(), _GpuKernels()

    for module in model.modules():
        checkpoint = getattr(module, "_gradient_checkpointing_func", None)
        if checkpoint is not None:
            module._gradient_checkpointing_func = functools.partial(checkpoint, context_fn=contexts)  # type: ignore[assignment]


def _model_order(model: torch.nn.Module) -> Iterator[tuple[torch.Tensor, Category]]:
    yield from ((p, "parameter") for p in model.parameters())
    yield from ((b, "buffer") for b in model.buffers())


def _apply_order(model: torch.nn.Module) -> Iterator[tuple[torch.Tensor, Category]]:
    """Parameters and buffers in the order ``model.to("cuda")`` allocates them (``Module._apply``: each child
    first, then the module's own parameters, then its buffers), each once."""
    seen: set[int] = set()

    def walk(module: torch.nn.Module) -> Iterator[tuple[torch.Tensor, Category]]:
        for child in module.children():
            yield from walk(child)
        own: list[tuple[torch.Tensor | None, Category]] = [(p, "parameter") for p in module._parameters.values()]
        own += [(b, "buffer") for b in module._buffers.values()]
        for t, category in own:
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                yield t, category

    return walk(model)


@dataclass(frozen=True)
class StepRun:
    """How :func:`trace_training_step` runs the step beyond the model and batch (defaults: one bare step)."""

    steps: int = 1
    """Training steps, each forward, backward, optimizer step (and, after the first, the Trainer's zero_grad):
    a GPU's allocator reaches its steady blocks after the optimizer state exists."""
    autocast: str | None = None
    """``bf16``/``fp16``: the forward (and loss) under autocast, as HF Trainer runs --bf16/--fp16 without
    DeepSpeed over fp32 weights. CPU autocast's lists agree with CUDA's on linear layers, matmuls and SDPA
    (16 bits) and the losses (fp32); with ``gpu``, CUDA's fp32 policies apply on top (:class:`_GpuKernels`)."""
    gpu: bool = False
    """Run the CUDA kernels' saving behaviour (:class:`_GpuKernels`) and keep host-resident storages apart."""
    trainer_groups: bool = False
    """Step HF Trainer's two parameter groups (foreach allocates its temporaries per group) instead of one."""


def trace_training_step(
    model_factory: Callable[[], torch.nn.Module],
    inputs_factory: Callable[[], dict[str, torch.Tensor]],
    optimizer: Optimizer = "foreach",
    fake: bool = True,
    run: StepRun | None = None,
) -> Trace:
    """Trace one training step of the model ``model_factory`` builds on the batch ``inputs_factory`` builds.

    Args:
        model_factory: builds the model in training mode, cast to the precision to trace; it must return an
            output with ``.loss`` when called on the inputs (transformers models do, given labels).
        inputs_factory: the batch, as keyword arguments of the model.
        optimizer: the torch AdamW implementation that steps.
        fake: build and run everything under ``FakeTensorMode`` (no data, no memory); False runs it for real.
        run: steps, autocast and the GPU's kernels (:class:`StepRun`); by default one step as built.

    Returns:
        The events and their peaks; the step's storages are freed when this returns.
    """
    run = run or StepRun()
    mode = torch._subclasses.fake_tensor.FakeTensorMode() if fake else contextlib.nullcontext()
    tracker = _Tracker()
    with mode:
        model = model_factory()
        inputs = inputs_factory()
        bounds = _step(tracker, model, inputs, optimizer, run)
    host = frozenset(tracker.host - {-1})
    if host:  # drop their events; each phase's start moves back by the events dropped before it
        kept = [int(e[1]) not in host for e in tracker.events]  # type: ignore[call-overload]
        bounds = [(sum(kept[:index]), phase) for index, phase in bounds]
        tracker.events = [e for e, keep in zip(tracker.events, kept, strict=True) if keep]
    peak, breakdown, phase_peaks = _peaks(tracker, bounds)
    last = {phase: index for index, phase in bounds}  # the last step's (later starts overwrite earlier ones)
    return Trace(
        storages=tuple(tracker.storages),
        events=tuple(tracker.events),
        phase_starts=last,
        optimizer=optimizer,
        saved_bytes=sum(tracker.storages[s].nbytes for s in tracker.saved_live),
        peak=peak,
        peak_breakdown=breakdown,
        phase_peaks=phase_peaks,
        steps=run.steps,
        bounds=tuple(bounds),
        host=host,
    )


def model_config(name: str) -> PretrainedConfig:
    """``name``'s config: the offline copy of a known checkpoint or preset first (no Hub round trip)."""
    from ftprof.known_configs import known_config_dict
    from ftprof.train.models import config_from_dict, resolve_model_spec

    known = known_config_dict(name)
    return config_from_dict(known) if known else resolve_model_spec(name, random_init=True).config


def known_model_factory(
    name: str,
    task: Task = "classification",
    precision: str = "fp32",
    attention: str = "sdpa",
    dropout: bool = True,
    checkpointing: bool = False,
) -> Callable[[], torch.nn.Module]:
    """A factory of the model ``name`` with random weights, as ``calibration.saved_activations_case`` builds it.

    Args:
        name: a tiny preset, known checkpoint, local directory or reachable Hub id.
        task: a sequence classifier with 2 labels, or a causal LM.
        precision: the dtype of parameters and activations (fp32, bf16, fp16), as DeepSpeed casts them.
        attention: transformers' attention implementation (sdpa, eager).
        dropout: False zeroes every dropout probability.
        checkpointing: gradient checkpointing (non-reentrant) of every layer.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    def build() -> torch.nn.Module:
        config = model_config(name)
        if not dropout:
            zero_dropout(config)
        config._attn_implementation = attention
        config.num_labels = 2
        if config.pad_token_id is None and task == "classification":  # decoders' heads find a row's end by it
            config.pad_token_id = config.eos_token_id
        torch.manual_seed(0)
        auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
        # built in its dtype: Module.to() can't swap fake parameters
        model = auto.from_config(config, dtype=DTYPES[precision])
        if checkpointing:
            enable = getattr(model, "activation_checkpointing_enable", None)  # transformers 5's name
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model.train()

    return build


def batch_factory(
    vocab: int, batch: int, seq: int, task: Task = "classification", attention_mask: bool = False
) -> Callable[[], dict[str, torch.Tensor]]:
    """A factory of a random batch of ``batch x seq`` token ids (and labels for ``task``); with
    ``attention_mask``, an int64 mask as a tokenizer pads to: under fake tensors transformers cannot see that
    it is all ones, so it builds the attention mask a padded batch gets (and SDPA takes it)."""

    def build() -> dict[str, torch.Tensor]:
        ids = torch.randint(3, vocab, (batch, seq))
        labels = ids if task == "causal-lm" else torch.randint(0, 2, (batch,))
        mask = {"attention_mask": torch.ones(batch, seq, dtype=torch.int64)} if attention_mask else {}
        return {"input_ids": ids, **mask, "labels": labels}

    return build


@dataclass(frozen=True)
class StepCost:
    """What one optimizer step costs in memory, measured: the optimizer's state and a steady step's transients."""

    state_bytes: int
    """Bytes of the tensors the optimizer keeps in ``state`` after its first step."""
    transient_peak: int
    """Most bytes a later step holds at once beyond parameters, gradients and state (its temporaries)."""
    allocator_peak: int
    """The same step's peak as the CPU allocator saw it (torch's profiler, ``profile_memory``): kernels'
    internal tensors included, which :attr:`transient_peak` (ops seen by the dispatcher) misses."""


def measure_optimizer_step(
    params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer, dispatch: bool = True
) -> StepCost:
    """Step ``optimizer`` twice over ``params`` with random gradients, for real, and trace the second step.

    The first step creates the state (its bytes are :attr:`StepCost.state_bytes`); the second is the steady
    step a training run repeats, whose allocations under :class:`_Tracker` give the transient peak. As in
    :func:`trace_training_step`, a kernel's internal scratch is not seen. ``dispatch=False``: no tracker (an
    optimizer that steps through ``torch.compile``, which refuses to run under a dispatch mode); the transient
    peak is then the allocator's.
    """
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    # no list of the state tensors is kept: a state an optimizer replaces each step (Adafactor's RMS) must be freed
    state = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in _state_tensors(optimizer)}
    tracker = _Tracker()
    for p in params:  # alive before the step: an in-place update of these is no allocation
        tracker.track(p, "parameter")
        if p.grad is not None:
            tracker.track(p.grad, "gradient")
    for t in _state_tensors(optimizer):
        tracker.track(t, "optimizer_state")
    start = len(tracker.events)
    with _allocations() as allocations, tracker if dispatch else contextlib.nullcontext():
        optimizer.step()
    if not dispatch:
        return StepCost(sum(state.values()), _running_peak(allocations), _running_peak(allocations))
    tracker.close()
    starts: dict[Phase, int] = {"setup": 0, "optimizer_step": start} if start else {"optimizer_step": 0}
    _, _, phase_peaks = _peaks(tracker, starts)
    # what was alive before the step is the setup's whole (allocations only); the step's peak is beyond it
    transient = phase_peaks.get("optimizer_step", 0) - phase_peaks.get("setup", 0)
    return StepCost(sum(state.values()), max(transient, 0), _running_peak(allocations))


def _state_tensors(optimizer: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
    return (t for s in optimizer.state.values() for v in s.values() for t in _plain_tensors(v))


def _plain_tensors(value: object) -> list[torch.Tensor]:
    """The tensors holding ``value``'s data: itself, or a tensor subclass' inner tensors (``__tensor_flatten__``,
    e.g. torchao's 8-bit optimizer state: its codes, block scales and quantisation map)."""
    if not isinstance(value, torch.Tensor):
        return []
    if type(value) is torch.Tensor or isinstance(value, torch.nn.Parameter):
        return [value]
    flatten = getattr(value, "__tensor_flatten__", None)
    if flatten is None:
        return [value]
    names, _ = flatten()
    return [t for name in names for t in _plain_tensors(getattr(value, name))]


@contextlib.contextmanager
def _allocations() -> Iterator[list[tuple[int, int]]]:
    """Every CPU allocation (+bytes) and free (-bytes) inside the block, as (time ns, bytes), once it ends."""
    from torch.profiler import ProfilerActivity, profile

    events: list[tuple[int, int]] = []
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        yield events
    results = prof.profiler.kineto_results if prof.profiler is not None else None
    if results is not None:
        events += [(e.start_ns(), e.nbytes()) for e in results.events() if e.name() == "[memory]"]


def _running_peak(events: list[tuple[int, int]]) -> int:
    """The most bytes held at once, in time order, above what was held when the events began."""
    held = peak = 0
    for _, delta in sorted(events):
        held += delta
        peak = max(peak, held)
    return peak
