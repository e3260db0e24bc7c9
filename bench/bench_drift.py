"""How steady is this machine? One fixed training step, timed in one process for minutes: the floor under
any throughput repeatability goal.

    .venv/bin/python bench/bench_drift.py              # 3 minutes
    .venv/bin/python bench/bench_drift.py --seconds 60

The step is tiny-bert's (ftprof's offline config: 2 layers, hidden 128) at batch 4 × 128 tokens, fp32,
forward + backward + AdamW, plain torch on this machine's threads; nothing else changes during the run: same
process, same tensors, same memory. Prints the samples/s of consecutive windows of 2 s (the sweep's default
on CPUs) and of 20 s, each as median, p5-p95 spread (as a fraction of the median) and the worst ratio between
two windows at least a minute apart: what two sweeps run back to back would see if ftprof measured perfectly.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def step_fn(batch: int, seq: int):
    import torch
    from transformers import AutoModelForSequenceClassification

    from ftprof.train.models import resolve_model_spec

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(resolve_model_spec("tiny-bert", random_init=True).config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    labels = torch.randint(0, 2, (batch,))

    def step() -> None:
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()

    return step


def windows(step, batch: int, seconds: float, window_s: float) -> list[tuple[float, float]]:
    """(start time, samples/s) of consecutive windows of about ``window_s``."""
    out = []
    end = time.perf_counter() + seconds
    while (start := time.perf_counter()) < end:
        steps = 0
        while time.perf_counter() - start < window_s:
            step()
            steps += 1
        out.append((start, batch * steps / (time.perf_counter() - start)))
    return out


def describe(rows: list[tuple[float, float]], apart_s: float = 60.0) -> dict[str, float]:
    rates = [r for _, r in rows]
    median = statistics.median(rates)
    q = statistics.quantiles(rates, n=20)
    pairs = [b / a for i, (ta, a) in enumerate(rows) for tb, b in rows[i + 1 :] if tb - ta >= apart_s]
    worst = max(pairs, key=lambda x: abs(x - 1), default=float("nan"))
    return {
        "windows": len(rates),
        "median_samples_per_s": round(median, 1),
        "p5_p95_spread": round((q[-1] - q[0]) / median, 3),
        "worst_ratio_a_minute_apart": round(worst, 3),
        "share_of_pairs_a_minute_apart_within_10pct": round(sum(abs(x - 1) <= 0.10 for x in pairs) / len(pairs), 3)
        if pairs
        else float("nan"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=180.0)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    a = p.parse_args()
    step = step_fn(a.batch, a.seq)
    for _ in range(10):  # warm-up: allocator, thread pool, optimizer state
        step()
    rows = windows(step, a.batch, a.seconds, 2.0)
    # 20 s windows from the same run: ten consecutive 2 s windows averaged by time.
    long = [(rows[i][0], statistics.fmean(r for _, r in rows[i : i + 10])) for i in range(0, len(rows) - 9, 10)]
    print(json.dumps({"2s_windows": describe(rows), "20s_windows": describe(long), "flags": vars(a)}, indent=2))


if __name__ == "__main__":
    main()
