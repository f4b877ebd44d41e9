"""The dashboard's fleet read: a few figures of each agent's newest summary, one statement
per chunk of agents, plain tuples (the live feed reads every agent every second)."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import Connection, select
from sqlalchemy.sql.expression import ClauseElement

from taskd.models import summary_latest_t
from taskd.store.backend import Backend
from taskd.store.database import Database

CHUNK = 5000
"""Agents looked up by one statement."""


@functools.cache
def _newest(names: tuple[str, ...]) -> Callable[[Backend], ClauseElement]:
    """``(uuid, time, storage_time, *names)`` from the latest-summary table of the agents
    bound as ``uuids`` (compiled once per set of names)."""

    def build(backend: Backend) -> ClauseElement:
        table = summary_latest_t
        listed, key = backend.listed("uuids")
        columns = [table.c.uuid, table.c.time, table.c.storage_time, *(table.c[n] for n in names)]
        return select(*columns).join(listed, table.c.uuid == key)

    return build


class FleetQueries(Database):
    """Each agent's newest figures, for the live fleet."""

    async def newest_figures(
        self, uuids: Sequence[str], names: Sequence[str]
    ) -> tuple[list[tuple[Any, ...]], float]:
        """``(uuid, time, storage_time, *names)`` of the newest summary of each agent in
        ``uuids`` that has one (a key lookup per agent), and the CPU seconds the read took
        on the thread that ran it (the live feed counts its cost)."""
        statement = self.backend.statement(_newest(tuple(names)))
        chunks = [
            statement.args({"uuids": self.backend.list_arg(uuids[start : start + CHUNK])})
            for start in range(0, len(uuids), CHUNK)
        ]
        if not self.is_sqlite:  # asyncpg reads on this thread
            started = time.thread_time()
            rows: list[tuple[Any, ...]] = []
            for args in chunks:
                rows.extend(
                    map(tuple, await self._reading(self.backend.read_rows(statement, args)))
                )
            return rows, time.thread_time() - started

        def fetch(conn: Connection) -> tuple[list[tuple[Any, ...]], float]:
            started = time.thread_time()
            rows: list[tuple[Any, ...]] = []
            cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
            try:
                for args in chunks:  # sqlite3's own cursor: tuples as they come
                    rows.extend(cursor.execute(statement.sql, args).fetchall())
            finally:
                cursor.close()
            return rows, time.thread_time() - started

        return await self.read(fetch)
