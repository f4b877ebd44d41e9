"""The database: every statement of taskd, built from the tables of ``models.py``.

- ``database.py``  the base: backend, writer, migrations, ``read`` / ``write``
- ``writer.py``    the group-commit writer every write goes through
- ``backend.py``   what a database gives the store; ``sqlite.py`` and ``postgres.py``
- ``tasks.py``, ``agents.py``, ``tokens.py``, ``crons.py``, ``kv.py``, ``nodes.py``,
  ``monitoring.py``, ``rollups.py``, ``alerts.py``, ``fleet.py`` (the dashboard's live read)
                   the queries and writes of each table, ``Store`` has them all
- ``records.py``   the task rows handed in and out
- ``point_cache.py`` rollup charts kept encoded, to answer a chart asked again

A caller is answered after its write is committed. The store raises domain errors
(``NotFound``, ``AlreadyUploaded`` ...) and knows nothing of RPC.
"""

from __future__ import annotations

from typing import Any

from taskd.models import task_t
from taskd.store.agents import AgentQueries
from taskd.store.alerts import AlertQueries
from taskd.store.backend import Channels
from taskd.store.crons import CronQueries
from taskd.store.fleet import FleetQueries
from taskd.store.kv import KvQueries
from taskd.store.monitoring import MonitoringQueries
from taskd.store.nodes import NodeQueries
from taskd.store.point_cache import PointCache
from taskd.store.records import NewTask, QueuedTask
from taskd.store.rollups import RollupQueries
from taskd.store.tasks import TaskQueries
from taskd.store.tokens import SUPER_USERNAME, TokenQueries

__all__ = [
    "SUPER_USERNAME",
    "Channels",
    "NewTask",
    "QueuedTask",
    "Store",
    "task_t",
]


class Store(
    TaskQueries,
    AgentQueries,
    TokenQueries,
    CronQueries,
    KvQueries,
    NodeQueries,
    MonitoringQueries,
    RollupQueries,
    AlertQueries,
    FleetQueries,
):
    """The database behind taskd; an async context manager (see ``Database``).

    Args:
        point_cache_bytes: at most this much of rollup points kept encoded
            (``point_cache.py``); 0, the default, keeps none.
        options: those of ``Database``.
    """

    def __init__(self, url: str, *, point_cache_bytes: int = 0, **options: Any) -> None:
        super().__init__(url, **options)
        self.point_cache = PointCache(point_cache_bytes)

    async def __aenter__(self) -> Store:
        await super().__aenter__()
        return self
