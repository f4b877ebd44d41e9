"""Host monitoring rows: static reports (a row per change), dynamic reports and summaries
(a row per report, keyed by agent and report time), their queries and deletes."""

from __future__ import annotations

import dataclasses
import functools
import operator
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
    ROLLUP_FIGURES,
    ROLLUP_PARTS,
    TENTHS,
    dynamic_monitoring_t,
    static_monitoring_t,
    summary_latest_t,
    summary_point,
    summary_rollup_t,
    summary_t,
)
from taskd.protocol import MAX_MONITORING_ROWS, SUMMARY_FIELDS, MonitoringWindow
from taskd.store.backend import Backend, Driver, Insert, Statement
from taskd.store.database import Database
from taskd.store.point_cache import PointCache, Version
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


def _rollup_upsert(backend: Backend) -> ClauseElement:
    """Add a batch's figures to a rollup bucket: counts and sums add up, min and max hold.

    NULL (no report had the figure) gives way to a value: ``coalesce`` for sums, and for
    min and max SQLite's two-argument ``min``/``max`` over both coalesced (each NULL only
    where the other is), PostgreSQL's ``least``/``greatest`` (which skip NULLs)."""
    names = [column.name for column in summary_rollup_t.c]
    insert = backend.insert(summary_rollup_t).values({name: bindparam(name) for name in names})
    new, old = insert.excluded, summary_rollup_t.c
    lower, upper = (func.min, func.max) if backend.is_sqlite else (func.least, func.greatest)
    changes: dict[str, Any] = {}
    for name in ROLLUP_FIGURES:
        count, total, low, high = (f"{name}_{part}" for part in ROLLUP_PARTS)
        changes[count] = old[count] + new[count]
        changes[total] = func.coalesce(old[total] + new[total], old[total], new[total])
        both_low: tuple[ColumnElement[Any], ColumnElement[Any]]
        both_high: tuple[ColumnElement[Any], ColumnElement[Any]]
        if backend.is_sqlite:
            both_low = (func.coalesce(old[low], new[low]), func.coalesce(new[low], old[low]))
            both_high = (func.coalesce(old[high], new[high]), func.coalesce(new[high], old[high]))
        else:
            both_low, both_high = (old[low], new[low]), (old[high], new[high])
        changes[low] = lower(*both_low)
        changes[high] = upper(*both_high)
    return insert.on_conflict_do_update(
        index_elements=[old.uuid, old.resolution, old.bucket], set_=changes
    )


_FIGURES = operator.itemgetter(*ROLLUP_FIGURES)
"""A summary row's figures, in rollup column order."""
_ROLLUP_COLUMNS = {column.name: index for index, column in enumerate(summary_rollup_t.c)}
_rollup_order: dict[str, Callable[[list[Any]], Sequence[Any]]] = {}


def _rollup_args(statement: Statement, bucket: list[Any]) -> Sequence[Any]:
    """The upsert's arguments from a bucket laid out in column order (no mapping per row)."""
    order = _rollup_order.get(statement.sql)
    if order is None:
        order = _rollup_order[statement.sql] = operator.itemgetter(
            *(_ROLLUP_COLUMNS[name] for name in statement.names)
        )
    return order(bucket)


def _figures(row: Mapping[str, Any]) -> list[Any]:
    """One row's count, sum, min and max of each figure, in rollup column order."""
    parts: list[Any] = []
    for value in _FIGURES(row):
        parts += (0, None, None, None) if value is None else (1, value, value, value)
    return parts


def _merge(parts: list[Any], more: list[Any]) -> None:
    """Add ``more`` (laid out as ``_figures``) into ``parts``."""
    for index in range(0, len(parts), 4):
        if not more[index]:
            continue
        if not parts[index]:
            parts[index : index + 4] = more[index : index + 4]
            continue
        parts[index] += more[index]
        parts[index + 1] += more[index + 1]
        parts[index + 2] = min(parts[index + 2], more[index + 2])
        parts[index + 3] = max(parts[index + 3], more[index + 3])


def _add_to_buckets(buckets: dict[tuple[str, int, int], list[Any]], row: Mapping[str, Any]) -> None:
    """Add one summary row to its 1-minute and 1-hour buckets (column-ordered lists)."""
    parts = _figures(row)
    uuid, time = row["uuid"], row["time"]
    for resolution in ROLLUP_RESOLUTIONS.values():
        key = (uuid, resolution, time - time % resolution)
        bucket = buckets.get(key)
        if bucket is None:
            buckets[key] = [*key, *parts]
        else:
            merged = bucket[3:]
            _merge(merged, parts)
            bucket[3:] = merged


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
    latest if it is the newest; all waiting ones together, each bucket and each agent's
    latest row written once per batch."""

    row: Mapping[str, Any]

    @classmethod
    async def run_all(cls, driver: Driver, ops: Sequence[Any]) -> list[Any]:
        buckets: dict[tuple[str, int, int], list[Any]] = {}
        newest: dict[str, Mapping[str, Any]] = {}
        for row in await _store_new(driver, "summary", ops):
            _add_to_buckets(buckets, row)
            known = newest.get(row["uuid"])
            if known is None or row["time"] > known["time"]:
                newest[row["uuid"]] = row
        backend = driver.backend
        # in key order, so batches of two nodes cannot deadlock on each other's rows
        if buckets:
            upsert = backend.statement(_rollup_upsert)
            await driver.execute_many(
                upsert, [_rollup_args(upsert, b) for _, b in sorted(buckets.items())]
            )
        if newest:
            latest = backend.statement(_latest_upsert)
            await driver.execute_many(
                latest, [latest.args(_with_point(newest[u])) for u in sorted(newest)]
            )
        return [None] * len(ops)


@dataclass(frozen=True)
class _RollupShape:
    """What a rollup query's statement depends on (its values are bound)."""

    resolution: str
    figures: tuple[str, ...]
    tenths: frozenset[str]
    by_agent: bool
    has_from: bool
    has_to: bool
    newest_first: bool


def _rollup_version(backend: Backend) -> list[ColumnElement[Any]]:
    """A rollup row's version (see ``point_cache.py``): its identity and its samples."""
    table = summary_rollup_t
    identity = literal_column("rowid" if backend.is_sqlite else "xmin::text::bigint", BigInteger)
    samples = functools.reduce(operator.add, (table.c[f"{name}_count"] for name in ROLLUP_FIGURES))
    return [identity.label("row_identity"), samples.label("samples")]


def _rollup_select(
    shape: _RollupShape, backend: Backend, columns: list[ColumnElement[Any]]
) -> ClauseElement:
    """``columns`` of the rollup buckets a query of ``shape`` answers, in its order."""
    table = summary_rollup_t
    clauses = [table.c.resolution == bindparam("resolution", type_=BigInteger)]
    if shape.by_agent:
        clauses.append(table.c.uuid == bindparam("uuid", type_=String))
    if shape.has_from:
        clauses.append(table.c.bucket >= bindparam("time_from", type_=BigInteger))
    if shape.has_to:
        clauses.append(table.c.bucket <= bindparam("time_to", type_=BigInteger))
    order = table.c.bucket.desc() if shape.newest_first else table.c.bucket.asc()
    return (
        select(*columns).where(*clauses).order_by(order).limit(bindparam("limit", type_=BigInteger))
    )


@functools.cache
def _rollup_versions(shape: _RollupShape) -> Callable[[Backend], ClauseElement]:
    """The buckets a query of ``shape`` answers, with their versions."""

    def build(backend: Backend) -> ClauseElement:
        bucket = summary_rollup_t.c.bucket
        return _rollup_select(shape, backend, [bucket, *_rollup_version(backend)])

    return build


@functools.cache
def _rollup_points(shape: _RollupShape) -> Callable[[Backend], ClauseElement]:
    """The statement of ``rollup_points`` for queries of ``shape`` (one builder per shape,
    so the backend compiles it once): each bucket's version, then its point."""

    def build(backend: Backend) -> ClauseElement:
        table = summary_rollup_t
        points: list[ColumnElement[Any]] = [
            *_rollup_version(backend),
            table.c.uuid,
            table.c.bucket.label("timestamp"),
            literal_column(f"'{shape.resolution}'", String).label("resolution"),
        ]
        zero, ten = literal_column("0", Integer), literal_column("10", Integer)  # not bound
        for name in shape.figures:
            count, total, low, high = (table.c[f"{name}_{part}"] for part in ROLLUP_PARTS)
            scaled = name in shape.tenths
            points.append(
                case((count > zero, total / (count * ten if scaled else count))).label(name)
            )
            for part, column in (("min", low), ("max", high)):
                value = cast(column, Float) / ten if scaled else column
                points.append(value.label(f"{name}_{part}"))
        return _rollup_select(shape, backend, points)

    return build


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


def _array(items: Iterable[bytes]) -> orjson.Fragment:
    """A JSON array of items encoded already."""
    return orjson.Fragment(b"[" + b",".join(items) + b"]")


def _with_point(row: Mapping[str, Any]) -> dict[str, Any]:
    """A summary row for the latest-summary table: with its point's JSON, every figure."""
    return {**row, "point": orjson.dumps(summary_point(row, SUMMARY_FIELDS)).decode()}


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

    point_cache: PointCache
    """Rollup points kept encoded (``Store`` makes it)."""

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

    async def rollup_points(
        self,
        resolution: str,
        window: MonitoringWindow,
        figures: Sequence[str],
        tenths: Collection[str] = (),
    ) -> orjson.Fragment:
        """The rollup buckets of ``window`` (at most MAX_MONITORING_ROWS) as a JSON array of
        points: ``uuid``, ``timestamp`` (the bucket's start), ``resolution``, and for each of
        ``figures`` its average, ``<figure>_min`` and ``<figure>_max`` (those in ``tenths``
        divided by ten).

        The database computes the points, so that a point is made of one row without a
        Python call per figure (a 30-day chart is about 35,000 figures), from a statement
        compiled once per shape of query and read on the driver's own cursor. One agent's
        points are kept encoded (``point_cache.py``): a chart asked again reads only the
        versions of its buckets and fetches the points of those that changed."""
        step = ROLLUP_RESOLUTIONS[resolution]
        if len(set(window.uuids)) > 1:
            return orjson.Fragment(b"[]")  # a bucket belongs to one agent
        shape = _RollupShape(
            resolution,
            tuple(figures),
            frozenset(tenths).intersection(figures),
            bool(window.uuids),
            window.time_from is not None,
            window.time_to is not None,
            window.limit is not None,
        )
        values: dict[str, Any] = {
            "resolution": step,
            "limit": min(window.limit or MAX_MONITORING_ROWS, MAX_MONITORING_ROWS),
        }
        if window.uuids:
            values["uuid"] = window.uuids[0]
        if window.time_from is not None:
            values["time_from"] = window.time_from - window.time_from % step
        if window.time_to is not None:
            values["time_to"] = window.time_to
        if not window.uuids or self.point_cache.max_bytes <= 0:  # buckets of many agents
            return _array(data for _, _, data in await self._encoded_points(shape, values))
        key = (window.uuids[0], shape.resolution, shape.figures, shape.tenths)
        versions = _rollup_versions(shape)
        seen = [(row[0], (row[1], row[2])) for row in await self.read_rows(versions, values)]
        kept = self.point_cache.points(key)
        parts: list[bytes | None] = []
        stale: list[int] = []
        for bucket, version in seen:
            point = kept.get(bucket)
            if point is not None and point[0] == version:
                parts.append(point[1])
            else:
                parts.append(None)
                stale.append(bucket)
        fresh: dict[int, tuple[Version, bytes]] = {}
        if stale:  # a range: most often the newest bucket, or all of them the first time
            fetched = await self._encoded_points(
                dataclasses.replace(shape, has_from=True, has_to=True, newest_first=False),
                values
                | {"time_from": min(stale), "time_to": max(stale), "limit": MAX_MONITORING_ROWS},
            )
            fresh = {bucket: (version, data) for bucket, version, data in fetched}
        answer = _array(
            data if data is not None else fresh[bucket][1]
            for (bucket, _), data in zip(seen, parts, strict=True)
            if data is not None or bucket in fresh  # else pruned since its version was read
        )
        self.point_cache.update(key, [bucket for bucket, _ in seen], fresh)
        return answer

    async def _encoded_points(
        self, shape: _RollupShape, values: Mapping[str, Any]
    ) -> list[tuple[int, Version, bytes]]:
        """The points of ``shape`` for ``values`` in its order: bucket, version, JSON."""
        build = _rollup_points(shape)
        keys = self.backend.statement(build).columns[2:]
        encoded: list[tuple[int, Version, bytes]] = []
        for row in await self.read_rows(build, values):
            point = dict(zip(keys, row[2:], strict=True))
            encoded.append((point["timestamp"], (row[0], row[1]), orjson.dumps(point)))
        return encoded

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
        if tuple(figures) == SUMMARY_FIELDS and tenths == TENTHS:
            for chunk in self._chunks(asked):
                for agent, point in await self.read_rows(_stored_points, {"uuids": chunk}):
                    if point is not None:
                        found[agent] = point.encode()
        build = _last_points(tuple(figures), tenths)
        keys = self.backend.statement(build).columns[1:]
        for chunk in self._chunks([uuid for uuid in asked if uuid not in found]):
            rows = await self.read_rows(build, {"uuids": chunk})
            if self.is_sqlite:
                found.update((agent, point.encode()) for agent, point in rows)
            else:
                for row in rows:
                    found[row[0]] = orjson.dumps(dict(zip(keys, row[1:], strict=True)))
        return _array(found[uuid] for uuid in asked if uuid in found)

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
        chunks = [
            self.backend.list_arg(asked[start : start + LAST_CHUNK])
            for start in range(0, len(asked), LAST_CHUNK)
        ]

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
