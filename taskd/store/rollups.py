"""Summary rollups: each summary added to its 1-minute and 1-hour buckets as it is stored
(count, sum, min and max per figure, upserted in place), and the buckets read back as
chart points, kept encoded between reads (``point_cache.py``)."""

from __future__ import annotations

import dataclasses
import functools
import operator
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Float,
    Integer,
    String,
    bindparam,
    case,
    cast,
    func,
    literal_column,
    select,
    true,
    union_all,
)
from sqlalchemy.sql.expression import ClauseElement

from taskd.models import ROLLUP_FIGURES, ROLLUP_PARTS, summary_rollup_t
from taskd.protocol import MAX_MONITORING_ROWS, MonitoringWindow
from taskd.store.backend import Backend, Driver, Insert, Statement
from taskd.store.database import Database
from taskd.store.point_cache import Chart, PointCache, Seen

ROLLUP_RESOLUTIONS: dict[str, int] = {"1m": 60_000, "1h": 3_600_000}
"""The rollups kept, by name, in ms per bucket."""


def _merged(backend: Backend, insert: Insert) -> ClauseElement:
    """``insert`` adding its figures to a bucket already stored: counts and sums add up,
    min and max hold.

    NULL (no report had the figure) gives way to a value: ``coalesce`` for sums, and for
    min and max SQLite's two-argument ``min``/``max`` over both coalesced (each NULL only
    where the other is), PostgreSQL's ``least``/``greatest`` (which skip NULLs)."""
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


def _rollup_upsert(backend: Backend) -> ClauseElement:
    """Add one bucket's figures (laid out in column order, as ``_add_to_buckets`` makes
    them) to its stored bucket, or store it."""
    names = [column.name for column in summary_rollup_t.c]
    insert = backend.insert(summary_rollup_t).values({name: bindparam(name) for name in names})
    return _merged(backend, insert)


def _summary_upsert(backend: Backend) -> ClauseElement:
    """Add one summary (bound by its column names) to both its buckets in one statement.

    The summary's figures go once: each bucket's count is 1 where the figure is there,
    its sum, min and max the figure itself. A fraction of the arguments of
    ``_rollup_upsert`` twice, which is most of the cost of a live agent's report on
    PostgreSQL."""
    time = bindparam("time", type_=BigInteger)
    resolutions = union_all(
        *(
            select(literal_column(str(resolution), Integer).label("resolution"))
            for resolution in ROLLUP_RESOLUTIONS.values()
        )
    ).subquery("resolutions")
    each = resolutions.c.resolution
    zero, one = literal_column("0", Integer), literal_column("1", Integer)
    chosen: list[ColumnElement[Any]] = [
        bindparam("uuid", type_=String),
        each,
        time - time % each,
    ]
    for name in ROLLUP_FIGURES:
        figure = bindparam(name, type_=BigInteger)
        chosen += (case((figure.is_(None), zero), else_=one), cast(figure, Float), figure, figure)
    names = [c.name for c in summary_rollup_t.c]
    # SQLite needs a WHERE to tell the upsert's ON from a join's
    source = select(*chosen).select_from(resolutions).where(true())
    return _merged(backend, backend.insert(summary_rollup_t).from_select(names, source))


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


async def add_to_rollups(driver: Driver, rows: Sequence[Mapping[str, Any]]) -> None:
    """Add summaries just stored to their 1-minute and 1-hour buckets.

    An agent's only summary of the batch (a live agent's report) goes in by
    ``_summary_upsert``. An agent's several (a backlog sent after a reconnect) are
    merged per bucket first, and each bucket goes in once by ``_rollup_upsert``. Agents
    go in UUID order, so batches of two nodes cannot deadlock on each other's rows."""
    by_agent: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        by_agent.setdefault(row["uuid"], []).append(row)
    statement_of = driver.backend.statement
    one, merged = statement_of(_summary_upsert), statement_of(_rollup_upsert)
    runs: list[tuple[Statement, list[Sequence[Any]]]] = []
    for agent in sorted(by_agent):
        summaries = by_agent[agent]
        if len(summaries) == 1:
            statement, args = one, [one.args(summaries[0])]
        else:
            buckets: dict[tuple[str, int, int], list[Any]] = {}
            for row in summaries:
                _add_to_buckets(buckets, row)
            statement = merged
            args = [_rollup_args(merged, bucket) for _, bucket in sorted(buckets.items())]
        if runs and runs[-1][0] is statement:
            runs[-1][1].extend(args)
        else:
            runs.append((statement, args))
    for statement, args in runs:
        await driver.execute_many(statement, args)


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


def encoded_array(items: Iterable[bytes]) -> orjson.Fragment:
    """A JSON array of items encoded already (one copy of them, however long)."""
    parts = list(items)
    if not parts:
        return orjson.Fragment(b"[]")
    parts[0] = b"[" + parts[0]
    parts[-1] += b"]"
    return orjson.Fragment(b",".join(parts))


class RollupQueries(Database):
    """Summary rollups read as chart points."""

    point_cache: PointCache
    """Rollup charts kept encoded (``Store`` makes it)."""

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
        charts are kept encoded (``point_cache.py``): a chart asked again reads the
        versions of its buckets and the points of those that changed in one go, and
        reuses the rest."""
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
            return encoded_array(await self._encoded_points(shape, values))
        key = (window.uuids[0], shape.resolution, shape.figures, shape.tenths)
        kept = self.point_cache.chart(key)
        refresh = _Refresh(kept, values)
        ranged = _rollup_points(
            dataclasses.replace(shape, has_from=True, has_to=True, newest_first=False)
        )
        seen, fetched = await self.read_rows_then(
            _rollup_versions(shape), values, ranged, refresh.stale_values
        )
        if kept is not None and refresh.reused == len(seen) == len(kept.seen):
            return orjson.Fragment(kept.body)  # nothing changed
        fresh = {entry[0]: (entry, data) for entry, data in self._encoded(ranged, fetched)}
        answered: Seen = seen[: refresh.reused]
        parts: list[bytes | memoryview] = []
        for entry, point in zip(seen[refresh.reused :], refresh.points, strict=True):
            if point is not None:
                answered.append(entry)
                parts.append(point)
            elif entry[0] in fresh:  # else pruned since its version was read
                answered.append(fresh[entry[0]][0])
                parts.append(fresh[entry[0]][1])
        chart = Chart.joined(answered, parts, kept, refresh.reused)
        self.point_cache.keep(key, chart)
        return orjson.Fragment(chart.body)

    async def _encoded_points(self, shape: _RollupShape, values: Mapping[str, Any]) -> list[bytes]:
        """The JSON of the points of ``shape`` for ``values``, in its order."""
        build = _rollup_points(shape)
        return [data for _, data in self._encoded(build, await self.read_rows(build, values))]

    def _encoded(
        self, build: Callable[[Backend], ClauseElement], rows: list[Sequence[Any]]
    ) -> list[tuple[tuple[int, int, int], bytes]]:
        """Rows of a ``_rollup_points`` statement as each bucket's version (``Seen``'s
        entry) and its point's JSON."""
        keys = self.backend.statement(build).columns[2:]
        encoded: list[tuple[tuple[int, int, int], bytes]] = []
        for row in rows:
            point = dict(zip(keys, row[2:], strict=True))
            encoded.append(((point["timestamp"], row[0], row[1]), orjson.dumps(point)))
        return encoded


@dataclass
class _Refresh:
    """What a chart asked again can reuse of the one kept (``kept``), worked out from the
    versions of the buckets asked, between the two reads of ``rollup_points`` (on
    SQLite's read thread: it only reads ``kept``, which no one changes)."""

    kept: Chart | None
    values: dict[str, Any]
    reused: int = 0
    """How many of the first buckets are kept unchanged, in the same order."""
    points: list[memoryview | None] = dataclasses.field(default_factory=list)
    """The kept point of each bucket after those (None: to fetch)."""

    def stale_values(self, seen: Seen) -> dict[str, Any] | None:
        """The values that fetch the points not kept at their buckets' versions (the range
        from the first to the last), or None if every point is kept."""
        kept = self.kept
        if kept is not None:
            self.reused = kept.unchanged_head(seen)
        rest = seen[self.reused :]  # most often the newest bucket, or all of them at first
        if kept is not None and not self.reused:  # the window moved, or a late summary
            self.points = [kept.point(entry) for entry in rest]
        else:  # the one left changed, or is new
            self.points = [None] * len(rest)
        stale = [entry[0] for entry, point in zip(rest, self.points, strict=True) if point is None]
        if not stale:
            return None
        limit = MAX_MONITORING_ROWS
        return self.values | {"time_from": min(stale), "time_to": max(stale), "limit": limit}
