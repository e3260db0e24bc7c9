"""Command-line arguments of the training entry: ftprof's own, plus every ``TrainingArguments`` flag."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, NamedTuple

import torch
from transformers import TrainingArguments

from ftprof.errors import ConfigError
from ftprof.point import (
    Offload,
    Peft,
    Precision,
    Stage,
    Task,
    parse_offloads,
    parse_precisions,
    parse_stages,
    parse_task,
)
from ftprof.runtime.deepspeed_config import DeepSpeedConfig, ds_config_for, shipped_config
from ftprof.runtime.distributed import adopt_process_group, release_shm_buffer

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
    precision: Precision | None = field(
        default=None,
        metadata={
            "help": "fp32, fp16 or bf16 (as in ftprof sweep and estimate): sets --fp16 / --bf16, which may then "
            "only agree with it."
        },
    )
    zero: str | None = field(
        default=None,
        metadata={
            "help": "ZeRO stage 0-3: without --ds_config, train with the config ftprof ships for it and --offload "
            "(ds_configs/zero<N>*.json); with --ds_config, it must be that config's stage. none: HF Trainer "
            "without DeepSpeed (its --optim steps)."
        },
    )
    offload: Offload | None = field(
        default=None,
        metadata={
            "help": "none, optimizer (ZeRO-1/2/3) or optimizer+param (ZeRO-3): what ZeRO offloads to CPU memory, "
            "with --zero; with --ds_config, it must be what that config offloads."
        },
    )
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
    peft: Peft = field(
        default="none",
        metadata={
            "help": "none: train every weight. lora: freeze the model and train LoRA adapters (peft) on "
            "--lora_target_modules, plus a classifier's head; the output dir gets the adapter "
            "(adapter_model.safetensors, adapter_config.json)."
        },
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank of each adapter's update B @ A."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scale: the update is multiplied by alpha / r."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on each adapted layer's input."})
    lora_target_modules: str | None = field(
        default=None,
        metadata={
            "help": "Comma list of Linear module names to adapt (matched as a name or its last parts), or: "
            "attention (the default: the family's query and value projections, as peft picks them), mlp "
            "(the family's feed-forward layers; 'attention,mlp' for both), all-linear (every Linear but the head)."
        },
    )
    merge_adapter: bool = field(
        default=False,
        metadata={
            "help": "--peft lora: also save the model with the adapters merged into its weights, with the "
            "tokenizer, in <output_dir>/merged (not with ZeRO-3)."
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

    def __post_init__(self) -> None:
        # Without CUDA, accelerate makes several ranks one DDP world (DistributedType.MULTI_CPU) only under
        # use_cpu; otherwise each rank of a run without DeepSpeed trains alone, its gradients never all-reduced.
        # (use_cpu turns DeepSpeed off, and DeepSpeed sets up its own world: only runs without it get it.)
        if not self.deepspeed and not torch.cuda.is_available():
            self.use_cpu = True
        super().__post_init__()

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
    def _setup_devices(self) -> torch.device:
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


@dataclass(frozen=True)
class Levers:
    """``--precision``, ``--zero`` and ``--offload`` as ``ftprof train`` was given them (None: not given): one
    value each, spelled as in ``ftprof sweep`` and ``ftprof estimate``."""

    precision: Precision | None = None
    zero: Stage | None = None  # "none": HF Trainer without DeepSpeed
    offload: Offload | None = None


LEVER_FLAGS = ("--precision", "--zero", "--offload")
BOOL_WORDS = {"true": True, "yes": True, "t": True, "y": True, "1": True}
BOOL_WORDS |= {"false": False, "no": False, "f": False, "n": False, "0": False}


def check_optimizer_installed(optim: str) -> None:
    """Refuse, before any heavy work, an ``--optim`` whose package is missing (HF Trainer would say so only when
    it builds the optimizer, after loading the model and data).

    Raises:
        ConfigError: a bitsandbytes optimizer without bitsandbytes, a torchao one without torchao.
    """
    import importlib.util

    if optim in _bitsandbytes_optimizers() and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"--optim {optim} needs bitsandbytes, not installed here: pip install 'ftprof[bnb]'")
    if optim in ("adamw_torch_4bit", "adamw_torch_8bit") and importlib.util.find_spec("torchao") is None:
        raise ConfigError(f"--optim {optim} needs torchao, not installed here: pip install 'ftprof[torchao]'")


def _bitsandbytes_optimizers() -> set[str]:
    """The ``--optim`` names HF Trainer builds with bitsandbytes: transformers' own list where it has one
    (``trainer_optimizer._BITSANDBYTES_OPTIMIZERS``, private), else the names' patterns."""
    from transformers.training_args import OptimizerNames

    try:
        from transformers.trainer_optimizer import _BITSANDBYTES_OPTIMIZERS

        return {str(getattr(o, "value", o)) for o in _BITSANDBYTES_OPTIMIZERS}
    except ImportError:
        names = {o.value for o in OptimizerNames}
        return {n for n in names if "bnb" in n or "lion" in n or n.startswith(("paged_", "ademamix", "adamw_8bit"))}


def take_levers(argv: list[str]) -> tuple[Levers, list[str]]:
    """The levers in ``argv``, checked with the parsers every command shares, and ``argv`` without them (they
    become ``--fp16`` / ``--bf16`` and a DeepSpeed config). ``--task`` is checked too, and stays.

    >>> take_levers(["--zero", "2", "--model", "tiny-bert", "--precision=bf16"])
    (Levers(precision='bf16', zero=2, offload=None), ['--model', 'tiny-bert'])

    Raises:
        ConfigError: an unknown value, or a list (train takes one value; lists are for sweep and estimate).
    """
    values: dict[str, str] = {}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        flag, _, inline = argv[i].partition("=")
        if flag in LEVER_FLAGS or flag == "--task":
            value = inline if "=" in argv[i] else (argv[i + 1] if i + 1 < len(argv) else "")
            values[flag] = value
            if flag == "--task":
                parse_task(value)
                rest += argv[i : i + (1 if "=" in argv[i] else 2)]
            i += 1 if "=" in argv[i] else 2
            continue
        rest.append(argv[i])
        i += 1
    precision = (
        _one(parse_precisions(values["--precision"]), "--precision", values) if "--precision" in values else None
    )
    zero = _one(parse_stages(values["--zero"]), "--zero", values) if "--zero" in values else None
    offload = _one(parse_offloads(values["--offload"]), "--offload", values) if "--offload" in values else None
    return Levers(precision, zero, offload), rest


def _one(parsed: list[Any], flag: str, values: dict[str, str]) -> Any:
    if len(parsed) != 1:
        raise ConfigError(
            f"{flag} {values[flag]!r}: ftprof train takes one value (lists are for ftprof sweep and estimate)"
        )
    return parsed[0]


def bool_flag(argv: list[str], flag: str) -> bool | None:
    """What a ``TrainingArguments`` switch says in ``argv``: ``--bf16`` and ``--bf16 true`` are True, ``--bf16
    false`` False, absent None.

    >>> bool_flag(["--bf16"], "--bf16"), bool_flag(["--bf16", "no"], "--bf16"), bool_flag([], "--fp16")
    (True, False, None)
    """
    for i, arg in enumerate(argv):
        if arg.startswith(flag + "="):
            return BOOL_WORDS.get(arg.split("=", 1)[1].lower(), True)
        if arg == flag:
            following = argv[i + 1].lower() if i + 1 < len(argv) else ""
            return BOOL_WORDS.get(following, True)
    return None


def with_precision(argv: list[str], precision: Precision | None, cuda: bool) -> list[str]:
    """``argv`` with the ``--fp16`` / ``--bf16`` that ``--precision`` means.

    >>> with_precision(["--model", "m"], "bf16", cuda=False)
    ['--model', 'm', '--bf16']

    Raises:
        ConfigError: an explicit ``--fp16`` / ``--bf16`` that says otherwise, or fp16 without a GPU.
    """
    if precision is None:
        return argv
    for name in ("fp16", "bf16"):
        given = bool_flag(argv, f"--{name}")
        if given is not None and given != (precision == name):
            said = f"--{name}" if given else f"--{name} false"
            raise ConfigError(f"--precision {precision} and {said} disagree; pass one of them")
    if precision == "fp16" and not cuda:
        raise ConfigError("--precision fp16 needs a CUDA GPU and this machine has none; use bf16 or fp32")
    if precision != "fp32" and bool_flag(argv, f"--{precision}") is None:
        return [*argv, f"--{precision}"]
    return argv


def deepspeed_for_levers(
    levers: Levers, given: DeepSpeedConfig | None, flag: str = "--ds_config"
) -> dict[str, Any] | None:
    """The DeepSpeed config ``--zero`` / ``--offload`` choose: the one ftprof ships for them (``ds_config_for``)
    when no config file is ``given``; None when a file is given (it must agree with them) or neither is.

    >>> deepspeed_for_levers(Levers(zero=2), None)["zero_optimization"]["stage"]
    2

    Raises:
        ConfigError: a lever that contradicts the given file (naming both), or an offload its stage can't do.
    """
    offload: Offload = levers.offload or "none"
    if levers.zero == "none":  # HF Trainer alone
        if given is not None:
            raise ConfigError(f"--zero none (no DeepSpeed) contradicts {flag} {given.path!r}; drop one of them")
        if offload != "none":
            raise ConfigError(f"--offload {offload} needs DeepSpeed; --zero none offloads nothing")
        return None
    if given is not None:
        where = f"{flag} {given.path!r}"
        if levers.zero is not None and levers.zero != given.zero_stage:
            raise ConfigError(
                f"--zero {levers.zero} contradicts {where}, which sets ZeRO stage {given.zero_stage}; drop one of them"
            )
        if levers.offload is not None and levers.offload != given.offload:
            raise ConfigError(
                f"--offload {levers.offload} contradicts {where}, which offloads "
                f"{given.offload if given.offload != 'none' else 'nothing'}; drop one of them"
            )
        forced = given.precision_forced()
        if levers.precision is not None and forced is not None and forced != levers.precision:
            raise ConfigError(
                f"--precision {levers.precision} contradicts {where}, which enables {forced}; drop one of them"
            )
        return None
    if levers.zero is None:
        if offload != "none":
            raise ConfigError(f"--offload {offload} needs --zero (1, 2 or 3) or a --ds_config that offloads")
        return None
    if offload == "optimizer+param" and levers.zero != 3:
        raise ConfigError(f"--offload optimizer+param needs ZeRO stage 3, not {levers.zero}; use --offload optimizer")
    if offload == "optimizer" and levers.zero == 0:
        raise ConfigError("--offload optimizer needs ZeRO stage 1, 2 or 3, not 0")
    return ds_config_for(levers.zero, offload != "none", offload == "optimizer+param")


def shipped_name(levers: Levers) -> str:
    """How a log line names the config ``--zero`` / ``--offload`` chose: its ``ds_configs/`` file, if one."""
    from ftprof.point import Point

    zero = levers.zero if isinstance(levers.zero, int) else 0
    point = Point(precision="fp32", zero=zero, seq_len=1, batch_size=1, offload=levers.offload or "none")
    name = shipped_config(point)
    return f"ds_configs/{name}" if name else f"ds_config_for({point.zero}, offload={point.offload!r})"
