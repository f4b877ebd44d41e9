"""Host monitoring retention: old reports and rollups pruned in the background.

Every ``monitoring_prune_interval_s`` each node deletes, agent by agent, the rows older
than their table's retention (server settings ``monitoring_*_retention_s``), in chunks of
``PRUNE_CHUNK`` rows, one chunk per write: the group-commit writer interleaves them with
reports and tasks, so pruning never holds writers up for long. An agent's newest static
report is kept whatever its age (it says what the host is).

Defaults (per agent reporting every second; sizes measured by benchmark P9):
raw dynamic reports 30 min (a few KB each: recent detail only), raw summaries 6 h (the
last hours at full detail), 1-minute rollups 3 days, 1-hour rollups and static
reports 400 days (a year of charts and host history).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Literal

from taskd.clock import Clock
from taskd.config import ServerSettings
from taskd.store import Store

logger = logging.getLogger(__name__)

PRUNE_CHUNK = 1000
"""Rows deleted by one write, by default."""

Pruned = Literal["dynamic", "summary", "static", "1m", "1h"]


def retentions(settings: ServerSettings) -> dict[Pruned, int]:
    """How long each kind of row is kept, in ms."""
    return {
        "dynamic": settings.monitoring_dynamic_retention_s * 1000,
        "summary": settings.monitoring_summary_retention_s * 1000,
        "1m": settings.monitoring_rollup_1m_retention_s * 1000,
        "1h": settings.monitoring_rollup_1h_retention_s * 1000,
        "static": settings.monitoring_static_retention_s * 1000,
    }


class Pruner:
    """Deletes monitoring rows past their retention (see the module docstring)."""

    def __init__(
        self, store: Store, settings: ServerSettings, clock: Clock, chunk: int = PRUNE_CHUNK
    ) -> None:
        self.store = store
        self.retentions = retentions(settings)
        self.clock = clock
        self.chunk = chunk
        """Rows deleted by one write."""

    async def prune(self) -> int:
        """One pass over every agent and kind of row; how many rows went."""
        now = self.clock.now_ms()
        total = 0
        for agent in await self.store.list_agents():
            for kind, keep_ms in self.retentions.items():
                while True:
                    deleted = await self.store.prune_monitoring(
                        kind, agent.uuid, now - keep_ms, self.chunk
                    )
                    total += deleted
                    if deleted < self.chunk:
                        break
                    await asyncio.sleep(0)
        if total:
            logger.info("pruned %d monitoring rows past their retention", total)
        return total
