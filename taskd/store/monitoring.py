"""Host monitoring rows: static reports (a row per change), dynamic reports and summaries
(a row per report, keyed by agent and report time), their queries and deletes."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import (
    ColumnElement,
    Connection,
    String,
    Table,
    bindparam,
    case,
    delete,
    func,
    select,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.sql.expression import ClauseElement

from taskd.models import (
    ROLLUP_FIGURES,
    ROLLUP_PARTS,
    dynamic_monitoring_t,
    static_monitoring_t,
    summary_rollup_t,
    summary_t,
)
from taskd.protocol import MAX_MONITORING_ROWS, MonitoringWindow
from taskd.store.backend import Backend, Driver
from taskd.store.database import Database
from taskd.store.writer import HotOp

Kind = Literal["static", "dynamic", "summary"]
TABLES: dict[Kind, Table] = {
    "static": static_monitoring_t,
    "dynamic": dynamic_monitoring_t,
    "summary": summary_t,
}


LAST_CHUNK = 5000
"""Agents looked up by one multi-last statement (each is a bound parameter)."""
ROLLUP_RESOLUTIONS: dict[str, int] = {"1m": 60_000, "1h": 3_600_000}
"""The rollups kept, by name, in ms per bucket."""


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


def _inserter(table: Table) -> Callable[[Backend], ClauseElement]:
    def build(backend: Backend) -> ClauseElement:
        names = [column.name for column in table.c]
        insert = backend.insert(table).values({name: bindparam(name) for name in names})
        return insert.on_conflict_do_nothing(index_elements=[table.c.uuid, table.c.time])

    return build


def _stored_already(table: Table) -> Callable[[Backend], ClauseElement]:
    def build(backend: Backend) -> ClauseElement:
        return select(table.c.uuid, table.c.time).where(
            backend.one_of(table.c.uuid, "uuids"), backend.one_of(table.c.time, "times")
        )

    return build


_INSERT = {"dynamic": _inserter(dynamic_monitoring_t), "summary": _inserter(summary_t)}
_STORED = {"dynamic": _stored_already(dynamic_monitoring_t), "summary": _stored_already(summary_t)}


def _rollup_upsert(backend: Backend) -> ClauseElement:
    """Add a batch's figures to a rollup bucket: counts and sums add up, min and max hold."""
    names = [column.name for column in summary_rollup_t.c]
    insert = backend.insert(summary_rollup_t).values({name: bindparam(name) for name in names})
    new, old = insert.excluded, summary_rollup_t.c
    changes: dict[str, Any] = {}
    for name in ROLLUP_FIGURES:
        count, total, low, high = (f"{name}_{part}" for part in ROLLUP_PARTS)
        changes[count] = old[count] + new[count]
        changes[total] = case(
            (new[total].is_(None), old[total]),
            (old[total].is_(None), new[total]),
            else_=old[total] + new[total],
        )
        changes[low] = case((old[low].is_(None) | (new[low] < old[low]), new[low]), else_=old[low])
        changes[high] = case(
            (old[high].is_(None) | (new[high] > old[high]), new[high]), else_=old[high]
        )
    return insert.on_conflict_do_update(
        index_elements=[old.uuid, old.resolution, old.bucket], set_=changes
    )


def _add_to_buckets(
    buckets: dict[tuple[str, int, int], dict[str, Any]], row: Mapping[str, Any]
) -> None:
    for resolution in ROLLUP_RESOLUTIONS.values():
        key = (row["uuid"], resolution, row["time"] - row["time"] % resolution)
        bucket = buckets.get(key)
        if bucket is None:
            bucket = buckets[key] = {"uuid": key[0], "resolution": key[1], "bucket": key[2]}
            for name in ROLLUP_FIGURES:
                bucket[f"{name}_count"] = 0
                bucket[f"{name}_sum"] = bucket[f"{name}_min"] = bucket[f"{name}_max"] = None
        for name in ROLLUP_FIGURES:
            value = row.get(name)
            if value is None:
                continue
            bucket[f"{name}_count"] += 1
            if bucket[f"{name}_sum"] is None:
                bucket[f"{name}_sum"] = bucket[f"{name}_min"] = bucket[f"{name}_max"] = value
            else:
                bucket[f"{name}_sum"] += value
                bucket[f"{name}_min"] = min(bucket[f"{name}_min"], value)
                bucket[f"{name}_max"] = max(bucket[f"{name}_max"], value)


async def _store_new(
    driver: Driver, kind: Literal["dynamic", "summary"], ops: Sequence[Any]
) -> list[dict[str, Any]]:
    """Insert the rows of ``ops`` not stored yet (the first of a batch for one key); those
    rows. All waiting reports are two statements, whatever their number."""
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    for op in ops:
        rows.setdefault((op.row["uuid"], op.row["time"]), op.row)
    backend = driver.backend
    stored = backend.statement(_STORED[kind])
    found = await driver.fetch(
        stored,
        *stored.args(
            {
                "uuids": backend.list_arg(sorted({u for u, _ in rows})),
                "times": backend.list_arg(sorted({t for _, t in rows})),
            }
        ),
    )
    for uuid, time in found:
        rows.pop((uuid, time), None)
    if rows:
        insert = backend.statement(_INSERT[kind])
        await driver.execute_many(insert, [insert.args(row) for _, row in sorted(rows.items())])
    return list(rows.values())


@dataclass(eq=False)
class DynamicStoredOp(HotOp):
    """Store a dynamic report; all waiting ones together."""

    row: Mapping[str, Any]

    @classmethod
    async def run_all(cls, driver: Driver, ops: Sequence[Any]) -> list[Any]:
        await _store_new(driver, "dynamic", ops)
        return [None] * len(ops)


@dataclass(eq=False)
class SummaryStoredOp(HotOp):
    """Store a summary and add it to its 1-minute and 1-hour rollups; all waiting ones
    together, each bucket updated once per batch."""

    row: Mapping[str, Any]

    @classmethod
    async def run_all(cls, driver: Driver, ops: Sequence[Any]) -> list[Any]:
        buckets: dict[tuple[str, int, int], dict[str, Any]] = {}
        for row in await _store_new(driver, "summary", ops):
            _add_to_buckets(buckets, row)
        if buckets:
            upsert = driver.backend.statement(_rollup_upsert)
            # in key order, so batches of two nodes cannot deadlock on each other's rows
            await driver.execute_many(upsert, [upsert.args(b) for _, b in sorted(buckets.items())])
        return [None] * len(ops)


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
        """Store a dynamic report or summary, answered once committed; one stored for that
        time already is kept (a resend). A stored summary is added to its rollups."""
        full = {column.name: row.get(column.name) for column in TABLES[kind].c}
        await self.submit(DynamicStoredOp(full) if kind == "dynamic" else SummaryStoredOp(full))

    async def rollup_rows(self, resolution: int, window: MonitoringWindow) -> list[dict[str, Any]]:
        """The rollup buckets of ``window`` (bucket start as ``time``; at most
        MAX_MONITORING_ROWS), as column mappings."""
        table = summary_rollup_t
        clauses = [table.c.resolution == resolution, *(table.c.uuid == u for u in window.uuids)]
        if window.time_from is not None:
            clauses.append(table.c.bucket >= window.time_from - window.time_from % resolution)
        if window.time_to is not None:
            clauses.append(table.c.bucket <= window.time_to)
        statement = select(table, table.c.bucket.label("time")).where(*clauses)
        if window.limit is not None:
            statement = statement.order_by(table.c.bucket.desc())
        else:
            statement = statement.order_by(table.c.bucket.asc())
        statement = statement.limit(min(window.limit or MAX_MONITORING_ROWS, MAX_MONITORING_ROWS))

        def fetch(conn: Connection) -> list[dict[str, Any]]:
            return [dict(row._mapping) for row in conn.execute(statement)]

        return await self.read(fetch)

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
        """The newest row of each agent in ``uuids`` that has one, in the order asked.

        One index seek per agent (the newest time of the agent, then its row by key),
        whatever the number of rows each agent has.
        """
        table = TABLES[kind]
        asked = list(dict.fromkeys(uuids))
        statements = []
        for start in range(0, len(asked), LAST_CHUNK):
            chunk = asked[start : start + LAST_CHUNK]
            key: ColumnElement[Any]
            listed: Any
            if self.is_sqlite:  # SQLite names no columns of a VALUES list: a JSON array
                listed = func.json_each(self.backend.list_arg(chunk)).table_valued(
                    "value", name="wanted"
                )
                key = listed.c.value
            else:  # one array parameter, however many agents
                listed = (
                    func.unnest(bindparam("uuids", value=list(chunk), type_=ARRAY(String)))
                    .table_valued("uuid", name="wanted")
                    .render_derived()
                )
                key = listed.c.uuid
            inner = table.alias("newest")
            newest_time = (
                select(func.max(inner.c.time)).where(inner.c.uuid == key).scalar_subquery()
            )
            last = (
                select(key.label("uuid"), newest_time.label("time")).select_from(listed).subquery()
            )
            statements.append(
                select(table).join(
                    last, (table.c.uuid == last.c.uuid) & (table.c.time == last.c.time)
                )
            )

        def fetch(conn: Connection) -> list[dict[str, Any]]:
            found: dict[str, dict[str, Any]] = {}
            for statement in statements:
                for row in conn.execute(statement):
                    # static rows may share a time: the newest id wins
                    if row.uuid not in found or (
                        kind == "static" and row.id > found[row.uuid]["id"]
                    ):
                        found[row.uuid] = dict(row._mapping)
            return [found[uuid] for uuid in asked if uuid in found]

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

    async def prune_monitoring(
        self, kind: Kind | Literal["1m", "1h"], agent_uuid: str, before_ms: int, chunk: int
    ) -> int:
        """Delete up to ``chunk`` of one agent's rows older than ``before_ms``, oldest first
        (its newest static report is always kept); how many went."""
        if kind in ROLLUP_RESOLUTIONS:
            table, time = summary_rollup_t, summary_rollup_t.c.bucket
            clauses = [table.c.resolution == ROLLUP_RESOLUTIONS[kind]]
        else:
            table = TABLES[kind]  # type: ignore[index]
            time, clauses = table.c.time, []
        key = table.c.id if table is static_monitoring_t else time
        chosen = (
            select(key)
            .where(table.c.uuid == agent_uuid, time < before_ms, *clauses)
            .order_by(time)
            .limit(chunk)
        )
        if table is static_monitoring_t:
            newest = select(func.max(table.c.id)).where(table.c.uuid == agent_uuid)
            chosen = chosen.where(key != newest.scalar_subquery())
        statement = delete(table).where(table.c.uuid == agent_uuid, *clauses, key.in_(chosen))

        def remove(conn: Connection) -> int:
            return int(conn.execute(statement).rowcount)

        return await self.write(remove)
