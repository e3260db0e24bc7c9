"""Measure one sweep point: a few real Trainer + DeepSpeed steps in this process (one per rank).

Run by ``ftprof sweep`` in a fresh process per point, so no peak is polluted by an earlier point:

    python -m ftprof.point SPEC.json                       # world size 1
    deepspeed --num_gpus 2 .../ftprof/point.py SPEC.json   # world size 2

SPEC holds a :class:`PointSpec`; rank 0 writes the measurement to ``spec.result_path`` as JSON.
The model is built from its config with random weights: memory and speed don't depend on weight values,
and this works with no network for known architectures.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class PointSpec:
    """Everything one measurement needs (JSON-serialisable)."""

    model: str
    batch_size: int
    grad_accum: int
    precision: str  # fp32 | fp16 | bf16
    seq_len: int
    zero: int
    world_size: int
    steps: int
    warmup: int
    ds_config: dict
    result_path: str
    dataset: str | None = None
    seed: int = 0


def _token_dataset(spec: PointSpec, vocab_size: int, n_rows: int):
    """Random token ids of exactly ``seq_len`` (the swept length) and random binary labels."""
    import torch
    from datasets import Dataset

    g = torch.Generator().manual_seed(spec.seed)
    ids = torch.randint(5, vocab_size, (n_rows, spec.seq_len), generator=g)
    labels = torch.randint(0, 2, (n_rows,), generator=g)
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * spec.seq_len] * n_rows,
                              "labels": labels.tolist()})


def _load_task(spec: PointSpec):
    from ftprof.data import load_raw, prepare_task

    return prepare_task(load_raw(spec.dataset, seed=spec.seed), None, None, seed=spec.seed)


def _dataset_rows(spec: PointSpec, task, tokenizer, n_rows: int, global_batch: int):
    """Real texts truncated to ``seq_len``, ordered so that the first global batch holds the longest
    inputs (the worst-case batch is always measured) and the rest follow in random order."""
    import random

    from datasets import Dataset

    texts, labels = list(task.train[task.text_column]), list(task.train[task.label_column])
    encoded = tokenizer(texts, truncation=True, max_length=spec.seq_len)
    order = sorted(range(len(texts)), key=lambda i: -len(encoded["input_ids"][i]))
    head, tail = order[:global_batch], order[global_batch:]
    random.Random(spec.seed).shuffle(tail)
    chosen = (head + tail)[:n_rows]
    while len(chosen) < n_rows:  # small files: repeat
        chosen += chosen[: n_rows - len(chosen)]
    return Dataset.from_dict({"input_ids": [encoded["input_ids"][i] for i in chosen],
                              "attention_mask": [encoded["attention_mask"][i] for i in chosen],
                              "labels": [labels[i] for i in chosen]})


def measure(spec: PointSpec) -> dict:
    """Run ``warmup + steps`` optimizer steps and return the profiler's summary (on every rank)."""
    import torch
    from transformers import DataCollatorWithPadding, Trainer

    from ftprof.args import FtprofTrainingArguments
    from ftprof.deepspeed_config import DeepSpeedConfig, cpu_adjusted
    from ftprof.distributed import ensure_single_process_env
    from ftprof.models import build_model, resolve_model_spec, train_tokenizer_for
    from ftprof.profiler import ProfilerCallback, TokenCountingCollator

    ensure_single_process_env()
    model_spec = resolve_model_spec(spec.model, random_init=True)
    with tempfile.TemporaryDirectory() as out:
        args = FtprofTrainingArguments(
            output_dir=out, per_device_train_batch_size=spec.batch_size, gradient_accumulation_steps=spec.grad_accum,
            max_steps=spec.warmup + spec.steps, bf16=spec.precision == "bf16", fp16=spec.precision == "fp16",
            deepspeed=cpu_adjusted(DeepSpeedConfig(spec.ds_config), torch.cuda.is_available()).config, save_strategy="no", eval_strategy="no", load_best_model_at_end=False,
            logging_steps=10_000, report_to="none", disable_tqdm=True, dataloader_num_workers=0, seed=spec.seed,
            learning_rate=1e-5,
            # With --dataset the rows are ordered so the first global batch is the worst case: keep that order.
            train_sampling_strategy="sequential" if spec.dataset else "random")
        global_batch = spec.batch_size * spec.grad_accum * args.world_size
        n_rows = global_batch * (spec.warmup + spec.steps + 1)
        # Token ids are synthetic unless --dataset: a tokenizer is only needed for real texts (and pad id 0).
        task = _load_task(spec) if spec.dataset else None
        texts = list(task.train[task.text_column]) if task else ["profiling"] * 4
        tokenizer = train_tokenizer_for(model_spec, texts)
        if task is not None:
            train = _dataset_rows(spec, task, tokenizer, n_rows, global_batch)
        else:
            train = _token_dataset(spec, model_spec.config.vocab_size, n_rows)
        model = build_model(model_spec, tokenizer, ["0", "1"], shrink_vocab=False)  # the preset's real shape
        model.accepts_loss_kwargs = False
        counter = TokenCountingCollator(DataCollatorWithPadding(tokenizer))
        profiler = ProfilerCallback(warmup_steps=spec.warmup, counter=counter)
        trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=counter, callbacks=[profiler])
        trainer.train()
        summary = dict(profiler.summary or {})
        summary["random_init"] = True
        return summary


def main(argv: list[str] | None = None) -> int:
    argv = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("--local_rank")]
    spec = PointSpec(**json.loads(Path(argv[0]).read_text()))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from ftprof.distributed import shutdown

    summary = measure(spec)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(spec.result_path).write_text(json.dumps(summary))
    shutdown()
    return 0


def write_spec(spec: PointSpec, path: Path) -> Path:
    path.write_text(json.dumps(asdict(spec)))
    return path


if __name__ == "__main__":
    raise SystemExit(main())
