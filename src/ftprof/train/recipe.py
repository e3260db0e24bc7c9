"""The one recipe that builds a Trainer: model, tokenizer, data, collator and Trainer class, from the flags.

``ftprof train`` (:func:`ftprof.train.run.setup`) and a sweep point (:func:`ftprof.sweep.measure.measure`)
both call :func:`build_trainer`, so a sweep measures the batches that the command it recommends trains on:
the same tokenizer, tokenization, collator (padding to a multiple of 8 in fp16/bf16), model class and
Trainer class. A :class:`Measurement` holds the few things that make a sweep point a measurement rather
than a fine-tune; everything else comes from :mod:`ftprof.train.tasks`, one ``--task`` at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from transformers import Trainer, TrainerCallback, set_seed

from ftprof.train.adapters import lora_config
from ftprof.train.args import FtprofTrainingArguments, ScriptArguments
from ftprof.train.models import ModelSpec, check_causal_lm, resolve_model_spec
from ftprof.train.tasks import (
    max_length_for,
    task_collator,
    task_data,
    task_metrics,
    task_model,
    task_trainer_class,
    tokenizer_only,
)


@dataclass(frozen=True)
class Measurement:
    """A sweep point's departures from a fine-tune (:mod:`ftprof.sweep.measure` fills it in).

    The model keeps its config's vocabulary size (a tiny preset's embedding is not shrunk to a tokenizer
    trained on the data: a measurement must not depend on the data, and the estimator reads the config),
    Trainer gets no eval split, and ``rows`` picks the rows the point trains on.
    """

    rows: Callable[[Any, ModelSpec], Any]
    """(the task's tokenized train split, None when ``with_data`` is off; the model) → the rows to train on."""
    with_data: bool = True
    """False (no ``--dataset``): no text is loaded, and ``rows`` makes token rows of its own."""


@dataclass
class Recipe:
    """What :func:`build_trainer` built: the Trainer, and the pieces it was given."""

    spec: ModelSpec
    max_length: int  # classification: the truncation length; causal-lm: the block size
    tokenizer: Any
    model: Any
    train: Any
    eval: Any
    collator: Callable
    trainer: Trainer
    rows: str = "rows"  # what a dataset row is, for the log line
    facts: dict[str, Any] = field(default_factory=dict)  # saved with the train metrics (causal-lm: the blocks)


def build_trainer(
    script: ScriptArguments,
    args: FtprofTrainingArguments,
    *,
    callbacks: Sequence[TrainerCallback] = (),
    resuming: bool = False,
    measurement: Measurement | None = None,
) -> Recipe:
    """Resolve ``--model``, load and tokenize ``--dataset``, and build the model, collator and Trainer.

    Args:
        script: ftprof's flags (``--task``, ``--model``, ``--dataset``, ``--max_length``, ...).
        args: Trainer's flags; ``--bf16`` / ``--fp16`` also pick the collator's padding.
        callbacks: handed to the Trainer.
        resuming: a resumed run loads the tokenizer it saved instead of training a new one.
        measurement: a sweep point's rows and model size (None: a fine-tune).

    Raises:
        ConfigError: ``--max_length`` above the model's limit, or a LoRA target that matches no Linear layer.
        ModelError: the model can't be resolved, or (causal-lm) has no causal-LM head.
        DataError: the data can't be loaded or has no usable rows.
    """
    spec = resolve_model_spec(script.model, script.random_init)
    if script.task == "causal-lm":
        check_causal_lm(spec)  # before any data is loaded
    max_length = max_length_for(script, spec)
    lora = _lora_for(script, spec)  # before any data is loaded: a bad target module fails at once
    if measurement is not None and not measurement.with_data:
        data = tokenizer_only(script, args, spec)
    else:
        data = task_data(script, args, spec, max_length, resuming)
    train, evaluation = data.train, data.eval
    if measurement is not None:
        train, evaluation = measurement.rows(data.train, spec), None
    if lora is not None and spec.random_init:
        set_seed(args.seed)  # the frozen random base must be the same on every rank and when a run resumes
    model = task_model(script, spec, data, shrink_vocab=measurement is None)
    if lora is not None:
        from peft import get_peft_model

        # Trainer enables the inputs' gradients itself with --gradient_checkpointing (frozen embeddings).
        model = get_peft_model(model, lora)
        _adapters_in_the_training_dtype(model, args)
    collator = task_collator(script, args, data.tokenizer)
    compute_metrics, preprocess_logits = task_metrics(script, data)
    trainer = task_trainer_class(script)(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=data.tokenizer,
        data_collator=collator,
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=preprocess_logits,
        callbacks=list(callbacks),
    )
    return Recipe(spec, max_length, data.tokenizer, model, train, evaluation, collator, trainer, data.rows, data.facts)


def _adapters_in_the_training_dtype(model: Any, args: FtprofTrainingArguments) -> None:
    """Under ZeRO-3 with bf16/fp16, cast peft's new adapters to the training dtype, as DeepSpeed casts every
    parameter at the other stages. ZeRO-3 builds the model under ``zero.Init`` in that dtype and the engine
    then casts nothing (``engine._configure_distributed_model``: ``_cast_module_mixed_precision`` skips a
    zero.Init model), so the adapters, created afterwards in fp32, would stay fp32 beside a classifier head's
    16-bit trainable copy, and ZeRO-3 refuses trainable parameters of two dtypes (``zero/utils.py``
    ``defragment``: ``assert len(set(t.dtype for t in tensors)) == 1``)."""
    import torch
    from transformers.integrations import is_deepspeed_zero3_enabled

    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
    if dtype is None or not is_deepspeed_zero3_enabled():
        return
    for p in model.parameters():
        if p.requires_grad and p.dtype == torch.float32 and not hasattr(p, "ds_id"):
            p.data = p.data.to(dtype)


def _lora_for(script: ScriptArguments, spec: ModelSpec) -> Any:
    """peft's ``LoraConfig`` for ``--peft lora`` (None: full fine-tuning)."""
    if script.peft != "lora":
        return None
    return lora_config(
        spec.config,
        spec.name,
        script.task == "causal-lm",
        r=script.lora_r,
        alpha=script.lora_alpha,
        dropout=script.lora_dropout,
        target_modules=script.lora_target_modules,
    )
