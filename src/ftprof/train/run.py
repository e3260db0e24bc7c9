"""Fine-tune a transformers model with HF Trainer and a DeepSpeed ZeRO config: a text classifier
(``--task classification``, the default) or a causal language model (``--task causal-lm``).

Top to bottom: :func:`parse` (flags, checked before anything heavy) → :func:`setup` (the checkpoint to
resume from, then :func:`ftprof.train.recipe.build_trainer`: model config, data, tokenizer, model, collator
and Trainer, as a sweep point builds them too) → :func:`fit` (train, evaluate, save). ``launch/train.py``
and ``ftprof train`` both call :func:`main`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import HfArgumentParser, Trainer
from transformers.trainer_utils import get_last_checkpoint

from ftprof.errors import ConfigError
from ftprof.profiler import add_profiler
from ftprof.profiler.breakdown import adapted_modules, parameter_counts
from ftprof.runtime.deepspeed_config import DeepSpeedConfig, for_this_machine, load_ds_config
from ftprof.runtime.distributed import adopt_slurm_env, ensure_single_process_env, exit_rank, shutdown
from ftprof.runtime.ds_ops import check_no_stale_locks, remember_cpu_info
from ftprof.train.adapters import check_peft_flags
from ftprof.train.args import (
    FtprofTrainingArguments,
    ScriptArguments,
    best_model_conflict,
    check_optimizer_installed,
    deepspeed_for_levers,
    shipped_name,
    take_levers,
    with_precision,
)
from ftprof.train.footprint import FootprintCallback
from ftprof.train.metrics import load_metric
from ftprof.train.models import ModelSpec
from ftprof.train.recipe import build_trainer
from ftprof.train.tasks import check_task_flags

logger = logging.getLogger("ftprof.train.run")
TRUE_WORDS = ("true", "last", "yes", "1")
_UNSET = object()  # marks a flag the user did not pass (argparse keeps values already in the namespace)


@dataclass
class Setup:
    """Everything :func:`fit` needs."""

    spec: ModelSpec
    trainer: Trainer
    resume: str | None
    facts: dict[str, Any] = field(default_factory=dict)  # saved with the train metrics (causal-lm: the blocks)
    merge_adapter: bool = False  # --peft lora --merge_adapter: also save <output_dir>/merged


def _flag_value(argv: list[str], flag: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def _normalize_deepspeed_flags(argv: list[str]) -> list[str]:
    """Validate the DeepSpeed config named by ``--ds_config``/``--deepspeed`` and pass it as ``--deepspeed``."""
    ds_config, deepspeed = _flag_value(argv, "--ds_config"), _flag_value(argv, "--deepspeed")
    if ds_config and deepspeed and Path(ds_config).resolve() != Path(deepspeed).resolve():
        raise ConfigError(f"--ds_config {ds_config!r} and --deepspeed {deepspeed!r} disagree; pass one of them")
    path = ds_config or deepspeed
    if path is None:
        return argv
    cfg = load_ds_config(path)
    if cfg.precision_forced() == "fp16" and not torch.cuda.is_available():
        raise ConfigError(
            f"--ds_config {path!r} sets fp16.enabled true, but fp16 training needs a CUDA GPU and "
            'this machine has none; set it to "auto" (or use bf16)'
        )
    effective, notes = for_this_machine(cfg, torch.cuda.is_available())
    if effective is not cfg:
        for note in notes:  # the optimizer's change is one the user should see; overlap_comm's is routine
            (logger.info if note.startswith("no CUDA") else logger.warning)("%s: %s", path, note)
        path = _write_effective_config(effective)
        argv = _drop_flag(_drop_flag(argv, "--deepspeed"), "--ds_config")
        deepspeed = None
    if not deepspeed:
        argv = argv + ["--deepspeed", path]
    return argv


def _write_effective_config(cfg: DeepSpeedConfig) -> str:
    """Write ``cfg`` to a content-addressed temp file: every rank computes the same name and bytes."""
    text = json.dumps(cfg.config, indent=2, sort_keys=True)
    path = Path(tempfile.gettempdir()) / f"ftprof-ds-{hashlib.sha256(text.encode()).hexdigest()[:12]}.json"
    if not path.is_file():
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return str(path)


def _drop_flag(argv: list[str], flag: str) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == flag:
            skip = True
        elif not arg.startswith(flag + "="):
            out.append(arg)
    return out


def _best_model_defaults_give_way(parser: HfArgumentParser, argv: list[str]) -> None:
    """Turn our best-model defaults off when the user's eval/save strategies rule them out.

    ``--load_best_model_at_end`` and ``--metric_for_best_model accuracy`` are launcher defaults, so a user who
    sets ``--save_strategy no`` (say) must not get Trainer's error about a flag they never passed. Passed
    explicitly, a contradiction is the user's and is reported as a :class:`ConfigError`.
    """
    probe = argparse.Namespace(load_best_model_at_end=_UNSET, metric_for_best_model=_UNSET)
    flags, _ = parser.parse_known_args(argv, namespace=probe)  # values only: no dataclass checks yet
    conflict = best_model_conflict(
        flags.eval_strategy, flags.save_strategy, flags.eval_steps, flags.save_steps, flags.logging_steps
    )
    if conflict is None:
        return
    if flags.load_best_model_at_end is _UNSET:
        logger.info("not restoring the best model at the end (--load_best_model_at_end off): %s", conflict.reason)
        parser.set_defaults(load_best_model_at_end=False)
    elif flags.load_best_model_at_end:
        raise ConfigError(
            f"--load_best_model_at_end needs a checkpoint at each evaluation, but {conflict.reason}; "
            f"{conflict.fix}, or drop --load_best_model_at_end"
        )
    if flags.eval_strategy == "no" and flags.save_strategy != "best" and flags.metric_for_best_model is _UNSET:
        parser.set_defaults(metric_for_best_model=None)  # nothing is evaluated during training to compare


def parse(argv: list[str]) -> tuple[ScriptArguments, FtprofTrainingArguments]:
    """Parse and check flags. Starts the process group when DeepSpeed is used (cheap, and needed to
    know the world size), but loads no model or data.

    Our best-model defaults yield to the user's eval/save strategies (see
    :func:`_best_model_defaults_give_way`); ``--metric`` is loaded here so an unavailable one fails at once.

    Raises:
        ConfigError: any invalid flag, DeepSpeed config or ``--metric``.
    """
    adopt_slurm_env()  # under srun, one world of all tasks, with or without DeepSpeed
    levers, argv = take_levers(argv)  # --precision/--zero/--offload: spelled as in sweep and estimate
    argv = with_precision(argv, levers.precision, torch.cuda.is_available())
    given = _flag_value(argv, "--ds_config") or _flag_value(argv, "--deepspeed")
    flag = "--ds_config" if _flag_value(argv, "--ds_config") else "--deepspeed"
    shipped = deepspeed_for_levers(levers, load_ds_config(given) if given else None, flag)
    if shipped is not None:
        argv = [*argv, "--deepspeed", _write_effective_config(DeepSpeedConfig(shipped))]
        logger.info("--zero %s: training with %s", levers.zero, shipped_name(levers))
    if "--fp16" in argv and not torch.cuda.is_available():
        raise ConfigError(
            "--fp16 needs a CUDA GPU and this machine has none; drop it, or use --bf16 on a CPU that supports bfloat16"
        )
    argv = _normalize_deepspeed_flags(argv)
    if _flag_value(argv, "--deepspeed"):
        ensure_single_process_env()
        check_no_stale_locks()
        remember_cpu_info()
    parser = HfArgumentParser((ScriptArguments, FtprofTrainingArguments))  # type: ignore[arg-type]  # NewType
    if _flag_value(argv, "--task") == "causal-lm":
        parser.set_defaults(metric_for_best_model="eval_loss")  # no accuracy without labels; lower is better
    _best_model_defaults_give_way(parser, argv)
    try:
        script, args = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as err:  # TrainingArguments.__post_init__ reports bad combinations this way
        raise ConfigError(str(err).strip().splitlines()[0]) from None
    if script.max_length is not None and script.max_length <= 0:
        raise ConfigError(f"--max_length must be a positive number of tokens, got {script.max_length}")
    for flag in ("max_train_samples", "max_eval_samples"):
        value = getattr(script, flag)
        if value is not None and value <= 0:
            raise ConfigError(f"--{flag} must be positive, got {value}")
    if not args.deepspeed:  # under DeepSpeed its config's optimizer block steps, if it has one
        check_optimizer_installed(str(getattr(args.optim, "value", args.optim)))
    passed = {a[2:].split("=")[0] for a in argv if a.startswith("--")}
    check_task_flags(script, args, passed)
    check_peft_flags(script.peft, passed, _zero_stage(args))
    script.precision, script.offload = levers.precision, levers.offload
    script.zero = None if levers.zero is None else str(levers.zero)
    if script.group_by_length:
        args.train_sampling_strategy = "group_by_length"
    if script.metric:
        load_metric(script.metric)  # fail now, not after the first epoch; setup() loads it again (cheap)
    return script, args


def _zero_stage(args: FtprofTrainingArguments) -> int | None:
    """DeepSpeed's ZeRO stage for this run (None: no DeepSpeed)."""
    if not args.deepspeed:
        return None
    given = args.deepspeed
    return (DeepSpeedConfig(given) if isinstance(given, dict) else load_ds_config(given)).zero_stage


def last_complete_checkpoint(output_dir: Path) -> str | None:
    """The newest ``checkpoint-N`` that finished saving (Trainer writes ``trainer_state.json`` last).

    A run killed mid-save leaves a partial folder; resuming from it would fail or load a torn state.
    """
    if not output_dir.is_dir():
        return None
    done = [
        p
        for p in output_dir.glob("checkpoint-*")
        if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").is_file()
    ]
    return str(max(done, key=lambda p: int(p.name.split("-")[-1]))) if done else None


def _resume_point(args: FtprofTrainingArguments, overwrite: bool) -> str | None:
    """The checkpoint to resume from; refuses to train over existing checkpoints by accident."""
    output_dir = Path(args.output_dir)
    any_checkpoint = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
    wanted = args.resume_from_checkpoint
    if wanted is None:
        if any_checkpoint is not None and not overwrite:
            raise ConfigError(
                f"--output_dir {str(output_dir)!r} already holds checkpoints "
                f"({Path(any_checkpoint).name}); pass --resume_from_checkpoint true to continue, "
                "or --overwrite_output_dir to start over"
            )
        return None
    if wanted.lower() in TRUE_WORDS:
        last = last_complete_checkpoint(output_dir)
        if last is None:
            raise ConfigError(f"--resume_from_checkpoint: no complete checkpoint-* folder in {str(output_dir)!r}")
        if any_checkpoint != last:
            logger.warning("skipping %s: it was not completely saved", any_checkpoint)
        return last
    if not (Path(wanted) / "trainer_state.json").is_file():
        raise ConfigError(
            f"--resume_from_checkpoint {wanted!r}: not a complete checkpoint folder (no trainer_state.json)"
        )
    return wanted


def setup(script: ScriptArguments, args: FtprofTrainingArguments) -> Setup:
    """Find the checkpoint to resume from, then build model, data and Trainer (:func:`build_trainer`)."""
    resume = _resume_point(args, script.overwrite_output_dir)
    recipe = build_trainer(script, args, callbacks=[FootprintCallback()], resuming=resume is not None)
    if script.profile:
        add_profiler(recipe.trainer)
    spec = recipe.spec
    logger.info(
        "%s: model %s (%s%s), %d train / %d eval %s, max_length %d, world size %d",
        script.task,
        spec.name,
        spec.origin,
        ", RANDOM weights" if spec.random_init else "",
        len(recipe.train),
        len(recipe.eval),
        recipe.rows,
        recipe.max_length,
        args.world_size,
    )
    if script.peft == "lora":
        trainable, frozen = parameter_counts(recipe.model)
        logger.info(
            "LoRA r=%d on %d layers (%s): %d trainable, %d frozen parameters",
            script.lora_r,
            len(adapted_modules(recipe.model)),
            ", ".join(sorted({n.rsplit(".", 1)[-1] for n in adapted_modules(recipe.model)})),
            trainable,
            frozen,
        )
    return Setup(spec, recipe.trainer, resume, recipe.facts, merge_adapter=script.merge_adapter)


def fit(s: Setup) -> dict[str, float]:
    """Train (resuming when asked), save model + tokenizer + metrics, evaluate; returns eval metrics."""
    trainer = s.trainer
    if s.resume:
        logger.info("resuming from %s", s.resume)
    result = trainer.train(resume_from_checkpoint=s.resume)
    metrics = dict(result.metrics)
    metrics["train_samples"] = len(trainer.train_dataset)  # type: ignore[arg-type]  # set by setup()
    metrics["random_init"] = s.spec.random_init
    if s.facts:
        metrics.update(s.facts)
        # What Trainer actually did with --gradient_checkpointing (transformers 5 names it activation_...).
        metrics["activation_checkpointing"] = bool(getattr(trainer.model, "is_activation_checkpointing", False))
    trainer.save_model()
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    eval_metrics = trainer.evaluate()
    eval_metrics["eval_samples"] = len(trainer.eval_dataset)  # type: ignore[arg-type]  # set by setup()
    eval_metrics["random_init"] = s.spec.random_init
    trainer.log_metrics("eval", eval_metrics)
    trainer.save_metrics("eval", eval_metrics)
    if s.merge_adapter:
        save_merged(trainer)
    return eval_metrics


def save_merged(trainer: Trainer) -> None:
    """Save the model with its LoRA adapters merged into the weights, and the tokenizer, in ``<output_dir>/merged``.

    Done last: merging replaces the adapted layers in place. ZeRO-3 never gets here (see ``check_peft_flags``).
    """
    if not trainer.args.should_save:
        return
    merged_dir = Path(str(trainer.args.output_dir)) / "merged"
    peft_model: Any = trainer.model  # a PeftModel under --peft lora
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(merged_dir)
    if trainer.processing_class is not None:
        trainer.processing_class.save_pretrained(merged_dir)
    logger.info("saved the model with its adapters merged in %s", merged_dir)


def _configure_logging(args: FtprofTrainingArguments | None = None) -> None:
    """Log to stdout: INFO on the main process, WARNING on the other ranks (once ``args`` is known)."""
    level = logging.INFO if args is None or args.should_log else logging.WARNING
    # An entry point owns logging; force=True rebinds the handler on repeated in-process calls.
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level, stream=sys.stdout, force=True
    )
    hf_logging = transformers.utils.logging
    hf_logging.set_verbosity(level)
    hf_logging.disable_default_handler()  # one handler and format for all: transformers propagates to root
    hf_logging.enable_propagation()
    logger.setLevel(level)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Parse ``argv`` (default: ``sys.argv[1:]``), train and evaluate; returns the eval metrics.

    One rank of several ends its process here once every rank is done (:func:`~ftprof.runtime.distributed.exit_rank`).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked dataloader workers would deadlock
    _configure_logging()
    script, args = parse(argv)
    _configure_logging(args)
    metrics = fit(setup(script, args))
    exit_rank(shutdown())  # several ranks: exits 0 here
    return metrics
