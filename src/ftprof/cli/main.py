"""``ftprof``: the console script. ``main()`` only dispatches to one module per subcommand."""

from __future__ import annotations

import sys

from ftprof import __version__

USAGE = f"""usage: ftprof COMMAND [ARGS]   (ftprof {__version__})

commands:
  train     fine-tune a text classifier with HF Trainer + DeepSpeed (same as launch/train.py)

Run `ftprof COMMAND --help` for a command's flags."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(__version__)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "train":
        from ftprof.cli.train import main as train_main

        return train_main(rest)
    print(f"ftprof: error: unknown command {command!r}; run `ftprof --help`", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
