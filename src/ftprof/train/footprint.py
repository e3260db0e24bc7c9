"""What each rank holds of the model state: parameters and optimizer states, in elements and bytes.

Under ZeRO these shrink with the world size (optimizer states from stage 1, parameters at stage 3), so the
per-rank figures are a direct check that partitioning happened.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import TrainerCallback

from ftprof.profiler.breakdown import adapted_modules, optimizer_chain, parameter_counts

if TYPE_CHECKING:
    from transformers import TrainerControl, TrainerState, TrainingArguments


def innermost_optimizer(optimizer: Any) -> torch.optim.Optimizer | None:
    """Unwrap accelerate's and DeepSpeed's optimizer wrappers down to the torch optimizer doing the step."""
    chain = optimizer_chain(optimizer)
    return chain[-1] if chain and isinstance(chain[-1], torch.optim.Optimizer) else None


def optimizer_state_bytes(optimizer: Any) -> int:
    """Bytes of tensors in the optimizer's state on this rank (Adam: exp_avg and exp_avg_sq)."""
    inner = innermost_optimizer(optimizer)
    if inner is None:
        return 0
    return sum(
        t.numel() * t.element_size()
        for state in inner.state.values()
        for t in state.values()
        if torch.is_tensor(t) and t.dim() > 0
    )


def local_parameter_numel(model: torch.nn.Module) -> int:
    """Parameter elements this rank stores: ZeRO-3 keeps only its partition (``ds_tensor``)."""
    return sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in model.parameters())


class FootprintCallback(TrainerCallback):
    """Write ``footprint_rank{N}.json`` in the output dir after the first optimizer step, on every rank."""

    def __init__(self) -> None:
        self.written = False

    def on_step_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        if self.written or optimizer is None or model is None:
            return
        record = {
            "rank": args.process_index,
            "world_size": args.world_size,
            "optimizer_state_bytes": optimizer_state_bytes(optimizer),
            "local_parameter_numel": local_parameter_numel(model),
            "total_parameter_numel": sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters()),
        }
        # What really trains: everything, or (--peft lora) the adapters and a classifier's head.
        record["trainable_parameter_numel"], record["frozen_parameter_numel"] = parameter_counts(model)
        record["adapted_modules"] = adapted_modules(model)
        assert args.output_dir is not None  # TrainingArguments.__post_init__ fills it in
        path = Path(args.output_dir) / f"footprint_rank{args.process_index}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n")
        self.written = True
