"""Measure one sweep point: a few real Trainer + DeepSpeed steps in this process (one per rank).

Run by ``ftprof sweep`` in a fresh process per point, so no peak is polluted by an earlier point:

    python -m ftprof.sweep.measure SPEC.json                       # world size 1
    deepspeed --num_gpus 2 .../ftprof/measure.py SPEC.json   # world size 2

SPEC holds a :class:`MeasureSpec`; rank 0 writes the measured :class:`~ftprof.records.profile.Profile` to
``spec.result_path`` as JSON. With ``spec.memory_snapshot_dir`` every rank also writes its memory records
there (:mod:`ftprof.profiler.memory_records`), profiling one step after the measured window.
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
from typing import Any

from ftprof.point import Point
from ftprof.records.profile import Profile

MAX_WINDOW_STEPS = 5000  # a cap on the window, however fast the steps


@dataclass
class MeasureSpec:
    """Everything one measurement needs besides the point's axes (JSON round trip)."""

    point: Point
    model: str
    steps: int
    warmup: int
    ds_config: dict[str, Any]  # complete, for this point's ZeRO stage and offload
    result_path: str
    dataset: str | None = None
    seed: int = 0
    min_seconds: float = 0.0  # the throughput window lasts at least ``steps`` steps and this long
    task: str = "classification"  # or "causal-lm": blocks of exactly seq_len tokens, labels = input_ids
    # ``sweep --memory_snapshot``: each rank writes <point key>-rank<r>.pickle / -timeline.* here (the sweep
    # folder's snapshots/), named in its profile relative to this folder's parent
    memory_snapshot_dir: str | None = None

    @property
    def max_steps(self) -> int:
        """Trainer's step budget: ``warmup + steps``, or room for ``min_seconds`` (the profiler stops early),
        and one more for the profiled step of ``memory_snapshot_dir``."""
        window = max(self.steps, MAX_WINDOW_STEPS) if self.min_seconds else self.steps
        return self.warmup + window + (1 if self.memory_snapshot_dir else 0)

    def write(self, path: Path) -> Path:
        path.write_text(json.dumps({**asdict(self), "point": self.point.to_json()}))
        return path

    @classmethod
    def read(cls, path: Path) -> MeasureSpec:
        data = json.loads(path.read_text())
        return cls(**{**data, "point": Point.from_json(data["point"])})


def _token_dataset(spec: MeasureSpec, vocab_size: int, n_rows: int):
    """Random token ids of exactly ``seq_len`` (the swept length) and random binary labels."""
    import torch
    from datasets import Dataset

    g = torch.Generator().manual_seed(spec.seed)
    seq_len = spec.point.seq_len
    ids = torch.randint(5, vocab_size, (n_rows, seq_len), generator=g)
    if spec.task == "causal-lm":  # the collator makes labels from the ids
        return Dataset.from_dict({"input_ids": ids.tolist()})
    labels = torch.randint(0, 2, (n_rows,), generator=g)
    return Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": [[1] * seq_len] * n_rows, "labels": labels.tolist()}
    )


def _packed_rows(spec: MeasureSpec, task, tokenizer, n_rows: int):
    """A causal LM's training text packed into blocks of exactly ``seq_len`` tokens, cycled to ``n_rows``."""
    from ftprof.train.causal_lm_data import pack, tokenize_documents

    blocks = pack(tokenize_documents(task.train, task.text_column, tokenizer), spec.point.seq_len)
    return blocks.select([i % len(blocks) for i in range(n_rows)])


def _load_task(dataset: str, seed: int, task: str = "classification"):
    """The data's train split: texts and labels, or (causal LM) documents."""
    from ftprof.train.data import load_raw, prepare_task

    if task == "causal-lm":
        from ftprof.train.causal_lm_data import prepare_corpus

        return prepare_corpus(load_raw(dataset, seed=seed), None, seed=seed)
    return prepare_task(load_raw(dataset, seed=seed), None, None, seed=seed)


def _dataset_rows(spec: MeasureSpec, task, tokenizer, n_rows: int, global_batch: int):
    """Real texts truncated to ``seq_len``: the first global batch holds the longest inputs (the worst case
    is always measured, once), then the other rows follow in random order, reshuffled on each pass, for as
    many rows as the run can take (a long window must not meet the worst-case batch again each epoch)."""
    import random

    from datasets import Dataset

    texts, labels = list(task.train[task.text_column]), list(task.train[task.label_column])
    encoded = tokenizer(texts, truncation=True, max_length=spec.point.seq_len)
    base = Dataset.from_dict(
        {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"], "labels": labels}
    )
    order = sorted(range(len(texts)), key=lambda i: -len(encoded["input_ids"][i]))
    head, tail = order[:global_batch], order[global_batch:] or order
    rng = random.Random(spec.seed)
    chosen = list(head)
    while len(chosen) < n_rows:
        rng.shuffle(tail)
        chosen += tail[: n_rows - len(chosen)]
    return base.select(chosen)  # an index mapping: no copy of the rows


def measure(spec: MeasureSpec) -> Profile:
    """Run ``warmup + steps`` optimizer steps and return the profile (on every rank)."""
    import torch
    from transformers import DataCollatorWithPadding, Trainer

    from ftprof.profiler import ProfilerCallback
    from ftprof.runtime.deepspeed_config import DeepSpeedConfig, cpu_adjusted
    from ftprof.runtime.distributed import ensure_single_process_env
    from ftprof.train.args import FtprofTrainingArguments
    from ftprof.train.causal_lm_data import CausalLMCollator
    from ftprof.train.models import build_causal_lm, build_model, resolve_model_spec, train_tokenizer_for

    ensure_single_process_env()
    p = spec.point
    model_spec = resolve_model_spec(spec.model, random_init=True)
    with tempfile.TemporaryDirectory() as out:
        args = FtprofTrainingArguments(
            output_dir=out,
            per_device_train_batch_size=p.batch_size,
            gradient_accumulation_steps=p.grad_accum,
            max_steps=spec.max_steps,
            bf16=p.precision == "bf16",
            fp16=p.precision == "fp16",
            gradient_checkpointing=p.gradient_checkpointing,
            deepspeed=cpu_adjusted(DeepSpeedConfig(spec.ds_config), torch.cuda.is_available()).config,
            save_strategy="no",
            eval_strategy="no",
            load_best_model_at_end=False,
            logging_steps=10_000,
            report_to="none",
            disable_tqdm=True,
            dataloader_num_workers=0,
            seed=spec.seed,
            learning_rate=1e-5,
            # With --dataset the rows are ordered so the first global batch is the worst case: keep that order.
            train_sampling_strategy="sequential" if spec.dataset else "random",
        )
        global_batch = p.batch_size * p.grad_accum * args.world_size
        recorder = None
        if spec.memory_snapshot_dir:  # before the model exists: the allocator's history sees it arrive
            from ftprof.profiler.memory_records import MemoryRecorder

            recorder = MemoryRecorder(Path(spec.memory_snapshot_dir), f"{p.key}-rank{args.process_index}")
            recorder.start()
        # Token ids are synthetic unless --dataset: a tokenizer is only needed for real texts (and pad id 0).
        task = _load_task(spec.dataset, spec.seed, spec.task) if spec.dataset else None
        texts = list(task.train[task.text_column]) if task else ["profiling"] * 4
        # Synthetic rows all have the swept length, so Trainer may loop over a few of them; real rows are index
        # mappings, enough for one pass of the longest window (the worst-case batch runs once).
        n_rows = global_batch * ((spec.max_steps if task else spec.warmup + spec.steps) + 1)
        causal = spec.task == "causal-lm"
        tokenizer = train_tokenizer_for(model_spec, texts, causal_lm=causal)
        if task is not None and causal:
            train = _packed_rows(spec, task, tokenizer, n_rows)
        elif task is not None:
            train = _dataset_rows(spec, task, tokenizer, n_rows, global_batch)
        else:
            train = _token_dataset(spec, model_spec.config.vocab_size, n_rows)
        if causal:
            # Loss averaged per token over ranks and accumulation: Trainer's loss kwargs stay on.
            model = build_causal_lm(model_spec, tokenizer, shrink_vocab=False)
            collator: Any = CausalLMCollator(tokenizer.pad_token_id)
        else:
            model = build_model(model_spec, tokenizer, ["0", "1"], shrink_vocab=False)  # the preset's real shape
            model.accepts_loss_kwargs = False  # type: ignore[assignment]  # a plain attribute Trainer reads
            collator = DataCollatorWithPadding(tokenizer)
        profiler = ProfilerCallback(
            warmup_steps=spec.warmup, min_steps=spec.steps, min_seconds=spec.min_seconds, memory_recorder=recorder
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=train,
            data_collator=collator,
            callbacks=[profiler],
        )
        trainer.train()
        assert profiler.profile is not None  # set by on_train_end
        profiler.profile.random_init = True
        if spec.memory_snapshot_dir:  # paths relative to the sweep folder, which may move
            root = Path(spec.memory_snapshot_dir).parent
            for rank in profiler.profile.ranks:
                rank.memory_files = [os.path.relpath(f, root) for f in rank.memory_files]
        return profiler.profile


def main(argv: list[str] | None = None) -> int:
    argv = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("--local_rank")]
    spec = MeasureSpec.read(Path(argv[0]))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from ftprof.runtime.distributed import shutdown

    profile = measure(spec)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(spec.result_path).write_text(json.dumps(profile.to_json()))
    shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
