"""Measure one sweep point: a few real Trainer + DeepSpeed steps in this process (one per rank).

``ftprof sweep`` runs each point in a process of its own, so no peak is polluted by an earlier point: a
child forked from the pre-imported worker (:mod:`ftprof.sweep.worker`, the default on CPU machines; it forks
each rank of a several-rank point), or a fresh process (a Slurm step, an environment the worker can't give):

    python .../ftprof/sweep/measure.py SPEC.json                      # world size 1, fresh
    deepspeed --num_gpus 2 .../ftprof/sweep/measure.py SPEC.json      # world size 2

SPEC holds a :class:`MeasureSpec`; rank 0 writes the measured :class:`~ftprof.records.profile.Profile` to
``spec.result_path`` as JSON. With ``spec.memory_snapshot_dir`` every rank also writes its memory records
there (:mod:`ftprof.profiler.memory_records`), profiling one step after the measured window.

The Trainer comes from :func:`ftprof.train.recipe.build_trainer`, the recipe ``ftprof train`` uses, so the
recommended command trains on batches of the shapes measured here. What makes a point a measurement: the
model is built from its config with random weights (memory and speed don't depend on weight values, and
this works with no network for known architectures), the rows are synthetic token ids of exactly
``seq_len`` (or, with ``--dataset``, the real rows, longest first), and the run stops after ``max_steps``
without saving or evaluating.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ftprof.point import LoraOptions, Point, Task
from ftprof.records.profile import Profile

if TYPE_CHECKING:  # heavy imports wait for measure(): the sweep driver imports this module for MeasureSpec
    from collections.abc import Callable, Sequence

    from datasets import Dataset
    from transformers import TrainerCallback

    from ftprof.train.args import FtprofTrainingArguments
    from ftprof.train.models import ModelSpec
    from ftprof.train.recipe import Recipe

MAX_WINDOW_STEPS = 5000  # a cap on the window, however fast the steps


@dataclass
class MeasureSpec:
    """Everything one measurement needs besides the point's axes (JSON round trip)."""

    point: Point
    model: str
    steps: int
    warmup: int
    ds_config: dict[str, Any] | None  # complete, for this point's ZeRO stage and offload; None: plain Trainer
    result_path: str
    dataset: str | None = None
    seed: int = 0
    min_seconds: float = 0.0  # the throughput window lasts at least ``steps`` steps and this long
    task: Task = "classification"  # or "causal-lm": blocks of exactly seq_len tokens, labels = input_ids
    lora: LoraOptions = field(default_factory=LoraOptions)  # a LoRA point's adapters (rank: point.lora_r)
    optim: str | None = None  # TrainingArguments.optim (None: its default); DeepSpeed's "optimizer" block wins
    # ``sweep --memory_snapshot``: each rank writes <point key>-rank<r>.pickle / -timeline.* here (the sweep
    # folder's snapshots/), named in its profile relative to this folder's parent
    memory_snapshot_dir: str | None = None
    # ``--child_memory_limit`` on a GPU: the CUDA caching allocator's cap (``set_per_process_memory_fraction``),
    # so a point that would need more raises a real OOM, as on a card of that size (less its CUDA context)
    device_memory_limit: int | None = None

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
        return cls(**{**data, "point": Point.from_json(data["point"]), "lora": LoraOptions(**data["lora"])})


def _token_dataset(spec: MeasureSpec, vocab_size: int, n_rows: int) -> Dataset:
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


def _worst_first(train: Any, seed: int, n_rows: int, global_batch: int) -> Any:
    """Texts tokenized as ``ftprof train`` does (truncated to ``seq_len``): the first global batch holds the
    longest inputs (the worst case is always measured, once), then the other rows follow in random order,
    reshuffled on each pass, for as many rows as the run can take (a long window must not meet the
    worst-case batch again each epoch)."""
    import random

    lengths = [len(ids) for ids in train["input_ids"]]
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    head, tail = order[:global_batch], order[global_batch:] or order
    rng = random.Random(seed)
    chosen = list(head)
    while len(chosen) < n_rows:
        rng.shuffle(tail)
        chosen += tail[: n_rows - len(chosen)]
    return train.select(chosen)  # an index mapping: no copy of the rows


def point_rows(spec: MeasureSpec, n_rows: int, global_batch: int) -> Callable[[Any, ModelSpec], Any]:
    """The point's rows from the train recipe's tokenized split (see :class:`ftprof.train.recipe.Measurement`).

    No ``--dataset``: random token ids of exactly ``seq_len``. Causal LM: the packed blocks of exactly
    ``seq_len`` tokens, cycled to ``n_rows``. Classification: the rows, longest first (:func:`_worst_first`).
    """

    def rows(train: Any, model_spec: ModelSpec) -> Any:
        if train is None:
            return _token_dataset(spec, model_spec.config.vocab_size, n_rows)
        if spec.task == "causal-lm":
            return train.select([i % len(train) for i in range(n_rows)])
        return _worst_first(train, spec.seed, n_rows, global_batch)

    return rows


def training_args(spec: MeasureSpec, output_dir: str) -> FtprofTrainingArguments:
    """Trainer's arguments for the point: its axes, ``max_steps``, and no saving, evaluation or logging."""
    import torch

    from ftprof.runtime.deepspeed_config import DeepSpeedConfig, for_this_machine
    from ftprof.train.args import FtprofTrainingArguments

    p = spec.point
    ds_config: DeepSpeedConfig | None = None
    notes: list[str] = []
    if spec.ds_config is not None:
        ds_config, notes = for_this_machine(DeepSpeedConfig(spec.ds_config), torch.cuda.is_available())
    for note in notes:
        print(f"ftprof: {note}", file=sys.stderr)
    optim: dict[str, Any] = {"optim": spec.optim} if spec.optim else {}  # else TrainingArguments' default
    return FtprofTrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=p.batch_size,
        gradient_accumulation_steps=p.grad_accum,
        max_steps=spec.max_steps,
        bf16=p.precision == "bf16",
        fp16=p.precision == "fp16",
        gradient_checkpointing=p.gradient_checkpointing,
        deepspeed=ds_config.config if ds_config else None,
        save_strategy="no",
        eval_strategy="no",
        load_best_model_at_end=False,
        logging_steps=10_000,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=spec.seed,
        learning_rate=1e-5,
        **optim,
        # With --dataset the rows are ordered so the first global batch is the worst case: keep that order.
        train_sampling_strategy="sequential" if spec.dataset else "random",
    )


def build_point(spec: MeasureSpec, args: FtprofTrainingArguments, callbacks: Sequence[TrainerCallback] = ()) -> Recipe:
    """The point's Trainer, built by :func:`ftprof.train.recipe.build_trainer` as ``ftprof train`` builds its
    own (tokenizer, tokenization, model class, collator, Trainer class), from the model's config with random
    weights and the rows of :func:`point_rows`; returns the :class:`~ftprof.train.recipe.Recipe`."""
    from ftprof.train.args import ScriptArguments
    from ftprof.train.recipe import Measurement, build_trainer

    p = spec.point
    script = ScriptArguments(
        task=spec.task,
        model=spec.model,
        dataset=spec.dataset or "",  # unread without a dataset (Measurement.with_data)
        max_length=p.seq_len,
        random_init=True,  # memory and speed don't depend on weight values; no download needed
        peft=p.peft,
        lora_r=p.lora_r or ScriptArguments.lora_r,
        lora_alpha=spec.lora.alpha,
        lora_dropout=spec.lora.dropout,
        lora_target_modules=spec.lora.target_modules,
    )
    global_batch = p.batch_size * p.grad_accum * args.world_size
    # Synthetic rows all have the swept length, so Trainer may loop over a few of them; real rows are index
    # mappings, enough for one pass of the longest window (the worst-case batch runs once).
    n_rows = global_batch * ((spec.max_steps if spec.dataset else spec.warmup + spec.steps) + 1)
    measurement = Measurement(rows=point_rows(spec, n_rows, global_batch), with_data=spec.dataset is not None)
    return build_trainer(script, args, callbacks=callbacks, measurement=measurement)


def measure(spec: MeasureSpec) -> Profile:
    """Run ``warmup + steps`` optimizer steps and return the profile (on every rank)."""
    from ftprof.profiler import ProfilerCallback
    from ftprof.runtime.distributed import ensure_single_process_env
    from ftprof.runtime.ds_ops import remember_cpu_info

    remember_cpu_info()

    if spec.ds_config is not None:  # a plain Trainer in one process needs no process group
        ensure_single_process_env()
    _cap_device_memory(spec.device_memory_limit)
    p = spec.point
    with tempfile.TemporaryDirectory() as out:
        args = training_args(spec, out)
        recorder = None
        if spec.memory_snapshot_dir:  # before the model exists: the allocator's history sees it arrive
            from ftprof.profiler.memory_records import MemoryRecorder

            recorder = MemoryRecorder(Path(spec.memory_snapshot_dir), f"{p.key}-rank{args.process_index}")
            recorder.start()
        profiler = ProfilerCallback(
            warmup_steps=spec.warmup, min_steps=spec.steps, min_seconds=spec.min_seconds, memory_recorder=recorder
        )
        profiler.trainer = build_point(spec, args, callbacks=[profiler]).trainer
        profiler.trainer.train()
        assert profiler.profile is not None  # set by on_train_end
        profiler.profile.random_init = True
        if spec.memory_snapshot_dir:  # paths relative to the sweep folder, which may move
            root = Path(spec.memory_snapshot_dir).parent
            for rank in profiler.profile.ranks:
                rank.memory_files = [os.path.relpath(f, root) for f in rank.memory_files]
        return profiler.profile


def _cap_device_memory(limit: int | None) -> None:
    """Cap this rank's CUDA caching allocator at ``limit`` bytes (no-op without a limit or a GPU)."""
    import torch

    if not limit or not torch.cuda.is_available():
        return
    device = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, limit / total), device)


def main(argv: list[str] | None = None) -> int:
    argv = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("--local_rank")]
    spec = MeasureSpec.read(Path(argv[0]))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from ftprof.runtime.distributed import exit_rank, shutdown

    profile = measure(spec)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(spec.result_path).write_text(json.dumps(profile.to_json()))
    exit_rank(shutdown())  # several ranks: exits 0 here, past interpreter finalization (see exit_rank)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
