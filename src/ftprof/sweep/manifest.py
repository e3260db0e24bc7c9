"""What a sweep folder's points were measured with, kept in ``sweep.json`` beside ``results.jsonl``.

A point's key names its axes only; the model, the window, the data, the DeepSpeed config, the libraries and
the device decide its figures too. ``--resume`` into a folder measured with other settings would mix runs, so
it is refused with every difference named.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ftprof.errors import ConfigError
from ftprof.records.results import results_path

MANIFEST = "sweep.json"
VERSIONED = ("torch", "transformers", "deepspeed")  # from environment(); accelerate and ftprof added


@dataclass(frozen=True)
class SweepSettings:
    """The settings every point of one sweep shares."""

    model: str
    steps: int
    warmup: int
    min_seconds: float
    dataset: str | None
    task: str
    ds_config_sha256: str | None  # of the base --ds_config's contents; None for the shipped configs
    device: str
    torch: str
    transformers: str
    deepspeed: str
    accelerate: str
    ftprof: str
    # The LoRA points' adapters besides their rank (alpha, dropout, target_modules); None while the sweep has
    # measured no LoRA point (the first that does fixes them).
    lora: dict[str, Any] | None = None
    optim: str | None = None  # --optim (None: the Trainer's default)

    @classmethod
    def of(
        cls,
        model: str,
        steps: int,
        warmup: int,
        min_seconds: float,
        dataset: str | None,
        ds_config: dict[str, Any] | None,
        env: dict[str, Any],
        task: str = "classification",
        lora: dict[str, Any] | None = None,
        optim: str | None = None,
    ) -> SweepSettings:
        import accelerate

        from ftprof import __version__

        versions = {name: str(env.get(name)) for name in VERSIONED} | {"accelerate": accelerate.__version__}
        digest = None
        if ds_config is not None:
            digest = hashlib.sha256(json.dumps(ds_config, sort_keys=True).encode()).hexdigest()
        return cls(
            model=model,
            steps=steps,
            warmup=warmup,
            min_seconds=min_seconds,
            dataset=dataset,
            task=task,
            ds_config_sha256=digest,
            device=str(env.get("device")),
            ftprof=__version__,
            lora=lora,
            optim=optim,
            **versions,
        )

    def differences(self, stored: SweepSettings) -> list[str]:
        """``name: stored -> now`` for each setting that differs.

        >>> a = SweepSettings("m", 3, 1, 2.0, None, "classification", None, "cpu", "2.13", "5.24", "0.19", "1.15",
        ...                   "0.1.0")
        >>> from dataclasses import replace
        >>> a.differences(replace(a, model="n", steps=5))
        ["model: sweep has 'n', now 'm'", 'steps: sweep has 5, now 3']
        """
        return [
            f"{f.name}: sweep has {getattr(stored, f.name)!r}, now {getattr(self, f.name)!r}"
            for f in fields(self)
            if getattr(self, f.name) != getattr(stored, f.name)
            and not (f.name == "lora" and None in (self.lora, stored.lora))  # one side has no LoRA points
        ]


def check_or_write(folder: Path, settings: SweepSettings) -> None:
    """Write ``sweep.json`` in a new sweep; in a resumed one, refuse other settings.

    Raises:
        ConfigError: the folder's points were measured with other settings (each difference named).
    """
    path = folder / MANIFEST
    if path.is_file():
        try:
            stored = SweepSettings(**json.loads(path.read_text()))
        except (TypeError, json.JSONDecodeError):
            raise ConfigError(
                f"{str(path)!r} is not a sweep settings file of this ftprof version; pass another --out"
            ) from None
        diff = settings.differences(stored)
        if diff:
            raise ConfigError(
                f"{str(folder)!r} holds a sweep measured with other settings ({'; '.join(diff)}); "
                "resume with the same flags, or pass another --out"
            )
        if stored.lora is None and settings.lora is not None:  # its first LoRA points: their adapters count now
            path.write_text(json.dumps(asdict(settings), indent=2) + "\n")
        return
    if results_path(folder).is_file():
        raise ConfigError(
            f"{str(folder)!r} holds results without {MANIFEST} (an older ftprof, whose throughput figures counted "
            "one step too few): start a new sweep with another --out"
        )
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(settings), indent=2) + "\n")
