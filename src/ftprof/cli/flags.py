"""The flags more than one command takes, built once so that they mean the same everywhere.

``--precision``, ``--zero``, ``--offload`` and ``--gradient_checkpointing`` take lists in ``sweep`` and
``estimate`` (``--zero 2`` or ``--zero 0,2,3``), parsed by :mod:`ftprof.point`'s parsers, which ``ftprof
train`` uses too for its single values; ``--task`` has the same choices in all three. A bad value is a
:class:`~ftprof.errors.ConfigError` raised while parsing: one line naming the flag, exit code 2.

Each command's parser puts its flags in argument groups (model, grid, levers, execution, Slurm, output), so
``--help`` reads by purpose.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from ftprof.errors import ConfigError
from ftprof.point import (
    TASKS,
    parse_int_list,
    parse_offloads,
    parse_peft,
    parse_precisions,
    parse_stages,
    parse_switch,
    parse_task,
)


def parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """A command's parser: its module docstring (the example commands) as the description."""
    return argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def int_list(flag: str) -> Callable[[str], list[int]]:
    """The argparse ``type`` of a list of positive integers, e.g. ``--seq_lens 128,512``."""

    def parse(text: str) -> list[int]:
        return parse_int_list(text, flag)

    parse.__name__ = flag  # argparse names the type in its own messages
    return parse


def switch(flag: str) -> Callable[[str], list[bool]]:
    """The argparse ``type`` of an on/off lever, e.g. ``--gradient_checkpointing off,on``."""

    def parse(text: str) -> list[bool]:
        return parse_switch(text, flag)

    parse.__name__ = flag
    return parse


def add_model_group(p: argparse.ArgumentParser, *, required: bool, model_help: str) -> argparse._ArgumentGroup:
    """``--model`` and ``--task``."""
    group = p.add_argument_group("model")
    group.add_argument("--model", required=required, help=model_help)
    group.add_argument(
        "--task",
        type=parse_task,
        choices=TASKS,
        default="classification",
        help="classification (a sequence classifier, the default) or causal-lm (a decoder's LM head: logits over "
        "the vocabulary at every position)",
    )
    return group


def add_lever_group(p: argparse.ArgumentParser, *, defaults: dict[str, str | None]) -> argparse._ArgumentGroup:
    """The memory levers, each a comma list: ``--precision``, ``--zero`` (stages, and ``none``: HF Trainer
    without DeepSpeed), ``--offload``, ``--gradient_checkpointing``. ``defaults`` holds each one's default
    (None: the command decides)."""
    group = p.add_argument_group("levers (each a comma list: every combination is a setting)")

    def default(flag: str, text: str) -> str:
        return f"{text} (default: {defaults[flag]})" if defaults.get(flag) else text

    group.add_argument(
        "--precision",
        type=parse_precisions,
        default=defaults.get("precision"),
        metavar="fp32,fp16,bf16",
        help=default("precision", "mixed precision: fp32, fp16, bf16"),
    )
    group.add_argument(
        "--zero",
        type=parse_stages,
        default=defaults.get("zero"),
        metavar="none,0,1,2,3",
        help=default(
            "zero", "ZeRO stages, e.g. 2 or 0,2,3; none: HF Trainer without DeepSpeed (none,0,2 side by side)"
        ),
    )
    group.add_argument(
        "--offload",
        type=parse_offloads,
        default=defaults.get("offload"),
        metavar="none,optimizer,optimizer+param",
        help=default(
            "offload", "what ZeRO offloads to CPU memory: none, optimizer (ZeRO-1/2/3), optimizer+param (ZeRO-3)"
        ),
    )
    group.add_argument(
        "--gradient_checkpointing",
        type=switch("--gradient_checkpointing"),
        nargs="?",
        const="on",
        default=defaults.get("gradient_checkpointing"),
        metavar="off,on",
        help=default("gradient_checkpointing", "recompute activations in backward: on (alone: on), off, or off,on"),
    )
    return group


def note(text: str) -> None:
    """One line on stderr that doesn't stop the command (a deprecated flag, say)."""
    print(f"ftprof: note: {text}", file=sys.stderr)


def add_peft_group(p: argparse.ArgumentParser, *, grid: bool = False) -> argparse._ArgumentGroup:
    """``--peft`` and the LoRA adapter's flags (``--lora_r``, ``--lora_alpha``, ``--lora_dropout``,
    ``--lora_target_modules``). ``grid`` (sweep): ``--lora_r`` is a list, and the LoRA flags default to None,
    so that a command can tell they were given (:func:`check_lora_flags`)."""
    group = p.add_argument_group("parameter-efficient fine-tuning")
    group.add_argument(
        "--peft",
        type=parse_peft,
        default="none",
        metavar="none,lora",
        help="none (full fine-tuning, the default), lora (frozen weights plus low-rank adapters), or none,lora",
    )
    if grid:
        group.add_argument("--lora_r", type=int_list("--lora_r"), help="LoRA ranks, e.g. 8,64 (default: 8)")
    else:
        group.add_argument("--lora_r", type=int, default=8, help="LoRA rank (default: 8, as ftprof train)")
    group.add_argument(
        "--lora_alpha",
        type=int,
        default=None if grid else 16,
        help="LoRA scale numerator, alpha / r (default: 16)",
    )
    group.add_argument(
        "--lora_dropout",
        type=float,
        default=None if grid else 0.05,
        help="dropout on each adapter's input (default: 0.05)",
    )
    group.add_argument(
        "--lora_target_modules",
        help="comma list of Linear module names to adapt (default: the family's, as peft's: e.g. q_proj,v_proj)",
    )
    return group


LORA_FLAGS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")


def check_lora_flags(a: argparse.Namespace) -> None:
    """LoRA flags given (not None) without ``lora`` in ``--peft``: they would do nothing.

    Raises:
        ConfigError: naming the first such flag.
    """
    given = [f"--{name}" for name in LORA_FLAGS if getattr(a, name) is not None]
    if given and "lora" not in a.peft:
        raise ConfigError(f"{given[0]} applies to --peft lora only; add --peft lora (or none,lora), or drop it")
