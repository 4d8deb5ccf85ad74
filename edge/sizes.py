"""Sizes the way people write them: 2GB (10^9), 512MiB (2^30), 1500MB, 0.5G; and back for display."""

from __future__ import annotations

import re

from edge.errors import EdgeError

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str, flag: str = "size") -> int:
    m = _SIZE.match(str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise EdgeError(f"{flag}: cannot read {str(text)!r} as a size; write it like 2GB, 1500MB, 512MiB or 0.5G")
    return int(float(m.group(1)) * _UNITS[unit])


def power_of_two_size(n: int) -> str:
    """A read, chunk or bundle size that is a power of two, named as such: 4KiB, 64KiB, 1MiB (amounts of memory
    and data are written by format_size, in decimal units)."""
    return f"{n >> 20}MiB" if n >= 1 << 20 and not n % (1 << 20) else f"{n / 1024:g}KiB"


def format_size(n: float) -> str:
    """Bytes as people read them, decimal units: 98.4MB, 2.1GB."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{int(n)}B"
