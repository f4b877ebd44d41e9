"""Wall-clock time: milliseconds since the epoch (the wire's unit), and the scheduler's clock."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta


def now_ms() -> int:
    """The current time in whole milliseconds since the epoch."""
    return time.time_ns() // 1_000_000


_MICROSECOND = timedelta(microseconds=1)


class Clock:
    """The time the cron scheduler keeps: the system clock, moved ahead by ``advance``.

    A server runs on the system clock. Tests move it ahead instead of sleeping: every
    listener hears how far it jumped, and whatever fell due in between happens at once,
    as after a stalled event loop.
    """

    def __init__(self) -> None:
        self.ahead = timedelta(0)
        """How far this clock is ahead of the system clock."""
        self._listeners: list[Callable[[timedelta], None]] = []

    def now(self) -> datetime:
        """The current time (UTC)."""
        return datetime.now(UTC) + self.ahead

    def now_ms(self) -> int:
        """The current time in whole milliseconds since the epoch."""
        ahead_ns = self.ahead // _MICROSECOND * 1000
        return (time.time_ns() + ahead_ns) // 1_000_000

    def listen(self, listener: Callable[[timedelta], None]) -> None:
        """Call ``listener`` with the jump each time the clock is moved ahead."""
        self._listeners.append(listener)

    def advance(self, seconds: float) -> None:
        """Move the clock ahead by ``seconds``."""
        self.advance_to(self.now() + timedelta(seconds=seconds))

    def advance_to(self, when: datetime) -> None:
        """Move the clock ahead to ``when`` (a time already past changes nothing)."""
        jump = when - self.now()
        if jump <= timedelta(0):
            return
        self.ahead += jump
        for listener in self._listeners:
            listener(jump)
