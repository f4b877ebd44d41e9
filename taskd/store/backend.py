"""What SQLite and PostgreSQL each give the store (``sqlite.py``, ``postgres.py``).

A backend owns the engines, runs a function of a SQLAlchemy ``Connection`` as a
read or as a write transaction, opens the writer's own driver connection, and
compiles the writer's statements once from the table metadata. Every query of
the store is plain SQLAlchemy Core against a ``Connection``; where it runs (a
read thread, the event loop, a greenlet over asyncpg) is the backend's concern.
"""

from __future__ import annotations

import operator
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy import JSON, ColumnElement, Connection, Dialect, Engine, Table
from sqlalchemy.dialects.postgresql import Insert as PgInsert
from sqlalchemy.dialects.sqlite import Insert as SqliteInsert
from sqlalchemy.exc import DBAPIError, StatementError
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import ClauseElement, FromClause

T = TypeVar("T")

Rows = list[Sequence[Any]]
"""Rows as a driver returns them."""
ThenArgs = Callable[[Rows], Sequence[Any] | None]
"""The arguments of a second read made of the first one's rows (None: no second read)."""

Insert = PgInsert | SqliteInsert
"""An INSERT with ON CONFLICT clauses, in the backend's dialect."""


@dataclass(frozen=True)
class Channels:
    """Where the store announces commits to the other nodes (named in ``cluster.py``)."""

    agents: str
    """Agents' subscriptions: ``uuid node`` items, ``uuid -`` when one ended."""
    node: Callable[[str], str]
    """A node's own channel: ``q:`` agents with tasks routed there, ``r:`` results it awaits."""


class Statement:
    """A statement compiled once for the writer's driver connection.

    ``args`` turns a mapping (column or bound name → value) into the driver's
    positional arguments, in the order the compiled SQL binds them, with JSON
    column values encoded: the table metadata is the one source of that order.
    """

    __slots__ = ("_dumps", "_fixed", "_get", "_json", "columns", "names", "sql")

    def __init__(
        self, statement: ClauseElement, dialect: Dialect, dumps: Callable[[Any], str]
    ) -> None:
        compiled = statement.compile(dialect=dialect)
        assert isinstance(compiled, SQLCompiler)
        self.sql = compiled.string
        selected = getattr(statement, "selected_columns", None)
        self.columns: tuple[str, ...] = tuple(map(str, selected.keys())) if selected else ()
        """The names of the columns a SELECT returns, in order."""
        self.names = tuple(compiled.positiontup or ())
        self._json = tuple(
            index
            for index, name in enumerate(self.names)
            if isinstance(compiled.binds[name].type, JSON)
        )
        self._dumps = dumps
        # values the statement carries itself (SQLite's OFFSET 0 after a bound LIMIT ...)
        self._fixed = {
            name: compiled.params[name] for name in self.names if not compiled.binds[name].required
        }
        names = self.names
        # one C call for the usual many names (itemgetter returns no tuple for fewer)
        self._get: Callable[[Mapping[str, Any]], Sequence[Any]] = (
            operator.itemgetter(*names)
            if len(names) > 1
            else lambda values: tuple(values[name] for name in names)
        )

    def args(self, values: Mapping[str, Any]) -> Sequence[Any]:
        """The positional arguments for ``values``."""
        row = self._get({**self._fixed, **values} if self._fixed else values)
        if not self._json:
            return row
        encoded = list(row)
        for index in self._json:
            encoded[index] = self._dumps(encoded[index])
        return encoded


class Driver(ABC):
    """The writer's own driver connection, for the hot statements (no SQLAlchemy per call)."""

    backend: Backend

    @abstractmethod
    async def begin(self) -> None:
        """Start a transaction (SQLite: take the write lock now)."""

    @abstractmethod
    async def commit(self) -> None:
        """Commit the transaction."""

    @abstractmethod
    async def rollback(self) -> None:
        """Roll the transaction back, if one is open."""

    @abstractmethod
    async def fetch(self, statement: Statement, *args: Any) -> list[Sequence[Any]]:
        """Rows of one statement."""

    @abstractmethod
    async def execute_many(self, statement: Statement, rows: list[Sequence[Any]]) -> int | None:
        """One statement for each row; the rows changed where the driver knows it."""

    @abstractmethod
    async def notify(self, channel: str, items: Sequence[str], prefix: str = "") -> None:
        """NOTIFY ``items`` at commit (PostgreSQL; nothing elsewhere)."""

    @abstractmethod
    async def next_task_ids(self, count: int) -> list[int]:
        """Reserve ``count`` new task ids inside the open transaction.

        Ids are drawn first so that the rows go in as one ``execute_many``.
        """

    @abstractmethod
    async def close(self) -> None:
        """Close the connection."""

    def lost(self, exc: BaseException) -> bool:
        """Whether ``exc`` means the connection is gone (the writer opens a new one)."""
        return isinstance(exc, OSError)


class Backend(ABC):
    """One database as this process reaches it; see the module docstring."""

    is_sqlite: bool
    dialect: Dialect
    read_engines: list[Engine]
    """The engines reads run on (for tests that watch the statements)."""
    dumps: Callable[[Any], str]
    """JSON text for a JSON column (a plain function: it runs for every row of a hot write)."""

    def __init__(self, channels: Channels | None) -> None:
        self.channels = channels
        self._compiled: dict[Callable[[Backend], ClauseElement], Statement] = {}

    @abstractmethod
    async def read(self, fn: Callable[[Connection], T]) -> T:
        """Run ``fn`` on a read connection, off the event loop's work where possible."""

    @abstractmethod
    async def read_rows(self, statement: Statement, args: Sequence[Any]) -> list[Sequence[Any]]:
        """The rows of a compiled statement, read on a read connection's own driver cursor
        (no SQLAlchemy per row: for reads that return many values)."""

    @abstractmethod
    async def read_rows_then(
        self, first: Statement, args: Sequence[Any], then: Statement, then_args: ThenArgs
    ) -> tuple[Rows, Rows]:
        """``read_rows`` of ``first``, then of ``then`` with the arguments ``then_args``
        makes of the first's rows (none if it gives None), in one go on one read
        connection: one hop to a read thread where there are any."""

    @abstractmethod
    async def transaction(self, fn: Callable[[Connection], T]) -> T:
        """Run ``fn`` in a write transaction on the writer's SQLAlchemy connection; commit."""

    @abstractmethod
    async def connect_driver(self) -> Driver:
        """Open the writer's own driver connection."""

    @abstractmethod
    async def close(self) -> None:
        """Close every connection."""

    @abstractmethod
    def insert(self, table: Table) -> Insert:
        """An INSERT of the dialect (with ``on_conflict_do_*``)."""

    @abstractmethod
    def one_of(self, column: ColumnElement[Any], name: str) -> ColumnElement[bool]:
        """``column`` equals one value of the list bound as ``name`` (see ``list_arg``)."""

    @abstractmethod
    def listed(self, name: str) -> tuple[FromClause, ColumnElement[Any]]:
        """A table of the strings of the list bound as ``name`` (see ``list_arg``), and its
        column: one bound parameter however many values."""

    @abstractmethod
    def list_arg(self, values: Sequence[Any]) -> Any:
        """A list of values as the argument ``one_of`` binds."""

    def text(self, value: str | None) -> str | None:
        """A text value as the database can store it."""
        return value

    def notify(  # noqa: B027 - nothing to do but on PostgreSQL
        self, conn: Connection, channel: str, items: Sequence[str], prefix: str = ""
    ) -> None:
        """NOTIFY ``items`` at commit of ``conn``'s transaction (PostgreSQL; nothing elsewhere)."""

    def busy(self, exc: BaseException) -> bool:
        """Whether a write failed only because another process holds the write lock."""
        return False

    async def checkpoint(self) -> None:  # noqa: B027 - nothing to do but on SQLite
        """Fold the write-ahead log into the database file, where the database needs it."""

    def statement(self, build: Callable[[Backend], ClauseElement]) -> Statement:
        """``build(self)`` compiled for the driver connection, once per backend."""
        compiled = self._compiled.get(build)
        if compiled is None:
            compiled = self._compiled[build] = Statement(build(self), self.dialect, self.dumps)
        return compiled


DRIVER_ERRORS = (sqlite3.Error, asyncpg.PostgresError, asyncpg.InterfaceError)
"""What the drivers raise themselves (reads on a driver cursor skip SQLAlchemy's wrapping)."""


def bad_value(exc: BaseException) -> bool:
    """Whether the database or its driver refused a value (not a failure of the database)."""
    if isinstance(exc, OverflowError | ValueError | TypeError):  # e.g. an integer beyond 64 bits
        return True
    if isinstance(exc, asyncpg.DataError):  # asyncpg could not encode an argument
        return True
    errors: list[BaseException | None] = [exc]
    if isinstance(exc, StatementError):
        errors = [exc.orig, getattr(exc.orig, "__cause__", None)]
    for error in errors:
        if isinstance(error, ValueError | TypeError | OverflowError | asyncpg.DataError):
            return True
        # SQLSTATE class 22: data exception (out of range, bad encoding, NUL in text ...)
        if str(getattr(error, "sqlstate", "") or "").startswith("22"):
            return True
    return False


def describe(exc: BaseException) -> str:
    """A one-line account of a database failure, for the log."""
    cause: BaseException = exc.orig if isinstance(exc, DBAPIError) and exc.orig else exc
    first = str(cause).splitlines()[0] if str(cause) else ""
    return f"{type(cause).__name__}: {first}"
