"""How every subcommand turns a user mistake into one line on stderr and exit code 2."""

from __future__ import annotations

import sys
from collections.abc import Callable

from ftprof.errors import FtprofError


def run_reporting_errors(fn: Callable[[], object], debug: bool = False) -> int:
    """Call ``fn``; an :class:`FtprofError` prints ``ftprof: error: ...`` and returns its exit code.

    Other exceptions are bugs and propagate with their traceback. ``debug`` re-raises user errors too.
    """
    try:
        fn()
    except FtprofError as err:
        if debug:
            raise
        print(f"ftprof: error: {err}", file=sys.stderr)
        return err.exit_code
    return 0


def run_command(argv: list[str] | None, command: Callable[[list[str]], object], uses_hub: bool = True) -> int:
    """The common shape of a subcommand's ``main``: default to ``sys.argv``, strip ``--debug``, decide on
    offline mode before transformers is imported (unless only ``--help`` is wanted), report user errors."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if uses_hub and not any(a in ("-h", "--help") for a in argv):
        from ftprof.hub import configure_offline_mode

        configure_offline_mode()
    return run_reporting_errors(lambda: command(argv), debug)
