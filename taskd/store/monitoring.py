"""Host monitoring rows: static reports (a row per change), dynamic reports and summaries
(a row per report, keyed by agent and report time), each agent's latest summary, their
queries, deletes and pruning. A summary's rollups are in ``rollups.py``."""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Connection,
    Float,
    Integer,
    String,
    Table,
    bindparam,
    case,
    cast,
    delete,
    func,
    literal_column,
    select,
    true,
    type_coerce,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.sql.expression import ClauseElement

from taskd.models import (
    TENTHS,
    dynamic_monitoring_t,
    static_monitoring_t,
    summary_latest_t,
    summary_point,
    summary_rollup_t,
    summary_t,
)
from taskd.protocol import MAX_MONITORING_ROWS, SUMMARY_FIELDS, MonitoringWindow
from taskd.store.backend import Backend, Driver, Insert
from taskd.store.database import Database
from taskd.store.rollups import (
    ROLLUP_RESOLUTIONS,
    add_to_rollups,
    encoded_array,
)
from taskd.store.writer import HotOp

Kind = Literal["static", "dynamic", "summary"]
TABLES: dict[Kind, Table] = {
    "static": static_monitoring_t,
    "dynamic": dynamic_monitoring_t,
    "summary": summary_t,
}


LAST_CHUNK = 5000
"""Agents looked up by one multi-last statement (each is a bound parameter)."""


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


def _inserter_returning(table: Table) -> Callable[[Backend], ClauseElement]:
    def build(backend: Backend) -> ClauseElement:
        insert = _inserter(table)(backend)
        assert isinstance(insert, Insert)
        return insert.returning(table.c.time)

    return build


def _stored_already(table: Table) -> Callable[[Backend], ClauseElement]:
    """PostgreSQL: which of the (uuid, time) pairs of two aligned arrays are stored, one
    key lookup per pair (a condition on the sets of both reads every row of the agents)."""

    def build(backend: Backend) -> ClauseElement:
        pairs = (
            func.unnest(
                bindparam("uuids", type_=ARRAY(String)), bindparam("times", type_=ARRAY(BigInteger))
            )
            .table_valued("uuid", "time", name="wanted")
            .render_derived()
        )
        return select(table.c.uuid, table.c.time).join(
            pairs, (table.c.uuid == pairs.c.uuid) & (table.c.time == pairs.c.time)
        )

    return build


_INSERT = {"dynamic": _inserter(dynamic_monitoring_t), "summary": _inserter(summary_t)}
_INSERT_RETURNING = {
    "dynamic": _inserter_returning(dynamic_monitoring_t),
    "summary": _inserter_returning(summary_t),
}
_STORED = {"dynamic": _stored_already(dynamic_monitoring_t), "summary": _stored_already(summary_t)}


async def _store_new(
    driver: Driver, kind: Literal["dynamic", "summary"], ops: Sequence[Any]
) -> list[dict[str, Any]]:
    """Insert the rows of ``ops`` not stored yet (the first of a batch for one key); those
    rows. SQLite (in-process, statements cached): one insert per row, which says itself
    whether it stored the row. PostgreSQL: two statements, whatever the number of rows."""
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    for op in ops:
        rows.setdefault((op.row["uuid"], op.row["time"]), op.row)
    backend = driver.backend
    if backend.is_sqlite:
        insert = backend.statement(_INSERT_RETURNING[kind])
        return [row for row in rows.values() if await driver.fetch(insert, *insert.args(row))]
    stored = backend.statement(_STORED[kind])
    keys = sorted(rows)
    found = await driver.fetch(
        stored, *stored.args({"uuids": [u for u, _ in keys], "times": [t for _, t in keys]})
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
    """Store a summary, add it to its 1-minute and 1-hour rollups and make it its agent's
    latest if it is the newest; all waiting ones together, each agent's latest row
    written once per batch."""

    row: Mapping[str, Any]

    @classmethod
    async def run_all(cls, driver: Driver, ops: Sequence[Any]) -> list[Any]:
        stored = await _store_new(driver, "summary", ops)
        await add_to_rollups(driver, stored)
        if stored:
            latest = driver.backend.statement(_latest_upsert)
            await driver.execute_many(latest, [latest.args(row) for row in latest_rows(stored)])
        return [None] * len(ops)


@functools.cache
def _last_points(
    figures: tuple[str, ...], tenths: frozenset[str]
) -> Callable[[Backend], ClauseElement]:
    """The statement of ``summary_last_points`` for ``figures`` (agents bound as ``uuids``):
    each agent's UUID and its point, which SQLite encodes as JSON itself (faster than
    making and encoding a dict per agent in Python; PostgreSQL's JSON is slower)."""

    def build(backend: Backend) -> ClauseElement:
        table = summary_latest_t
        listed, key = backend.listed("uuids")
        ten = literal_column("10", Integer)  # not bound
        values: list[tuple[str, ColumnElement[Any]]] = [
            ("uuid", table.c.uuid),
            ("timestamp", table.c.time),
        ]
        for name in figures:
            column = table.c[name]
            values.append((name, cast(column, Float) / ten if name in tenths else column))
        if backend.is_sqlite:
            pairs = [
                part for name, value in values for part in (literal_column(f"'{name}'"), value)
            ]
            points = [func.json_object(*pairs).label("point")]
        else:
            points = [value.label(name) for name, value in values]
        return select(table.c.uuid.label("agent"), *points).join(listed, table.c.uuid == key)

    return build


def _stored_points(backend: Backend) -> ClauseElement:
    """Each agent's UUID and the point its latest summary keeps (agents bound as ``uuids``)."""
    table = summary_latest_t
    listed, key = backend.listed("uuids")
    return select(table.c.uuid, table.c.point).join(listed, table.c.uuid == key)


def latest_rows(summaries: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each agent's newest of ``summaries`` as the latest-summary table keeps it: with its
    point's JSON, every figure; agents in UUID order (two nodes' batches cannot deadlock)."""
    newest: dict[str, Mapping[str, Any]] = {}
    for row in summaries:
        known = newest.get(row["uuid"])
        if known is None or row["time"] > known["time"]:
            newest[row["uuid"]] = row
    return [
        {**row, "point": orjson.dumps(summary_point(row, SUMMARY_FIELDS)).decode()}
        for _, row in sorted(newest.items())
    ]


def _latest_upsert(backend: Backend) -> ClauseElement:
    """Make a summary its agent's latest unless a newer one is there already."""
    table = summary_latest_t
    names = [column.name for column in table.c]
    insert = backend.insert(table).values({name: bindparam(name) for name in names})
    return insert.on_conflict_do_update(
        index_elements=[table.c.uuid],
        set_={name: insert.excluded[name] for name in names if name != "uuid"},
        where=insert.excluded.time > table.c.time,
    )


def _latest_prune(backend: Backend) -> ClauseElement:
    """Forget an agent's latest summary once it is past the summaries' retention."""
    table = summary_latest_t
    agent = bindparam("uuid", type_=String)
    return delete(table).where(table.c.uuid == agent, table.c.time < bindparam("before"))


def refresh_latest(conn: Connection, agents: Sequence[str] | None) -> None:
    """Rebuild the latest summary of ``agents`` (None: of every agent) from the stored rows."""
    latest = summary_latest_t
    newest = summary_t.alias("newest")
    clauses: list[ColumnElement[bool]] = []
    if agents is not None:
        clauses.append(summary_t.c.uuid.in_(list(agents)))
    conn.execute(
        delete(latest).where(latest.c.uuid.in_(list(agents)))
        if agents is not None
        else delete(latest)
    )
    newest_time = (
        select(func.max(newest.c.time)).where(newest.c.uuid == summary_t.c.uuid).scalar_subquery()
    )
    rows = select(*summary_t.c).where(*clauses, summary_t.c.time == newest_time)
    conn.execute(latest.insert().from_select([c.name for c in summary_t.c], rows))


def _newest_hash(backend: Backend) -> ClauseElement:
    table = static_monitoring_t
    return (
        select(table.c.data_hash)
        .where(table.c.uuid == bindparam("uuid", type_=String))
        .order_by(*_newest_first(table))
        .limit(bindparam("one"))
        .offset(bindparam("skip"))  # SQLite's LIMIT with a parameter comes with an OFFSET
    )


def _static_insert(backend: Backend) -> ClauseElement:
    table = static_monitoring_t
    names = [column.name for column in table.c if column.name != "id"]
    return table.insert().inline().values({name: bindparam(name) for name in names})


@dataclass(eq=False)
class StaticStoredOp(HotOp):
    """Store a static report unless the agent's newest one has the same hash (whether it
    was stored): statements compiled once, on the writer's connection, in order, so that
    of two equal reports waiting together the second is seen as a repeat."""

    row: Mapping[str, Any]

    @classmethod
    async def run_all(cls, driver: Driver, ops: Sequence[Any]) -> list[Any]:
        newest = driver.backend.statement(_newest_hash)
        insert = driver.backend.statement(_static_insert)
        stored = []
        for op in ops:
            found = await driver.fetch(newest, *newest.args({**op.row, "one": 1, "skip": 0}))
            if found and found[0][0] == op.row["data_hash"]:
                stored.append(False)
                continue
            await driver.execute_many(insert, [insert.args(op.row)])
            stored.append(True)
        return stored


def _newest_first(table: Table) -> list[ColumnElement[Any]]:
    """Newest row first (static rows may share a time: the newest id wins)."""
    order: list[ColumnElement[Any]] = [table.c.time.desc()]
    if table is static_monitoring_t:
        order.append(table.c.id.desc())
    return order


def _pruner(kind: Kind | Literal["1m", "1h"]) -> Callable[[Backend], ClauseElement]:
    """DELETE up to ``chunk`` of one agent's rows of ``kind`` older than ``before``, oldest
    first (its newest static report is kept), returning a row per deleted row."""

    def build(backend: Backend) -> ClauseElement:
        if kind == "1m" or kind == "1h":
            table, time = summary_rollup_t, summary_rollup_t.c.bucket
            clauses = [table.c.resolution == bindparam("resolution")]
        else:
            table = TABLES[kind]
            time, clauses = table.c.time, []
        key = table.c.id if table is static_monitoring_t else time
        agent = bindparam("uuid", type_=String)
        chosen = (
            select(key)
            .where(table.c.uuid == agent, time < bindparam("before"), *clauses)
            .order_by(time)
            .limit(bindparam("chunk"))
            .offset(bindparam("skip"))  # SQLite's LIMIT with a parameter comes with an OFFSET
        )
        if table is static_monitoring_t:
            newest = select(func.max(table.c.id)).where(table.c.uuid == agent)
            chosen = chosen.where(key != newest.scalar_subquery())
        return (
            delete(table)
            .where(table.c.uuid == agent, *clauses, key.in_(chosen))
            .returning(table.c.uuid)
        )

    return build


_PRUNE = {kind: _pruner(kind) for kind in ("static", "dynamic", "summary", "1m", "1h")}


@dataclass(eq=False)
class PruneOp(HotOp):
    """Delete a chunk of one agent's old rows of one kind: a statement compiled once, on
    the writer's connection, in the transaction of whatever reports wait with it."""

    kind: Kind | Literal["1m", "1h"]
    agent_uuid: str
    before_ms: int
    chunk: int

    @classmethod
    async def run_all(cls, driver: Driver, ops: Sequence[Any]) -> list[Any]:
        counts = []
        for op in ops:
            statement = driver.backend.statement(_PRUNE[op.kind])
            values = {
                "uuid": op.agent_uuid,
                "before": op.before_ms,
                "chunk": op.chunk,
                "skip": 0,
                "resolution": ROLLUP_RESOLUTIONS.get(op.kind),
            }
            counts.append(len(await driver.fetch(statement, *statement.args(values))))
            if op.kind == "summary":
                forget = driver.backend.statement(_latest_prune)
                await driver.execute_many(forget, [forget.args(values)])
        return counts


class MonitoringQueries(Database):
    """Host monitoring rows."""

    async def store_static(self, row: Mapping[str, Any]) -> bool:
        """Store a static report unless the agent's newest one has the same hash; whether stored."""
        return bool(await self.submit(StaticStoredOp(row)))

    async def store_report(
        self, kind: Literal["dynamic", "summary"], row: Mapping[str, Any]
    ) -> None:
        """Store a dynamic report or summary, answered once committed; one stored for that
        time already is kept (a resend). A stored summary is added to its rollups."""
        full = {column.name: row.get(column.name) for column in TABLES[kind].c}
        await self.submit(DynamicStoredOp(full) if kind == "dynamic" else SummaryStoredOp(full))

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

    async def summary_last_points(
        self, uuids: Sequence[str], figures: Sequence[str], tenths: Collection[str] = ()
    ) -> orjson.Fragment:
        """The newest summary of each agent in ``uuids`` that has one, in the order asked, as
        a JSON array of points: ``uuid``, ``timestamp`` and ``figures`` (those in ``tenths``
        divided by ten), from the latest-summary table (one row per agent).

        Every figure in NodeGet's order is the point each row keeps encoded; other figures,
        and rows without their point, are made by the database, with a statement compiled
        once per set of figures, read on the driver's own cursor."""
        asked = list(dict.fromkeys(uuids))
        tenths = frozenset(tenths).intersection(figures)
        found: dict[str, bytes] = {}
        made = asked  # the agents whose points the database makes from the columns
        if tuple(figures) == SUMMARY_FIELDS and tenths == TENTHS:
            made = []
            for chunk in self._chunks(asked):
                for agent, point in await self.read_rows(_stored_points, {"uuids": chunk}):
                    if point is None:
                        made.append(agent)
                    else:
                        found[agent] = point.encode()
        build = _last_points(tuple(figures), tenths)
        keys = self.backend.statement(build).columns[1:]
        for chunk in self._chunks(made):
            rows = await self.read_rows(build, {"uuids": chunk})
            if self.is_sqlite:
                found.update((agent, point.encode()) for agent, point in rows)
            else:
                for row in rows:
                    found[row[0]] = orjson.dumps(dict(zip(keys, row[1:], strict=True)))
        return encoded_array(found[uuid] for uuid in asked if uuid in found)

    def _chunks(self, uuids: list[str]) -> list[Any]:
        """``uuids`` as list arguments of at most LAST_CHUNK."""
        return [
            self.backend.list_arg(uuids[start : start + LAST_CHUNK])
            for start in range(0, len(uuids), LAST_CHUNK)
        ]

    async def monitoring_last(
        self, kind: Kind, uuids: Sequence[str], columns: Sequence[ColumnElement[Any]] = ()
    ) -> list[dict[str, Any]]:
        """The newest row of each agent in ``uuids`` that has one, in the order asked (only
        ``columns`` of it if given; they must include ``uuid``, and ``id`` for static rows).

        One index seek per agent, whatever the number of rows each agent has: on SQLite
        the newest time of the agent, then its row by key; on PostgreSQL a lateral join
        taking the first row of a backward scan of the agent's key (a join on the newest
        time there is planned as a hash join over the whole table).
        """
        table = summary_latest_t if kind == "summary" else TABLES[kind]
        if kind == "summary":  # the columns of a summary (not the latest's point)
            columns = [table.c[column.name] for column in columns or summary_t.c]
        asked = list(dict.fromkeys(uuids))
        listed, key = self.backend.listed("uuids")
        statement: Any
        if table is summary_latest_t:  # one row per agent: a join on the key
            statement = select(*(columns or table.c)).join(listed, table.c.uuid == key)
        elif not self.is_sqlite:
            newest = (
                select(*(columns or table.c))
                .where(table.c.uuid == key)
                .order_by(*_newest_first(table))
                .limit(1)
                .lateral("newest")
            )
            statement = select(newest).select_from(listed).join(newest, true())
        else:
            inner = table.alias("newest")
            newest_time = (
                select(func.max(inner.c.time)).where(inner.c.uuid == key).scalar_subquery()
            )
            last = (
                select(key.label("uuid"), newest_time.label("time")).select_from(listed).subquery()
            )
            statement = (
                select(*(columns or table.c))
                .select_from(table)
                .join(last, (table.c.uuid == last.c.uuid) & (table.c.time == last.c.time))
            )
        chunks = self._chunks(asked)

        def fetch(conn: Connection) -> list[dict[str, Any]]:
            found: dict[str, dict[str, Any]] = {}
            for chunk in chunks:
                for row in conn.execute(statement, {"uuids": chunk}):
                    # static rows may share a time: the newest id wins
                    if row.uuid not in found or (
                        kind == "static" and row.id > found[row.uuid]["id"]
                    ):
                        found[row.uuid] = dict(row._mapping)
            return [found[uuid] for uuid in asked if uuid in found]

        return await self.read(fetch)

    async def static_values_last(
        self, uuids: Sequence[str], paths: Mapping[str, tuple[str, tuple[str | int, ...]]]
    ) -> list[dict[str, Any]]:
        """Values inside the newest static report of each agent in ``uuids`` that has one:
        ``uuid``, ``time`` and, per name in ``paths`` (column, JSON path), the string or
        number found there, None for anything else. Read in SQL, so large reports (a core
        list per CPU) are not decoded for a few of their values."""
        table = static_monitoring_t
        columns: list[ColumnElement[Any]] = [table.c.uuid, table.c.time, table.c.id]
        for name, (column, path) in paths.items():
            document = table.c[column]
            value: ColumnElement[Any]
            if self.is_sqlite:
                where = "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path)
                scalar = func.json_type(document, where).in_(("text", "integer", "real"))
                value = func.json_extract(document, where)
            else:
                keys = bindparam(f"path_{name}", [str(p) for p in path], ARRAY(String))
                found = document.op("#>")(keys)
                scalar = func.jsonb_typeof(found).in_(("string", "number"))
                value = type_coerce(found, JSONB)
            columns.append(case((scalar, value)).label(name))
        return await self.monitoring_last("static", uuids, columns)

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
                deleted = int(conn.execute(statement).rowcount)
            else:
                deleted = 0
                for uuid, value in conn.execute(chosen).all():
                    deleted += conn.execute(
                        delete(table).where(table.c.uuid == uuid, key == value)
                    ).rowcount
            if kind == "summary" and deleted:
                refresh_latest(conn, window.uuids or None)
            return deleted

        return await self.write(remove)

    async def prune_monitoring(
        self, kind: Kind | Literal["1m", "1h"], agent_uuid: str, before_ms: int, chunk: int
    ) -> int:
        """Delete up to ``chunk`` of one agent's rows older than ``before_ms``, oldest first
        (its newest static report is always kept); how many went."""
        return int(await self.submit(PruneOp(kind, agent_uuid, before_ms, chunk)))
