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
  :func:`~ftprof.estimate.calibration.calibrate` fits to measurements: the runtime (CUDA context / Python + torch), what
  the ZeRO optimizer adds beyond its buckets, an activation factor (temporaries not itemised) and the caching
  allocator's overhead.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from ftprof.errors import ConfigError
from ftprof.estimate.optimizers import Device, TrainerOptimizer, check_plain_trainer
from ftprof.point import Point, Precision
from ftprof.units import GIB

if TYPE_CHECKING:
    from ftprof.estimate.adapters import LoraFacts


_MIB = 2**20

# Memory of common GPUs, for --gpu. Names are lower-case, as typed on the command line; the "gb" in a name is
# the marketing size. Values are bytes, in one unit for every card: the total NVML reports, i.e. nvidia-smi's
# "memory.total" in MiB (`nvidia-smi --query-gpu=name,memory.total --format=csv`) x 2^20. Recent drivers count
# their own reserved memory (some hundreds of MiB) in that total, so not all of it is allocatable; older ones
# print less (V100 32GB: 32510 MiB, V100 16GB: 16160 MiB, T4: 15109 MiB). Sources: nvidia-smi output of each
# card in public logs and issues; Modal's table of NVML totals (thundergolfer.com/blog/nvidia-gpu-memory-capacity).
GPUS: dict[str, int] = {
    "h200-141gb": 143771 * _MIB,  # NVIDIA H200 (SXM)
    "h100-80gb": 81559 * _MIB,  # NVIDIA H100 80GB HBM3 (SXM) and NVIDIA H100 PCIe alike
    "h100-94gb": 95830 * _MIB,  # NVIDIA H100 NVL (the 94 GB PCIe card prints 94514 MiB)
    "a100-80gb": 81920 * _MIB,  # NVIDIA A100-SXM4-80GB / A100 80GB PCIe
    "a100-40gb": 40960 * _MIB,  # NVIDIA A100-SXM4-40GB / A100-PCIE-40GB
    "l40s-48gb": 46068 * _MIB,  # NVIDIA L40S
    "a10g-24gb": 23028 * _MIB,  # NVIDIA A10G (AWS g5), the same as the A10
    "l4-24gb": 23034 * _MIB,  # NVIDIA L4
    "rtx4090-24gb": 24564 * _MIB,  # NVIDIA GeForce RTX 4090
    "rtx3090-24gb": 24576 * _MIB,  # NVIDIA GeForce RTX 3090
    "v100-32gb": 32768 * _MIB,  # Tesla V100-SXM2-32GB / V100-PCIE-32GB, recent drivers
    "v100-16gb": 16384 * _MIB,  # Tesla V100-SXM2-16GB / V100-PCIE-16GB, recent drivers (older: 16160)
    "t4-16gb": 15360 * _MIB,  # Tesla T4, recent drivers
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
    mlp_saves: int = 2  # MLP-width tensors a plain MLP saves: 2 with a fused GELU; 5 with GPT-2's gelu_new
    head_keeps_output: bool = True  # an encoder's head slices the last layer's output (a view keeps all of it)
    mask_per_layer: bool = False  # a b x s x s attention mask passed to every layer (GPT-2 with eager attention)
    # Elements of each parameter in model order: the one group DeepSpeed builds from a config with an
    # "optimizer" block (all of ftprof's). Empty: partitions are taken as even shares.
    param_sizes: tuple[int, ...] = ()
    # Shapes of the trained parameters in the groups HF Trainer's optimizer steps without DeepSpeed: those with
    # weight decay, then the rest (biases, norms), each in model order. Empty: ``param_sizes`` as one group.
    step_groups: tuple[tuple[tuple[int, ...], ...], ...] = ()

    @property
    def trainer_step_groups(self) -> tuple[tuple[tuple[int, ...], ...], ...]:
        """What the Trainer's own optimizer steps (:attr:`step_groups`, else the sizes as vectors, one group)."""
        return self.step_groups or (tuple((n,) for n in self.param_sizes),)

    @property
    def largest_param(self) -> int:
        """Elements of the largest parameter (without the parameter list: vocab x hidden, the embedding)."""
        return max(self.param_sizes, default=0) or self.vocab * self.hidden

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
    # What a DeepSpeed run adds outside the allocator, beside ``runtime_bytes``: its process group's NCCL buffers
    # (even on one GPU). 0 where a sweep's fitted runtime holds it (CPUs; calibrations fitted before it existed).
    deepspeed_runtime_bytes: float = 0.0
    fitted_on: int = 0  # number of measured points behind these values
    reserved_fitted_on: int = 0  # points whose torch allocator figures gave reserved_factor (0: assumed)
    # 2: the activation factor scales saved activations only (at least 1) and the CPU peak adds the optimizer
    # step to the forward; files of version 1 were fitted to another model and are not loaded.
    version: int = 2

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: Path) -> Calibration | None:
        """The calibration saved at ``path``; None if it was fitted to an older version of the estimator."""
        values = json.loads(path.read_text())
        if values.get("version", 1) != cls.version:
            return None
        return cls(**values)


# Items, named as the measured breakdown names them (:mod:`ftprof.profiler.breakdown`), so that a prediction
# and a measurement compare item by item, and labels for people.
ITEM_LABELS: dict[str, str] = {
    "parameters": "parameters",
    "frozen_parameters": "frozen weights (LoRA)",  # no gradients, master copy or moments
    "gradients": "gradients",
    "master_weights": "fp32 master weights",
    "optimizer_states": "optimizer states (Adam moments)",
    "gradient_buckets": "DeepSpeed gradient buckets",
    "offload_buffers": "offload staging buffers",
    "zero_runtime": "DeepSpeed runtime",
    "gathered_parameters": "ZeRO-3 gathered parameters",
    "saved_activations": "saved activations",
    "recomputed_layer": "recomputed layer (gradient checkpointing)",
    "temporaries": "temporaries (live logits; activation factor)",
    "optimizer_step": "optimizer step (fp32 gradients; without DeepSpeed: --optim's temporaries)",
    "gpu_workspaces": "cuBLAS workspaces (one per thread, in the allocator)",  # --trace
    "block_rounding": "allocator blocks beyond the tensors (rounding, unsplit remainders)",  # --trace
}
MODEL_STATES = ("parameters", "gradients", "master_weights", "optimizer_states")
# Alive in the forward/backward only; the optimizer step's fp32 gradients compete with them for the peak.
FORWARD_ITEMS = ("saved_activations", "recomputed_layer", "temporaries", "gathered_parameters")
STAGE3_MAX_LIVE_PARAMETERS = 1_000_000_000  # the shipped ZeRO-3 configs' stage3_max_live_parameters
# A prediction item and the measured breakdown items it is judged against (their sum; on a GPU machine the
# host-resident part is measured apart, as ``<name>_host``: see :func:`measured_bytes`). DeepSpeed's gradient
# buckets are not compared (it frees ZeRO-1/2's after the backward, before the breakdown is read); DDP's are.
MEASURED_AS: dict[str, tuple[str, ...]] = {
    "parameters": ("parameters_fp32", "parameters_bf16", "parameters_fp16"),
    "frozen_parameters": ("frozen_parameters_fp32", "frozen_parameters_bf16", "frozen_parameters_fp16"),
    "gradients": ("gradients",),
    "gradient_buckets": ("gradient_buckets",),
    "master_weights": ("master_weights",),
    "optimizer_states": ("optimizer_states",),
    "offload_buffers": ("other_buffers",),
    "gathered_parameters": ("gathered_parameters",),
    "saved_activations": ("saved_activations",),
}


def measured_bytes(breakdown: dict[str, int], item: str, host: bool = False) -> int:
    """What a rank's measured breakdown holds of prediction ``item``: on the device, or in host memory.

    >>> measured_bytes({"parameters_bf16": 10, "parameters_fp32_host": 4, "other_buffers": 3}, "parameters")
    10
    >>> measured_bytes({"parameters_bf16": 10, "parameters_fp32_host": 4}, "parameters", host=True)
    4
    """
    suffix = "_host" if host else ""
    return sum(breakdown.get(name + suffix, 0) for name in MEASURED_AS[item])


@dataclass
class Estimate:
    """Bytes per rank: items (keys of :data:`ITEM_LABELS`), then the three predicted peaks.

    ``activation_parts`` splits ``saved_activations`` (layers, embeddings, head, loss) for display;
    ``labels`` holds this estimate's own label of an item where :data:`ITEM_LABELS`' does not fit it (the
    optimizer states of a Trainer optimizer other than Adam).
    """

    items: dict[str, int]
    host_items: dict[str, int] = field(default_factory=dict)  # offloaded to CPU memory
    allocated: int = 0
    reserved: int = 0
    device_used: int = 0
    activation_parts: dict[str, int] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)

    def label(self, item: str) -> str:
        """What a table calls ``item`` in this estimate."""
        return self.labels.get(item, ITEM_LABELS[item])


def bytes_per_element(precision: Precision) -> int:
    return 4 if precision == "fp32" else 2


def model_states(
    arch: Arch, s: Point, device: Device = "gpu", rank: int | None = None, lora: LoraFacts | None = None
) -> tuple[dict[str, int], dict[str, int]]:
    """(on device, in host memory) bytes of parameters, gradients, master weights and Adam moments, and of
    the buffers optimizer offload adds, as DeepSpeed (0.19) holds them on each rank after a backward.

    Partitioning divides by the world size: ZeRO 1 the optimizer states and master weights, 2 also the
    gradients, 3 also the parameters. Offloading the optimizer moves master weights and moments to host
    memory and adds an fp32 gradient partition there for the CPU optimizer, plus (ZeRO-1/2) staging buffers.
    On a CPU everything is one process's memory: "host" items count with the others.

    Under ZeRO-1/2 on several ranks the gradients are those of every parameter that overlaps the rank's
    partition, whole (:func:`zero12_gradient_elements`); the figure is ``rank``'s, by default the largest.

    With ``lora``, only the adapters (and a classifier's head) train: they get gradients, master weights and
    moments; the frozen weights (``frozen_parameters``) are held in the training dtype alone, partitioned by
    ZeRO-3 and offloaded with the parameters (see :func:`frozen_weights`).

    >>> arch = Arch("x", "encoder", 1000, 1, 8, 2, 32, 10)
    >>> model_states(arch, Point(batch_size=1, seq_len=8, precision="bf16", zero=2, world_size=4))[0]
    {'parameters': 2000, 'gradients': 500, 'master_weights': 1000, 'optimizer_states': 2000}
    """
    frozen = 0
    if lora is not None:
        frozen = lora.frozen_params
        arch = replace(arch, params=lora.trainable_params, param_sizes=lora.trainable_sizes)
    p, n, e = arch.params, s.world_size, bytes_per_element(s.precision)
    optimizer_split = n if s.zero >= 1 else 1
    if s.zero in (1, 2) and n > 1:
        per_rank = zero12_gradient_elements(arch, n)
        gradients = e * (max(per_rank) if rank is None else per_rank[rank])
    else:
        gradients = math.ceil(e * p / (n if s.zero >= 2 else 1))
    held = {
        "parameters": math.ceil(e * p / (n if s.zero == 3 else 1)),
        **frozen_weights(frozen, s),
        "gradients": gradients,
        # ZeRO 1-3 keep an fp32 copy of their partition even in fp32 training; mixed precision always does.
        "master_weights": math.ceil(4 * p / optimizer_split) if (s.zero >= 1 or e == 2) else 0,
        "optimizer_states": math.ceil(8 * p / optimizer_split),
    }
    host: dict[str, int] = {}
    if s.offload_optimizer:
        host["master_weights"] = held.pop("master_weights")
        host["optimizer_states"] = held.pop("optimizer_states")
        host["gradients"] = math.ceil(4 * p / optimizer_split)  # the CPU optimizer's fp32 gradient partition
        if s.zero == 3:  # stage3.py puts its 16-bit gradient partition on the offload device too
            host["gradients"] += held.pop("gradients")
        if s.zero in (1, 2):
            # 16-bit gradients leave the device as they are reduced, through two staging buffers of the largest
            # parameter (temp_grad_buffer_for_{gpu,cpu}_offload); the updated 16-bit partition comes back
            # through param_buffer_of_bit16_for_cpu_offload_groups.
            held.pop("gradients")
            held["offload_buffers"] = e * arch.largest_param
            host["offload_buffers"] = e * arch.largest_param + math.ceil(e * p / optimizer_split)
    if s.offload_param:
        host["parameters"] = held.pop("parameters")
        if "frozen_parameters" in held:  # ZeRO-3 partitions and offloads every parameter, frozen or not
            host["frozen_parameters"] = held.pop("frozen_parameters")
    if device == "cpu":  # one memory: what is "host" on a GPU machine is this process too
        for k, v in host.items():
            held[k] = held.get(k, 0) + v
        host = {}
    return held, host


def frozen_weights(frozen: int, s: Point) -> dict[str, int]:
    """Bytes of ``frozen`` parameters per rank: ``{"frozen_parameters": ...}``, or nothing without any.

    DeepSpeed (0.19) casts every parameter to the training dtype (``engine._cast_module_mixed_precision``);
    transformers hands it only the trainable ones for the optimizer (``deepspeed_init``: ``requires_grad``
    filter), and ZeRO-1/2's flat 16-bit groups, fp32 partitions and gradient hooks, and ZeRO-3's
    ``_get_trainable_parameter_groups`` (``is_optimized_parameter``), take only those: a frozen weight gets no
    gradient, master copy or moments. ZeRO-3 still converts every module parameter to a partitioned one
    (``parameter_offload._convert_to_zero_parameters``), so frozen weights are split over the ranks there too.

    >>> frozen_weights(1000, Point(batch_size=1, seq_len=8, precision="bf16", zero=3, world_size=4))
    {'frozen_parameters': 500}
    """
    if not frozen:
        return {}
    e, split = bytes_per_element(s.precision), s.world_size if s.zero == 3 else 1
    return {"frozen_parameters": math.ceil(e * frozen / split)}


def zero12_gradient_elements(arch: Arch, world_size: int) -> list[int]:
    """Gradient elements each rank holds after a backward under ZeRO-1/2 (DeepSpeed 0.19, no offload).

    The parameters are flattened in model order (one group: DeepSpeed builds it from the config's "optimizer"
    block, which all of ftprof's configs have; without one, Trainer's two weight-decay groups are partitioned
    apart, not modelled here), padded to a multiple of 2 x ranks and cut into equal partitions. A rank copies
    the gradients of the parameters that overlap its partition, whole, into one buffer
    (``grads_in_partition``), so a parameter across a boundary counts on both sides. Without the parameter
    list (``arch.param_sizes`` empty), an even share.

    >>> arch = Arch("x", "encoder", 100, 1, 8, 2, 32, 10, param_sizes=(60, 30, 10))
    >>> zero12_gradient_elements(arch, 2)  # partitions [0, 52) and [52, 104): the 60 is on both sides
    [60, 100]
    """
    if not arch.param_sizes:
        return [math.ceil(arch.params / world_size)] * world_size
    align = 2 * world_size
    share = -(-sum(arch.param_sizes) // align) * align // world_size
    held, start = [0] * world_size, 0
    for numel in arch.param_sizes:
        for rank in range(start // share, min((start + numel - 1) // share, world_size - 1) + 1):
            held[rank] += numel
        start += numel
    return held


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
    linear = sq * b * h * (8 * e + 2 * drop * mask) + arch.mlp_saves * sq * b * i * e + 16 * sq * b
    if materializes_scores(arch, device):
        scores = a * sq * sq * b * (e + drop * (e + mask))
        if device == "cpu" and arch.attention == "sdpa" and e == 2:
            # torch's CPU math path in 16 bits also keeps the scores in fp32 and 16 bits, and copies of q, k, v
            # (measured on BERT at two lengths: 6 bytes per score and 6 per token and hidden unit)
            scores += 6 * a * sq * sq * b + 3 * sq * b * h * e
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


def saved_activations(arch: Arch, s: Point, device: Device = "gpu") -> dict[str, int]:
    """Bytes autograd saves for backward in one micro-batch's forward, by part: ``layers``, ``embeddings``,
    ``head`` (final norm and LM head input) and ``loss``. What :class:`~ftprof.profiler.breakdown.SavedActivationMeter`
    measures as ``saved_activations``."""
    b, sq, h, e = s.batch_size, s.seq_len, arch.hidden, bytes_per_element(s.precision)
    if s.gradient_checkpointing:
        layers = arch.layers * sq * b * h * e  # only each layer's input; backward recomputes one layer at a time
        if arch.mask_per_layer and arch.attention == "eager":
            layers += b * sq * sq * e  # ... and the attention mask it is called with
    else:
        layers = arch.layers * layer_activations(arch, s, device)
    drop_mask = int(arch.dropout) * (e if device == "cpu" else 1)
    if arch.family == "decoder":
        # The lookups keep their int64 ids (and dropout its mask); their sum is layer 0's (norm) input.
        embeddings = 8 * sq * b + sq * b * h * drop_mask
        # The final norm (input, statistics; RMSNorm also its normalised output) and the head's input.
        head = sq * b * (3 * h * e + 4 if arch.mlp == "gated" else 2 * h * e + 8)
    else:
        # The embeddings' sum (LayerNorm input) and dropout mask; the LayerNorm output is layer 0's input,
        # counted there. Per token: LayerNorm statistics and the int64 ids the lookups keep (measured: 26 B).
        embeddings = sq * b * h * (e + drop_mask) + 26 * sq * b
        # A first-token pooler or classifier saves a slice of the last layer's output: a view that keeps all of
        # it (RoBERTa's head drops out the slice first, which saves only a mask).
        head = sq * b * h * e if arch.head_keeps_output else 0
    parts = {"layers": layers, "embeddings": embeddings, "head": head}
    if arch.lm_head:
        parts["loss"] = b * sq * (4 * arch.vocab + 8)  # fp32 log-softmax over the vocabulary, int64 labels
    else:
        parts["loss"] = 2 * 4 * b * arch.num_labels  # fp32 logits and their softmax for the loss
    return parts


def lora_layer(arch: Arch, s: Point, lora: LoraFacts, device: Device = "gpu") -> tuple[int, int, int]:
    """(what freezing saves, what the adapters add, what layer 0 saves besides) in bytes, for one layer.

    Measured on real forwards (peft 0.21, torch 2.13): a frozen Linear keeps no input (autograd saves a
    matmul operand only for the other's gradient), so a layer no longer keeps the input of its frozen
    projections: the q/k/v input (unless an adapter reads it), eager attention's context for the output
    projection, the MLP's input and its down projection's input; a frozen RMSNorm weight no longer needs the
    normalised input. An adapter keeps its input for lora_A (shared by adapters that read the same tensor,
    and by nothing else with lora_dropout > 0: lora_A reads the dropped copy), the r-wide output of lora_A,
    and with dropout the dropped copy and its mask. Layer 0's input needs no gradient (the embeddings are
    frozen): eager attention keeps q only if k needs a gradient (and k only if q does), and dropout on it
    keeps no mask.
    """
    tokens, h, e = s.batch_size * s.seq_len, arch.hidden, bytes_per_element(s.precision)
    mask, drop = (e if device == "cpu" else 1), lora.spec.dropout > 0
    roles = lora.roles
    block, n = [layer for layer in lora.layers if layer.role != "other"], max(arch.layers, 1)
    kept = {role for role in roles if not drop}  # roles whose input lora_A keeps
    freed = 0 if kept & {"q", "k", "v", "qkv"} else h
    if materializes_scores(arch, device) and "o" not in kept:
        freed += h  # the context only the output projection kept (fused kernels keep their output anyway)
    freed += 0 if "fc1" in kept else h
    freed += 0 if "fc2" in kept else arch.intermediate
    if arch.mlp == "gated":
        freed += 2 * h  # each RMSNorm's normalised input, kept for its (now frozen) weight
    added = tokens * sum(lora.spec.r * e + (layer.fan_in * (e + mask) if drop else 0) for layer in block) // n
    first = 0
    if materializes_scores(arch, device):
        q, k = bool(roles & {"q", "qkv"}), bool(roles & {"k", "qkv"})
        first += h * e if q and not k else (arch.kv_dim * e if k and not q else 0)
    if drop:
        first += sum(layer.fan_in for layer in block if layer.role in ("q", "k", "v", "qkv")) // n * mask
    return tokens * freed * e, added, tokens * first


def lora_saved_activations(arch: Arch, s: Point, lora: LoraFacts, device: Device = "gpu") -> dict[str, int]:
    """:func:`saved_activations` of a LoRA model: the same parts, less what frozen weights don't keep, and an
    ``adapters`` part (each adapter's r-wide intermediate, and with lora_dropout its dropped input and mask).

    Without checkpointing nothing before layer 0 needs a gradient: the embeddings keep nothing. With it,
    transformers makes the embeddings' output require a gradient (``enable_input_require_grads``, so that the
    checkpointed layers have one to pass back): they keep what full fine-tuning keeps, less the token ids.
    A frozen head keeps no input: a causal LM's, and an encoder's behind a frozen pooler (BERT); peft trains a
    classifier's head (``modules_to_save``), which keeps its input.
    """
    parts = saved_activations(arch, s, device)
    tokens, h, e = s.batch_size * s.seq_len, arch.hidden, bytes_per_element(s.precision)
    freed, added, first = lora_layer(arch, s, lora, device)
    ids = tokens * (24 if arch.family == "encoder" else 8)
    if s.gradient_checkpointing:
        parts["embeddings"] = max(parts["embeddings"] - ids, 0)
        adapters = 0  # recomputed in backward with the rest of the layer
    else:
        parts["layers"] -= arch.layers * freed + first
        parts["embeddings"] = 0
        adapters = arch.layers * added
    if arch.family == "encoder":
        parts["head"] = parts["head"] if lora.head_saves_input else 0
    else:
        parts["head"] -= tokens * h * e * ((0 if lora.head_saves_input else 1) + (arch.mlp == "gated"))
    return {"layers": parts["layers"], "adapters": adapters, **{k: v for k, v in parts.items() if k != "layers"}}


def live_logits(arch: Arch, s: Point) -> int:
    """Bytes of an LM head's logits, alive until the loss is taken but not saved: the logits in the data type
    and, under mixed precision, their fp32 copy. Classification heads' few logits are in ``loss``."""
    if not arch.lm_head:
        return 0
    e = bytes_per_element(s.precision)
    return s.batch_size * s.seq_len * arch.vocab * (e + (4 if e == 2 else 0))


def estimate(
    arch: Arch,
    s: Point,
    cal: Calibration | None = None,
    device: Device = "gpu",
    rank: int | None = None,
    lora: LoraFacts | None = None,
    trainer_optim: TrainerOptimizer | None = None,
    saved_parts: dict[str, int] | None = None,
) -> Estimate:
    """Predict the per-rank peaks of training ``arch`` at point ``s`` on a GPU or a CPU: those of ``rank``, by
    default of the rank that holds the most.

    ``saved_parts``: the saved activations by part, taken as given (``--trace``: the real model's traced forward)
    instead of the formulas.

    ``trainer_optim``: for a point without DeepSpeed (``s.deepspeed`` False, ``--zero none``; fp32, one rank),
    the optimizer HF Trainer steps: its states replace Adam's moments and its step's temporaries are the step's item.

    Two moments compete for the peak: the forward/backward (saved activations and temporaries, and under
    ZeRO-3 the gathered 16-bit weights, which the shipped configs' ``stage3_max_live_parameters`` and
    ``stage3_max_reuse_distance`` of 1e9 keep resident for models below that size) and the optimizer step
    (the fp32 gradients of this rank's partition). On a GPU the caching allocator reuses the first moment's
    blocks for the second, so the peak is the larger; on a CPU the heap keeps what the first moment grew, so
    the peak is their sum. Everything else (model states, buckets) is held throughout.

    With ``lora`` (:func:`ftprof.estimate.adapters.lora_facts`), only the adapters and a classifier's head
    train: see :func:`model_states` and :func:`lora_saved_activations`.
    """
    if s.peft == "lora" and lora is None:
        raise ValueError(f"{s.key} is a LoRA point: pass its adapters (lora=), or it is estimated as full fine-tuning")
    if s.deepspeed == (trainer_optim is not None):
        raise ValueError(f"{s.key}: pass the Trainer's optimizer (trainer_optim=) exactly when DeepSpeed is off")
    cal = cal or Calibration()
    # (called with the four arguments alone when no adapter is given: a test swaps in a four-argument stand-in)
    items, host = model_states(arch, s, device, rank) if lora is None else model_states(arch, s, device, rank, lora)
    e = bytes_per_element(s.precision)
    if s.zero >= 1:
        # HF's "auto" reduce bucket is hidden² elements; overlap_comm (the shipped ZeRO-2/3 configs, on GPUs)
        # keeps two, CPU runs and ZeRO-1 one.
        items["gradient_buckets"] = (2 if device == "gpu" and s.zero >= 2 else 1) * arch.hidden**2 * e
        items["zero_runtime"] = math.ceil(cal.zero_runtime_bytes)
    parts = _activation_parts(arch, s, device, lora, saved_parts)
    saved = sum(parts.values())
    items["saved_activations"] = saved
    if s.gradient_checkpointing:
        layer = layer_activations(arch, s, device)  # in backward, one layer at a time
        if lora is not None:
            freed, added, _ = lora_layer(arch, s, lora, device)
            layer += added - freed
        items["recomputed_layer"] = layer
    items["temporaries"] = math.ceil(saved * (cal.activation_factor - 1)) + live_logits(arch, s)
    total, trained = (arch.params, arch.params) if lora is None else (lora.params, lora.trainable_params)
    if s.zero == 3:  # every parameter, frozen ones too, is gathered for the forward and backward
        items["gathered_parameters"] = e * min(total, STAGE3_MAX_LIVE_PARAMETERS)
    forward = sum(items[k] for k in FORWARD_ITEMS if k in items)
    step = math.ceil(4 * trained / (s.world_size if s.zero >= 1 else 1)) if e == 2 or s.zero >= 1 else 0
    labels: dict[str, str] = {}
    if trainer_optim is not None:
        step, labels = _plain_trainer(arch, s, device, trainer_optim, lora, trained, items)
    if s.offload_optimizer and device == "gpu":
        step = 0  # the CPU optimizer steps in host memory
    if device == "cpu":
        items["optimizer_step"] = step
    elif step > forward:
        items["optimizer_step"] = step - forward
    allocated = sum(items.values())
    reserved = math.ceil(allocated * cal.reserved_factor)
    # a process group's own buffers (NCCL's, on a GPU): DeepSpeed's always, DDP's on several ranks
    group = trainer_optim is None or s.world_size > 1
    runtime = cal.runtime_bytes + (cal.deepspeed_runtime_bytes if group else 0.0)
    return Estimate(items, host, allocated, reserved, reserved + math.ceil(runtime), parts, labels)


def _activation_parts(
    arch: Arch, s: Point, device: Device, lora: LoraFacts | None, given: dict[str, int] | None
) -> dict[str, int]:
    """The saved activations by part: ``given`` (traced), else the formulas (LoRA's where adapters train)."""
    if given is not None:
        return dict(given)
    return saved_activations(arch, s, device) if lora is None else lora_saved_activations(arch, s, lora, device)


def _plain_trainer(
    arch: Arch,
    s: Point,
    device: Device,
    optim: TrainerOptimizer,
    lora: LoraFacts | None,
    trained: int,
    items: dict[str, int],
) -> tuple[int, dict[str, str]]:
    """HF Trainer without DeepSpeed (DDP on several ranks) stepping ``optim``: its states and DDP's buckets go
    into ``items``; returns the step's temporaries and the items' labels."""
    assert s.zero == 0, "a plain-Trainer point is ZeRO-0 in shape (no partitioning)"
    check_plain_trainer(s.precision, s.offload, s.gradient_checkpointing)
    groups = arch.trainer_step_groups if lora is None else lora_step_groups(lora, optim)
    items["optimizer_states"] = optim.states(groups)
    labels = {"optimizer_states": f"optimizer states ({optim.states_label})"}
    if s.world_size > 1:
        # DDP as HF Trainer builds it (gradient_as_bucket_view=False): every trained parameter's gradient also
        # has a place in a flat bucket (torch/nn/parallel/distributed.py, the Reducer), fp32 here.
        items["gradient_buckets"] = 4 * trained
        labels["gradient_buckets"] = "DDP gradient buckets (each gradient's copy for the all-reduce)"
    return optim.temporaries(groups, device), labels


def lora_step_groups(lora: LoraFacts, optim: TrainerOptimizer) -> tuple[tuple[tuple[int, ...], ...], ...]:
    """The trained parameters under LoRA as the Trainer's optimizer sees them: peft's sizes, as vectors in one
    group (the Adam and SGD models count elements; foreach's per-group copy is taken over all of them, at most
    the head's biases more than the Trainer's two groups hold).

    Raises:
        ConfigError: an optimizer whose state depends on the adapters' matrix shapes (Adafactor).
    """
    if optim.name == "adafactor":
        raise ConfigError("--optim adafactor with --peft lora: its factored state of the adapters is not modelled yet")
    return (tuple((n,) for n in lora.trainable_sizes),)


def max_batch(
    arch: Arch,
    s: Point,
    budget: int,
    cal: Calibration | None = None,
    device: Device = "gpu",
    limit: int = 1 << 16,
    lora: LoraFacts | None = None,
    trainer_optim: TrainerOptimizer | None = None,
    saved_parts: Callable[[int], dict[str, int]] | None = None,
) -> int:
    """The largest micro-batch whose predicted device-used peak fits ``budget`` (0 if none), by bisection
    over the model (monotonic in the batch), not by trial runs. ``saved_parts``: the saved activations of a
    batch (``--trace``), in the formulas' place."""

    def fits(batch: int) -> bool:
        parts = saved_parts(batch) if saved_parts else None
        point = s.with_batch(batch)
        est = estimate(arch, point, cal, device, lora=lora, trainer_optim=trainer_optim, saved_parts=parts)
        return est.device_used <= budget

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
