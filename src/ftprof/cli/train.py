"""``ftprof train`` / ``launch/train.py``: fine-tune with HF Trainer + DeepSpeed (see :mod:`ftprof.train`)."""

from __future__ import annotations

import sys

from ftprof.cli.errors import run_reporting_errors
from ftprof.hub import configure_offline_mode


def main(argv: list[str] | None = None) -> int:
    """Run a training job; returns the process exit code. ``--debug`` keeps tracebacks of user errors."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not any(a in ("-h", "--help") for a in argv):
        configure_offline_mode()  # before transformers/datasets are imported

    def run() -> None:
        from ftprof.train import main as train_main  # heavy imports, after the offline decision

        train_main(argv)

    return run_reporting_errors(run, debug)
