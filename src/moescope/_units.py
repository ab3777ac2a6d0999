"""Byte sizes as people write them: ``12582912``, ``12MiB``, ``1.5GB``, ``10GiB`` (case-insensitive)."""

from __future__ import annotations

import math
import re

from moescope.errors import UsageError

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30})
MAX_BYTES = 2**60  # 1 EiB: above any memory or file size a plan could name
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_bytes(text: str | int | float, what: str = "size") -> int:
    """Bytes in `text`; K/M/G alone are binary (as llama.cpp prints them), kB/MB/GB decimal."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        m = _SIZE.match(str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise UsageError(
                f"{what} {text!r} is not a size; write bytes with an optional unit, e.g. 12MiB, 1.5GB or 10GiB"
            )
        value, unit = float(m.group(1)), m.group(2).lower()
    if not math.isfinite(value) or value * _UNITS[unit] > MAX_BYTES:
        raise UsageError(f"{what} {text!r} is beyond any memory size (above 1 EiB); give a size like 16GiB")
    n = round(value * _UNITS[unit])
    if n <= 0:
        raise UsageError(f"{what} {text!r} is not positive; give a size above 0")
    return n


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
