"""The base of the store: its backend and writer, migrations, and the one way to read or write.

Every query group (``tasks.py``, ``tokens.py`` ...) extends ``Database``: a read is
a SQLAlchemy function run by ``read``, a write one run by ``write`` (or a hot op
submitted to the writer). Database failures become ``DatabaseError`` and values
the database refuses ``InvalidInput`` here, in one place.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import ColumnElement, Connection, Engine, Row, Select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.sql.expression import ClauseElement

from taskd.errors import DatabaseError, InvalidInput, TaskdError
from taskd.store.backend import DRIVER_ERRORS, Backend, Channels, Rows, bad_value, describe
from taskd.store.postgres import PostgresBackend
from taskd.store.sqlite import SqliteBackend
from taskd.store.writer import CallOp, Op, Writer, retry_while_locked

logger = logging.getLogger(__name__)

T = TypeVar("T")

MIGRATIONS = Path(__file__).parent.parent / "migrations"


class Database:
    """The database behind taskd; an async context manager owning the backend and the writer.

    Args:
        channels: where commits are announced to the other nodes of a cluster
            (PostgreSQL); None announces nothing.
        batch_observer: told the size of every batch the writer commits.
    """

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 10,
        echo: bool = False,
        channels: Channels | None = None,
        batch_observer: Callable[[int], None] | None = None,
    ) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        self.channels = None if self.is_sqlite else channels
        self.batch_observer = batch_observer
        self._pool_size = pool_size
        self._echo = echo
        self.backend: Backend
        self.writer: Writer

    async def __aenter__(self) -> Database:
        if self.is_sqlite:
            self.backend = SqliteBackend(self.url, readers=self._pool_size, echo=self._echo)
        else:
            self.backend = PostgresBackend(
                self.url, pool_size=self._pool_size, echo=self._echo, channels=self.channels
            )
        self.writer = Writer(self.backend, self._observe_batch)
        self.writer.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.writer.close()
        await self.backend.close()

    def _observe_batch(self, size: int) -> None:
        if self.batch_observer is not None:
            self.batch_observer(size)

    @property
    def read_engines(self) -> list[Engine]:
        """The engines reads run on (tests watch their statements)."""
        return self.backend.read_engines

    async def migrate(self) -> None:
        """Bring the schema to the newest Alembic revision."""

        def upgrade(connection: Connection) -> None:
            config = AlembicConfig()
            config.set_main_option("script_location", str(MIGRATIONS))
            config.attributes["connection"] = connection
            command.upgrade(config, "head")

        await retry_while_locked(self.backend, partial(self.backend.transaction, upgrade))

    async def checkpoint(self) -> None:
        """Fold SQLite's write-ahead log into the database file, off the event loop."""
        await self.backend.checkpoint()

    async def submit(self, op: Op) -> Any:
        """Hand ``op`` to the writer; its outcome once committed."""
        return await self.writer.submit(op)

    async def write(self, fn: Callable[[Connection], T]) -> T:
        """Run ``fn`` inside a writer transaction; return its value once committed."""
        result: T = await self.writer.submit(CallOp(fn))
        return result

    async def read(self, fn: Callable[[Connection], T]) -> T:
        """Run ``fn`` on a read connection; database failures become DatabaseError.

        On SQLite ``fn`` runs on a read thread: it must use only its connection and
        plain values.
        """
        return await self._reading(self.backend.read(fn))

    async def read_rows(
        self, build: Callable[[Backend], ClauseElement], values: Mapping[str, Any]
    ) -> list[Sequence[Any]]:
        """The rows of the statement ``build`` makes (compiled once per backend) with its
        bound ``values``, read as the driver returns them: for reads of many values."""
        statement = self.backend.statement(build)
        return await self._reading(self.backend.read_rows(statement, statement.args(values)))

    async def read_rows_then(
        self,
        first: Callable[[Backend], ClauseElement],
        values: Mapping[str, Any],
        then: Callable[[Backend], ClauseElement],
        then_values: Callable[[Rows], Mapping[str, Any] | None],
    ) -> tuple[Rows, Rows]:
        """``read_rows`` of ``first``, then of ``then`` with the values ``then_values`` makes
        of the first's rows (not read if it gives None), in one go on one read connection.
        On SQLite that is one hop to a read thread, where ``then_values`` runs: it must use
        only plain values and objects no one changes."""
        one, two = self.backend.statement(first), self.backend.statement(then)

        def then_args(rows: Rows) -> Sequence[Any] | None:
            more = then_values(rows)
            return None if more is None else two.args(more)

        return await self._reading(
            self.backend.read_rows_then(one, one.args(values), two, then_args)
        )

    async def read_dicts(
        self, build: Callable[[Backend], ClauseElement], values: Mapping[str, Any]
    ) -> list[dict[str, Any]]:
        """``read_rows``, each row as a dict keyed by the statement's column names."""
        keys = self.backend.statement(build).columns
        return [dict(zip(keys, row, strict=True)) for row in await self.read_rows(build, values)]

    async def _reading(self, reading: Awaitable[T]) -> T:
        """``reading``'s outcome; database failures become DatabaseError."""
        try:
            return await reading
        except TaskdError:
            raise
        except (TimeoutError, SQLAlchemyError, *DRIVER_ERRORS, OSError, OverflowError) as exc:
            if bad_value(exc):
                logger.warning("the database refused a value: %s", describe(exc))
                raise InvalidInput("The database cannot look up a value of this request") from None
            logger.error("database read failed: %s", describe(exc))
            raise DatabaseError("Database error: the read failed") from None

    async def fetch_one(self, statement: Select[Any]) -> Row[Any] | None:
        """The first row a read statement returns, or None."""
        return await self.read(lambda conn: conn.execute(statement).first())

    async def fetch_all(self, statement: Select[Any]) -> list[Row[Any]]:
        """Every row a read statement returns."""
        return await self.read(lambda conn: list(conn.execute(statement).all()))


def each_equal(column: ColumnElement[Any], values: Iterable[Any]) -> list[ColumnElement[bool]]:
    """``column = value`` for each distinct value (a query's conditions all hold at once)."""
    return [column == value for value in set(values)]


def outcome(
    success: ColumnElement[Any], is_success: bool, is_failure: bool
) -> list[ColumnElement[bool]]:
    """The conditions ``is_success`` and ``is_failure`` on a ``success`` column."""
    wanted = ([True] if is_success else []) + ([False] if is_failure else [])
    return [success.is_(value) for value in wanted]
