"""``ftprof``: the console script. ``main()`` only dispatches to one module per subcommand."""

from __future__ import annotations

import importlib
import sys

from ftprof import __version__

COMMANDS = {
    "train": (
        "ftprof.cli.train",
        "fine-tune a classifier or causal LM with HF Trainer + DeepSpeed (= launch/train.py)",
    ),
    "sweep": ("ftprof.cli.sweep", "measure peak memory and throughput over batch, precision, length, ZeRO stage"),
    "estimate": ("ftprof.cli.estimate", "predict peak memory per rank before running; calibrate on a sweep"),
    "report": ("ftprof.cli.report", "tables, Pareto front, recommendations, exports and plots of a sweep"),
}
USAGE = (
    f"usage: ftprof COMMAND [ARGS]   (ftprof {__version__})\n\ncommands:\n"
    + "\n".join(f"  {name:<8}  {help_}" for name, (_, help_) in COMMANDS.items())
    + "\n\nRun `ftprof COMMAND --help` for its flags."
)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(__version__)
        return 0
    if argv[0] not in COMMANDS:
        print(f"ftprof: error: unknown command {argv[0]!r}; run `ftprof --help`", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
