"""The database: engine, migrations, a group-commit writer, and every query.

All writes go through one writer task that collects whatever operations are
waiting, runs them in one transaction and only then resolves their futures,
so a caller is answered after its write is committed. Batches of task
inserts and result updates become one statement each. The store raises
domain errors (``NotFound``, ``AlreadyUploaded`` ...) and knows nothing of RPC.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Awaitable, Callable, Generator, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite
import orjson
from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import (
    Connection,
    Row,
    Select,
    bindparam,
    delete,
    event,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import (
    DBAPIError,
    IntegrityError,
    OperationalError,
    SQLAlchemyError,
    StatementError,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry

from taskd.clock import now_ms
from taskd.errors import (
    AlreadyUploaded,
    DatabaseError,
    InvalidInput,
    NotFound,
    PermissionDenied,
    TaskdError,
)
from taskd.models import Agent, Cron, CronFire, CronResult, Node, Task, TaskState, Token
from taskd.protocol import (
    DEFAULT_QUERY_LIMIT,
    RESULT_KIND,
    CronResultQuery,
    TaskQuery,
    TaskResponse,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")
task_t = Task.__table__  # type: ignore[attr-defined]
token_t = Token.__table__  # type: ignore[attr-defined]
agent_t = Agent.__table__  # type: ignore[attr-defined]
node_t = Node.__table__  # type: ignore[attr-defined]
cron_t = Cron.__table__  # type: ignore[attr-defined]
cron_fire_t = CronFire.__table__  # type: ignore[attr-defined]
cron_result_t = CronResult.__table__  # type: ignore[attr-defined]

MAX_BATCH = 1000
LOCKED_WAIT_S = 30.0
TASK_RECORD_COLUMNS = (
    task_t.c.id,
    task_t.c.uuid,
    task_t.c.timestamp,
    task_t.c.success,
    task_t.c.error_message,
    task_t.c.task_event_type,
    task_t.c.task_event_result,
    task_t.c.cron_source,
    task_t.c.created_by,
)


def _json_dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def _pg_json_dumps(value: Any) -> str:
    """JSON for PostgreSQL, whose JSONB cannot hold NUL characters: they become U+FFFD."""
    text = orjson.dumps(value).decode()
    return orjson.dumps(_without_nul(value)).decode() if "\\u0000" in text else text


def _without_nul(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, list):
        return [_without_nul(item) for item in value]
    if isinstance(value, dict):
        return {_without_nul(k): _without_nul(v) for k, v in value.items()}
    return value


@dataclass
class NewTask:
    """A task row to insert; ``id`` is filled in once it is committed."""

    uuid: str
    task_token: str
    type: str
    task_event_type: Any
    deadline: int
    created_at: int
    state: int = TaskState.RUNNING
    queue_ttl_ms: int | None = None
    cron_source: str | None = None
    created_by: str | None = None
    route_to: str | None = None
    waiter_node: str | None = None
    id: int = 0

    def row(self) -> dict[str, Any]:
        """The column values."""
        return {
            "uuid": self.uuid,
            "task_token": self.task_token,
            "type": self.type,
            "task_event_type": self.task_event_type,
            "state": self.state,
            "created_at": self.created_at,
            "deadline": self.deadline,
            "queue_ttl_ms": self.queue_ttl_ms,
            "order_ts": self.created_at,
            "cron_source": self.cron_source,
            "created_by": self.created_by,
            "waiter_node": self.waiter_node,
        }


@dataclass(frozen=True)
class StoredResult:
    """A result as committed: what blocking waiters receive."""

    task_id: int
    agent_uuid: str
    task_token: str
    timestamp: int | None
    success: bool | None
    error_message: str | None
    task_event_result: Any

    def to_wire(self) -> dict[str, Any]:
        """The TaskEventResponse JSON object."""
        return {
            "task_id": self.task_id,
            "agent_uuid": self.agent_uuid,
            "task_token": self.task_token,
            "timestamp": self.timestamp,
            "success": self.success,
            "error_message": self.error_message,
            "task_event_result": self.task_event_result,
        }


# --------------------------------------------------------------------------- writer ops


@dataclass(eq=False)
class _Op:
    future: asyncio.Future[Any] = field(init=False)

    def __post_init__(self) -> None:
        self.future = asyncio.get_running_loop().create_future()

    async def run_batch(self, conn: AsyncConnection, ops: Sequence[_Op]) -> list[Any]:
        """Run ``ops`` (all of this class) inside the open transaction; one outcome each."""
        return [await op.run(conn) for op in ops]

    async def run(self, conn: AsyncConnection) -> Any:
        """Run this op alone inside the open transaction."""
        raise NotImplementedError


@dataclass(eq=False)
class _CallOp(_Op):
    fn: Callable[[AsyncConnection], Awaitable[Any]]

    async def run(self, conn: AsyncConnection) -> Any:
        return await self.fn(conn)


@dataclass(eq=False)
class _InsertTasksOp(_Op):
    tasks: Sequence[NewTask]

    async def run_batch(self, conn: AsyncConnection, ops: Sequence[_Op]) -> list[Any]:
        tasks: list[NewTask] = [task for op in ops for task in op.tasks]  # type: ignore[attr-defined]
        # ids are drawn first so the rows go in as one executemany: SQLite cannot
        # return ids of a multi-row insert in order, and SQLAlchemy then inserts row by row
        ids = await _allocate_task_ids(conn, len(tasks))
        rows = []
        for task, task_id in zip(tasks, ids, strict=True):
            task.id = task_id
            rows.append(task.row() | {"id": task_id})
        await conn.execute(insert(task_t), rows)
        routed: dict[str, set[str]] = {}
        for task in tasks:
            if task.route_to is not None:
                routed.setdefault(node_channel(task.route_to), set()).add(task.uuid)
        for channel, uuids in routed.items():
            await notify(conn, channel, sorted(uuids), "q:")
        return [[task.id for task in op.tasks] for op in ops]  # type: ignore[attr-defined]

    async def run(self, conn: AsyncConnection) -> Any:
        return (await self.run_batch(conn, [self]))[0]


@dataclass(eq=False)
class _CompleteOp(_Op):
    upload: TaskResponse
    result_kind: str | None
    node_id: str = ""

    async def run_batch(self, conn: AsyncConnection, ops: Sequence[_Op]) -> list[Any]:
        uploads: list[_CompleteOp] = list(ops)  # type: ignore[arg-type]
        ids = {op.upload.task_id for op in uploads}
        rows = await conn.execute(
            select(
                task_t.c.id,
                task_t.c.uuid,
                task_t.c.task_token,
                task_t.c.type,
                task_t.c.state,
                task_t.c.waiter_node,
            )
            .where(task_t.c.id.in_(ids))
            .with_for_update()
        )
        found = {row.id: row for row in rows}
        outcomes: list[Any] = []
        updates: list[dict[str, Any]] = []
        taken: set[int] = set()
        waiting: dict[str, list[str]] = {}
        # PostgreSQL text cannot hold NUL characters (see _pg_json_dumps)
        sane_text = conn.dialect.name != "postgresql"
        for op in uploads:
            up = op.upload
            row = found.get(up.task_id)
            if row is None or row.uuid != up.agent_uuid or row.task_token != up.task_token:
                outcomes.append(
                    NotFound(f"No task {up.task_id} for agent {up.agent_uuid} with that task_token")
                )
            elif row.state == TaskState.DONE or up.task_id in taken:
                outcomes.append(AlreadyUploaded(f"Task {up.task_id} already has a result"))
            elif op.result_kind is not None and op.result_kind != RESULT_KIND[row.type]:
                outcomes.append(
                    InvalidInput(
                        f"task_event_result: a {row.type} task must be answered with a "
                        f"{RESULT_KIND[row.type]!r} result, not {op.result_kind!r}"
                    )
                )
            else:
                taken.add(up.task_id)
                if row.waiter_node is not None and row.waiter_node != op.node_id:
                    waiting.setdefault(node_channel(row.waiter_node), []).append(str(row.id))
                result = (
                    up.task_event_result.to_wire() if up.task_event_result is not None else None
                )
                updates.append(
                    {
                        "b_id": up.task_id,
                        "state": TaskState.DONE,
                        "timestamp": up.timestamp,
                        "order_ts": up.timestamp,
                        "success": up.success,
                        "error_message": up.error_message
                        if sane_text
                        else _without_nul(up.error_message),
                        "task_event_result": result,
                    }
                )
                outcomes.append(
                    StoredResult(
                        up.task_id,
                        up.agent_uuid,
                        up.task_token,
                        up.timestamp,
                        up.success,
                        up.error_message,
                        result,
                    )
                )
        if updates:
            statement = (
                update(task_t)
                .where(task_t.c.id == bindparam("b_id"), task_t.c.state != TaskState.DONE)
                .values(
                    state=bindparam("state"),
                    timestamp=bindparam("timestamp"),
                    order_ts=bindparam("order_ts"),
                    success=bindparam("success"),
                    error_message=bindparam("error_message"),
                    task_event_result=bindparam("task_event_result"),
                )
            )
            result = await conn.execute(statement, updates)
            # SQLite reports the total; where the driver cannot (asyncpg), the rows are
            # locked by the SELECT ... FOR UPDATE above and cannot have changed
            sane = conn.dialect.supports_sane_multi_rowcount
            if sane and result.rowcount != len(updates):
                raise _Retry("a result row changed under the batch")
        for channel, task_ids in waiting.items():
            await notify(conn, channel, task_ids, "r:")
        return outcomes

    async def run(self, conn: AsyncConnection) -> Any:
        return (await self.run_batch(conn, [self]))[0]


async def _allocate_task_ids(conn: AsyncConnection, count: int) -> list[int]:
    """Reserve ``count`` new task ids inside the writer transaction."""
    if conn.dialect.name == "postgresql":
        result = await conn.execute(
            text(
                "SELECT nextval(pg_get_serial_sequence('task', 'id')) FROM generate_series(1, :n)"
            ),
            {"n": count},
        )
        return [int(value) for value in result.scalars()]
    # SQLite: the writer holds the write lock (BEGIN IMMEDIATE), so max(id) cannot move
    # under it; sqlite_sequence is not used because the table is not AUTOINCREMENT
    highest = (await conn.execute(select(func.max(task_t.c.id)))).scalar()
    start = int(highest or 0) + 1
    return list(range(start, start + count))


@dataclass(eq=False)
class _AgentConnectedOp(_Op):
    values: dict[str, Any]

    async def run_batch(self, conn: AsyncConnection, ops: Sequence[_Op]) -> list[Any]:
        # one statement for a whole reconnect storm, not a savepoint per agent
        rows = {op.values["uuid"]: op.values for op in ops}  # type: ignore[attr-defined]
        dialect_insert = sqlite_insert if conn.dialect.name == "sqlite" else pg_insert
        statement = dialect_insert(agent_t)
        columns = ["last_seen", "connected_since", "remote_addr", "node_id", "token_key"]
        statement = statement.on_conflict_do_update(
            index_elements=["uuid"],
            set_={column: getattr(statement.excluded, column) for column in columns},
        )
        await conn.execute(statement, list(rows.values()))
        await notify(conn, AGENTS_CHANNEL, [f"{u} {v['node_id']}" for u, v in rows.items()])
        return [None] * len(ops)

    async def run(self, conn: AsyncConnection) -> Any:
        return (await self.run_batch(conn, [self]))[0]


AGENTS_CHANNEL = "taskd_agents"
TERMINALS_CHANNEL = "taskd_terminals"
CRONS_CHANNEL = "taskd_crons"
TOKENS_CHANNEL = "taskd_tokens"


def node_channel(node_id: str) -> str:
    """The LISTEN channel of a cluster node (a valid unquoted identifier)."""
    return "taskd_n_" + "".join(c for c in node_id.lower() if c.isalnum())[:48]


async def notify(
    conn: AsyncConnection, channel: str, items: Sequence[str], prefix: str = ""
) -> None:
    """NOTIFY ``items`` comma-joined (chunked under 8000 bytes) on PostgreSQL, at commit."""
    if conn.dialect.name != "postgresql" or not items:
        return
    payloads: list[str] = []
    current = ""
    for item in items:
        if current and len(prefix) + len(current) + len(item) + 1 > 7_900:
            payloads.append(prefix + current)
            current = ""
        current = f"{current},{item}" if current else item
    payloads.append(prefix + current)
    for payload in payloads:
        await conn.execute(text("SELECT pg_notify(:c, :p)"), {"c": channel, "p": payload})


class _RunNow:
    """Stands in for aiosqlite's queue to its thread: runs each call as it is queued."""

    def put_nowait(self, item: tuple[asyncio.Future[Any] | None, Callable[[], Any]]) -> None:
        """Run the call and settle its future."""
        future, function = item
        try:
            result = function()
        except BaseException as exc:
            if future is not None:
                future.set_exception(exc)
        else:
            if future is not None:
                future.set_result(result)


class InlineSqlite(aiosqlite.Connection):
    """aiosqlite's interface, with every call run at once on the event loop thread.

    The writer's statements touch a local file for microseconds, while handing each
    to aiosqlite's thread and back costs two wake-ups (a millisecond or more where
    system calls are slow). Run inline, a whole batch commits without leaving the
    loop. A busy lock is not waited for here (a 100 ms busy timeout): the writer
    retries the batch after yielding instead.
    """

    def __init__(self, connector: Callable[[], sqlite3.Connection]) -> None:
        super().__init__(connector, iter_chunk_size=64)
        self._tx = _RunNow()  # type: ignore[assignment]

    def __await__(self) -> Generator[Any, None, aiosqlite.Connection]:
        return self._connect().__await__()  # no thread to start


def _json(options: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if k.startswith("json_") or k == "echo"}


class _Retry(Exception):
    """The batch must be re-run op by op."""


# --------------------------------------------------------------------------- store


class Store:
    """The database behind taskd; an async context manager owning the engine and writer."""

    def __init__(self, url: str, *, pool_size: int = 10, echo: bool = False) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        self._pool_size = pool_size
        self._echo = echo
        self._queue: list[_Op] = []
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._closing = False
        self.batch_observer: Callable[[int], None] | None = None
        self.engine: AsyncEngine

    async def __aenter__(self) -> Store:
        options: dict[str, Any] = {
            "json_serializer": _json_dumps if self.is_sqlite else _pg_json_dumps,
            "json_deserializer": orjson.loads,
            "echo": self._echo,
        }
        if self.is_sqlite:
            options["pool_size"] = self._pool_size
            options["connect_args"] = {"timeout": 30}
        else:
            options["pool_size"] = self._pool_size
            options["max_overflow"] = self._pool_size
            options["pool_timeout"] = 10
            options["connect_args"] = {"timeout": 5, "command_timeout": 30}
        self.engine = create_async_engine(self.url, **options)
        if not self.is_sqlite:
            # the writer keeps a connection of its own: a flood of reads queued on the
            # pool must never hold back the commits that acknowledge tasks and results
            single = options | {"pool_size": 1, "max_overflow": 0}
            self.write_engine = create_async_engine(self.url, **single)
        else:
            path = self.url.split("///", 1)[-1]

            async def inline() -> aiosqlite.Connection:
                return await InlineSqlite(lambda: sqlite3.connect(path, timeout=0.1))

            # one connection, run on the event loop thread: see InlineSqlite
            self.write_engine = create_async_engine(
                self.url, async_creator=inline, pool_size=1, max_overflow=0, **_json(options)
            )
            self._prepare_sqlite(self.engine, busy_timeout_ms=30_000)
            self._prepare_sqlite(self.write_engine, busy_timeout_ms=100)
        self._writer = asyncio.create_task(self._write_loop(), name="taskd-store-writer")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._closing = True
        self._wake.set()
        if self._writer is not None:
            await self._writer
        await self.engine.dispose()
        if self.write_engine is not self.engine:
            await self.write_engine.dispose()

    async def checkpoint(self) -> None:
        """Copy the SQLite write-ahead log into the database file, off the event loop.

        The writer runs on the event loop and never checkpoints itself (a checkpoint
        syncs the file to disk, which can take long); this runs on a reader thread.
        """
        if self.is_sqlite:

            async def run(conn: AsyncConnection) -> None:
                await conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")

            await self.read(run)

    def _prepare_sqlite(self, engine: AsyncEngine, busy_timeout_ms: int) -> None:
        path = self.url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            if not Path(path).exists():
                Path(path).touch(mode=0o600)
        writer = engine is not self.engine

        @event.listens_for(engine.sync_engine, "connect")
        def _pragmas(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
            # SQLAlchemy emits BEGIN itself (below), so SELECT ... then UPDATE and
            # SAVEPOINTs behave; the driver's implicit transactions are switched off.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            pragmas = [
                "PRAGMA journal_mode=WAL",
                "PRAGMA synchronous=NORMAL",
                f"PRAGMA busy_timeout={busy_timeout_ms}",
                "PRAGMA foreign_keys=ON",
            ]
            if writer:
                pragmas.append("PRAGMA wal_autocheckpoint=0")  # see Store.checkpoint
            for pragma in pragmas:
                cursor.execute(pragma)
            cursor.close()

        @event.listens_for(engine.sync_engine, "begin")
        def _begin(conn: Connection) -> None:
            # the writer takes the write lock up front; readers take a snapshot
            immediate = conn.get_execution_options().get("taskd_writer", False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    # ------------------------------------------------------------------ migrations

    async def migrate(self) -> None:
        """Bring the schema to the newest Alembic revision."""

        def upgrade(connection: Connection) -> None:
            config = AlembicConfig()
            config.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
            config.attributes["connection"] = connection
            command.upgrade(config, "head")

        async with self.write_engine.begin() as conn:
            await conn.run_sync(upgrade)

    # ------------------------------------------------------------------ writer

    async def _submit(self, op: _Op) -> Any:
        if self._closing:
            raise DatabaseError("The store is shutting down")
        self._queue.append(op)
        self._wake.set()
        return await op.future

    async def write(self, fn: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        """Run ``fn`` inside a writer transaction; return its value once committed."""
        result: T = await self._submit(_CallOp(fn))
        return result

    async def _write_loop(self) -> None:
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
                await self._run_batch(batch)
            if self._closing and not self._queue:
                return

    async def _run_batch(self, batch: list[_Op]) -> None:
        try:
            outcomes = await self._locked_retry(batch)
        except Exception as exc:
            # one op's values broke the transaction: halves are retried until only it fails
            isolate = isinstance(exc, _Retry | IntegrityError | ValueError | TypeError)
            if len(batch) > 1 and (isolate or _bad_value(exc)):
                half = len(batch) // 2
                await self._run_batch(batch[:half])
                await self._run_batch(batch[half:])
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

    async def _locked_retry(self, batch: list[_Op]) -> list[Any]:
        """Run the batch; while another process holds SQLite's write lock, wait and retry."""
        deadline = asyncio.get_running_loop().time() + LOCKED_WAIT_S
        while True:
            try:
                return await self._transaction(batch)
            except OperationalError as exc:
                locked = "locked" in str(exc.orig) or "busy" in str(exc.orig)
                if not locked or asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.02)

    async def _transaction(self, batch: list[_Op]) -> list[Any]:
        outcomes: dict[int, Any] = {}
        async with self.write_engine.connect() as conn:
            await conn.execution_options(taskd_writer=True)
            async with conn.begin():
                await self._run_grouped(conn, batch, outcomes)
        return [outcomes[i] for i in range(len(batch))]

    async def _run_grouped(
        self, conn: AsyncConnection, batch: list[_Op], outcomes: dict[int, Any]
    ) -> None:
        groups: dict[type[_Op], list[int]] = {}
        for index, op in enumerate(batch):
            groups.setdefault(type(op), []).append(index)
        # ops of one kind run together; kinds run in order of first appearance
        for kind, indexes in groups.items():
            ops = [batch[i] for i in indexes]
            if kind is _CallOp:
                results = []
                for op in ops:
                    try:
                        async with conn.begin_nested():
                            results.append(await op.run(conn))
                    except TaskdError as exc:
                        results.append(exc)
            else:
                results = await ops[0].run_batch(conn, ops)
            outcomes.update(zip(indexes, results, strict=True))

    def _fail(self, batch: Iterable[_Op], exc: BaseException) -> None:
        if isinstance(exc, TaskdError):
            error: TaskdError = exc
        elif _bad_value(exc):
            logger.warning("the database refused a value: %s", _describe(exc))
            error = InvalidInput("The database cannot store a value of this request")
        else:
            logger.error("database write failed: %s", _describe(exc))
            error = DatabaseError("Database error: the write was not committed")
        for op in batch:
            if not op.future.done():
                op.future.set_exception(error)

    async def read(self, fn: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        """Run ``fn`` on a pooled read connection; database failures become DatabaseError."""
        try:
            async with self.engine.connect() as conn:
                return await fn(conn)
        except TaskdError:
            raise
        except (TimeoutError, SQLAlchemyError, OSError, OverflowError) as exc:
            if _bad_value(exc):
                logger.warning("the database refused a value: %s", _describe(exc))
                raise InvalidInput("The database cannot look up a value of this request") from None
            logger.error("database read failed: %s", _describe(exc))
            raise DatabaseError("Database error: the read failed") from None

    async def fetch_one(self, statement: Select[Any]) -> Row[Any] | None:
        """The first row a read statement returns, or None."""

        async def fetch(conn: AsyncConnection) -> Row[Any] | None:
            row: Row[Any] | None = (await conn.execute(statement)).first()
            return row

        return await self.read(fetch)

    async def fetch_all(self, statement: Select[Any]) -> list[Row[Any]]:
        """Every row a read statement returns."""

        async def fetch(conn: AsyncConnection) -> list[Row[Any]]:
            return list((await conn.execute(statement)).all())

        return await self.read(fetch)

    # ------------------------------------------------------------------ tasks

    async def insert_tasks(self, tasks: Sequence[NewTask]) -> list[int]:
        """Insert task rows; their ids are set once committed."""
        ids: list[int] = await self._submit(_InsertTasksOp(tasks))
        return ids

    async def complete_task(self, upload: TaskResponse, node_id: str = "") -> StoredResult:
        """Store an agent's result: 105 if id/uuid/token do not match, 108 if already done.

        A blocking caller waiting on another node (``waiter_node``) is notified at commit.
        """
        kind = upload.task_event_result.kind if upload.task_event_result is not None else None
        result: StoredResult = await self._submit(_CompleteOp(upload, kind, node_id))
        return result

    async def get_result(self, task_id: int) -> StoredResult | None:
        """The committed result of a task, or None while it has none."""

        async def fetch(conn: AsyncConnection) -> StoredResult | None:
            row = (
                await conn.execute(
                    select(
                        task_t.c.id,
                        task_t.c.uuid,
                        task_t.c.task_token,
                        task_t.c.timestamp,
                        task_t.c.success,
                        task_t.c.error_message,
                        task_t.c.task_event_result,
                    ).where(task_t.c.id == task_id, task_t.c.state >= TaskState.DONE)
                )
            ).first()
            return StoredResult(*row) if row is not None else None

        return await self.read(fetch)

    async def task_identity(self, task_id: int) -> Row[Any] | None:
        """The (uuid, task_token, type) of a task, or None."""

        return await self.fetch_one(
            select(task_t.c.uuid, task_t.c.task_token, task_t.c.type).where(task_t.c.id == task_id)
        )

    async def delete_task_ids(self, ids: Sequence[int]) -> int:
        """Remove task rows by id (a task that could not be delivered)."""

        async def remove(conn: AsyncConnection) -> int:
            result = await conn.execute(delete(task_t).where(task_t.c.id.in_(ids)))
            return int(result.rowcount)

        return await self.write(remove)

    async def take_queued(self, agent_uuid: str, deadline_ms: int) -> list[Row[Any]]:
        """Mark every queued task of an agent as running (with a fresh deadline) and return them."""

        async def take(conn: AsyncConnection) -> list[Row[Any]]:
            now = now_ms()
            rows = (
                await conn.execute(
                    select(task_t.c.id, task_t.c.task_token, task_t.c.task_event_type)
                    .where(
                        task_t.c.uuid == agent_uuid,
                        task_t.c.state == TaskState.QUEUED,
                        task_t.c.deadline > now,
                    )
                    .order_by(task_t.c.id)
                    .with_for_update(skip_locked=True)
                )
            ).all()
            if rows:
                await conn.execute(
                    update(task_t)
                    .where(task_t.c.id.in_([r.id for r in rows]))
                    .values(state=TaskState.RUNNING, deadline=now + deadline_ms)
                )
            return list(rows)

        return await self.write(take)

    async def requeue(self, ids: Sequence[int]) -> None:
        """Put taken tasks back in the queue (their agent went away before delivery)."""

        async def back(conn: AsyncConnection) -> None:
            await conn.execute(
                update(task_t)
                .where(task_t.c.id.in_(ids), task_t.c.state == TaskState.RUNNING)
                .values(
                    state=TaskState.QUEUED,
                    # a routed task (no TTL) keeps the deadline it was given when taken
                    deadline=func.coalesce(
                        task_t.c.created_at + task_t.c.queue_ttl_ms, task_t.c.deadline
                    ),
                )
            )

        await self.write(back)

    async def reap(self, now: int, limit: int = 5000) -> list[StoredResult]:
        """Fail tasks past their deadline: running ones time out, queued ones expire."""

        async def fail(conn: AsyncConnection) -> list[StoredResult]:
            rows = (
                await conn.execute(
                    select(
                        task_t.c.id,
                        task_t.c.uuid,
                        task_t.c.task_token,
                        task_t.c.state,
                        task_t.c.queue_ttl_ms,
                    )
                    .where(task_t.c.state < TaskState.DONE, task_t.c.deadline <= now)
                    .order_by(task_t.c.deadline)
                    .limit(limit)
                    .with_for_update(skip_locked=True)
                )
            ).all()
            if not rows:
                return []
            reaped = []
            for row in rows:
                if row.state == TaskState.QUEUED and row.queue_ttl_ms is None:
                    message = "timed out: the agent's node did not deliver the task"
                elif row.state == TaskState.QUEUED:
                    message = f"expired: agent did not connect within {row.queue_ttl_ms} ms"
                else:
                    message = "timed out: no result from agent"
                reaped.append(
                    StoredResult(row.id, row.uuid, row.task_token, now, False, message, None)
                )
            await conn.execute(
                update(task_t)
                .where(task_t.c.id == bindparam("b_id"), task_t.c.state < TaskState.DONE)
                .values(
                    state=TaskState.FAILED_BY_SERVER,
                    timestamp=now,
                    order_ts=now,
                    success=False,
                    error_message=bindparam("message"),
                ),
                [{"b_id": r.task_id, "message": r.error_message} for r in reaped],
            )
            return reaped

        return await self.write(fail)

    def _filtered(self, statement: Select[Any], query: TaskQuery) -> Select[Any]:
        c = task_t.c
        if query.task_ids:
            for task_id in set(query.task_ids):
                statement = statement.where(c.id == task_id)
        for agent_uuid in set(query.uuids):
            statement = statement.where(c.uuid == agent_uuid)
        for task_type in set(query.types):
            statement = statement.where(c.type == task_type)
        for source in set(query.cron_sources):
            statement = statement.where(c.cron_source == source)
        # order_ts equals timestamp once a task has one, so repeating the bounds on
        # order_ts lets the (..., order_ts) indexes serve time ranges too
        if query.timestamp_from is not None:
            statement = statement.where(
                c.timestamp >= query.timestamp_from, c.order_ts >= query.timestamp_from
            )
        if query.timestamp_to is not None:
            statement = statement.where(
                c.timestamp <= query.timestamp_to, c.order_ts <= query.timestamp_to
            )
        if query.is_success:
            statement = statement.where(c.success.is_(True))
        if query.is_failure:
            statement = statement.where(c.success.is_(False))
        if query.is_running:
            statement = statement.where(c.timestamp.is_(None))
        limit = DEFAULT_QUERY_LIMIT if query.limit is None else query.limit
        return statement.order_by(c.order_ts.desc(), c.id.desc()).limit(limit)

    async def query_tasks(self, query: TaskQuery) -> list[Row[Any]]:
        """Task records matching every condition, newest first."""

        return await self.fetch_all(self._filtered(select(*TASK_RECORD_COLUMNS), query))

    async def delete_tasks(self, query: TaskQuery) -> list[int]:
        """Delete the task records a query selects (newest first, its limit applies).

        Returns the deleted ids; nodes with a blocking call waiting on one of them
        are told (see ``Hub.forget``).
        """

        async def remove(conn: AsyncConnection) -> list[int]:
            ids = self._filtered(select(task_t.c.id), query).scalar_subquery()
            statement = (
                delete(task_t)
                .where(task_t.c.id.in_(ids))
                .returning(task_t.c.id, task_t.c.waiter_node)
            )
            rows = (await conn.execute(statement)).all()
            waiting: dict[str, list[str]] = {}
            for row in rows:
                if row.waiter_node is not None:
                    waiting.setdefault(node_channel(row.waiter_node), []).append(str(row.id))
            for channel, task_ids in waiting.items():
                await notify(conn, channel, task_ids, "r:")
            return [int(row.id) for row in rows]

        return await self.write(remove)

    async def count_tasks(self) -> int:
        """How many task rows exist."""

        async def count(conn: AsyncConnection) -> int:
            return int((await conn.execute(select(func.count()).select_from(task_t))).scalar_one())

        return await self.read(count)

    # ------------------------------------------------------------------ tokens

    async def token_by_key(self, key: str) -> Row[Any] | None:
        """The token row with that key."""

        return await self.fetch_one(select(token_t).where(token_t.c.key == key))

    async def token_by_username(self, username: str) -> Row[Any] | None:
        """The token row with that username."""

        return await self.fetch_one(select(token_t).where(token_t.c.username == username))

    async def insert_token(self, values: dict[str, Any]) -> int:
        """Insert a token row; 108 if its key or username is taken."""

        async def add(conn: AsyncConnection) -> int:
            now = now_ms()
            row = {"created_at": now, "updated_at": now, "uses": 0, "is_super": False} | values
            if row.get("username") is not None:
                taken = await conn.execute(
                    select(token_t.c.id).where(token_t.c.username == row["username"])
                )
                if taken.first() is not None:
                    raise InvalidInput(f"Username {row['username']!r} is already taken")
            result = await conn.execute(insert(token_t).returning(token_t.c.id), [row])
            return int(result.scalar_one())

        return await self.write(add)

    async def has_super_token(self) -> bool:
        """Whether a super token exists."""

        statement = select(token_t.c.id).where(token_t.c.is_super.is_(True)).limit(1)
        return await self.fetch_one(statement) is not None

    # ------------------------------------------------------------------ agents

    def _upsert(
        self, table: Any, values: dict[str, Any], keys: list[str], update_cols: Iterable[str]
    ) -> Any:
        dialect_insert = sqlite_insert if self.is_sqlite else pg_insert
        statement = dialect_insert(table).values(**values)
        return statement.on_conflict_do_update(
            index_elements=keys,
            set_={col: getattr(statement.excluded, col) for col in update_cols},
        )

    async def agent_connected(
        self, agent_uuid: str, remote_addr: str | None, node_id: str, token_key: str | None
    ) -> None:
        """Record that an agent subscribed here."""
        now = now_ms()
        values = {
            "uuid": agent_uuid,
            "first_seen": now,
            "last_seen": now,
            "connected_since": now,
            "remote_addr": remote_addr,
            "node_id": node_id,
            "token_key": token_key,
        }
        await self._submit(_AgentConnectedOp(values))

    async def agents_disconnected(self, seen: dict[str, int], node_id: str) -> None:
        """Record that agents' subscriptions on this node ended (``seen``: uuid → last seen ms)."""

        async def mark(conn: AsyncConnection) -> None:
            await conn.execute(
                update(agent_t)
                .where(agent_t.c.uuid == bindparam("b_uuid"), agent_t.c.node_id == node_id)
                .values(connected_since=None, last_seen=bindparam("last_seen")),
                [{"b_uuid": u, "last_seen": t} for u, t in seen.items()],
            )
            await notify(conn, AGENTS_CHANNEL, [f"{u} -" for u in seen])

        if seen:
            await self.write(mark)

    async def touch_agents(self, seen: dict[str, int]) -> None:
        """Update agents' last-seen times."""

        async def mark(conn: AsyncConnection) -> None:
            await conn.execute(
                update(agent_t)
                .where(agent_t.c.uuid == bindparam("b_uuid"))
                .values(last_seen=bindparam("last_seen")),
                [{"b_uuid": u, "last_seen": t} for u, t in seen.items()],
            )

        if seen:
            await self.write(mark)

    async def list_agents(self) -> list[Row[Any]]:
        """Every agent ever seen."""

        return await self.fetch_all(select(agent_t).order_by(agent_t.c.uuid))

    async def reset_node_agents(self, node_id: str) -> None:
        """Mark every agent recorded on ``node_id`` as disconnected (the node restarted)."""

        async def mark(conn: AsyncConnection) -> None:
            await conn.execute(
                update(agent_t)
                .where(agent_t.c.node_id == node_id, agent_t.c.connected_since.is_not(None))
                .values(connected_since=None)
            )

        await self.write(mark)

    # ------------------------------------------------------------------ terminal relay

    async def terminal_task(self, task_id: int) -> Row[Any, Any, Any, Any, Any] | None:
        """The (uuid, task_token, type, state, task_event_type) of a task, or None."""

        async def fetch(conn: AsyncConnection) -> Row[Any, Any, Any, Any, Any] | None:
            statement = select(
                task_t.c.uuid,
                task_t.c.task_token,
                task_t.c.type,
                task_t.c.state,
                task_t.c.task_event_type,
            ).where(task_t.c.id == task_id)
            return (await conn.execute(statement)).first()

        return await self.read(fetch)

    # ---- crons

    async def _next_cron_id(self, conn: AsyncConnection) -> int:
        # SQLite hands the highest rowid out again once its row is deleted, but a
        # deleted cron's history keeps its id: a new cron must not inherit it
        highest = select(func.max(cron_t.c.id)).union_all(
            select(func.max(cron_fire_t.c.cron_id)), select(func.max(cron_result_t.c.cron_id))
        )
        values = (await conn.execute(highest)).scalars().all()
        return max((int(v) for v in values if v is not None), default=0) + 1

    async def insert_cron(self, values: dict[str, Any]) -> Row[Any]:
        """Insert a cron and return its row; 108 if the name is taken."""

        async def add(conn: AsyncConnection) -> Row[Any]:
            taken = await conn.execute(select(cron_t.c.id).where(cron_t.c.name == values["name"]))
            if taken.first() is not None:
                raise InvalidInput(f"A cron named {values['name']!r} already exists")
            now = now_ms()
            row = {"enable": True, "created_at": now, "updated_at": now} | values
            if self.is_sqlite:
                row["id"] = await self._next_cron_id(conn)
            result = await conn.execute(insert(cron_t).values(row).returning(*cron_t.c))
            return result.one()

        return await self.write(add)

    async def update_cron(
        self,
        name: str,
        values: dict[str, Any],
        check: Callable[[Row[Any]], None] | None = None,
    ) -> Row[Any]:
        """Change a cron and return the new row; 105 if none has that name.

        ``check`` sees the current row inside the transaction and may raise to refuse.
        """

        async def change(conn: AsyncConnection) -> Row[Any]:
            current = (
                await conn.execute(select(cron_t).where(cron_t.c.name == name).with_for_update())
            ).first()
            if current is None:
                raise NotFound(f"No cron named {name!r}")
            if check is not None:
                check(current)
            result = await conn.execute(
                update(cron_t)
                .where(cron_t.c.id == current.id)
                .values(updated_at=now_ms(), **values)
                .returning(*cron_t.c)
            )
            return result.one()

        return await self.write(change)

    async def delete_cron(
        self, name: str, check: Callable[[Row[Any]], None] | None = None
    ) -> Row[Any]:
        """Delete a cron (its fire history stays) and return the deleted row; 105 if none."""

        async def remove(conn: AsyncConnection) -> Row[Any]:
            current = (
                await conn.execute(select(cron_t).where(cron_t.c.name == name).with_for_update())
            ).first()
            if current is None:
                raise NotFound(f"No cron named {name!r}")
            if check is not None:
                check(current)
            await conn.execute(delete(cron_t).where(cron_t.c.id == current.id))
            return current

        return await self.write(remove)

    async def cron_by_id(self, cron_id: int) -> Row[Any] | None:
        """The cron with that id, or None (deleted)."""

        return await self.fetch_one(select(cron_t).where(cron_t.c.id == cron_id))

    async def cron_by_name(self, name: str) -> Row[Any] | None:
        """The cron with that name."""

        return await self.fetch_one(select(cron_t).where(cron_t.c.name == name))

    async def list_crons(self, *, enabled_only: bool = False) -> list[Row[Any]]:
        """Every cron (or every enabled one), by id."""

        statement = select(cron_t).order_by(cron_t.c.id)
        if enabled_only:
            statement = statement.where(cron_t.c.enable.is_(True))
        return await self.fetch_all(statement)

    async def claim_cron_slot(
        self, cron_id: int, slot: int, fired_at: int, node_id: str
    ) -> Row[Any] | None:
        """Record that a cron fires ``slot`` and return its row.

        None if the cron is gone or disabled, or the slot was already fired (by an
        earlier run of this node or by another node): the unique (cron_id, slot)
        row is the guard, written in the same transaction as ``last_run_time``.
        """

        async def claim(conn: AsyncConnection) -> Row[Any] | None:
            cron = (
                await conn.execute(
                    select(cron_t).where(cron_t.c.id == cron_id, cron_t.c.enable.is_(True))
                )
            ).first()
            if cron is None:
                return None
            dialect_insert = sqlite_insert if self.is_sqlite else pg_insert
            inserted = await conn.execute(
                dialect_insert(cron_fire_t)
                .values(cron_id=cron_id, slot=slot, fired_at=fired_at, node_id=node_id)
                .on_conflict_do_nothing(index_elements=["cron_id", "slot"])
                .returning(cron_fire_t.c.id)
            )
            if inserted.first() is None:
                return None
            await conn.execute(
                update(cron_t)
                .where(
                    cron_t.c.id == cron_id,
                    or_(cron_t.c.last_run_time.is_(None), cron_t.c.last_run_time < slot),
                )
                .values(last_run_time=slot)
            )
            return cron

        return await self.write(claim)

    async def insert_cron_results(self, rows: Sequence[dict[str, Any]]) -> None:
        """Store the outcome of a fire: one row per target agent."""

        async def add(conn: AsyncConnection) -> None:
            await conn.execute(insert(cron_result_t), list(rows))

        if rows:
            await self.write(add)

    async def cron_result_names(self) -> list[str]:
        """Every cron name that has results."""

        async def fetch(conn: AsyncConnection) -> list[str]:
            statement = select(cron_result_t.c.cron_name).distinct()
            return [str(name) for name in (await conn.execute(statement)).scalars()]

        return await self.read(fetch)

    def _cron_results_filtered(
        self,
        statement: Select[Any],
        query: CronResultQuery,
        names: Sequence[str] | None,
        default_limit: int | None,
    ) -> Select[Any]:
        c = cron_result_t.c
        for result_id in set(query.ids):
            statement = statement.where(c.id == result_id)
        for cron_id in set(query.cron_ids):
            statement = statement.where(c.cron_id == cron_id)
        for cron_name in set(query.cron_names):
            statement = statement.where(c.cron_name == cron_name)
        if names is not None:
            statement = statement.where(c.cron_name.in_(names))
        if query.run_time_from is not None:
            statement = statement.where(c.run_time >= query.run_time_from)
        if query.run_time_to is not None:
            statement = statement.where(c.run_time <= query.run_time_to)
        if query.is_success:
            statement = statement.where(c.success.is_(True))
        if query.is_failure:
            statement = statement.where(c.success.is_(False))
        statement = statement.order_by(c.run_time.desc(), c.id.desc())
        limit = default_limit if query.limit is None else query.limit
        return statement if limit is None else statement.limit(limit)

    async def query_cron_results(
        self, query: CronResultQuery, names: Sequence[str] | None = None
    ) -> list[Row[Any]]:
        """Cron results matching every condition (and, if given, one of ``names``), newest first."""

        return await self.fetch_all(
            self._cron_results_filtered(select(cron_result_t), query, names, DEFAULT_QUERY_LIMIT)
        )

    async def delete_cron_results(
        self, query: CronResultQuery, names: Sequence[str] | None = None
    ) -> int:
        """Delete the cron results a query selects (all of them unless it has a limit)."""

        async def remove(conn: AsyncConnection) -> int:
            ids = self._cron_results_filtered(
                select(cron_result_t.c.id), query, names, None
            ).scalar_subquery()
            result = await conn.execute(delete(cron_result_t).where(cron_result_t.c.id.in_(ids)))
            return int(result.rowcount)

        return await self.write(remove)

    # ------------------------------------------------------------------ cluster

    async def node_heartbeat(self, node_id: str, address: str, *, started: bool = False) -> None:
        """Record that a node is alive (and where other nodes reach it)."""
        now = now_ms()
        values = {"id": node_id, "address": address, "started_at": now, "heartbeat": now}
        columns = ["address", "heartbeat"] + (["started_at"] if started else [])

        async def beat(conn: AsyncConnection) -> None:
            await conn.execute(self._upsert(node_t, values, ["id"], columns))

        await self.write(beat)

    async def announce(self, channel: str, payload: str) -> None:
        """NOTIFY one payload on a channel (PostgreSQL only)."""

        async def send(conn: AsyncConnection) -> None:
            await notify(conn, channel, [payload])

        await self.write(send)

    async def node_left(self, node_id: str) -> None:
        """A node shut down: its heartbeat stops counting at once."""

        async def leave(conn: AsyncConnection) -> None:
            await conn.execute(update(node_t).where(node_t.c.id == node_id).values(heartbeat=0))

        await self.write(leave)

    async def list_nodes(self) -> list[Row[Any]]:
        """Every node row."""

        return await self.fetch_all(select(node_t))

    async def connected_agents(self) -> list[Row[Any]]:
        """(uuid, node_id) of every agent recorded as connected."""

        return await self.fetch_all(
            select(agent_t.c.uuid, agent_t.c.node_id).where(agent_t.c.connected_since.is_not(None))
        )

    # ------------------------------------------------------------------ token management

    async def list_tokens(self) -> list[Row[Any]]:
        """Every token row, oldest first."""

        async def fetch(conn: AsyncConnection) -> list[Row[Any]]:
            return list((await conn.execute(select(token_t).order_by(token_t.c.id))).all())

        return await self.read(fetch)

    async def _username_taken(self, conn: AsyncConnection, username: str, key: str) -> bool:
        statement = select(token_t.c.id).where(token_t.c.username == username, token_t.c.key != key)
        return (await conn.execute(statement)).first() is not None

    async def update_token(
        self, key: str, change: Callable[[Row[Any]], dict[str, Any]]
    ) -> Row[Any]:
        """Set the values ``change(row)`` returns (it may raise) on token ``key``, atomically.

        105 if there is no such token, 108 if a new username is taken; returns the new row.
        """

        async def apply(conn: AsyncConnection) -> Row[Any]:
            row = (await conn.execute(select(token_t).where(token_t.c.key == key))).first()
            if row is None:
                raise NotFound(f"No token with key {key}")
            values = change(row) | {"updated_at": now_ms()}
            username = values.get("username")
            if username is not None and await self._username_taken(conn, username, key):
                raise InvalidInput(f"Username {username!r} is already taken")
            await conn.execute(update(token_t).where(token_t.c.id == row.id).values(**values))
            statement = select(token_t).where(token_t.c.id == row.id)
            return (await conn.execute(statement)).one()

        return await self.write(apply)

    async def delete_token(self, key: str, check: Callable[[Row[Any]], None]) -> None:
        """Delete token ``key`` unless ``check(row)`` raises; 105 if there is no such token."""

        async def remove(conn: AsyncConnection) -> None:
            row = (await conn.execute(select(token_t).where(token_t.c.key == key))).first()
            if row is None:
                raise NotFound(f"No token with key {key}")
            check(row)
            await conn.execute(delete(token_t).where(token_t.c.id == row.id))

        await self.write(remove)

    async def enroll_agent(
        self, enroll_key: str, agent_uuid: str, token: dict[str, Any], remote_addr: str | None
    ) -> None:
        """Use up one use of an enrollment token, claim ``agent_uuid`` and store its token.

        All in one transaction: 102 if the enrollment token has no uses left (or is
        gone), 108 if an agent row or another token's scope already claims the UUID.
        """

        async def enroll(conn: AsyncConnection) -> None:
            used = await conn.execute(
                update(token_t)
                .where(
                    token_t.c.key == enroll_key,
                    or_(token_t.c.max_uses.is_(None), token_t.c.uses < token_t.c.max_uses),
                )
                .values(uses=token_t.c.uses + 1)
                .returning(token_t.c.uses)
            )
            if used.first() is None:
                raise PermissionDenied(
                    f"Enrollment token {enroll_key} has no uses left or was revoked"
                )
            claimed = {"agent_uuid": agent_uuid}
            others = await conn.execute(select(token_t.c.limits).where(token_t.c.key != enroll_key))
            if any(
                claimed in (limit.get("scopes") or [])
                for (limits,) in others
                for limit in limits or []
                if isinstance(limit, dict)
            ):
                raise InvalidInput(f"Agent UUID {agent_uuid} is already taken")
            now = now_ms()
            dialect_insert = sqlite_insert if self.is_sqlite else pg_insert
            inserted = await conn.execute(
                dialect_insert(agent_t)
                .values(
                    uuid=agent_uuid,
                    first_seen=now,
                    last_seen=now,
                    remote_addr=remote_addr,
                    token_key=token["key"],
                )
                .on_conflict_do_nothing(index_elements=["uuid"])
                .returning(agent_t.c.uuid)
            )
            if inserted.first() is None:
                raise InvalidInput(f"Agent UUID {agent_uuid} is already taken")
            row = {"created_at": now, "updated_at": now, "uses": 0, "is_super": False} | token
            await conn.execute(insert(token_t), [row])

        await self.write(enroll)


def _bad_value(exc: BaseException) -> bool:
    """Whether the database or its driver refused a value (not a failure of the database)."""
    if isinstance(exc, OverflowError):  # sqlite3 binding an integer beyond 64 bits
        return True
    if not isinstance(exc, StatementError):
        return False
    for error in (exc.orig, getattr(exc.orig, "__cause__", None)):
        if isinstance(error, ValueError | TypeError | OverflowError):
            return True
        # SQLSTATE class 22: data exception (out of range, bad encoding, NUL in text ...)
        if str(getattr(error, "sqlstate", "") or "").startswith("22"):
            return True
    return False


def _describe(exc: BaseException) -> str:
    if isinstance(exc, DBAPIError):
        return (
            f"{type(exc.orig).__name__}: {str(exc.orig).splitlines()[0] if str(exc.orig) else ''}"
        )
    return f"{type(exc).__name__}: {exc}"
