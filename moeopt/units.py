"""Byte sizes and durations from user text: `parse_bytes("64MB")`, `parse_seconds("50ms")`.

Budgets and latency targets come from the command line and pipeline text; a value that does not parse
is a one-line `BadInputError` naming what was expected, never a silent default.
"""

from __future__ import annotations

import math
import re

from moeopt.errors import BadInputError

_NUMBER = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)\s*([^\d\s]*)$")
BYTE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
SECOND_UNITS = {"": 1.0, "s": 1.0, "sec": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9, "min": 60.0}


def parse_bytes(text: str | int) -> int:
    """'64MB' -> 64_000_000, '1.5GiB' -> 1_610_612_736, '4096' or 4096 -> 4096 (bytes, >= 0).

    Decimal units (KB, MB, GB, TB) are powers of 1000, binary ones (KiB, MiB, GiB, TiB) of 1024; a
    fraction of a byte rounds down.
    """
    if isinstance(text, bool):
        raise BadInputError(f"expected a size in bytes (e.g. 64MB, 1.5GiB, 4096), got '{text}'")
    if isinstance(text, int):
        if text < 0:
            raise BadInputError(f"a size in bytes cannot be negative, got {text}")
        return text
    m = _NUMBER.match(str(text).strip())
    unit = (m.group(2) if m else "").lower()
    if not m or unit not in BYTE_UNITS:
        raise BadInputError(f"expected a size in bytes (e.g. 64MB, 1.5GiB, 4096), got '{text}'")
    return int(float(m.group(1)) * BYTE_UNITS[unit])


def parse_seconds(text: str | float) -> float:
    """'50ms' -> 0.05, '2s' -> 2.0, '250us' -> 0.00025, '0.1' -> 0.1 (seconds, finite, >= 0)."""
    if isinstance(text, bool):
        raise BadInputError(f"expected a duration (e.g. 50ms, 0.2s), got '{text}'")
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        m = _NUMBER.match(str(text).strip())
        unit = (m.group(2) if m else "").lower()
        if not m or unit not in SECOND_UNITS:
            raise BadInputError(f"expected a duration (e.g. 50ms, 0.2s), got '{text}'")
        value = float(m.group(1)) * SECOND_UNITS[unit]
    if not math.isfinite(value) or value < 0:
        raise BadInputError(f"a duration must be finite and >= 0, got '{text}'")
    return value


def format_bytes(n: int) -> str:
    """A short human form: 512 B, 4.0 KiB, 63.2 MiB, 1.50 GiB."""
    if n < 2**10:
        return f"{n} B"
    if n < 2**20:
        return f"{n / 2**10:.1f} KiB"
    if n < 2**30:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**30:.2f} GiB"
