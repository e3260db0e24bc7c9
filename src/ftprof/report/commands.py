"""Shell command lines ftprof prints for the user to run: built as argument lists, quoted once."""

from __future__ import annotations

import shlex

from ftprof.point import LoraOptions, Point

PRECISION_FLAGS = {"fp32": [], "fp16": ["--fp16"], "bf16": ["--bf16"]}


def train_command(
    model: str,
    point: Point,
    config_path: str | None,
    task: str = "classification",
    lora: LoraOptions | None = None,
    optim: str | None = None,
) -> str:
    """The ``deepspeed launch/train.py`` command that trains ``model`` as ``point`` was measured, rank count
    pinned (a bare ``deepspeed`` would start one rank per visible GPU); a LoRA point's adapters as ``lora``
    (default: train's) set them. A point without DeepSpeed is ``python launch/train.py --zero none`` with the
    ``optim`` it stepped (None: the Trainer's default), and no config; on several ranks (DDP) the same launcher
    starts them.

    >>> train_command("gpt2", Point(precision="bf16", zero=2, seq_len=512, batch_size=8), "ds_configs/zero2.json")
    'deepspeed --num_gpus 1 launch/train.py --ds_config ds_configs/zero2.json --model gpt2 \
--per_device_train_batch_size 8 --gradient_accumulation_steps 1 --max_length 512 --bf16'
    >>> train_command("gpt2", Point(precision="fp32", zero=0, deepspeed=False, seq_len=64, batch_size=8), None,
    ...               optim="adamw_torch")
    'python launch/train.py --zero none --optim adamw_torch --model gpt2 --per_device_train_batch_size 8 \
--gradient_accumulation_steps 1 --max_length 64'
    >>> train_command("gpt2", Point(precision="fp32", zero=0, deepspeed=False, world_size=2, seq_len=64,
    ...               batch_size=8), None).split(" --model")[0]
    'deepspeed --num_gpus 2 launch/train.py --zero none'
    """
    ranks = ["deepspeed", "--num_gpus", str(point.world_size), "launch/train.py"]
    if point.deepspeed:
        assert config_path is not None, "a DeepSpeed point's command names its config"
        launch = [*ranks, "--ds_config", config_path]
    else:  # several ranks without DeepSpeed: the same launcher starts them, and the Trainer makes them DDP
        launch = [*(ranks if point.world_size > 1 else ["python", "launch/train.py"]), "--zero", "none"]
        launch += ["--optim", optim] if optim else []
    args = [
        *launch,
        "--model",
        model,
        "--per_device_train_batch_size",
        str(point.batch_size),
        "--gradient_accumulation_steps",
        str(point.grad_accum),
        "--max_length",
        str(point.seq_len),
        *PRECISION_FLAGS[point.precision],
    ]
    if point.gradient_checkpointing:
        args.append("--gradient_checkpointing")
    if task != "classification":
        args += ["--task", task]  # for a causal LM, --max_length is the packed block size
    if point.peft == "lora":
        args += ["--peft", "lora", "--lora_r", str(point.lora_r), *(lora or LoraOptions()).train_flags()]
    return shlex.join(args)
