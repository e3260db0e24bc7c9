"""``ftprof train`` / ``launch/train.py``: fine-tune with HF Trainer + DeepSpeed (see :mod:`ftprof.train.run`)."""

from __future__ import annotations

from ftprof.cli.runner import run_command


def main(argv: list[str] | None = None) -> int:
    """Run a training job; returns the process exit code. ``--debug`` keeps tracebacks of user errors."""

    def command(args: list[str]) -> None:
        from ftprof.train.run import main as train_main  # heavy imports, after the offline decision

        train_main(args)

    return run_command(argv, command)
