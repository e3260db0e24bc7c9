"""Count real and padded tokens as batches are built, on each rank, under any gradient accumulation."""

from __future__ import annotations

from typing import Any


class TokenCountingCollator:
    """Wrap a data collator; counts ``attention_mask`` ones (real tokens) and ``input_ids`` elements (padded).

    Counts are per process; :class:`~ftprof.profiler.ProfilerCallback` sums them over ranks. Use with
    ``dataloader_num_workers=0`` (workers would count in their own processes).
    """

    def __init__(self, collator) -> None:
        self.collator = collator
        self.real_tokens = 0
        self.padded_tokens = 0
        self.samples = 0

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collator(features)
        ids = batch["input_ids"]
        self.padded_tokens += int(ids.numel())
        mask = batch.get("attention_mask")
        self.real_tokens += int(mask.sum()) if mask is not None else int(ids.numel())
        self.samples += int(ids.shape[0])
        return batch

    def snapshot(self) -> tuple[int, int, int]:
        return self.samples, self.real_tokens, self.padded_tokens
