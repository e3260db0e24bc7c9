"""Memory sizes: one unit (binary GiB) for every figure ftprof reads, prints or compares."""

from __future__ import annotations

import re

from ftprof.errors import ConfigError

GIB = 2**30
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*$", re.IGNORECASE)


def parse_size(text: str, flag: str = "--budget") -> int:
    """A memory size in bytes: ``24GiB``, ``24GB``, ``1.5G`` (binary units either way), or plain bytes.

    >>> parse_size("1.5GiB"), parse_size("512M"), parse_size("1000")
    (1610612736, 536870912, 1000)
    """
    match = _SIZE.match(text)
    if not match:
        raise ConfigError(f"{flag} {text!r}: not a size; use e.g. 24GiB, 80GB or 512MiB")
    number, unit = float(match.group(1)), match.group(2).upper()
    return int(number * 1024 ** " KMGT".index(unit or " "))


def gib(n: int | float | None, digits: int = 3) -> float | None:
    """Bytes to GiB, rounded for display; None for a missing figure.

    >>> gib(3 * 2**30), gib(None)
    (3.0, None)
    """
    return None if not n else round(n / GIB, digits)
