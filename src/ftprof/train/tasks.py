"""What each ``--task`` trains: its data, tokenizer, model, collator, metrics and Trainer class.

``classification`` (the default): labelled texts, a sequence classifier, accuracy and F1.
``causal-lm``: plain texts packed into blocks (:mod:`ftprof.train.causal_lm_data`), a causal LM, loss and perplexity.
:func:`ftprof.train.recipe.build_trainer` puts the pieces together, for ``ftprof train`` and a sweep point alike.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import AutoTokenizer, DataCollatorWithPadding, Trainer

from ftprof.errors import ConfigError
from ftprof.train.args import CAUSAL_LM_METRICS, FtprofTrainingArguments, ScriptArguments
from ftprof.train.causal_lm_data import CausalLMCollator, lm_datasets, prepare_corpus
from ftprof.train.data import load_raw, prepare_task, tokenize
from ftprof.train.metrics import add_perplexity, argmax_logits, make_compute_metrics
from ftprof.train.models import ModelSpec, build_causal_lm, build_model, load_tokenizer, train_tokenizer_for

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase
    from transformers.trainer_utils import EvalLoopOutput

DEFAULT_MAX_LENGTH = 512  # longer inputs cost quadratic attention for little accuracy on classification
# causal-lm block size: GPT-2's context. Activations grow with it (the fp32 logits alone are block x vocab x 4 B
# per sequence: 0.6 GB for Qwen2.5 at 1024), so a 32k-128k model limit as the default would not fit out of the
# box; with packing a shorter block wastes nothing, it only limits how far back the model can look.
DEFAULT_LM_BLOCK = 1024
# What a tokenizer learns from when there is no text (a sweep point without --dataset: only its pad id is used).
PLACEHOLDER_TEXTS = ("profiling",) * 4
PLACEHOLDER_LABELS = ["0", "1"]


@dataclass
class TaskData:
    """A task's tokenizer and its tokenized train/eval splits (None: no text was loaded)."""

    tokenizer: Any
    train: Any
    eval: Any
    label_names: list[str] = field(default_factory=lambda: list(PLACEHOLDER_LABELS))  # classification only
    rows: str = "rows"  # what a dataset row is, for the log line
    facts: dict[str, Any] = field(default_factory=dict)


class CausalLMTrainer(Trainer):
    """Trainer whose evaluations also report perplexity, ``exp(loss)``, wherever the loss goes (logs,
    ``trainer_state.json``, ``eval_results.json``, best-model tracking)."""

    def evaluation_loop(self, *args: Any, **kwargs: Any) -> EvalLoopOutput:
        output = super().evaluation_loop(*args, **kwargs)
        if output.metrics is not None:
            add_perplexity(output.metrics)
        return output


def max_length_for(script: ScriptArguments, spec: ModelSpec) -> int:
    """``--max_length``, or the task's default within the model's limit (which it may not exceed)."""
    limit = spec.max_positions()
    default = DEFAULT_LM_BLOCK if script.task == "causal-lm" else DEFAULT_MAX_LENGTH
    max_length = script.max_length or min(default, limit or default)
    if limit is not None and max_length > limit:
        raise ConfigError(
            f"--max_length {max_length} is above {script.model!r}'s limit of {limit} tokens; "
            f"use --max_length {limit} or less"
        )
    return max_length


def check_task_flags(script: ScriptArguments, args: FtprofTrainingArguments, passed: set[str]) -> None:
    """Flags that only one task uses, and a ``--metric_for_best_model`` that the task never reports.

    ``passed`` holds the names of the flags on the command line (``{"packing", "greater_is_better", ...}``).

    Raises:
        ConfigError: a flag that does nothing for ``--task``, or a best-model metric the task never reports.
    """
    if script.task == "classification":
        if passed & {"packing", "no_packing"}:
            raise ConfigError("--packing applies to --task causal-lm only; drop it, or pass --task causal-lm")
        return
    for flag in ("label_column", "metric"):
        if getattr(script, flag) is not None:
            raise ConfigError(
                f"--{flag} applies to --task classification only (a causal LM's labels are the next tokens, "
                f"its metrics loss and perplexity); drop --{flag}"
            )
    if script.group_by_length and script.packing:
        raise ConfigError(
            "--group_by_length does nothing with packing (every block is --max_length tokens); drop it, or pass "
            "--packing false to pad documents"
        )
    best = args.metric_for_best_model
    if best is not None and best not in CAUSAL_LM_METRICS:
        raise ConfigError(
            f"--metric_for_best_model {best!r} is not reported by --task causal-lm; use one of "
            f"{', '.join(CAUSAL_LM_METRICS[::2])}"
        )
    if best is not None and best.endswith("perplexity") and "greater_is_better" not in passed:
        args.greater_is_better = False  # Trainer assumes higher is better for names not ending in "loss"


def task_data(
    script: ScriptArguments, args: FtprofTrainingArguments, spec: ModelSpec, max_length: int, resuming: bool
) -> TaskData:
    """Load ``--dataset``, get the tokenizer, and tokenize both splits as ``--task`` wants them."""
    make = causal_lm_data if script.task == "causal-lm" else classification_data
    return make(script, args, spec, max_length, resuming)


def tokenizer_only(script: ScriptArguments, args: FtprofTrainingArguments, spec: ModelSpec) -> TaskData:
    """No text at all: the model's tokenizer, or one learnt from a placeholder (only its pad id is used)."""
    causal_lm = script.task == "causal-lm"
    tokenizer = tokenizer_for(spec, args, lambda: list(PLACEHOLDER_TEXTS), False, causal_lm=causal_lm)
    return TaskData(tokenizer, None, None, label_names=[] if causal_lm else list(PLACEHOLDER_LABELS))


def classification_data(
    script: ScriptArguments, args: FtprofTrainingArguments, spec: ModelSpec, max_length: int, resuming: bool
) -> TaskData:
    """Labelled texts → token ids truncated to ``max_length`` (unpadded: the collator pads each batch)."""
    with args.main_process_first(local=False, desc="dataset"):
        task = prepare_task(
            load_raw(script.dataset, seed=args.seed),
            script.text_column,
            script.label_column,
            seed=args.seed,
            max_train_samples=script.max_train_samples,
            max_eval_samples=script.max_eval_samples,
        )
    tokenizer = tokenizer_for(spec, args, lambda: task.train[task.text_column], resuming, causal_lm=False)
    with args.main_process_first(local=False, desc="tokenize"):
        train_ds, eval_ds = tokenize(task, tokenizer, max_length, with_length=script.group_by_length)
    return TaskData(tokenizer, train_ds, eval_ds, label_names=task.label_names)


def causal_lm_data(
    script: ScriptArguments, args: FtprofTrainingArguments, spec: ModelSpec, max_length: int, resuming: bool
) -> TaskData:
    """Texts → packed blocks of ``max_length`` tokens (or, ``--packing false``, truncated documents)."""
    packing = script.packing
    with args.main_process_first(local=False, desc="dataset"):
        corpus = prepare_corpus(
            load_raw(script.dataset, seed=args.seed),
            script.text_column,
            seed=args.seed,
            max_train_samples=script.max_train_samples,
            max_eval_samples=script.max_eval_samples,
        )
    tokenizer = tokenizer_for(
        spec, args, lambda: (t for t in corpus.train[corpus.text_column] if t), resuming, causal_lm=True
    )
    with args.main_process_first(local=False, desc="tokenize"):
        train_ds, eval_ds = lm_datasets(corpus, tokenizer, max_length, packing, with_length=script.group_by_length)
    return TaskData(
        tokenizer,
        train_ds,
        eval_ds,
        label_names=[],
        rows=f"blocks of {max_length} tokens" if packing else "documents (padded)",
        facts={"packing": packing, "block_size": max_length},
    )


def task_model(script: ScriptArguments, spec: ModelSpec, data: TaskData, shrink_vocab: bool = True) -> Any:
    """The model ``--task`` trains, sized for ``data``'s tokenizer and labels (see :func:`build_model`)."""
    if script.task == "causal-lm":
        # The model keeps its loss kwargs: Trainer averages the loss over all tokens of an accumulated step
        # and of all ranks.
        return build_causal_lm(spec, data.tokenizer, shrink_vocab=shrink_vocab)
    model = build_model(spec, data.tokenizer, data.label_names, shrink_vocab=shrink_vocab)
    # Classification heads return a per-batch mean loss; declaring no loss kwargs stops Trainer from also
    # multiplying it by the number of ranks (it would report and back-propagate world_size x the mean).
    model.accepts_loss_kwargs = False  # type: ignore[assignment]  # a plain attribute, not a Module
    return model


def task_collator(script: ScriptArguments, args: FtprofTrainingArguments, tokenizer: Any) -> Callable:
    """Batches padded to their own longest row, rounded up to a multiple of 8 in fp16/bf16 (tensor cores).

    Packed causal-LM blocks all have ``--max_length`` tokens and are never padded.
    """
    mixed = args.fp16 or args.bf16
    if script.task == "causal-lm":
        pad_multiple = 8 if mixed and not script.packing else None
        return CausalLMCollator(tokenizer.pad_token_id, pad_to_multiple_of=pad_multiple)
    return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8 if mixed else None)


def task_trainer_class(script: ScriptArguments) -> type[Trainer]:
    """:class:`CausalLMTrainer` (perplexity in every evaluation) for a causal LM, else ``Trainer``."""
    return CausalLMTrainer if script.task == "causal-lm" else Trainer


def task_metrics(script: ScriptArguments, data: TaskData) -> tuple[Callable | None, Callable | None]:
    """Trainer's ``compute_metrics`` and ``preprocess_logits_for_metrics`` for ``--task``.

    A causal LM has neither: evaluation gathers no logits (batch x block x vocab floats each step), only the
    loss, and :class:`CausalLMTrainer` adds perplexity.
    """
    if script.task == "causal-lm":
        return None, None
    return make_compute_metrics(len(data.label_names), script.metric), argmax_logits


def tokenizer_for(
    spec: ModelSpec,
    args: FtprofTrainingArguments,
    train_texts: Callable[[], Iterable[str]],
    resuming: bool,
    causal_lm: bool,
) -> PreTrainedTokenizerBase:
    """Load the model's tokenizer, or train one on rank 0 and share it through the output dir.

    Rank 0 goes first; other ranks (and a resumed run) load its saved copy, so every rank and every
    checkpoint sees the same vocabulary.
    """
    saved = Path(args.output_dir) / "tokenizer"

    def offline() -> PreTrainedTokenizerBase:
        if saved.is_dir() and (resuming or args.process_index > 0):
            return AutoTokenizer.from_pretrained(saved)
        tokenizer = train_tokenizer_for(spec, train_texts(), causal_lm=causal_lm)
        if args.process_index == 0:
            tokenizer.save_pretrained(saved)
        return tokenizer

    with args.main_process_first(local=False, desc="tokenizer"):
        return load_tokenizer(spec, offline)
