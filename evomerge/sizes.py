"""Byte sizes as users write them ('80GB', '1.5GiB', '512MB') and as evomerge prints them.

Units are powers of 1024 whatever the spelling (GB and GiB alike): memory is sized that way, and a
user planning for an "80 GB" GPU means what the device reports.
"""

from __future__ import annotations

import re

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)
_UNITS = " KMGT"


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '1.5GiB' or a byte count → bytes; ValueError for anything else."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"expected a size like 80GB or 512MB, got {text}")
        return text
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"expected a size like 80GB or 512MB, got '{text}'")
    number, unit = float(match.group(1)), match.group(2).upper()
    return int(number * 1024 ** _UNITS.index(unit or " "))


def format_size(n: float) -> str:
    """Bytes for people: '13.5 GiB', '512 MiB', '0 B'."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" or abs(value) >= 100 else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB" if abs(value) < 100 else f"{value:.0f} TiB"
