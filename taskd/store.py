"""The database: engines, migrations, and every query.

All writes go through the group-commit writer (``writer.py``), so a caller is
answered after its write is committed. The store raises domain errors
(``NotFound``, ``AlreadyUploaded`` ...) and knows nothing of RPC.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from collections.abc import Awaitable, Callable, Generator, Iterable, Sequence
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
    literal_column,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import make_url
from sqlalchemy.exc import (
    SQLAlchemyError,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry

from taskd.clock import now_ms
from taskd.errors import (
    DatabaseError,
    InvalidInput,
    NotFound,
    PermissionDenied,
    TaskdError,
)
from taskd.models import Agent, Cron, CronFire, CronResult, Kv, Node, Task, TaskState, Token
from taskd.protocol import (
    DEFAULT_QUERY_LIMIT,
    CronResultQuery,
    TaskQuery,
    TaskResponse,
)
from taskd.writer import (
    AGENTS_CHANNEL,
    AgentConnectedOp,
    AgentsSeenOp,
    CallOp,
    CompleteOp,
    InsertTasksOp,
    NewTask,
    Op,
    QueuedTask,
    Raw,
    RawPostgres,
    RawSqlite,
    StoredResult,
    TakeQueuedOp,
    Writer,
    bad_value,
    describe,
    json_dumps,
    node_channel,
    notify,
    pg_json_dumps,
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
kv_t = Kv.__table__  # type: ignore[attr-defined]
SUPER_USERNAME = "root"
"""The username of the super token: NodeGet's clients recognise the super token by it."""

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
    """aiosqlite's interface, with every call run at once on the calling thread's loop.

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


class _ReadLoop:
    """A thread with its own event loop and one SQLite connection, used inline there.

    A read runs there whole (check-out, BEGIN, statements, fetch, roll back): one
    hand-over from the server's event loop and one back, where aiosqlite makes
    about eight, each waiting for a turn of a busy server loop. SQLAlchemy's work
    for the read runs on this thread too, and SQLite releases the GIL while it reads.
    """

    def __init__(self, engine: AsyncEngine, name: str) -> None:
        self.engine = engine
        self.pending = 0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    async def read(self, fn: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        """Run ``fn`` on this thread's connection."""
        self.pending += 1
        try:
            return await asyncio.wrap_future(
                asyncio.run_coroutine_threadsafe(self._read(fn), self.loop)
            )
        finally:
            self.pending -= 1

    async def _read(self, fn: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        async with self.engine.connect() as conn:
            return await fn(conn)

    async def close(self) -> None:
        """Close the connection and end the thread."""
        done = asyncio.run_coroutine_threadsafe(self.engine.dispose(), self.loop)
        await asyncio.wrap_future(done)
        self.loop.call_soon_threadsafe(self.loop.stop)
        await asyncio.to_thread(self.thread.join)
        self.loop.close()


def _json(options: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if k.startswith("json_") or k == "echo"}


# --------------------------------------------------------------------------- store


class Store:
    """The database behind taskd; an async context manager owning the engine and writer."""

    def __init__(self, url: str, *, pool_size: int = 10, echo: bool = False) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        self._pool_size = pool_size
        self._echo = echo
        self.batch_observer: Callable[[int], None] | None = None
        self.engine: AsyncEngine
        self.read_engines: list[AsyncEngine] = []
        """Every engine reads run on (SQLite: one per read thread)."""
        self._readers: list[_ReadLoop] = []
        self.writer: Writer

    async def __aenter__(self) -> Store:
        options: dict[str, Any] = {
            "json_serializer": json_dumps if self.is_sqlite else pg_json_dumps,
            "json_deserializer": orjson.loads,
            "echo": self._echo,
        }
        if not self.is_sqlite:
            options["pool_size"] = self._pool_size
            options["max_overflow"] = self._pool_size
            options["pool_timeout"] = 10
            options["connect_args"] = {"timeout": 5, "command_timeout": 30}
            self.engine = create_async_engine(self.url, **options)
            self.read_engines = [self.engine]
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
            self._prepare_sqlite(self.write_engine, busy_timeout_ms=100, writer=True)

            async def reader() -> aiosqlite.Connection:
                return await InlineSqlite(lambda: sqlite3.connect(path, timeout=30))

            for index in range(max(self._pool_size, 1)):
                engine = create_async_engine(
                    self.url, async_creator=reader, pool_size=1, max_overflow=0, **_json(options)
                )
                self._prepare_sqlite(engine, busy_timeout_ms=30_000, writer=False)
                self._readers.append(_ReadLoop(engine, f"taskd-sqlite-reader-{index}"))
            self.read_engines = [r.engine for r in self._readers]
            self.engine = self.read_engines[0]
        self.writer = Writer(self.write_engine, self._connect_writer, self._observe_batch)
        self.writer.start()
        return self

    async def _connect_writer(self) -> Raw:
        """The writer's own driver connection for the hot statements."""
        if self.is_sqlite:
            return RawSqlite(self.url.split("///", 1)[-1])
        dsn = make_url(self.url).set(drivername="postgresql").render_as_string(False)
        return await RawPostgres.connect(dsn)

    def _observe_batch(self, size: int) -> None:
        if self.batch_observer is not None:
            self.batch_observer(size)

    async def __aexit__(self, *exc_info: object) -> None:
        await self.writer.close()
        for reader in self._readers:
            await reader.close()
        if not self._readers:
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

    def _prepare_sqlite(self, engine: AsyncEngine, *, busy_timeout_ms: int, writer: bool) -> None:
        path = self.url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            if not Path(path).exists():
                Path(path).touch(mode=0o600)

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

    async def _submit(self, op: Op) -> Any:
        return await self.writer.submit(op)

    async def write(self, fn: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        """Run ``fn`` inside a writer transaction; return its value once committed."""
        result: T = await self._submit(CallOp(fn))
        return result

    async def read(self, fn: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        """Run ``fn`` on a read connection; database failures become DatabaseError.

        On SQLite ``fn`` runs on a read thread's own event loop (see _ReadLoop): it must
        use only its connection and plain values.
        """
        try:
            if self._readers:
                reader = min(self._readers, key=lambda r: r.pending)
                return await reader.read(fn)
            async with self.engine.connect() as conn:
                return await fn(conn)
        except TaskdError:
            raise
        except (TimeoutError, SQLAlchemyError, OSError, OverflowError) as exc:
            if bad_value(exc):
                logger.warning("the database refused a value: %s", describe(exc))
                raise InvalidInput("The database cannot look up a value of this request") from None
            logger.error("database read failed: %s", describe(exc))
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
        ids: list[int] = await self._submit(InsertTasksOp(tasks))
        return ids

    async def complete_task(self, upload: TaskResponse, node_id: str = "") -> StoredResult:
        """Store an agent's result: 105 if id/uuid/token do not match, 108 if already done.

        A blocking caller waiting on another node (``waiter_node``) is notified at commit.
        """
        kind = upload.task_event_result.kind if upload.task_event_result is not None else None
        result: StoredResult = await self._submit(CompleteOp(upload, kind, node_id))
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

    async def take_queued(self, agent_uuid: str, deadline_ms: int) -> list[QueuedTask]:
        """Mark every queued task of an agent as running and return them (see TakeQueuedOp)."""
        taken: list[QueuedTask] = await self._submit(TakeQueuedOp(agent_uuid, deadline_ms))
        return taken

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
                    # a literal, not a parameter: PostgreSQL's generic plans can use the
                    # partial index on open tasks only for a constant
                    .where(task_t.c.state < literal_column("2"), task_t.c.deadline <= now)
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
            # exactly the rows without a timestamp (every result sets one), written as
            # the predicate of the partial index of open tasks so that index serves it;
            # inline, not bound: a generic plan cannot prove a parameter matches it
            statement = statement.where(c.state < text(str(int(TaskState.DONE))))
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
        self,
        agent_uuid: str,
        remote_addr: str | None,
        node_id: str,
        token_key: str | None,
        *,
        since: int | None = None,
    ) -> None:
        """Record that an agent subscribed here (connected ``since`` ms, now by default)."""
        now = now_ms()
        values = {
            "uuid": agent_uuid,
            "first_seen": now,
            "last_seen": now,
            "connected_since": now if since is None else since,
            "remote_addr": remote_addr,
            "node_id": node_id,
            "token_key": token_key,
        }
        await self._submit(AgentConnectedOp(values))

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

    async def agents_seen(self, seen: dict[str, int]) -> None:
        """Record agents' authenticated calls (uuid → ms): each is known from then on, and one
        soft-deleted before its call is listed again."""
        if seen:
            await self._submit(AgentsSeenOp(seen))

    async def soft_delete_agent(self, agent_uuid: str) -> bool:
        """Leave an agent out of the lists from now on (its history stays); False if unknown."""

        async def mark(conn: AsyncConnection) -> bool:
            found = await conn.execute(
                select(agent_t.c.deleted_at).where(agent_t.c.uuid == agent_uuid)
            )
            row = found.first()
            if row is None:
                return False
            if row.deleted_at is None:
                await conn.execute(
                    update(agent_t).where(agent_t.c.uuid == agent_uuid).values(deleted_at=now_ms())
                )
            return True

        return await self.write(mark)

    # ------------------------------------------------------------------ kv

    async def kv_namespaces(self) -> list[str]:
        """Every KV namespace (a namespace exists while it holds a key), sorted."""

        async def fetch(conn: AsyncConnection) -> list[str]:
            rows = await conn.execute(select(kv_t.c.namespace).distinct())
            return sorted(namespace for (namespace,) in rows)

        return await self.read(fetch)

    @staticmethod
    async def _kv_exists(conn: AsyncConnection, namespace: str) -> bool:
        statement = select(kv_t.c.id).where(kv_t.c.namespace == namespace).limit(1)
        return (await conn.execute(statement)).first() is not None

    @staticmethod
    def _no_namespace(namespace: str) -> NotFound:
        return NotFound(f"KV namespace {namespace!r} does not exist")

    async def kv_create(self, namespace: str, marker: str) -> None:
        """Create a KV namespace by storing its ``marker`` key (value null); 108 if it exists."""

        async def create(conn: AsyncConnection) -> None:
            if await self._kv_exists(conn, namespace):
                raise InvalidInput(f"KV namespace {namespace!r} already exists")
            dialect_insert = sqlite_insert if self.is_sqlite else pg_insert
            inserted = await conn.execute(
                dialect_insert(kv_t)
                .values(namespace=namespace, key=marker, value=None)
                .on_conflict_do_nothing(index_elements=["namespace", "key"])
                .returning(kv_t.c.id)
            )
            if inserted.first() is None:  # created by another node meanwhile
                raise InvalidInput(f"KV namespace {namespace!r} already exists")

        await self.write(create)

    async def kv_get(self, namespace: str, key: str) -> Any:
        """The value of ``key`` (None if it has none); 105 if the namespace does not exist."""

        async def fetch(conn: AsyncConnection) -> Any:
            statement = select(kv_t.c.value).where(kv_t.c.namespace == namespace, kv_t.c.key == key)
            row = (await conn.execute(statement)).first()
            if row is not None:
                return row.value
            if not await self._kv_exists(conn, namespace):
                raise self._no_namespace(namespace)
            return None

        return await self.read(fetch)

    async def kv_keys(self, namespace: str) -> list[str]:
        """Every key of a namespace, sorted; 105 if the namespace does not exist."""

        async def fetch(conn: AsyncConnection) -> list[str]:
            rows = await conn.execute(select(kv_t.c.key).where(kv_t.c.namespace == namespace))
            keys = sorted(key for (key,) in rows)
            if not keys:
                raise self._no_namespace(namespace)
            return keys

        return await self.read(fetch)

    async def kv_set(self, namespace: str, key: str, value: Any) -> None:
        """Store ``value`` under ``key``, replacing any; 105 if the namespace does not exist."""

        async def store(conn: AsyncConnection) -> None:
            if not await self._kv_exists(conn, namespace):
                raise self._no_namespace(namespace)
            await conn.execute(
                self._upsert(
                    kv_t,
                    {"namespace": namespace, "key": key, "value": value},
                    ["namespace", "key"],
                    ["value"],
                )
            )

        await self.write(store)

    async def kv_delete(self, namespace: str, key: str) -> None:
        """Remove ``key`` (nothing if it is absent); 105 if the namespace does not exist."""

        async def remove(conn: AsyncConnection) -> None:
            if not await self._kv_exists(conn, namespace):
                raise self._no_namespace(namespace)
            await conn.execute(delete(kv_t).where(kv_t.c.namespace == namespace, kv_t.c.key == key))

        await self.write(remove)

    async def kv_get_many(
        self, exact: Sequence[tuple[str, str]], prefixed: Sequence[tuple[str, str]]
    ) -> tuple[dict[tuple[str, str], Any], dict[str, list[tuple[str, Any]]]]:
        """Values of exact (namespace, key) pairs, and the sorted (key, value) pairs of each
        namespace named with a key prefix whose key starts with one of its prefixes."""

        async def fetch(
            conn: AsyncConnection,
        ) -> tuple[dict[tuple[str, str], Any], dict[str, list[tuple[str, Any]]]]:
            values: dict[tuple[str, str], Any] = {}
            wanted = set(exact)
            spaces = sorted({namespace for namespace, _ in wanted})
            keys = sorted({key for _, key in wanted})
            for spaces_part in _chunks(spaces, KV_CHUNK):
                for keys_part in _chunks(keys, KV_CHUNK):
                    rows = await conn.execute(
                        select(kv_t.c.namespace, kv_t.c.key, kv_t.c.value).where(
                            kv_t.c.namespace.in_(spaces_part), kv_t.c.key.in_(keys_part)
                        )
                    )
                    values.update(
                        ((ns, key), value) for ns, key, value in rows if (ns, key) in wanted
                    )
            prefixes: dict[str, set[str]] = {}
            for namespace, prefix in prefixed:
                prefixes.setdefault(namespace, set()).add(prefix)
            distinct = {prefix for group in prefixes.values() for prefix in group}
            # a few prefixes narrow the read in SQL; any key still passes the check below
            narrow = (
                [func.substr(kv_t.c.key, 1, len(prefix)) == prefix for prefix in sorted(distinct)]
                if "" not in distinct and len(distinct) <= KV_SQL_PREFIXES
                else []
            )
            matched: dict[str, list[tuple[str, Any]]] = {}
            for spaces_part in _chunks(sorted(prefixes), KV_CHUNK):
                statement = select(kv_t.c.namespace, kv_t.c.key, kv_t.c.value).where(
                    kv_t.c.namespace.in_(spaces_part)
                )
                if narrow:
                    statement = statement.where(or_(*narrow))
                for ns, key, value in await conn.execute(statement):
                    if any(key.startswith(prefix) for prefix in prefixes[ns]):
                        matched.setdefault(ns, []).append((key, value))
            for pairs in matched.values():
                pairs.sort(key=lambda pair: pair[0])
            return values, matched

        return await self.read(fetch)

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
        The fire stays pending, holding the cron's name and targets as they were,
        until ``settle_cron_fire`` stores its result rows.
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
                .values(
                    cron_id=cron_id,
                    slot=slot,
                    fired_at=fired_at,
                    node_id=node_id,
                    pending={"cron_name": cron.name, "cron_type": cron.cron_type},
                )
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

    async def settle_cron_fire(
        self, cron_id: int, slot: int, rows: Sequence[dict[str, Any]]
    ) -> bool:
        """Store the result rows of a pending fire; False if it was settled already.

        The fire stops being pending in the same transaction, so each claimed slot
        gets exactly one set of rows, whoever settles it first: the fire itself, or
        the scheduler that finds it cut short.
        """

        async def settle(conn: AsyncConnection) -> bool:
            fire_c = cron_fire_t.c
            settled = await conn.execute(
                update(cron_fire_t)
                .where(fire_c.cron_id == cron_id, fire_c.slot == slot, fire_c.pending.is_not(None))
                .values(pending=None)
                .returning(fire_c.id)
            )
            if settled.first() is None:
                return False
            if rows:
                await conn.execute(insert(cron_result_t), list(rows))
            return True

        return await self.write(settle)

    async def pending_cron_fires(self) -> list[Row[Any]]:
        """Claimed fires without result rows yet: running now, or cut short."""

        fire_c = cron_fire_t.c
        return await self.fetch_all(
            select(fire_c.cron_id, fire_c.slot, fire_c.fired_at, fire_c.node_id, fire_c.pending)
            .where(fire_c.pending.is_not(None))
            .order_by(fire_c.id)
        )

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

    @staticmethod
    async def _named_token(
        conn: AsyncConnection, names: Sequence[str]
    ) -> tuple[Row[Any], str] | None:
        """The token one of ``names`` (tried in order) is the key, else the username, of.

        Returns the row and ``"token_key"`` or ``"username"``. The super token answers
        to its username even in databases made before it was given one.
        """
        for name in names:
            for column, matched_by in (
                (token_t.c.key, "token_key"),
                (token_t.c.username, "username"),
            ):
                row = (await conn.execute(select(token_t).where(column == name))).first()
                if row is not None:
                    return row, matched_by
            if name == SUPER_USERNAME:
                statement = select(token_t).where(token_t.c.is_super.is_(True)).limit(1)
                row = (await conn.execute(statement)).first()
                if row is not None:
                    return row, "username"
        return None

    async def find_token(self, names: Sequence[str]) -> tuple[Row[Any], str] | None:
        """The token one of ``names`` is the key or username of, and which of the two matched."""

        async def find(conn: AsyncConnection) -> tuple[Row[Any], str] | None:
            return await self._named_token(conn, names)

        return await self.read(find)

    async def update_token(
        self, names: Sequence[str], change: Callable[[Row[Any]], dict[str, Any]]
    ) -> Row[Any]:
        """Set the values ``change(row)`` returns (it may raise) on the named token, atomically.

        ``names`` as for ``find_token``. 105 if there is no such token, 108 if a new
        username is taken; returns the new row.
        """

        async def apply(conn: AsyncConnection) -> Row[Any]:
            found = await self._named_token(conn, names)
            if found is None:
                raise NotFound(f"No token with key or username {_shown(names)}")
            row = found[0]
            values = change(row) | {"updated_at": now_ms()}
            username = values.get("username")
            if username is not None and await self._username_taken(conn, username, row.key):
                raise InvalidInput(f"Username {username!r} is already taken")
            await conn.execute(update(token_t).where(token_t.c.id == row.id).values(**values))
            statement = select(token_t).where(token_t.c.id == row.id)
            return (await conn.execute(statement)).one()

        return await self.write(apply)

    async def delete_token(
        self, names: Sequence[str], check: Callable[[Row[Any]], None]
    ) -> tuple[Row[Any], str]:
        """Delete the named token unless ``check(row)`` raises; 105 if there is no such token.

        ``names`` as for ``find_token``; returns the deleted row and what matched.
        """

        async def remove(conn: AsyncConnection) -> tuple[Row[Any], str]:
            found = await self._named_token(conn, names)
            if found is None:
                raise NotFound(f"No token with key or username {_shown(names)}")
            check(found[0])
            await conn.execute(delete(token_t).where(token_t.c.id == found[0].id))
            return found

        return await self.write(remove)

    async def enroll_agent(
        self, enroll_key: str, agent_uuid: str, token: dict[str, Any], remote_addr: str | None
    ) -> None:
        """Use up one use of an enrollment token, claim ``agent_uuid`` and store its token.

        All in one transaction: 102 if the enrollment token has no uses left (or is
        gone), 108 if an agent row, another token's scope, an unanswered task or a
        cron already claims the UUID.
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
            # work already waits for this UUID: whoever enrolls it would receive that work
            waiting = await conn.execute(
                select(task_t.c.id)
                .where(task_t.c.uuid == agent_uuid, task_t.c.state < TaskState.DONE)
                .limit(1)
            )
            crons = await conn.execute(select(cron_t.c.cron_type))
            if waiting.first() is not None or any(
                agent_uuid in _cron_targets(cron_type) for (cron_type,) in crons
            ):
                raise InvalidInput(f"Agent UUID {agent_uuid} is already taken: work waits for it")
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


def _shown(names: Sequence[str]) -> str:
    """The name a token was looked up by, for a message: never the secret of a credential."""
    return repr(names[-1])


KV_CHUNK = 500
"""Names bound in one IN list: well under every driver's limit on parameters."""
KV_SQL_PREFIXES = 8


def _chunks(items: Sequence[str], size: int) -> Iterable[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _cron_targets(cron_type: Any) -> list[str]:
    """The agent UUIDs a stored cron type creates tasks for."""
    agent = cron_type.get("agent") if isinstance(cron_type, dict) else None
    if isinstance(agent, list) and agent and isinstance(agent[0], list):
        return [u for u in agent[0] if isinstance(u, str)]
    return []
