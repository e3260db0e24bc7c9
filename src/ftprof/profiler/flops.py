"""Model FLOPs per token and device peaks, for achieved TFLOP/s and MFU.

Formula (PaLM, Chowdhery et al. 2022, appendix B): training FLOPs per token = 6·N + 12·L·H·Q·T, where N is
the number of non-embedding parameters, L layers, H heads, Q head dimension and T the sequence length. The
second term is attention's score and value products, which HF's ``total_flos`` (6·N·tokens, counting
padding) leaves out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ftprof.known_configs import dims

if TYPE_CHECKING:
    import torch

# Dense bf16/fp16 tensor-core peaks in TFLOP/s (no sparsity), and fp32 (non-tensor-core) peaks.
GPU_PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "H100 SXM": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0},
    "H100 NVL": {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
    "L40S": {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6},
    "A10G": {"bf16": 70.0, "fp16": 70.0, "fp32": 31.2},
    "L4": {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3},
    "V100": {"fp16": 125.0, "fp32": 15.7},
    "T4": {"fp16": 65.0, "fp32": 8.1},
    "RTX 4090": {"bf16": 165.0, "fp16": 165.0, "fp32": 82.6},
    "RTX 3090": {"bf16": 71.0, "fp16": 71.0, "fp32": 35.6},
}


def peak_tflops(device_name: str, precision: str) -> float | None:
    """The table's peak for a CUDA device name such as ``NVIDIA H100 80GB HBM3``, or None when unknown.

    >>> peak_tflops("NVIDIA H100 80GB HBM3", "bf16")
    989.0
    """
    name = device_name.upper()
    key: str | None
    if "H100" in name:  # SXM parts report "HBM3"; PCIe ones say "PCIe"; NVL says NVL
        key = "H100 PCIe" if "PCIE" in name else "H100 NVL" if "NVL" in name else "H100 SXM"
    else:
        key = next((k for k in GPU_PEAK_TFLOPS if k.upper() in name), None)
    if key is None:
        return None
    return GPU_PEAK_TFLOPS[key].get(precision)


def training_flops_per_token(non_embedding_params: int, layers: int, heads: int, head_dim: int, seq_len: int) -> float:
    """PaLM's 6·N + 12·L·H·Q·T.

    >>> training_flops_per_token(1000, 2, 2, 4, 8)
    7536.0
    """
    return 6.0 * non_embedding_params + 12.0 * layers * heads * head_dim * seq_len


def model_shape(model: torch.nn.Module) -> tuple[int, int, int, int]:
    """(non-embedding parameters, layers, heads, head dim) of a transformers model, from its config.

    Embedding lookups cost no FLOPs, but an LM head tied to the input embedding is a real vocabulary-wide
    matmul: it counts (PaLM's N includes the output projection).
    """
    d = dims(model.config)
    # A transformers model's submodule weights and get_output_embeddings are attributes torch's types can't see.
    embeddings: list[Any] = [m for m in model.modules() if type(m).__name__ == "Embedding"]
    embedding = sum(getattr(m.weight, "ds_numel", m.weight.numel()) for m in embeddings)
    total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    transformers_model: Any = model
    head = transformers_model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = head is not None and getattr(model.config, "tie_word_embeddings", False)
    tied_head = getattr(head.weight, "ds_numel", head.weight.numel()) if tied and head is not None else 0
    return total - embedding + tied_head, d.layers, d.heads, d.head_dim
