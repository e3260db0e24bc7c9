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

    FOLD = 64

    def __init__(self) -> None:
        self.samples = 0
        self.real_tokens = 0
        self.padded_tokens = 0
        self.longest = 0  # the longest padded input of any training forward (the worst case that ran)
        self._handle: Any = None
        # Mask sums on the device, not read yet (reading one syncs the GPU): one reduction launched per
        # forward, folded into one tensor every FOLD of them (no per-forward addition).
        self._real_on_device: list[torch.Tensor] = []

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
            sums = self._real_on_device
            sums.append(mask.sum(dtype=torch.int64))
            if len(sums) >= self.FOLD:
                self._real_on_device = [torch.stack(sums).sum()]

    def snapshot(self) -> tuple[int, int, int]:
        if self._real_on_device:
            self.real_tokens += int(torch.stack(self._real_on_device).sum())
            self._real_on_device = []
        return self.samples, self.real_tokens, self.padded_tokens
