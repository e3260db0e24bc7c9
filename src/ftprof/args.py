"""Command-line arguments of the training entry: ftprof's own, plus every ``TrainingArguments`` flag."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from transformers import TrainingArguments

from ftprof.distributed import adopt_process_group


@dataclass
class ScriptArguments:
    """What to train on; the field help is the ``--help`` text."""

    model: str = field(default="bert-base-uncased", metadata={
        "help": "Hub id, local model directory, or a tiny preset (tiny-bert, tiny-distilbert, tiny-roberta, tiny-gpt2)."})
    dataset: str = field(default="imdb", metadata={
        "help": "Hub dataset name, a local csv/tsv/json/jsonl/parquet file or folder (splits by file name), or 'synthetic'."})
    text_column: str | None = field(default=None, metadata={"help": "Column with the text (detected when omitted)."})
    label_column: str | None = field(default=None, metadata={"help": "Column with integer labels (detected when omitted)."})
    max_length: int | None = field(default=None, metadata={
        "help": "Truncate inputs to this many tokens (default: the model's limit, at most 512). Batches are padded only to their longest input."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Train on a seeded random subset of this size."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on a seeded random subset of this size."})
    random_init: bool = field(default=False, metadata={
        "help": "Build the architecture from its config with random weights (for when the weights can't be fetched)."})
    ds_config: str | None = field(default=None, metadata={"help": "DeepSpeed config JSON (same as --deepspeed)."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Start over in an --output_dir that already holds checkpoints (they may be rotated away)."})
    profile: bool = field(default=False, metadata={
        "help": "Measure peak memory per phase and steady-state throughput (ProfilerCallback); the figures go to "
                "the logs (profile/*) and trainer_state.json."})
    group_by_length: bool = field(default=False, metadata={
        "help": "Batch inputs of similar length together (sets --train_sampling_strategy group_by_length)."})


@dataclass
class FtprofTrainingArguments(TrainingArguments):
    """``TrainingArguments`` with defaults for classification fine-tuning and a CPU multi-rank fix.

    Changed defaults: evaluate and save each epoch, keep the best checkpoint by accuracy.
    """

    output_dir: str | None = field(default="outputs/train", metadata={"help": "Where checkpoints, model and metrics go."})
    eval_strategy: str = field(default="epoch", metadata={"help": "When to evaluate: no, steps or epoch."})
    save_strategy: str = field(default="epoch", metadata={"help": "When to checkpoint: no, steps, epoch or best."})
    load_best_model_at_end: bool = field(default=True, metadata={"help": "Restore the best checkpoint after training."})
    metric_for_best_model: str | None = field(default="accuracy", metadata={"help": "Metric that picks the best model."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Checkpoints kept (the best one is never deleted)."})
    logging_steps: float = field(default=10, metadata={"help": "Log the training loss every N optimizer steps."})

    @cached_property
    def _setup_devices(self):
        device = TrainingArguments._setup_devices.func(self)
        adopt_process_group(self.distributed_state)
        return device
