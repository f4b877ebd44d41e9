"""Host monitoring rows: static reports (a row per change), dynamic reports and summaries
(a row per report, keyed by agent and report time), their queries and deletes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from sqlalchemy import ColumnElement, Connection, Table, delete, func, select

from taskd.models import dynamic_monitoring_t, static_monitoring_t, summary_t
from taskd.protocol import MAX_MONITORING_ROWS, MonitoringWindow
from taskd.store.database import Database

Kind = Literal["static", "dynamic", "summary"]
TABLES: dict[Kind, Table] = {
    "static": static_monitoring_t,
    "dynamic": dynamic_monitoring_t,
    "summary": summary_t,
}


def _where(window: MonitoringWindow, table: Table) -> list[ColumnElement[bool]]:
    """The SQL conditions of ``window`` on ``table``."""
    clauses: list[ColumnElement[bool]] = [table.c.uuid == uuid for uuid in window.uuids]
    if window.time_from is not None:
        clauses.append(table.c.time >= window.time_from)
    if window.time_to is not None:
        clauses.append(table.c.time <= window.time_to)
    if window.storage_from is not None:
        clauses.append(table.c.storage_time >= window.storage_from)
    if window.storage_to is not None:
        clauses.append(table.c.storage_time <= window.storage_to)
    return clauses


class MonitoringQueries(Database):
    """Host monitoring rows."""

    async def store_static(self, row: Mapping[str, Any]) -> bool:
        """Store a static report unless the agent's newest one has the same hash; whether stored."""
        newest = (
            select(static_monitoring_t.c.data_hash)
            .where(static_monitoring_t.c.uuid == row["uuid"])
            .order_by(static_monitoring_t.c.time.desc(), static_monitoring_t.c.id.desc())
            .limit(1)
        )
        insert = static_monitoring_t.insert().values(**row)

        def store(conn: Connection) -> bool:
            if conn.execute(newest).scalar() == row["data_hash"]:
                return False
            conn.execute(insert)
            return True

        return await self.write(store)

    async def store_report(
        self, kind: Literal["dynamic", "summary"], row: Mapping[str, Any]
    ) -> None:
        """Store a dynamic report or summary; one stored for that time already is kept."""
        table = TABLES[kind]
        statement = (
            self.backend.insert(table)
            .values(**row)
            .on_conflict_do_nothing(index_elements=[table.c.uuid, table.c.time])
        )

        def store(conn: Connection) -> None:
            conn.execute(statement)

        await self.write(store)

    async def monitoring_rows(self, kind: Kind, window: MonitoringWindow) -> list[dict[str, Any]]:
        """The rows of ``window`` (at most MAX_MONITORING_ROWS), as column mappings."""
        table = TABLES[kind]
        statement = select(table).where(*_where(window, table))
        if window.limit is not None:
            statement = statement.order_by(table.c.time.desc()).limit(
                min(window.limit, MAX_MONITORING_ROWS)
            )
        else:
            statement = statement.order_by(table.c.time.asc()).limit(MAX_MONITORING_ROWS)

        def fetch(conn: Connection) -> list[dict[str, Any]]:
            return [dict(row._mapping) for row in conn.execute(statement)]

        return await self.read(fetch)

    async def monitoring_last(self, kind: Kind, uuids: Sequence[str]) -> list[dict[str, Any]]:
        """The newest row of each agent in ``uuids`` that has one, in the order asked."""
        table = TABLES[kind]
        newest = (
            select(table.c.uuid, func.max(table.c.time).label("time"))
            .where(table.c.uuid.in_(set(uuids)))
            .group_by(table.c.uuid)
            .subquery()
        )
        statement = select(table).join(
            newest, (table.c.uuid == newest.c.uuid) & (table.c.time == newest.c.time)
        )

        def fetch(conn: Connection) -> list[dict[str, Any]]:
            found: dict[str, dict[str, Any]] = {}
            for row in conn.execute(statement):
                found.setdefault(row.uuid, dict(row._mapping))
            return [found[uuid] for uuid in dict.fromkeys(uuids) if uuid in found]

        return await self.read(fetch)

    async def delete_monitoring(self, kind: Kind, window: MonitoringWindow) -> int:
        """Delete the rows of ``window`` (with a limit: the newest ones); how many went."""
        table = TABLES[kind]
        key = table.c.id if kind == "static" else table.c.time
        if window.limit is not None:
            chosen = (
                select(table.c.uuid, key)
                .where(*_where(window, table))
                .order_by(table.c.time.desc())
                .limit(window.limit)
            )
        statement = delete(table).where(*_where(window, table))

        def remove(conn: Connection) -> int:
            if window.limit is None:
                return int(conn.execute(statement).rowcount)
            deleted = 0
            for uuid, value in conn.execute(chosen).all():
                deleted += conn.execute(
                    delete(table).where(table.c.uuid == uuid, key == value)
                ).rowcount
            return deleted

        return await self.write(remove)
