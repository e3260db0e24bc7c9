"""Read and check a DeepSpeed config file before DeepSpeed sees it (no deepspeed import here).

DeepSpeed reports a bad config deep inside ``deepspeed.initialize``, after the model is loaded and the
process group is up; checking the file first turns those into one-line errors that name the file and key.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftprof.errors import ConfigError
from ftprof.point import ZERO_STAGES, Offload, Point

OFFLOAD_DEVICES = ("none", "cpu", "nvme")
# The file in ds_configs/ that holds ds_config_for(stage, offload), by (stage, offload).
SHIPPED_CONFIGS: dict[tuple[int, Offload], str] = {
    (0, "none"): "zero0.json",
    (1, "none"): "zero1.json",
    (2, "none"): "zero2.json",
    (3, "none"): "zero3.json",
    (2, "optimizer"): "zero2_offload.json",
    (3, "optimizer+param"): "zero3_offload.json",
}


@dataclass(frozen=True)
class DeepSpeedConfig:
    """A parsed DeepSpeed config with dotted look-ups.

    >>> DeepSpeedConfig({"zero_optimization": {"stage": 2}}).get("zero_optimization.stage")
    2
    """

    config: dict[str, Any]
    path: str = "<dict>"

    def get(self, dotted_key: str, default: Any = None) -> Any:
        """Value at ``a.b.c``, or ``default`` when any part is missing."""
        node: Any = self.config
        for part in dotted_key.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    @property
    def zero_stage(self) -> int:
        return int(self.get("zero_optimization.stage", 0))

    @property
    def offload_optimizer(self) -> str:
        return str(self.get("zero_optimization.offload_optimizer.device", "none"))

    @property
    def offload_param(self) -> str:
        return str(self.get("zero_optimization.offload_param.device", "none"))

    @property
    def offload(self) -> Offload:
        """What this config offloads, as a :class:`~ftprof.point.Point` axis."""
        if self.offload_param != "none":
            return "optimizer+param"
        return "optimizer" if self.offload_optimizer != "none" else "none"

    def precision_forced(self) -> str | None:
        """'fp16' or 'bf16' when the file enables it with ``true`` rather than ``"auto"``."""
        for name in ("fp16", "bf16"):
            if self.get(f"{name}.enabled") is True:
                return name
        return None


def load_ds_config(path: str | Path) -> DeepSpeedConfig:
    """Load and validate a DeepSpeed JSON config.

    Raises:
        ConfigError: the file is missing, is not JSON, or holds values DeepSpeed would reject.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--ds_config {str(path)!r}: no such file; pick one of ds_configs/*.json")
    text = path.read_text()
    try:
        config = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"--ds_config {str(path)!r} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}"
        ) from None
    if not isinstance(config, dict):
        raise ConfigError(f"--ds_config {str(path)!r} must hold a JSON object, not {type(config).__name__}")
    return validate(DeepSpeedConfig(config, str(path)))


def validate(cfg: DeepSpeedConfig) -> DeepSpeedConfig:
    """Check the keys ftprof relies on; returns ``cfg`` unchanged."""
    where = f"--ds_config {cfg.path!r}"
    zero = cfg.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f"{where}: zero_optimization must be an object, got {zero!r}")
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or stage not in ZERO_STAGES:
        raise ConfigError(f"{where}: unknown ZeRO stage {stage!r} in zero_optimization.stage; use 0, 1, 2 or 3")
    for key in ("offload_optimizer", "offload_param"):
        device = cfg.get(f"zero_optimization.{key}.device", "none")
        if device not in OFFLOAD_DEVICES:
            raise ConfigError(f"{where}: zero_optimization.{key}.device is {device!r}; use one of {OFFLOAD_DEVICES}")
    if cfg.offload_param != "none" and stage != 3:
        raise ConfigError(f"{where}: offload_param needs ZeRO stage 3 (stage is {stage}); use offload_optimizer")
    if cfg.offload_optimizer != "none" and stage == 0:
        raise ConfigError(f"{where}: offload_optimizer needs ZeRO stage 1, 2 or 3 (stage is 0)")
    if cfg.get("fp16.enabled") is True and cfg.get("bf16.enabled") is True:
        raise ConfigError(f"{where}: fp16.enabled and bf16.enabled are both true; enable at most one")
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        value = cfg.get(key, "auto")
        if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise ConfigError(f'{where}: {key} is {value!r}; use a positive integer or "auto"')
    return cfg


def ds_config_for(stage: int, offload_optimizer: bool = False, offload_param: bool = False) -> dict[str, Any]:
    """The config ftprof ships for a ZeRO stage (``ds_configs/*.json`` are this function's output).

    Every value HF Trainer knows is ``"auto"``; there is no scheduler block, so Trainer's
    ``--lr_scheduler_type`` applies.
    """
    zero: dict[str, Any] = {"stage": stage}
    if stage == 1:
        zero["reduce_bucket_size"] = "auto"
    if stage == 2:
        zero.update(
            overlap_comm=True, contiguous_gradients=True, allgather_bucket_size=200_000_000, reduce_bucket_size="auto"
        )
    if stage == 3:
        zero.update(
            overlap_comm=True,
            contiguous_gradients=True,
            sub_group_size=1_000_000_000,
            reduce_bucket_size="auto",
            stage3_prefetch_bucket_size="auto",
            stage3_param_persistence_threshold="auto",
            stage3_max_live_parameters=1_000_000_000,
            stage3_max_reuse_distance=1_000_000_000,
            stage3_gather_16bit_weights_on_model_save=True,
        )
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "fp16": {
            "enabled": "auto",
            "loss_scale": 0,
            "loss_scale_window": 1000,
            "initial_scale_power": 16,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        "bf16": {"enabled": "auto"},
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"},
        },
        "zero_optimization": zero,
        "steps_per_print": 1_000_000,
        "wall_clock_breakdown": False,
    }


def shipped_config(point: Point) -> str | None:
    """The name of the ``ds_configs/`` file for ``point``'s stage and offload, if ftprof ships one."""
    return SHIPPED_CONFIGS.get((point.zero, point.offload))


def for_point(base: DeepSpeedConfig, point: Point) -> dict[str, Any]:
    """A copy of ``base`` for ``point``: its ZeRO stage and offload, everything else of ``base`` kept.

    At ``base``'s own stage its ``zero_optimization`` block is used as written; at another stage the shipped
    block for that stage is the starting point, overridden by ``base``'s own keys (buckets, live
    parameters, ...). Offload follows the point: ``base``'s offload settings where it has them, else pinned
    CPU memory.
    """
    config = json.loads(json.dumps(base.config))
    own = {
        k: v for k, v in config.get("zero_optimization", {}).items() if k not in ("offload_optimizer", "offload_param")
    }
    shipped = {} if point.zero == base.zero_stage else ds_config_for(point.zero)["zero_optimization"]
    zero = {**shipped, **own, "stage": point.zero}
    if point.offload_optimizer:
        zero["offload_optimizer"] = base.get("zero_optimization.offload_optimizer") or {
            "device": "cpu",
            "pin_memory": True,
        }
    if point.offload_param:
        zero["offload_param"] = base.get("zero_optimization.offload_param") or {"device": "cpu", "pin_memory": True}
    config["zero_optimization"] = zero
    return config


def cpu_adjusted(cfg: DeepSpeedConfig, cuda: bool) -> DeepSpeedConfig:
    """``cfg`` for this machine: without CUDA, ``overlap_comm`` is turned off (there are no streams to
    overlap, and on CPU it costs ~15% of ZeRO-2 throughput, bench/bench_train.py). Unchanged on GPUs.

    >>> cpu_adjusted(DeepSpeedConfig({"zero_optimization": {"overlap_comm": True}}), cuda=False).config
    {'zero_optimization': {'overlap_comm': False}}
    """
    if cuda or cfg.get("zero_optimization.overlap_comm") is not True:
        return cfg
    config = json.loads(json.dumps(cfg.config))
    config["zero_optimization"]["overlap_comm"] = False
    return DeepSpeedConfig(config, cfg.path)


#: ``FTPROF_DS_OPTIMIZER=torch``: under DeepSpeed, step with the Trainer's ``--optim`` even where DeepSpeed's
#: FusedAdam could be built (to compare with a plain Trainer run, or to skip a JIT build's minutes).
TORCH_OPTIMIZER_ENV = "FTPROF_DS_OPTIMIZER"


def fused_adam_unavailable(cuda: bool) -> str | None:
    """Why DeepSpeed's FusedAdam can't run here (None: it can). On a CUDA machine DeepSpeed JIT-builds it
    with ``nvcc`` on first use unless the install shipped it prebuilt (``DS_BUILD_FUSED_ADAM=1``); a pip-only
    CUDA environment has no ``nvcc`` and the build fails deep inside ``deepspeed.initialize``."""
    if os.environ.get(TORCH_OPTIMIZER_ENV, "").lower() == "torch":
        return f"{TORCH_OPTIMIZER_ENV}=torch"
    if not cuda:
        return None  # the CPU accelerator builds its Adam with the host's C++ compiler
    try:
        from deepspeed.git_version_info import installed_ops

        if installed_ops.get("fused_adam"):
            return None
    except ImportError:
        pass
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    if shutil.which("nvcc") or Path(home, "bin", "nvcc").exists():
        return None
    return "no nvcc (CUDA compiler) here to build DeepSpeed's FusedAdam"


def torch_optimizer_fallback(cfg: DeepSpeedConfig, cuda: bool) -> tuple[DeepSpeedConfig, str | None]:
    """``cfg`` without its Adam/AdamW ``optimizer`` block where FusedAdam can't run, so DeepSpeed steps the
    Trainer's ``--optim`` (torch's fused AdamW by default; transformers sets ``zero_allow_untested_optimizer``),
    and the one-line note that says so; ``cfg`` itself and None otherwise. Offload keeps its block: ZeRO-Offload
    needs DeepSpeedCPUAdam, which the host's C++ compiler builds.

    >>> cfg = DeepSpeedConfig({"optimizer": {"type": "AdamW"}, "zero_optimization": {"stage": 2}})
    >>> torch_optimizer_fallback(cfg, cuda=False)[0] is cfg
    True
    """
    kind = str(cfg.get("optimizer.type", "")).lower()
    if kind not in ("adam", "adamw") or cfg.offload_optimizer != "none":
        return cfg, None
    why = fused_adam_unavailable(cuda)
    if why is None:
        return cfg, None
    config = {k: v for k, v in cfg.config.items() if k != "optimizer"}
    note = f"{why}: DeepSpeed steps the Trainer's --optim (torch AdamW) instead of FusedAdam"
    return DeepSpeedConfig(config, cfg.path), note


def for_this_machine(cfg: DeepSpeedConfig, cuda: bool) -> tuple[DeepSpeedConfig, list[str]]:
    """``cfg`` as it runs on this machine (:func:`cpu_adjusted`, :func:`torch_optimizer_fallback`), and a
    one-line note for each change."""
    notes = []
    adjusted = cpu_adjusted(cfg, cuda)
    if adjusted is not cfg:
        notes.append("no CUDA device: zero_optimization.overlap_comm=false")
    adjusted, note = torch_optimizer_fallback(adjusted, cuda)
    return adjusted, notes + ([note] if note else [])
