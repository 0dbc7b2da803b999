"""The one size grammar of pyivshmem: regions, ring slot sizes, the server's memory (``Server(size=)``
and ``pyivshmem-server -l``) and the benchmark's size lists all parse sizes here.

QEMU's grammar (``-l`` of ivshmem-server, ``size=`` of memory back-ends): a number of bytes, or a
number with a K, M, G, T, P or E suffix (powers of 1024, any case); a fraction needs a suffix
("1.5M", not "1.5"); a trailing "B" or "iB" after the suffix is accepted ("64KiB", "16MB"), as is a
bare "B" ("10B").  A positive int is taken as it is.  Anything else (zero, negatives, floats,
bools, None, unknown suffixes) is a ConfigError that names the value and the grammar.
"""
from __future__ import annotations

import re
from typing import Union

from .errors import ConfigError

__all__ = ["parse_size"]

_SIZE_RE = re.compile(
    r"^\s*(?P<num>\d+(?:\.\d*)?|\.\d+)\s*(?:(?P<suf>[KMGTPE])(?:I?B)?|B)?\s*$", re.IGNORECASE
)
_SHIFT = {"K": 10, "M": 20, "G": 30, "T": 40, "P": 50, "E": 60}


def parse_size(size: Union[int, str], what: str = "size") -> int:
    """Bytes from a positive int or a string such as "4096", "64K", "1.5M", "16MiB", "2T"
    (powers of 1024; fractions only with a suffix, truncated to whole bytes).
    ConfigError, naming ``what``, for anything else."""
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise ConfigError(f"{what} must be an int or a string like '16M', not {size!r}")
    if isinstance(size, int):
        if size <= 0:
            raise ConfigError(f"{what} must be positive, got {size}")
        return int(size)
    m = _SIZE_RE.match(size)
    if not m:
        raise ConfigError(
            f"invalid {what} {size!r}: expected a number of bytes with an optional K, M, G, T, P "
            "or E suffix (powers of 1024), e.g. '16M' or '1.5G'"
        )
    num, suf = m.group("num"), m.group("suf")
    shift = _SHIFT[suf.upper()] if suf else 0
    whole, _, frac = num.partition(".")
    if "." in num and not suf:
        raise ConfigError(f"invalid {what} {size!r}: a fraction needs a K/M/G/T/P/E suffix")
    # exact decimal arithmetic: "1.5M" is 1572864 whatever the float rounding would say
    scale = 10 ** len(frac)
    n = ((int(whole or "0") * scale + int(frac or "0")) << shift) // scale
    if n <= 0:
        raise ConfigError(f"invalid {what} {size!r}: must be at least one byte")
    return n
