"""Durations and sizes as log lines print them."""

from __future__ import annotations


def format_duration(seconds: float | None) -> str:
    """73 -> '1m13s', 7300 -> '2h01m', None -> '?'."""
    if seconds is None:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def format_bytes(n: float) -> str:
    """1234 -> "1.2 KB" (powers of 1000), 12 -> "12 B"."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover
