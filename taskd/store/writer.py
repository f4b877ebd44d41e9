"""The store's group-commit writer: every write, batched into few transactions.

Writes wait in one queue. One task takes whatever is waiting, runs it in one
transaction and only then settles each write's future, so a caller is answered
after its write is committed. The hot writes (task inserts, results, agent
subscriptions: ``HotOp``) run as a handful of statements compiled once, on the
writer's own driver connection, without SQLAlchemy's per-statement cost; every
other write (``CallOp``) is a SQLAlchemy function run in a savepoint of its own.
A value the database refuses fails only its own write: the batch is halved until
it stands alone.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, ClassVar, TypeVar, cast

from sqlalchemy import Connection
from sqlalchemy.exc import IntegrityError

from taskd.errors import DatabaseError, InvalidInput, TaskdError
from taskd.store.backend import Backend, Driver, bad_value, describe

logger = logging.getLogger(__name__)

T = TypeVar("T")

MAX_BATCH = 1000
LOCKED_WAIT_S = 30.0
LOCKED_PAUSES_S = (0.001, 0.002, 0.005, 0.01, 0.02)
"""Pauses between attempts while another process holds SQLite's write lock (the last
one repeats): short at first, like SQLite's own busy handler, but asleep on the loop."""


async def retry_while_locked(backend: Backend, attempt: Callable[[], Awaitable[T]]) -> T:
    """``attempt()``, tried again after a pause (``LOCKED_PAUSES_S``) while another process
    holds SQLite's write lock, for up to ``LOCKED_WAIT_S``; other errors are raised."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + LOCKED_WAIT_S
    pauses = iter(LOCKED_PAUSES_S)
    pause = 0.0
    while True:
        try:
            return await attempt()
        except Exception as exc:
            if not backend.busy(exc) or loop.time() > deadline:
                raise
            pause = next(pauses, pause)
            await asyncio.sleep(pause)


class BatchConflict(Exception):
    """A row changed under the batch: it is re-run in smaller parts."""


@dataclass(eq=False)
class Op:
    """One write waiting for the writer; its future settles once it is committed."""

    hot: ClassVar[bool] = False
    """Runs on the writer's driver connection (else in a SQLAlchemy transaction)."""
    future: asyncio.Future[Any] = field(init=False)

    def __post_init__(self) -> None:
        self.future = asyncio.get_running_loop().create_future()


@dataclass(eq=False)
class CallOp(Op):
    """A SQLAlchemy function, in a savepoint of its own inside the batch's transaction."""

    fn: Callable[[Connection], Any]


class HotOp(Op):
    """A hot write: all waiting ops of one class run as a few statements together."""

    hot = True

    @classmethod
    async def run_all(cls, driver: Driver, ops: Sequence[Any]) -> list[Any]:
        """Run ``ops`` (all of this class) inside the open transaction; one outcome each.

        An outcome that is a ``TaskdError`` fails only its own op.
        """
        raise NotImplementedError


class Writer:
    """Collects writes and commits them in batches; see the module docstring."""

    def __init__(
        self, backend: Backend, batch_observer: Callable[[int], None] | None = None
    ) -> None:
        self.backend = backend
        self.batch_observer = batch_observer
        self._driver: Driver | None = None
        self._queue: list[Op] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def start(self) -> None:
        """Start taking writes."""
        self._task = asyncio.create_task(self._loop(), name="taskd-store-writer")

    async def close(self) -> None:
        """Commit what is waiting, then stop."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
        if self._driver is not None:
            await self._driver.close()
            self._driver = None

    async def submit(self, op: Op) -> Any:
        """Queue ``op``; its outcome once committed (or its error)."""
        if self._closing:
            raise DatabaseError("The store is shutting down")
        self._queue.append(op)
        self._wake.set()
        return await op.future

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            # one turn of the loop lets every request that is already running add its
            # write, so a burst becomes one transaction instead of many small ones
            await asyncio.sleep(0)
            self._wake.clear()
            while self._queue:
                batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
                if self.batch_observer is not None:
                    self.batch_observer(len(batch))
                hot = [op for op in batch if op.hot]
                if hot:
                    await self._run(hot, self._hot_transaction)
                calls = [op for op in batch if not op.hot]
                if calls:
                    await self._run(calls, self._call_transaction)
            if self._closing and not self._queue:
                return

    async def _run(
        self, batch: list[Op], transaction: Callable[[list[Op]], Awaitable[list[Any]]]
    ) -> None:
        try:
            # while another process holds SQLite's write lock: wait and retry
            outcomes = await retry_while_locked(self.backend, partial(transaction, batch))
        except Exception as exc:
            # one op's values broke the transaction: halves are retried until only it fails
            isolate = isinstance(exc, BatchConflict | IntegrityError | sqlite3.IntegrityError)
            if len(batch) > 1 and (isolate or bad_value(exc)):
                half = len(batch) // 2
                await self._run(batch[:half], transaction)
                await self._run(batch[half:], transaction)
                return
            self._fail(batch, exc)  # the database failed: every op of the batch fails
            return
        for op, outcome in zip(batch, outcomes, strict=True):
            if op.future.done():
                continue
            if isinstance(outcome, TaskdError):
                op.future.set_exception(outcome)
            else:
                op.future.set_result(outcome)

    async def _hot_transaction(self, batch: list[Op]) -> list[Any]:
        if self._driver is None:
            self._driver = await self.backend.connect_driver()
        driver = self._driver
        outcomes: dict[int, Any] = {}
        try:
            await driver.begin()
            for kind, indexes in _groups(batch).items():
                ops = [batch[i] for i in indexes]
                results = await cast(type[HotOp], kind).run_all(driver, ops)
                outcomes.update(zip(indexes, results, strict=True))
            await driver.commit()
        except BaseException as exc:
            try:
                await driver.rollback()
            except Exception:
                # the connection is broken (the database went away): open a new one next time
                await self._drop(driver)
            if driver.lost(exc):
                await self._drop(driver)
            raise
        return [outcomes[i] for i in range(len(batch))]

    async def _drop(self, driver: Driver) -> None:
        if self._driver is driver:
            self._driver = None
        try:
            await driver.close()
        except Exception as exc:
            logger.debug("closing a broken writer connection: %s", exc)

    async def _call_transaction(self, batch: list[Op]) -> list[Any]:
        return await self.backend.transaction(partial(_run_calls, batch))

    def _fail(self, batch: list[Op], exc: BaseException) -> None:
        if isinstance(exc, TaskdError):
            error: TaskdError = exc
        elif bad_value(exc):
            logger.warning("the database refused a value: %s", describe(exc))
            error = InvalidInput("The database cannot store a value of this request")
        else:
            logger.error("database write failed: %s", describe(exc))
            error = DatabaseError("Database error: the write was not committed")
        for op in batch:
            if not op.future.done():
                op.future.set_exception(error)


def _run_calls(batch: list[Op], conn: Connection) -> list[Any]:
    """Each ``CallOp`` of the batch in a savepoint: a domain error undoes only its own op."""
    results: list[Any] = []
    for op in batch:
        assert isinstance(op, CallOp)
        try:
            with conn.begin_nested():
                results.append(op.fn(conn))
        except TaskdError as exc:
            results.append(exc)
    return results


def _groups(batch: list[Op]) -> dict[type[Op], list[int]]:
    """Indexes of the ops of each class, classes in order of first appearance."""
    groups: dict[type[Op], list[int]] = {}
    for index, op in enumerate(batch):
        groups.setdefault(type(op), []).append(index)
    return groups
