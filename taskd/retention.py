"""Retention: rows past their keeping time are deleted in the background, in small chunks.

One loop prunes everything that grows without bound:

- host monitoring reports and rollups (``monitoring_*_retention_s``, see monitoring.py);
- finished tasks with their results, by the time of the result: ``task_retention_s``,
  or the task type's entry in ``task_retention_by_type``. A task still queued, running
  or waiting for its result is never pruned;
- cron results, by run time: the cron's own ``result_retention_ms`` if it has one, else
  ``cron_result_retention_s`` (the results of deleted crons too), together with the
  settled fire records of those slots. A cron's own retention also applies to the
  finished tasks it created (whichever of it and their type's retention is shorter), so
  one setting bounds everything a per-second probe writes.

Every ``monitoring_prune_interval_s`` a pass deletes ``PRUNE_CHUNK`` rows per write:
the group-commit writer interleaves these writes with reports and results, so pruning
never holds writers up for long. With several nodes on one PostgreSQL, only the cron
leader prunes (the others would race it for the same rows).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any

from sqlalchemy import Row

from taskd.clock import Clock
from taskd.config import ServerSettings
from taskd.monitoring import retentions
from taskd.protocol import TASK_TYPES
from taskd.store import Store

logger = logging.getLogger(__name__)

PRUNE_CHUNK = 1000
"""Rows deleted by one write, by default."""
FIRE_GUARD_MS = 3600_000
"""A fire record younger than this is kept whatever the retention: it is what stops a slot
from firing twice while two nodes briefly both believe they lead."""


class Pruner:
    """Deletes rows past their retention (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        settings: ServerSettings,
        clock: Clock,
        leads: Callable[[], bool] = lambda: True,
        chunk: int = PRUNE_CHUNK,
    ) -> None:
        self.store = store
        self.settings = settings
        self.monitoring = retentions(settings)
        self.clock = clock
        self.leads = leads
        """Whether this node prunes now (the cron leader of a cluster)."""
        self.chunk = chunk
        """Rows deleted by one write."""

    async def prune(self) -> int:
        """One pass over every kind of row; how many rows went (0 on a node not leading)."""
        if not self.leads():
            return 0
        now = self.clock.now_ms()
        crons = await self.store.list_crons()
        monitoring = await self.prune_monitoring(now)
        tasks = await self.prune_tasks(now, crons)
        results = await self.prune_cron_results(now, crons)
        if monitoring or tasks or results:
            logger.info(
                "pruned rows past their retention: %d monitoring, %d tasks, %d cron results",
                monitoring,
                tasks,
                results,
            )
        return monitoring + tasks + results

    async def prune_monitoring(self, now: int) -> int:
        """Monitoring rows past their table's retention, agent by agent."""
        total = 0
        for agent in await self.store.list_agents():
            for kind, keep_ms in self.monitoring.items():
                prune = partial(self.store.prune_monitoring, kind, agent.uuid, now - keep_ms)
                total += await self._drain(prune)
        return total

    async def prune_tasks(self, now: int, crons: Sequence[Row[Any]]) -> int:
        """Finished tasks past their type's retention, or their cron's own."""
        total = 0
        for task_type in TASK_TYPES:
            before = now - self.settings.task_retention_ms(task_type)
            total += await self._drain(partial(self.store.prune_tasks, task_type, before))
        for cron in crons:
            if cron.result_retention_ms is not None:
                before = now - cron.result_retention_ms
                total += await self._drain(partial(self.store.prune_cron_tasks, cron.name, before))
        return total

    async def prune_cron_results(self, now: int, crons: Sequence[Row[Any]]) -> int:
        """Cron results past their cron's retention (their fire records go too, uncounted)."""
        default_ms = self.settings.cron_result_retention_s * 1000
        keeps: list[tuple[int | None, int]] = [(None, default_ms)]
        for cron in crons:
            if cron.result_retention_ms is not None:
                keeps.append((cron.id, cron.result_retention_ms))
        total = 0
        for cron_id, keep_ms in keeps:
            before = now - keep_ms
            total += await self._drain(partial(self.store.prune_cron_results, cron_id, before))
            fires_before = min(before, now - FIRE_GUARD_MS)
            await self._drain(partial(self.store.prune_cron_fires, cron_id, fires_before))
        return total

    async def _drain(self, delete: Callable[[int], Awaitable[int]]) -> int:
        """Call ``delete(chunk)`` until it deletes less than a chunk; how many rows went."""
        total = 0
        while True:
            deleted = await delete(self.chunk)
            total += deleted
            if deleted < self.chunk:
                return total
            await asyncio.sleep(0)
