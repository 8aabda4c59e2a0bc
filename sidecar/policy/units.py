"""Parsing of the human units the policy format uses: durations, rates, sizes."""

from __future__ import annotations

import re
from dataclasses import dataclass

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}

_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(\d*)\s*(ms|s|sec|second|m|min|minute|h|hour)\s*$")
_RATE_UNITS = {
    "ms": 0.001,
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "m": 60.0,
    "min": 60.0,
    "minute": 60.0,
    "h": 3600.0,
    "hour": 3600.0,
}

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KiB|MiB|GiB)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
}

DURATION_PATTERN = r"^\d+(\.\d+)?(ms|s|m|h)$"
RATE_PATTERN = r"^\d+(\.\d+)?/\d*(ms|s|sec|second|m|min|minute|h|hour)$"
SIZE_PATTERN = r"^\d+(\.\d+)?\s*([KMG]i?B|B)?$"


def parse_duration(value: object) -> float:
    """'250ms' -> 0.25 (seconds). Bare numbers are refused: a unit is never implied."""
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            number, unit = float(m.group(1)), m.group(2)
            # Divided, not multiplied by 0.001: 700 * 0.001 is 0.7000000000000001, and
            # /config and /faults would show it so.
            return number / 1000 if unit == "ms" else number * _DURATION_UNITS[unit]
    raise ValueError(f"{value!r} is not a duration; write it like '250ms', '5s', '2m' or '1h'")


def format_duration(seconds: float) -> str:
    # Rounded to the microsecond: a float's last bit (0.1 + 0.2) never shows.
    ms = round(seconds * 1000, 3)
    if seconds < 1 and ms == int(ms):
        return f"{int(ms)}ms"
    whole = round(seconds, 6)
    if whole == int(whole):
        return f"{int(whole)}s"
    return f"{whole}s"


@dataclass(frozen=True, slots=True)
class Rate:
    """Events per second, and the text it was written as (kept for messages and /config)."""

    per_second: float
    text: str

    def __str__(self) -> str:
        return self.text


def parse_rate(value: object) -> Rate:
    """'600/min' -> Rate(10.0); '5/10s' means 5 per 10 seconds."""
    if isinstance(value, Rate):
        return value
    if isinstance(value, str):
        m = _RATE.match(value)
        if m:
            count = float(m.group(1))
            window = float(m.group(2) or 1) * _RATE_UNITS[m.group(3)]
            if count > 0 and window > 0:
                return Rate(count / window, value.strip())
    raise ValueError(f"{value!r} is not a rate; write it like '10/s', '600/min' or '5000/h'")


def parse_size(value: object) -> int:
    """'10MiB' -> 10485760 bytes; a bare integer is bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m:
            unit = (m.group(2) or "b").lower()
            return int(float(m.group(1)) * _SIZE_UNITS[unit])
    raise ValueError(f"{value!r} is not a size; write it like '512KiB', '10MiB' or 1048576")
