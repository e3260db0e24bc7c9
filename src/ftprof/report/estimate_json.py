"""``ftprof estimate --format json``: every item and peak of an estimate, with its settings, for scripts and CI.

One JSON object on stdout. For a prediction (``ftprof.estimate/1``): per setting its point, every item on the
device and in host memory, ``allocated_bytes`` (``max_memory_allocated``), ``reserved_bytes``
(``max_memory_reserved``), ``device_used_bytes`` (NVML on a GPU, RSS on a CPU) and, with a budget, whether it fits.
For ``--grid`` (``ftprof.estimate-grid/1``): per sequence length and setting, the largest micro-batch. Both carry
the target and the constants with where each comes from (measured or assumed).
"""

from __future__ import annotations

from dataclasses import asdict, replace
from typing import Any

from ftprof.estimate.request import Estimates, MaxBatchGrid, Target

ESTIMATE_SCHEMA = "ftprof.estimate/1"
GRID_SCHEMA = "ftprof.estimate-grid/1"


def _common(result: Estimates | MaxBatchGrid) -> dict[str, Any]:
    target: Target = result.request.target
    return {
        "model": result.request.model,
        "task": result.request.task,
        "target": {
            "device": target.device,
            "budget_bytes": target.budget,
            "margin": target.margin,
            "usable_bytes": target.usable,
        },
        "calibration": asdict(result.calibration),
        "constants": [{"name": n, "value": v, "source": s} for n, v, s in result.constants],
    }


def estimates_json(result: Estimates) -> dict[str, Any]:
    """A prediction per setting, itemised (bytes per rank, the fullest rank)."""
    usable = result.request.target.usable
    settings = []
    for i, (point, est) in enumerate(zip(result.points, result.estimates, strict=True)):
        settings.append(
            {
                "point": point.to_json(),
                "key": point.key,
                "peft": result.peft[i] if result.peft else "none",
                "items": dict(est.items),
                "host_items": dict(est.host_items),
                "saved_activation_parts": dict(est.activation_parts),
                "allocated_bytes": est.allocated,
                "reserved_bytes": est.reserved,
                "device_used_bytes": est.device_used,
                "fits": None if usable is None else est.device_used <= usable,
                "headroom_bytes": None if usable is None else usable - est.device_used,
            }
        )
    return {"schema": ESTIMATE_SCHEMA, **_common(result), "params": result.params, "settings": settings}


def grid_json(result: MaxBatchGrid) -> dict[str, Any]:
    """The largest micro-batch per (sequence length, setting); 0 where nothing fits."""
    cells = []
    for (seq_len, column), cell in sorted(result.cells.items()):
        setting = replace(result.settings[column], seq_len=seq_len, batch_size=cell.best or 1)
        cells.append(
            {
                "seq_len": seq_len,
                "setting": setting.to_json(),  # at the largest batch that fits (1 where none does)
                "peft": result.peft[column] if result.peft else "none",
                "max_batch_size": cell.best,
                "micro_batch_size": cell.micro,
                "gradient_accumulation_steps": cell.accum,
            }
        )
    return {
        "schema": GRID_SCHEMA,
        **_common(result),
        "effective_batch": result.request.effective_batch,
        "cells": cells,
    }
