"""Count the samples, real tokens and padded tokens a model trains on, as its forward consumes them."""

from __future__ import annotations

from typing import Any

import torch


class BatchCounter:
    """A forward pre-hook on the model that counts training inputs (``input_ids`` elements are padded
    tokens, ``attention_mask`` ones real tokens).

    Counting where the model consumes a batch, not where the data loader builds it, keeps the count exact
    whatever the loader fetches ahead (Trainer draws a whole accumulation window before ``on_step_begin``,
    and accelerate prefetches one more batch). Evaluation forwards (``model.training`` false) don't count.
    Counts are per process; :class:`~ftprof.profiler.ProfilerCallback` sums them over ranks.
    """

    def __init__(self) -> None:
        self.samples = 0
        self.real_tokens = 0
        self.padded_tokens = 0
        self.longest = 0  # the longest padded input of any training forward (the worst case that ran)
        self._handle: Any = None
        self._real_on_device: torch.Tensor | None = None  # mask sums not read yet: reading one syncs the GPU

    def attach(self, model: torch.nn.Module) -> None:
        if self._handle is None:
            self._handle = model.register_forward_pre_hook(self._count, with_kwargs=True)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _count(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not module.training:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(ids, torch.Tensor):
            embeds = kwargs.get("inputs_embeds")
            if isinstance(embeds, torch.Tensor):
                self.samples += int(embeds.shape[0])
            return
        self.samples += int(ids.shape[0])
        self.padded_tokens += int(ids.numel())
        self.longest = max(self.longest, int(ids.shape[-1]))
        mask = kwargs.get("attention_mask")
        if not isinstance(mask, torch.Tensor):
            self.real_tokens += int(ids.numel())
        elif mask.device.type == "cpu":
            self.real_tokens += int(mask.sum())
        else:  # summed on the device and read at the next snapshot: one sync per window, not one per step
            total = mask.sum(dtype=torch.int64)
            self._real_on_device = total if self._real_on_device is None else self._real_on_device + total

    def snapshot(self) -> tuple[int, int, int]:
        if self._real_on_device is not None:
            self.real_tokens += int(self._real_on_device)
            self._real_on_device = None
        return self.samples, self.real_tokens, self.padded_tokens
