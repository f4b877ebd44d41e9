"""PostgreSQL: a pool for reads, and the writer's own connections (SQLAlchemy's and asyncpg's).

Reads and writes run as plain SQLAlchemy functions inside ``AsyncConnection.run_sync``:
the whole function in one greenlet, each statement awaited over asyncpg. The writer
keeps connections of its own, so a flood of reads queued on the pool never holds
back the commits that acknowledge tasks and results.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import orjson
from sqlalchemy import (
    ARRAY,
    ColumnElement,
    Connection,
    Select,
    String,
    Table,
    any_,
    bindparam,
    func,
    literal_column,
    select,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.sql.expression import ClauseElement, FromClause

from taskd.models import task_t
from taskd.store.backend import Backend, Channels, Driver, Insert, Rows, Statement, T, ThenArgs


def pg_json_dumps(value: Any) -> str:
    """JSON for PostgreSQL, whose JSONB cannot hold NUL characters: they become U+FFFD."""
    text = orjson.dumps(value).decode()
    return orjson.dumps(without_nul(value)).decode() if "\\u0000" in text else text


def without_nul(value: Any) -> Any:
    """``value`` with every NUL character (PostgreSQL text cannot hold one) as U+FFFD."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, list):
        return [without_nul(item) for item in value]
    if isinstance(value, dict):
        return {without_nul(k): without_nul(v) for k, v in value.items()}
    return value


def _notify(backend: Backend) -> Select[Any]:
    return select(func.pg_notify(bindparam("channel"), bindparam("payload")))


def _next_task_ids(backend: Backend) -> ClauseElement:
    table: Any = literal_column(f"'{task_t.name}'")
    column: Any = literal_column(f"'{task_t.c.id.name}'")
    sequence = func.pg_get_serial_sequence(table, column)
    series = func.generate_series(literal_column("1"), bindparam("count"))
    return select(func.nextval(sequence)).select_from(series)


class PostgresBackend(Backend):
    """A PostgreSQL database; see the module docstring."""

    is_sqlite = False
    dumps = staticmethod(pg_json_dumps)

    def __init__(self, url: str, *, pool_size: int, echo: bool, channels: Channels | None) -> None:
        super().__init__(channels)
        options: dict[str, Any] = {
            "json_serializer": pg_json_dumps,
            "json_deserializer": orjson.loads,
            "echo": echo,
            "pool_size": pool_size,
            "max_overflow": pool_size,
            "pool_timeout": 10,
            "connect_args": {"timeout": 5, "command_timeout": 30},
        }
        self.engine = create_async_engine(url, **options)
        self.write_engine = create_async_engine(
            url, **options | {"pool_size": 1, "max_overflow": 0}
        )
        self.read_engines = [self.engine.sync_engine]
        self.dialect = self.engine.dialect
        self._dsn = make_url(url).set(drivername="postgresql").render_as_string(False)

    async def read(self, fn: Callable[[Connection], T]) -> T:
        """Run ``fn`` on a pooled connection."""
        async with self.engine.connect() as conn:
            return await conn.run_sync(fn)

    async def read_rows(self, statement: Statement, args: Sequence[Any]) -> list[Sequence[Any]]:
        """The rows of ``statement`` from a pooled connection's asyncpg connection (which
        prepares it once per connection)."""
        async with self.engine.connect() as conn:
            raw = await conn.get_raw_connection()
            return list(await raw.driver_connection.fetch(statement.sql, *args))  # type: ignore[union-attr]

    async def read_rows_then(
        self, first: Statement, args: Sequence[Any], then: Statement, then_args: ThenArgs
    ) -> tuple[Rows, Rows]:
        """Both reads on one pooled connection's asyncpg connection."""
        async with self.engine.connect() as conn:
            raw = (await conn.get_raw_connection()).driver_connection
            rows = list(await raw.fetch(first.sql, *args))  # type: ignore[union-attr]
            more = then_args(rows)
            return rows, [] if more is None else list(await raw.fetch(then.sql, *more))  # type: ignore[union-attr]

    async def transaction(self, fn: Callable[[Connection], T]) -> T:
        """Run ``fn`` in a transaction on the writer's SQLAlchemy connection."""
        async with self.write_engine.begin() as conn:
            return await conn.run_sync(fn)

    async def connect_driver(self) -> Driver:
        """The writer's asyncpg connection (5 s to connect, 30 s per statement, like the pool's)."""
        return PostgresDriver(self, await asyncpg.connect(self._dsn, timeout=5, command_timeout=30))

    async def close(self) -> None:
        """Close both engines."""
        await self.engine.dispose()
        await self.write_engine.dispose()

    def insert(self, table: Table) -> Insert:
        """PostgreSQL's INSERT."""
        return pg_insert(table)

    def one_of(self, column: ColumnElement[Any], name: str) -> ColumnElement[bool]:
        """``column = ANY`` of an array bound as ``name``."""
        return column == any_(bindparam(name, type_=ARRAY(column.type)))

    def listed(self, name: str) -> tuple[FromClause, ColumnElement[Any]]:
        """``unnest`` of a text array bound as ``name``."""
        table = (
            func.unnest(bindparam(name, type_=ARRAY(String)))
            .table_valued("value", name="wanted")
            .render_derived()
        )
        return table, table.c.value

    def list_arg(self, values: Sequence[Any]) -> list[Any]:
        """The values as a list (asyncpg sends it as an array)."""
        return list(values)

    def text(self, value: str | None) -> str | None:
        """PostgreSQL text cannot hold NUL characters: they become U+FFFD."""
        return None if value is None else value.replace("\x00", "\ufffd")

    def notify(
        self, conn: Connection, channel: str, items: Sequence[str], prefix: str = ""
    ) -> None:
        """NOTIFY ``items`` at commit of ``conn``'s transaction."""
        for payload in payloads(items, prefix) if items else []:
            conn.execute(_notify(self), {"channel": channel, "payload": payload})


class PostgresDriver(Driver):
    """An asyncpg connection (statements prepared once and cached by asyncpg)."""

    def __init__(self, backend: PostgresBackend, conn: asyncpg.Connection) -> None:
        self.backend = backend
        self.conn = conn
        self._tx: Any = None

    async def begin(self) -> None:
        self._tx = self.conn.transaction()
        await self._tx.start()

    async def commit(self) -> None:
        tx, self._tx = self._tx, None
        await tx.commit()

    async def rollback(self) -> None:
        tx, self._tx = self._tx, None
        if tx is not None and not self.conn.is_closed():
            await tx.rollback()

    async def fetch(self, statement: Statement, *args: Any) -> list[Sequence[Any]]:
        return list(await self.conn.fetch(statement.sql, *args))

    async def execute_many(self, statement: Statement, rows: list[Sequence[Any]]) -> int | None:
        await self.conn.executemany(statement.sql, rows)
        return None  # asyncpg does not report it

    async def notify(self, channel: str, items: Sequence[str], prefix: str = "") -> None:
        if items:
            statement = self.backend.statement(_notify)
            for payload in payloads(items, prefix):
                args = statement.args({"channel": channel, "payload": payload})
                await self.conn.execute(statement.sql, *args)

    async def next_task_ids(self, count: int) -> list[int]:
        statement = self.backend.statement(_next_task_ids)
        rows = await self.fetch(statement, *statement.args({"count": count}))
        return [int(row[0]) for row in rows]

    def lost(self, exc: BaseException) -> bool:
        return isinstance(exc, OSError | asyncpg.PostgresConnectionError | asyncpg.InterfaceError)

    async def close(self) -> None:
        if not self.conn.is_closed():
            await self.conn.close(timeout=2)


def payloads(items: Sequence[str], prefix: str) -> list[str]:
    """``items`` comma-joined into NOTIFY payloads under 8000 bytes."""
    chunks: list[str] = []
    current = ""
    for item in items:
        if current and len(prefix) + len(current) + len(item) + 1 > 7_900:
            chunks.append(prefix + current)
            current = ""
        current = f"{current},{item}" if current else item
    chunks.append(prefix + current)
    return chunks
