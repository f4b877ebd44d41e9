"""SQLite: the writer's connections used inline on the event loop, reads on threads of their own.

The writer's statements touch a local file for microseconds, while handing each
to a thread and back costs two wake-ups of a busy event loop (measured: a writer
thread made the server slower under load, not faster), so the writer runs them
inline. A lock held by another process is not waited for there (no busy timeout):
the writer is refused at once and retries the batch after a pause asleep. A read runs whole
on a read thread (check-out, BEGIN, statements, fetch, roll back): one hand-over
from the event loop and one back, and SQLite releases the GIL while it reads.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Select,
    Table,
    bindparam,
    create_engine,
    event,
    func,
    literal_column,
    select,
)
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.sql.expression import ClauseElement, FromClause

from taskd.models import task_t
from taskd.store.backend import Backend, Driver, Insert, Rows, Statement, T, ThenArgs

WRITER_BUSY_TIMEOUT_MS = 0
"""The writer runs on the event loop, so it never waits inside SQLite for another
process's write lock (that wait would stop the loop): it is refused at once and the
writer retries after an asynchronous pause (``writer.retry_while_locked``)."""
READER_BUSY_TIMEOUT_MS = 30_000


def connect(path: str, *, busy_timeout_ms: int, writer: bool) -> sqlite3.Connection:
    """A connection with taskd's pragmas, in autocommit mode (transactions are begun explicitly)."""
    conn = sqlite3.connect(
        path, timeout=busy_timeout_ms / 1000, isolation_level=None, check_same_thread=False
    )
    pragmas = [
        "PRAGMA journal_mode=WAL",
        "PRAGMA synchronous=NORMAL",
        f"PRAGMA busy_timeout={busy_timeout_ms}",
        "PRAGMA foreign_keys=ON",
    ]
    if writer:
        pragmas.append("PRAGMA wal_autocheckpoint=0")  # see SqliteBackend.checkpoint
    for pragma in pragmas:
        conn.execute(pragma)
    return conn


def json_dumps(value: Any) -> str:
    """JSON text for a JSON column."""
    return orjson.dumps(value).decode()


def _engine(
    url: str, connector: Callable[[], sqlite3.Connection], *, size: int, begin: str, echo: bool
) -> Engine:
    engine = create_engine(
        make_url(url).set(drivername="sqlite"),
        creator=connector,
        pool_size=size,
        max_overflow=0,
        echo=echo,
        json_serializer=json_dumps,
        json_deserializer=orjson.loads,
    )

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        # the driver is in autocommit mode, so SQLAlchemy's transactions (SELECT then
        # UPDATE, SAVEPOINTs) are begun here: the writer takes the write lock up front
        conn.exec_driver_sql(begin)

    return engine


def _max_task_id(backend: Backend) -> ClauseElement:
    return select(func.max(task_t.c.id))


class SqliteBackend(Backend):
    """A SQLite file; see the module docstring."""

    is_sqlite = True
    dumps = staticmethod(json_dumps)

    def __init__(self, url: str, *, readers: int, echo: bool) -> None:
        super().__init__(channels=None)  # one node: nobody to notify
        path = make_url(url).database or ""
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            if not Path(path).exists():
                Path(path).touch(mode=0o600)
        self.path = path
        self.write_engine = _engine(
            url,
            lambda: connect(path, busy_timeout_ms=WRITER_BUSY_TIMEOUT_MS, writer=True),
            size=1,
            begin="BEGIN IMMEDIATE",
            echo=echo,
        )
        readers = max(readers, 1)
        self.read_engine = _engine(
            url,
            lambda: connect(path, busy_timeout_ms=READER_BUSY_TIMEOUT_MS, writer=False),
            size=readers,
            begin="BEGIN",
            echo=echo,
        )
        self.read_engines = [self.read_engine]
        self.dialect = self.write_engine.dialect
        self._threads = ThreadPoolExecutor(readers, thread_name_prefix="taskd-sqlite-reader")

    async def read(self, fn: Callable[[Connection], T]) -> T:
        """Run ``fn`` whole on a read thread: it must use only its connection and plain values."""
        return await asyncio.get_running_loop().run_in_executor(self._threads, self._read, fn)

    def _read(self, fn: Callable[[Connection], T]) -> T:
        with self.read_engine.connect() as conn:
            return fn(conn)

    async def read_rows(self, statement: Statement, args: Sequence[Any]) -> list[Sequence[Any]]:
        """The rows of ``statement`` from sqlite3's own cursor on a read thread."""

        def fetch(conn: Connection) -> list[Sequence[Any]]:
            cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
            try:
                rows: list[Sequence[Any]] = cursor.execute(statement.sql, args).fetchall()
                return rows
            finally:
                cursor.close()

        return await self.read(fetch)

    async def read_rows_then(
        self, first: Statement, args: Sequence[Any], then: Statement, then_args: ThenArgs
    ) -> tuple[Rows, Rows]:
        """Both reads on one cursor of a read thread (``then_args`` runs there too)."""

        def fetch(conn: Connection) -> tuple[Rows, Rows]:
            cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
            try:
                rows: Rows = cursor.execute(first.sql, args).fetchall()
                more = then_args(rows)
                return rows, [] if more is None else cursor.execute(then.sql, more).fetchall()
            finally:
                cursor.close()

        return await self.read(fetch)

    async def transaction(self, fn: Callable[[Connection], T]) -> T:
        """Run ``fn`` inline (see the module docstring) in a write transaction."""
        with self.write_engine.begin() as conn:
            return fn(conn)

    async def connect_driver(self) -> Driver:
        """The writer's sqlite3 connection."""
        return SqliteDriver(
            self, connect(self.path, busy_timeout_ms=WRITER_BUSY_TIMEOUT_MS, writer=True)
        )

    async def close(self) -> None:
        """Wait for the reads, then close every connection."""
        await asyncio.to_thread(self._threads.shutdown)
        self.read_engine.dispose()
        self.write_engine.dispose()

    async def checkpoint(self) -> None:
        """Copy the write-ahead log into the database file, on a read thread.

        The writer runs on the event loop and never checkpoints itself (a checkpoint
        syncs the file to disk, which can take long).
        """

        def run(conn: Connection) -> None:
            conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")

        await self.read(run)

    def insert(self, table: Table) -> Insert:
        """SQLite's INSERT."""
        return sqlite_insert(table)

    def one_of(self, column: ColumnElement[Any], name: str) -> ColumnElement[bool]:
        """``column IN`` a JSON array bound as ``name``: one SQL text for any count."""
        values: Select[Any] = select(literal_column("value")).select_from(
            func.json_each(bindparam(name))
        )
        return column.in_(values)

    def listed(self, name: str) -> tuple[FromClause, ColumnElement[Any]]:
        """``json_each`` of a JSON array bound as ``name`` (SQLite names no columns of a
        VALUES list)."""
        table = func.json_each(bindparam(name)).table_valued("value", name="wanted")
        return table, table.c.value

    def list_arg(self, values: Sequence[Any]) -> str:
        """The values as a JSON array."""
        return orjson.dumps(list(values)).decode()

    def busy(self, exc: BaseException) -> bool:
        """Whether SQLite refused the write lock because another process holds it."""
        cause = exc.orig if isinstance(exc, OperationalError) else exc
        if not isinstance(cause, sqlite3.OperationalError | OperationalError):
            return False
        return "locked" in str(cause) or "busy" in str(cause)


class SqliteDriver(Driver):
    """The writer's sqlite3 connection, used inline on the event loop."""

    def __init__(self, backend: SqliteBackend, conn: sqlite3.Connection) -> None:
        self.backend = backend
        self.conn = conn

    async def begin(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    async def commit(self) -> None:
        self.conn.execute("COMMIT")

    async def rollback(self) -> None:
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")

    async def fetch(self, statement: Statement, *args: Any) -> list[Sequence[Any]]:
        return self.conn.execute(statement.sql, args).fetchall()

    async def execute_many(self, statement: Statement, rows: list[Sequence[Any]]) -> int | None:
        return self.conn.executemany(statement.sql, rows).rowcount

    async def notify(self, channel: str, items: Sequence[str], prefix: str = "") -> None:
        """Nothing: SQLite has one node."""

    async def next_task_ids(self, count: int) -> list[int]:
        # the writer holds the write lock (BEGIN IMMEDIATE), so max(id) cannot move under it
        [(highest,)] = await self.fetch(self.backend.statement(_max_task_id))
        start = int(highest or 0) + 1
        return list(range(start, start + count))

    async def close(self) -> None:
        self.conn.close()
