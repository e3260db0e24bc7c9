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
