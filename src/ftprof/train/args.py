"""Command-line arguments of the training entry: ftprof's own, plus every ``TrainingArguments`` flag."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal, NamedTuple

import torch
from transformers import TrainingArguments

from ftprof.runtime.distributed import adopt_process_group, release_shm_buffer

Task = Literal["classification", "causal-lm"]
CAUSAL_LM_METRICS = ("eval_loss", "loss", "eval_perplexity", "perplexity")  # what a causal-LM evaluation reports


@dataclass
class ScriptArguments:
    """What to train on; the field help is the ``--help`` text."""

    task: Task = field(
        default="classification",
        metadata={
            "help": "classification: a sequence classifier on labelled texts. causal-lm: next-token language "
            "modelling on the texts alone (AutoModelForCausalLM; eval loss and perplexity)."
        },
    )
    model: str = field(
        default="bert-base-uncased",
        metadata={
            "help": "Hub id, local model directory, or a tiny preset (tiny-bert, tiny-distilbert, tiny-roberta, "
            "tiny-gpt2, tiny-llama, tiny-qwen2)."
        },
    )
    dataset: str = field(
        default="imdb",
        metadata={
            "help": "Hub dataset name, a local csv/tsv/json/jsonl/parquet/txt file or folder (splits by file name; "
            ".txt: one document per line), or 'synthetic'."
        },
    )
    text_column: str | None = field(default=None, metadata={"help": "Column with the text (detected when omitted)."})
    label_column: str | None = field(
        default=None, metadata={"help": "Column with integer labels (detected when omitted; classification only)."}
    )
    max_length: int | None = field(
        default=None,
        metadata={
            "help": "classification: truncate inputs to this many tokens (default: the model's limit, at most 512; "
            "batches are padded only to their longest input). causal-lm: the block size (default: the model's "
            "limit, at most 1024)."
        },
    )
    packing: bool = field(
        default=True,
        metadata={
            "help": "causal-lm only: concatenate the documents, EOS between them, into blocks of exactly --max_length "
            "tokens. --packing false: one document per row, truncated to --max_length and padded per batch (labels "
            "-100 on the pads)."
        },
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Train on a seeded random subset of this size (documents, before packing)."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Evaluate on a seeded random subset of this size."}
    )
    random_init: bool = field(
        default=False,
        metadata={
            "help": "Build the architecture from its config with random weights (when weights cannot be fetched)."
        },
    )
    ds_config: str | None = field(default=None, metadata={"help": "DeepSpeed config JSON (same as --deepspeed)."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start over in an --output_dir that already holds checkpoints (they may be rotated away)."},
    )
    profile: bool = field(
        default=False,
        metadata={
            "help": "Measure peak memory per phase and steady-state throughput (ProfilerCallback); the figures go to "
            "the logs (profile/*) and trainer_state.json."
        },
    )
    group_by_length: bool = field(
        default=False,
        metadata={"help": "Batch inputs of similar length together (sets --train_sampling_strategy group_by_length)."},
    )
    metric: str | None = field(
        default=None,
        metadata={
            "help": "Also compute this `evaluate` metric on the eval predictions: a Hub name (accuracy, f1, "
            "matthews_correlation; needs network once, then its cache) or a local metric script path. "
            "Accuracy and F1 are always computed (numpy, no network). Classification only."
        },
    )


@dataclass
class FtprofTrainingArguments(TrainingArguments):
    """``TrainingArguments`` with defaults for classification fine-tuning and a CPU multi-rank fix.

    Changed defaults: evaluate and save each epoch, keep the best checkpoint by accuracy (by ``eval_loss`` for
    ``--task causal-lm``, set by ``ftprof.train.run.parse``). The best-model defaults give way to the user's
    strategies: ``ftprof.train.run.parse`` turns them off (see :func:`best_model_conflict`) unless
    ``--load_best_model_at_end`` / ``--metric_for_best_model`` were passed.
    """

    output_dir: str = field(default="outputs/train", metadata={"help": "Where checkpoints, model and metrics go."})
    eval_strategy: str = field(default="epoch", metadata={"help": "When to evaluate: no, steps or epoch."})
    save_strategy: str = field(default="epoch", metadata={"help": "When to checkpoint: no, steps, epoch or best."})
    load_best_model_at_end: bool = field(default=True, metadata={"help": "Restore the best checkpoint after training."})
    metric_for_best_model: str | None = field(
        default="accuracy",
        metadata={"help": "Metric that picks the best model (default: accuracy; eval_loss for --task causal-lm)."},
    )
    save_total_limit: int | None = field(
        default=2, metadata={"help": "Checkpoints kept (the best one is never deleted)."}
    )
    logging_steps: float = field(default=10, metadata={"help": "Log the training loss every N optimizer steps."})

    def _validate_args(self) -> None:
        # transformers accepts bf16 only on a GPU or with use_cpu, which turns DeepSpeed off; DeepSpeed itself
        # trains in bf16 on CPUs, so its runs skip that one check.
        if not (self.bf16 and self.deepspeed and not torch.cuda.is_available()):
            return super()._validate_args()
        self.bf16 = False
        try:
            super()._validate_args()
        finally:
            self.bf16 = True

    @cached_property
    def _setup_devices(self):
        device = TrainingArguments._setup_devices.func(self)  # type: ignore[attr-defined]  # cached_property
        adopt_process_group(self.distributed_state)
        release_shm_buffer()  # DeepSpeed never unlinks its CPU collectives' 66 MiB per rank in /dev/shm
        return device


class BestModelConflict(NamedTuple):
    """Why ``--load_best_model_at_end`` can't work with the chosen strategies, and the fix."""

    reason: str
    fix: str


def best_model_conflict(
    eval_strategy: str, save_strategy: str, eval_steps: float | None, save_steps: float, logging_steps: float
) -> BestModelConflict | None:
    """Whether restoring the best checkpoint is impossible with these eval/save strategies (None: it works).

    Mirrors the checks of ``TrainingArguments.__post_init__``, so the launcher can decide before they raise,
    plus one of its own: without evaluation during training there is no best model to restore.

    >>> best_model_conflict("epoch", "no", None, 500, 10).reason
    "--save_strategy 'no' saves no checkpoint to restore"
    >>> best_model_conflict("steps", "steps", 5, 15, 10) is None
    True
    """
    if eval_strategy == "no":
        return BestModelConflict(
            "--eval_strategy 'no' never evaluates during training, so no checkpoint is best",
            "evaluate with --eval_strategy epoch (or steps)",
        )
    if save_strategy == "best":  # Trainer saves exactly the best checkpoints, whatever the eval cadence
        return None
    every = eval_steps or logging_steps  # Trainer evaluates every --logging_steps when --eval_steps is unset
    match = f"pass --save_strategy {eval_strategy}" + (
        f" with --save_steps a multiple of {every:g}" if eval_strategy == "steps" else ""
    )
    if save_strategy == "no":
        return BestModelConflict("--save_strategy 'no' saves no checkpoint to restore", match)
    if eval_strategy != save_strategy:
        return BestModelConflict(
            f"--eval_strategy {eval_strategy!r} and --save_strategy {save_strategy!r} differ", match
        )
    # every == 0: Trainer itself rejects "steps" without --eval_steps or --logging_steps, with its own message
    if eval_strategy == "steps" and every and not _steps_compatible(save_steps, every):
        return BestModelConflict(
            f"--save_steps {save_steps:g} is not a multiple of --eval_steps {every:g}",
            f"make --save_steps a multiple of {every:g}",
        )
    return None


def _steps_compatible(save_steps: float, eval_steps: float) -> bool:
    """Trainer's rule: saves land on evaluations (ratios below 1 and absolute steps can't be mixed)."""
    if save_steps % eval_steps == 0:
        return True
    if save_steps < 1 and eval_steps < 1:
        scale = 1_000_000  # Trainer's own integer scaling for ratio steps
        return (save_steps * scale) % (eval_steps * scale) == 0
    return False
