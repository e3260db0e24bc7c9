"""Predict peak memory per rank before running: pure arithmetic over architecture facts (no torch.cuda,
no deepspeed).

Three figures are predicted: the tensor peak (torch ``max_memory_allocated``), the allocator peak
(``max_memory_reserved``) and what the device reports as used (NVML on GPUs; process RSS on CPUs). Items:

* model states — parameters, gradients, the fp32 master copy and Adam's two moments, divided by the world
  size as ZeRO stage 1 (optimizer states), 2 (+ gradients) and 3 (+ parameters) partition them, and moved to
  host memory by optimizer/parameter offload;
* activations saved for backward, per layer, after Korthikanti et al. (2022) generalised to any MLP width:
  ``s·b·h·(8e + 2·drop) + 2·s·b·i·e`` plus, with eager attention, ``a·s²·b·(e + drop·(e + 1))`` for the
  score matrices (SDPA/flash kernels keep none; they store ``4·a·b·s`` bytes of softmax statistics instead);
  with gradient checkpointing only each layer's input plus one layer's full set;
* embeddings, logits (fp32; ``b·s·V`` for LM heads) and the fp32 gradient partition of the optimizer step;
* DeepSpeed's communication buckets (``2·hidden²`` elements), and as constants that
  :func:`~ftprof.calibrate.calibrate` fits to measurements: the runtime (CUDA context / Python + torch), what
  the ZeRO optimizer adds beyond its buckets, an activation factor (temporaries not itemised) and the caching
  allocator's overhead.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from ftprof.point import Point, Precision
from ftprof.units import GIB

Device = Literal["gpu", "cpu"]  # on a CPU, "offloaded" state still counts in the process

# Memory of common GPUs (bytes), for --gpu. Names are lower-case, as typed on the command line.
GPUS: dict[str, int] = {
    "h200-141gb": 141 * 10**9,
    "h100-80gb": 80 * GIB,
    "h100-94gb": 94 * GIB,
    "a100-80gb": 80 * GIB,
    "a100-40gb": 40 * GIB,
    "l40s-48gb": 48 * GIB,
    "a10g-24gb": 24 * GIB,
    "l4-24gb": 24 * GIB,
    "rtx4090-24gb": 24 * GIB,
    "rtx3090-24gb": 24 * GIB,
    "v100-32gb": 32 * GIB,
    "v100-16gb": 16 * GIB,
    "t4-16gb": 16 * GIB,
}

_VENDOR_WORDS = {"nvidia", "tesla", "geforce", "sxm", "sxm2", "sxm4", "sxm5", "pcie", "hbm3", "hbm3e"}


def gpu_key(name: str, memory_bytes: int | None = None) -> str | None:
    """The :data:`GPUS` key of a device as NVML, torch or a user name it; None if unknown or ambiguous.

    One naming for every place a device is looked up: a calibration saved by a sweep on "NVIDIA H100 80GB
    HBM3" is the one ``ftprof estimate --gpu h100-80gb`` loads. A name without its memory size is decided
    by ``memory_bytes`` (the nearest size) or, with one size known for the model, that one.

    >>> gpu_key("NVIDIA H100 80GB HBM3"), gpu_key("h100-80gb"), gpu_key("NVIDIA A100-SXM4-40GB")
    ('h100-80gb', 'h100-80gb', 'a100-40gb')
    >>> gpu_key("NVIDIA H200"), gpu_key("NVIDIA GeForce RTX 4090"), gpu_key("Tesla T4")
    ('h200-141gb', 'rtx4090-24gb', 't4-16gb')
    >>> gpu_key("NVIDIA H100 PCIe") is None, gpu_key("NVIDIA H100 PCIe", memory_bytes=85_520_809_984)
    (True, 'h100-80gb')
    >>> gpu_key("cpu (x86_64)") is None
    True
    """
    words = [w for w in re.split(r"[^a-z0-9]+", name.lower()) if w and w not in _VENDOR_WORDS]
    joined = {a + b for a, b in zip(words, words[1:], strict=False)}  # "rtx 4090" -> "rtx4090"
    sizes = {w for w in words if re.fullmatch(r"\d+gb", w)}
    candidates = []
    for key in GPUS:
        model, size = key.rsplit("-", 1)
        if (model in words or model in joined) and (not sizes or size in sizes):
            candidates.append(key)
    if len(candidates) > 1 and memory_bytes:
        return min(candidates, key=lambda k: abs(GPUS[k] - memory_bytes))
    return candidates[0] if len(candidates) == 1 else None


@dataclass(frozen=True)
class Arch:
    """The facts of an architecture that memory depends on (from its config; no weights)."""

    name: str
    family: Literal["encoder", "decoder"]
    params: int  # all parameters, counted exactly
    layers: int
    hidden: int
    heads: int
    intermediate: int
    vocab: int
    dropout: bool = True
    attention: Literal["eager", "sdpa"] = "sdpa"
    lm_head: bool = False  # logits over the vocabulary (causal LM) rather than a few labels
    num_labels: int = 2
    kv_heads: int = 0  # key/value heads (grouped-query attention); 0: as many as ``heads``
    mlp: Literal["plain", "gated"] = "plain"  # gated: Llama-style SiLU(gate) * up, RMSNorm, no dropout

    @property
    def kv_dim(self) -> int:
        """Width of the key (or value) projection: kv heads x head dim."""
        return (self.kv_heads or self.heads) * (self.hidden // self.heads)


@dataclass
class Calibration:
    """Constants fitted to measurements of one device (defaults: typical values, uncalibrated)."""

    device: str = "default"
    runtime_bytes: float = 0.55 * GIB  # CUDA context + cuBLAS/NCCL workspaces, or Python + torch on a CPU
    activation_factor: float = 1.0  # allocator rounding and temporaries not itemised, relative to activations
    zero_runtime_bytes: float = 0.0  # what DeepSpeed's ZeRO optimizer adds beyond its buckets (ops, comm state)
    reserved_factor: float = 1.08  # caching allocator: reserved / allocated
    fitted_on: int = 0  # number of measured points behind these values

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: Path) -> Calibration:
        return cls(**json.loads(path.read_text()))


@dataclass
class Estimate:
    """Bytes per rank: itemised, then the three predicted peaks."""

    items: dict[str, int]
    host_items: dict[str, int] = field(default_factory=dict)  # offloaded to CPU memory
    allocated: int = 0
    reserved: int = 0
    device_used: int = 0


def bytes_per_element(precision: Precision) -> int:
    return 4 if precision == "fp32" else 2


def model_states(arch: Arch, s: Point, device: Device = "gpu") -> tuple[dict[str, int], dict[str, int]]:
    """(on device, offloaded to host) bytes of parameters, gradients, master weights and Adam moments.

    >>> arch = Arch("x", "encoder", 1000, 1, 8, 2, 32, 10)
    >>> model_states(arch, Point(batch_size=1, seq_len=8, precision="bf16", zero=2, world_size=4))[0]
    {'parameters': 2000, 'gradients': 500, 'fp32 master weights': 1000, 'Adam moments': 2000}
    """
    p, n, e = arch.params, s.world_size, bytes_per_element(s.precision)
    optimizer_split = n if s.zero >= 1 else 1
    held = {
        "parameters": math.ceil(e * p / (n if s.zero == 3 else 1)),
        "gradients": math.ceil(e * p / (n if s.zero >= 2 else 1)),
        # ZeRO 1-3 keep an fp32 copy of their partition even in fp32 training; mixed precision always does.
        "fp32 master weights": math.ceil(4 * p / optimizer_split) if (s.zero >= 1 or e == 2) else 0,
        "Adam moments": math.ceil(8 * p / optimizer_split),
    }
    host: dict[str, int] = {}
    if device == "gpu":
        moved = (["fp32 master weights", "Adam moments"] if s.offload_optimizer else []) + (
            ["parameters"] if s.offload_param else []
        )
        host = {k: held.pop(k) for k in moved}
    return held, host


def layer_activations(arch: Arch, s: Point, device: Device = "gpu") -> int:
    """Bytes one transformer layer saves for backward at micro-batch ``b`` and length ``s``.

    Dropout masks are one byte per element on GPUs (fused kernels) and a full element on CPUs, where dropout
    saves its mask in the data type; each of the two LayerNorms keeps a mean and 1/std in fp32 per token.

    >>> arch = Arch("gpt", "decoder", 0, 1, 1024, 16, 4096, 50257, attention="eager")
    >>> p = Point(batch_size=1, seq_len=2048, precision="fp16", zero=0)
    >>> layer_activations(arch, p) == 2048 * 1024 * (34 + 5 * 16 * 2048 / 1024) + 16 * 2048
    True
    """
    b, sq, h, i, a = s.batch_size, s.seq_len, arch.hidden, arch.intermediate, arch.heads
    e, drop = bytes_per_element(s.precision), int(arch.dropout)
    mask = e if device == "cpu" else 1
    if arch.mlp == "gated":
        return gated_layer_activations(arch, s, device)
    linear = sq * b * h * (8 * e + 2 * drop * mask) + 2 * sq * b * i * e + 16 * sq * b
    if materializes_scores(arch, device):
        scores = a * sq * sq * b * (e + drop * (e + mask))
    else:
        scores = 4 * a * b * sq  # softmax statistics of fused kernels
    return linear + scores


def gated_layer_activations(arch: Arch, s: Point, device: Device = "gpu") -> int:
    """Bytes a Llama-style layer (RMSNorm, rotary, grouped-query attention, SiLU-gated MLP) saves for backward.

    Per token: each RMSNorm keeps its input, its normalised output and 1/rms (fp32); the q/k/v projections
    their (weighted) input; attention q, k and v (k, v at the kv width) and its output; the MLP its input,
    gate and up outputs, SiLU(gate) and the product. Eager attention repeats k and v to every head and keeps
    the softmax (in fp32 too under mixed precision); SDPA/flash keeps log-sum-exp statistics instead.

    >>> arch = Arch("l", "decoder", 0, 1, 64, 4, 176, 1000, dropout=False, kv_heads=2, mlp="gated")
    >>> gated_layer_activations(arch, Point(batch_size=2, seq_len=32, precision="fp32", zero=0), "cpu")
    329216
    """
    b, sq, h, i, a = s.batch_size, s.seq_len, arch.hidden, arch.intermediate, arch.heads
    e = bytes_per_element(s.precision)
    tokens = sq * b
    norms = 2 * tokens * (2 * h * e + 4)  # input and output of each RMSNorm, and 1/rms
    mlp = tokens * (h + 4 * i) * e
    if materializes_scores(arch, device):
        # q/k/v input, q, k and v repeated to all heads, the output for o_proj; softmax (+ its fp32 copy)
        attention = tokens * 5 * h * e + a * sq * sq * b * (e + (4 if e == 2 else 0))
    else:
        attention = tokens * (3 * h + 2 * arch.kv_dim) * e + 4 * a * tokens  # q/k/v input, q, out; k, v; lse
    return norms + attention + mlp


def materializes_scores(arch: Arch, device: Device) -> bool:
    """Whether attention keeps the s x s score matrices: eager always; SDPA on a CPU when dropout is on, since
    torch's fused CPU kernel has no dropout and SDPA falls back to its math path."""
    return arch.attention == "eager" or (device == "cpu" and arch.dropout)


def activations(arch: Arch, s: Point, device: Device = "gpu") -> dict[str, int]:
    b, sq, h, e = s.batch_size, s.seq_len, arch.hidden, bytes_per_element(s.precision)
    per_layer = layer_activations(arch, s, device)
    if s.gradient_checkpointing:
        layers = arch.layers * sq * b * h * e + per_layer  # inputs kept, one layer recomputed at a time
    else:
        layers = arch.layers * per_layer
    if arch.mlp == "gated":  # the lookup keeps its int64 ids; its output is layer 0's input
        embeddings = 8 * sq * b
    else:
        # The embeddings' sum (LayerNorm input) and dropout mask; the LayerNorm output is layer 0's input,
        # counted there. Per token: LayerNorm statistics and the int64 ids the lookups keep (measured: 26 B).
        embeddings = sq * b * h * (e + int(arch.dropout) * (e if device == "cpu" else 1)) + 26 * sq * b
    items = {"activations (layers)": layers, "activations (embeddings)": embeddings}
    if arch.lm_head:
        # The final norm (input, output, statistics) and lm_head's input; the loss keeps fp32 log-softmax over
        # the vocabulary and the int64 labels, while the logits themselves (and, under mixed precision, their
        # fp32 copy) are alive until the loss is computed.
        items["activations (final norm + head)"] = sq * b * (3 * h * e + 4 if arch.mlp == "gated" else 3 * h * e + 8)
        items["logits + loss"] = b * sq * (arch.vocab * (4 + e + (4 if e == 2 else 0)) + 8)
    else:
        items["logits + loss"] = 2 * 4 * b * arch.num_labels  # fp32 logits and their softmax for the loss
    return items


def estimate(arch: Arch, s: Point, cal: Calibration | None = None, device: Device = "gpu") -> Estimate:
    """Predict the per-rank peaks of training ``arch`` at point ``s`` on a GPU or a CPU."""
    cal = cal or Calibration()
    items, host = model_states(arch, s, device)
    acts = activations(arch, s, device)
    items.update({k: math.ceil(v * cal.activation_factor) for k, v in acts.items()})
    e = bytes_per_element(s.precision)
    if s.zero >= 1:
        # HF's "auto" reduce bucket is hidden² elements; overlap_comm keeps two (GPU configs).
        items["DeepSpeed buckets"] = 2 * arch.hidden**2 * e
        items["DeepSpeed runtime"] = math.ceil(cal.zero_runtime_bytes)
    # The optimizer step materialises fp32 gradients of this rank's partition; activations are gone by then,
    # so the peak is the larger of the two moments.
    step_extra = math.ceil(4 * arch.params / (s.world_size if s.zero >= 1 else 1)) if e == 2 or s.zero >= 1 else 0
    if s.offload_optimizer and device == "gpu":
        step_extra = 0
    activation_total = sum(items[k] for k in items if k.startswith(("activations", "logits")))
    states = sum(v for k, v in items.items() if k not in acts)
    allocated = states + max(activation_total, step_extra)
    if step_extra > activation_total:
        items["optimizer step (fp32 grads)"] = step_extra - activation_total
    reserved = math.ceil(allocated * cal.reserved_factor)
    return Estimate(items, host, allocated, reserved, reserved + math.ceil(cal.runtime_bytes))


def max_batch(
    arch: Arch, s: Point, budget: int, cal: Calibration | None = None, device: Device = "gpu", limit: int = 1 << 16
) -> int:
    """The largest micro-batch whose predicted device-used peak fits ``budget`` (0 if none), by bisection
    over the model (monotonic in the batch), not by trial runs."""

    def fits(batch: int) -> bool:
        return estimate(arch, s.with_batch(batch), cal, device).device_used <= budget

    lo, hi = 0, 1
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo
