"""Durations as users write them in resources and flags: ``500ms``, ``30s``, ``10m``."""

from __future__ import annotations

import re

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")


def parse_duration(text: str) -> float:
    """Seconds in ``text``; parts may be combined (``1m30s``). Raises ValueError."""
    value = text.strip()
    if not value:
        raise ValueError("empty duration")
    position, total = 0, 0.0
    for match in _PART.finditer(value):
        if match.start() != position:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        position = match.end()
    if position != len(value) or position == 0:
        raise ValueError(f"{text!r} is not a duration like 500ms, 30s, 10m or 1h")
    return total
