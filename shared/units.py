"""Parsing of human-friendly sizes and counts on the command line ("512MiB", "200k")."""

from __future__ import annotations

import re

from shared.errors import fail

MiB = 1 << 20

_SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
               "gb": 10**9, "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20,
               "gib": 2**30, "tib": 2**40}
_COUNT_UNITS = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}


def _parse(text: str, units: dict[str, int], what: str, example: str) -> int:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", text.lower())
    if not m or m.group(2) not in units:
        fail(f"cannot read {what} {text!r}; write e.g. {example}")
    value = float(m.group(1)) * units[m.group(2)]
    if value != int(value):
        fail(f"{what} {text!r} is not a whole number")
    return int(value)


def parse_size(text: str) -> int:
    """'512MiB' -> 536870912 bytes (also B, kB, MB, GB, KiB, GiB, TiB; plain numbers are bytes)."""
    return _parse(text, _SIZE_UNITS, "size", "512MiB, 2GiB or 1e9")


def parse_count(text: str) -> int:
    """'200k' -> 200000 (k, M, B/G suffixes; '1e6' works too)."""
    return _parse(text, _COUNT_UNITS, "count", "200000, 200k, 5M or 1e6")
