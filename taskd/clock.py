"""Wall-clock time in the unit the wire uses (milliseconds since the epoch)."""

from __future__ import annotations

import time


def now_ms() -> int:
    """The current time in whole milliseconds since the epoch."""
    return time.time_ns() // 1_000_000
