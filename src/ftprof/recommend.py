"""Recommendations from measured points: pure rules over records, no I/O.

* fastest: the highest samples/s whose peak fits the budget;
* largest_effective_batch: the largest micro-batch × accumulation × ranks that fits (faster on ties);
* memory_optimal: the smallest peak among measured points (the safest choice on a shared device).
Each comes with the exact launcher command and the ds_config to use.
"""

from __future__ import annotations

from dataclasses import dataclass

from ftprof.deepspeed_config import ds_config_for
from ftprof.results import Record

# Peaks vary a little run to run (allocator, sampling); keep this much of the budget free.
SAFETY_MARGIN = 0.05


@dataclass(frozen=True)
class Recommendation:
    kind: str
    record: Record
    command: str
    ds_config: dict

    @property
    def title(self) -> str:
        return {"fastest": "Fastest under the budget", "largest_effective_batch": "Largest effective batch",
                "memory_optimal": "Least memory"}[self.kind]


def fitting(records: list[Record], budget: int | None) -> list[Record]:
    """Measured points whose peak leaves :data:`SAFETY_MARGIN` of ``budget`` free."""
    ok = [r for r in records if r.status == "ok" and r.peak_bytes]
    if budget is None:
        return ok
    return [r for r in ok if r.peak_bytes <= budget * (1 - SAFETY_MARGIN)]


def samples_per_s(record: Record) -> float:
    return float(record.metrics.get("samples_per_s") or 0.0)


def pareto_front(records: list[Record]) -> list[Record]:
    """Points no other point beats on both peak memory (lower) and samples/s (higher), by rising memory."""
    front: list[Record] = []
    best = -1.0
    for r in sorted((r for r in records if r.status == "ok" and r.peak_bytes),
                    key=lambda r: (r.peak_bytes, -samples_per_s(r))):
        if samples_per_s(r) > best:
            front.append(r)
            best = samples_per_s(r)
    return front


def launch_command(record: Record, config_path: str) -> str:
    """The ``deepspeed launch/train.py`` command that trains with ``record``'s settings."""
    p = record.point
    launcher = "deepspeed" if p.world_size == 1 else f"deepspeed --num_gpus {p.world_size}"
    precision = {"bf16": " --bf16", "fp16": " --fp16"}.get(p.precision, "")
    return (f"{launcher} launch/train.py --ds_config {config_path} --model {record.model} "
            f"--per_device_train_batch_size {p.batch_size} --gradient_accumulation_steps {p.grad_accum} "
            f"--max_length {p.seq_len}{precision}")


def recommend(records: list[Record], budget: int | None, seq_len: int | None = None,
              config_dir: str = "ds_configs") -> list[Recommendation]:
    """Up to three recommendations at one sequence length (fewer when nothing fits).

    The sequence length is the data's, not a free choice, so settings are compared at ``seq_len``: by
    default the longest measured length at which something fits (inputs padded up to ``--max_length``).
    """
    candidates = fitting(records, budget)
    if seq_len is None and candidates:
        seq_len = max(r.point.seq_len for r in candidates)
    candidates = [r for r in candidates if r.point.seq_len == seq_len]
    if not candidates:
        return []
    picks = {
        "fastest": max(candidates, key=lambda r: (samples_per_s(r), -r.peak_bytes)),
        "largest_effective_batch": max(candidates, key=lambda r: (r.point.effective_batch(), samples_per_s(r))),
        "memory_optimal": min(candidates, key=lambda r: (r.peak_bytes, -samples_per_s(r))),
    }
    out = []
    for kind, record in picks.items():
        path = f"{config_dir}/zero{record.point.zero}.json"
        out.append(Recommendation(kind, record, launch_command(record, path), ds_config_for(record.point.zero)))
    return out
