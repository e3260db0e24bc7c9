"""Profiler overhead: training steps/s with ProfilerCallback vs without, alternated in fresh processes.

    .venv/bin/python bench/bench_profiler.py            # ~3 min on a 2-core CPU
    .venv/bin/python bench/bench_profiler.py --repeats 5 --steps 80

A small BERT (4 layers, hidden 256, seq 128, batch 16) trains under plain HF Trainer on the CPU; each run is
a fresh process and runs alternate (without, with, without, ...) so drift hits both sides alike. The
figure is the ratio of median steps/s (goal: at most 1% slower with the callback).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys


def worker(with_profiler: bool, steps: int) -> None:
    import time

    import torch
    from datasets import Dataset
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        Trainer,
        TrainingArguments,
        default_data_collator,
    )

    from ftprof.profiler import ProfilerCallback

    torch.manual_seed(0)
    model = BertForSequenceClassification(
        BertConfig(vocab_size=4096, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024)
    )
    g = torch.Generator().manual_seed(0)
    n = 16 * (steps + 1)
    data = Dataset.from_dict(
        {
            "input_ids": torch.randint(5, 4096, (n, 128), generator=g).tolist(),
            "attention_mask": [[1] * 128] * n,
            "labels": [i % 2 for i in range(n)],
        }
    )
    args = TrainingArguments(
        output_dir="/tmp/ftprof-bench-profiler",
        per_device_train_batch_size=16,
        max_steps=steps,
        report_to="none",
        disable_tqdm=True,
        logging_steps=10,
        save_strategy="no",
        use_cpu=True,
    )
    callbacks = [ProfilerCallback(warmup_steps=2)] if with_profiler else []
    trainer = Trainer(
        model=model, args=args, train_dataset=data, data_collator=default_data_collator, callbacks=callbacks
    )
    start = time.perf_counter()
    trainer.train()
    print(json.dumps({"steps_per_s": steps / (time.perf_counter() - start)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--worker", choices=["with", "without"], help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.worker:
        return worker(a.worker == "with", a.steps)
    rates: dict[str, list[float]] = {"without": [], "with": []}
    for i in range(a.repeats):
        for side in ("without", "with"):
            out = subprocess.run(
                [sys.executable, __file__, "--worker", side, "--steps", str(a.steps)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            rates[side].append(json.loads(out.strip().splitlines()[-1])["steps_per_s"])
        print(
            f"round {i + 1}: without {rates['without'][-1]:.2f} steps/s, with {rates['with'][-1]:.2f} steps/s",
            flush=True,
        )
    without, with_ = statistics.median(rates["without"]), statistics.median(rates["with"])
    print(f"\nmedian steps/s: without {without:.3f} | with ProfilerCallback {with_:.3f}")
    print(f"with / without: {with_ / without:.4f} ({100 * (1 - with_ / without):+.2f}% slower)")


if __name__ == "__main__":
    main()
