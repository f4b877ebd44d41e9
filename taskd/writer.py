"""The group-commit writer: every write of the store, batched into few transactions.

Writes wait in one queue. One task takes whatever is waiting, runs it in one
transaction and only then settles each write's future, so a caller is answered
after its write is committed. The hot writes (task inserts, results, agent
subscriptions) run as a handful of plain statements on the writer's own driver
connection (sqlite3 run inline, or asyncpg), without SQLAlchemy's per-statement
cost; every other write is SQLAlchemy code on a connection of its own. A value the
database refuses fails only its own write: the batch is halved until it stands alone.
"""

from __future__ import annotations

import asyncio
import logging
import operator
import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import asyncpg  # type: ignore[import-untyped]
import orjson
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError, StatementError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from taskd.clock import now_ms
from taskd.errors import AlreadyUploaded, DatabaseError, InvalidInput, NotFound, TaskdError
from taskd.models import TaskState
from taskd.protocol import TaskResponse

logger = logging.getLogger(__name__)

MAX_BATCH = 1000
LOCKED_WAIT_S = 30.0

AGENTS_CHANNEL = "taskd_agents"
TERMINALS_CHANNEL = "taskd_terminals"
CRONS_CHANNEL = "taskd_crons"
TOKENS_CHANNEL = "taskd_tokens"


def node_channel(node_id: str) -> str:
    """The LISTEN channel of a cluster node (a valid unquoted identifier)."""
    return "taskd_n_" + "".join(c for c in node_id.lower() if c.isalnum())[:48]


def json_dumps(value: Any) -> str:
    """JSON text for a JSON column."""
    return orjson.dumps(value).decode()


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


def _payloads(items: Sequence[str], prefix: str) -> list[str]:
    """``items`` comma-joined into NOTIFY payloads under 8000 bytes."""
    payloads: list[str] = []
    current = ""
    for item in items:
        if current and len(prefix) + len(current) + len(item) + 1 > 7_900:
            payloads.append(prefix + current)
            current = ""
        current = f"{current},{item}" if current else item
    payloads.append(prefix + current)
    return payloads


async def notify(
    conn: AsyncConnection, channel: str, items: Sequence[str], prefix: str = ""
) -> None:
    """NOTIFY ``items`` on PostgreSQL at commit (inside a SQLAlchemy transaction)."""
    if conn.dialect.name != "postgresql" or not items:
        return
    for payload in _payloads(items, prefix):
        await conn.execute(text("SELECT pg_notify(:c, :p)"), {"c": channel, "p": payload})


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


def _locked(exc: BaseException) -> bool:
    """Whether SQLite refused the write lock because another process holds it."""
    cause = exc.orig if isinstance(exc, OperationalError) else exc
    if not isinstance(cause, sqlite3.OperationalError | OperationalError):
        return False
    return "locked" in str(cause) or "busy" in str(cause)


# --------------------------------------------------------------------------- rows


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


# --------------------------------------------------------------------------- driver connections


class Raw(Protocol):
    """The writer's own driver connection, for the hot statements."""

    postgres: bool

    async def begin(self) -> None:
        """Start a transaction (SQLite: take the write lock now)."""

    async def commit(self) -> None:
        """Commit the transaction."""

    async def rollback(self) -> None:
        """Roll the transaction back, if one is open."""

    async def fetch(self, sql: str, *args: Any) -> list[Sequence[Any]]:
        """Rows of one statement."""

    async def execute_many(self, sql: str, rows: list[tuple[Any, ...]]) -> int | None:
        """One statement for each row; the rows changed where the driver knows it."""

    async def close(self) -> None:
        """Close the connection."""


class RawSqlite:
    """A sqlite3 connection used on the event loop thread.

    Each statement touches a local file for microseconds; handing it to a thread
    and back would cost more than it does (measured: a writer thread made the
    server slower under load, not faster). A lock held by another process is not
    waited for here (100 ms busy timeout): the writer retries after yielding.
    """

    postgres = False

    def __init__(self, path: str) -> None:
        self.conn = sqlite3.connect(
            path, timeout=0.1, isolation_level=None, check_same_thread=False
        )
        for pragma in (
            "PRAGMA journal_mode=WAL",
            "PRAGMA synchronous=NORMAL",
            "PRAGMA busy_timeout=100",
            "PRAGMA foreign_keys=ON",
            "PRAGMA wal_autocheckpoint=0",  # checkpoints run on a reader thread
        ):
            self.conn.execute(pragma)

    async def begin(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    async def commit(self) -> None:
        self.conn.execute("COMMIT")

    async def rollback(self) -> None:
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")

    async def fetch(self, sql: str, *args: Any) -> list[Sequence[Any]]:
        return self.conn.execute(sql, args).fetchall()

    async def execute_many(self, sql: str, rows: list[tuple[Any, ...]]) -> int | None:
        return self.conn.executemany(sql, rows).rowcount

    async def close(self) -> None:
        self.conn.close()


class RawPostgres:
    """An asyncpg connection (statements prepared once and cached by asyncpg)."""

    postgres = True

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self._tx: Any = None

    @classmethod
    async def connect(cls, dsn: str) -> RawPostgres:
        """Open the connection (5 s to connect, 30 s per statement, like the pool's)."""
        return cls(await asyncpg.connect(dsn, timeout=5, command_timeout=30))

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

    async def fetch(self, sql: str, *args: Any) -> list[Sequence[Any]]:
        return list(await self.conn.fetch(sql, *args))

    async def execute_many(self, sql: str, rows: list[tuple[Any, ...]]) -> int | None:
        await self.conn.executemany(sql, rows)
        return None  # asyncpg does not report it

    async def close(self) -> None:
        if not self.conn.is_closed():
            await self.conn.close(timeout=2)


def _sql(raw: Raw, statement: str) -> str:
    """``statement`` written with ``?`` placeholders, in the driver's own style."""
    if not raw.postgres:
        return statement
    parts = statement.split("?")
    return "".join(f"{part}${i}" for i, part in enumerate(parts[:-1], 1)) + parts[-1]


async def _notify_raw(raw: Raw, channel: str, items: Sequence[str], prefix: str = "") -> None:
    if raw.postgres and items:
        for payload in _payloads(items, prefix):
            await raw.fetch("SELECT pg_notify($1, $2)", channel, payload)


# --------------------------------------------------------------------------- operations


class _Retry(Exception):
    """The batch must be re-run in smaller parts."""


@dataclass(eq=False)
class Op:
    """One write waiting for the writer; its future settles once it is committed."""

    hot = False
    """Runs on the writer's driver connection (else in a SQLAlchemy transaction)."""
    future: asyncio.Future[Any] = field(init=False)

    def __post_init__(self) -> None:
        self.future = asyncio.get_running_loop().create_future()


@dataclass(eq=False)
class CallOp(Op):
    """Any SQLAlchemy code, in a savepoint of its own inside the batch's transaction."""

    fn: Callable[[AsyncConnection], Awaitable[Any]]


class HotOp(Op):
    """A hot write: all waiting ops of one class run as a few statements together."""

    hot = True

    @classmethod
    async def run_all(cls, raw: Raw, ops: Sequence[Any]) -> list[Any]:
        """Run ``ops`` (all of this class) inside the open transaction; one outcome each."""
        raise NotImplementedError


_INSERT_TASK = (
    "INSERT INTO task (id, uuid, task_token, type, task_event_type, state, created_at, "
    "deadline, queue_ttl_ms, order_ts, cron_source, created_by, waiter_node) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


@dataclass(eq=False)
class InsertTasksOp(HotOp):
    """Insert task rows; the outcome is their ids."""

    tasks: Sequence[NewTask]

    @classmethod
    async def run_all(cls, raw: Raw, ops: Sequence[Any]) -> list[Any]:
        tasks: list[NewTask] = [task for op in ops for task in op.tasks]
        ids = await _allocate_task_ids(raw, len(tasks))
        dumps = pg_json_dumps if raw.postgres else json_dumps
        rows = []
        routed: dict[str, set[str]] = {}
        for task, task_id in zip(tasks, ids, strict=True):
            task.id = task_id
            rows.append(
                (
                    task_id,
                    task.uuid,
                    task.task_token,
                    task.type,
                    dumps(task.task_event_type),
                    int(task.state),
                    task.created_at,
                    task.deadline,
                    task.queue_ttl_ms,
                    task.created_at,
                    task.cron_source,
                    task.created_by,
                    task.waiter_node,
                )
            )
            if task.route_to is not None:
                routed.setdefault(node_channel(task.route_to), set()).add(task.uuid)
        await raw.execute_many(_sql(raw, _INSERT_TASK), rows)
        for channel, uuids in routed.items():
            await _notify_raw(raw, channel, sorted(uuids), "q:")
        return [[task.id for task in op.tasks] for op in ops]


async def _allocate_task_ids(raw: Raw, count: int) -> list[int]:
    """Reserve ``count`` new task ids inside the writer transaction.

    Ids are drawn first so the rows go in as one executemany.
    """
    if raw.postgres:
        rows = await raw.fetch(
            "SELECT nextval(pg_get_serial_sequence('task', 'id')) FROM generate_series(1, $1)",
            count,
        )
        return [int(row[0]) for row in rows]
    # the writer holds the write lock (BEGIN IMMEDIATE), so max(id) cannot move under it
    [(highest,)] = await raw.fetch("SELECT max(id) FROM task")
    start = int(highest or 0) + 1
    return list(range(start, start + count))


_COMPLETE = (
    "UPDATE task SET state = ?, timestamp = ?, order_ts = ?, success = ?, error_message = ?, "
    "task_event_result = ? WHERE id = ? AND state <> 2"
)


@dataclass(eq=False)
class CompleteOp(HotOp):
    """Store an agent's result: 105 if id/uuid/token do not match, 108 if already done."""

    upload: TaskResponse
    result_kind: str | None
    node_id: str = ""

    @classmethod
    async def run_all(cls, raw: Raw, ops: Sequence[Any]) -> list[Any]:
        uploads: list[CompleteOp] = list(ops)
        ids = sorted({op.upload.task_id for op in uploads})
        columns = "id, uuid, task_token, type, state, waiter_node FROM task"
        if raw.postgres:
            rows = await raw.fetch(f"SELECT {columns} WHERE id = ANY($1::bigint[]) FOR UPDATE", ids)
        else:
            marks = ",".join("?" * len(ids))
            rows = await raw.fetch(f"SELECT {columns} WHERE id IN ({marks})", *ids)
        found = {row[0]: row for row in rows}
        outcomes: list[Any] = []
        updates: list[tuple[Any, ...]] = []
        taken: set[int] = set()
        waiting: dict[str, list[str]] = {}
        dumps = pg_json_dumps if raw.postgres else json_dumps
        for op in uploads:
            up = op.upload
            row = found.get(up.task_id)
            if row is None or row[1] != up.agent_uuid or row[2] != up.task_token:
                outcomes.append(
                    NotFound(f"No task {up.task_id} for agent {up.agent_uuid} with that task_token")
                )
                continue
            _, _, _, task_type, state, waiter_node = row
            if state == TaskState.DONE or up.task_id in taken:
                outcomes.append(AlreadyUploaded(f"Task {up.task_id} already has a result"))
            elif op.result_kind is not None and op.result_kind != task_type:
                # each task variant is answered with the result variant of the same name
                outcomes.append(
                    InvalidInput(
                        f"task_event_result: a {task_type} task must be answered with a "
                        f"{task_type!r} result, not {op.result_kind!r}"
                    )
                )
            else:
                taken.add(up.task_id)
                if waiter_node is not None and waiter_node != op.node_id:
                    waiting.setdefault(node_channel(waiter_node), []).append(str(up.task_id))
                result = (
                    up.task_event_result.to_wire() if up.task_event_result is not None else None
                )
                # PostgreSQL text cannot hold NUL characters (see pg_json_dumps)
                message = without_nul(up.error_message) if raw.postgres else up.error_message
                updates.append(
                    (
                        int(TaskState.DONE),
                        up.timestamp,
                        up.timestamp,
                        up.success,
                        message,
                        dumps(result),
                        up.task_id,
                    )
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
            changed = await raw.execute_many(_sql(raw, _COMPLETE), updates)
            # SQLite reports the total; on PostgreSQL the rows are locked by the
            # SELECT ... FOR UPDATE above and cannot have changed
            if changed is not None and changed != len(updates):
                raise _Retry("a result row changed under the batch")
        for channel, task_ids in waiting.items():
            await _notify_raw(raw, channel, task_ids, "r:")
        return outcomes


class QueuedTask(NamedTuple):
    """A queued task handed to its agent's node for delivery."""

    id: int
    task_token: str
    task_event_type: Any


@dataclass(eq=False)
class TakeQueuedOp(HotOp):
    """Mark an agent's queued tasks as running and return them, oldest first.

    Every agent's take in a batch is one SELECT and one UPDATE. A task routed here
    from another node keeps its creator's deadline (a blocking call's timeout); one
    that waited with a TTL gets ``deadline_ms`` from now.
    """

    agent_uuid: str
    deadline_ms: int

    @classmethod
    async def run_all(cls, raw: Raw, ops: Sequence[Any]) -> list[Any]:
        now = now_ms()
        uuids = sorted({op.agent_uuid for op in ops})
        columns = "id, uuid, task_token, task_event_type FROM task"
        # literal state values: the partial index on queued tasks serves only a constant
        if raw.postgres:
            rows = await raw.fetch(
                f"SELECT {columns} WHERE uuid = ANY($1::text[]) AND state = 0 AND deadline > $2 "
                "ORDER BY id FOR UPDATE SKIP LOCKED",
                uuids,
                now,
            )
        else:
            marks = ",".join("?" * len(uuids))
            rows = await raw.fetch(
                f"SELECT {columns} WHERE uuid IN ({marks}) AND state = 0 AND deadline > ? "
                "ORDER BY id",
                *uuids,
                now,
            )
        taken: dict[str, list[QueuedTask]] = {}
        for task_id, agent_uuid, task_token, event in rows:
            taken.setdefault(agent_uuid, []).append(
                QueuedTask(task_id, task_token, orjson.loads(event))
            )
        updates = [
            (now + op.deadline_ms, task.id)
            for op in {op.agent_uuid: op for op in ops}.values()
            for task in taken.get(op.agent_uuid, [])
        ]
        if updates:
            await raw.execute_many(
                _sql(
                    raw,
                    "UPDATE task SET state = 1, deadline = CASE WHEN queue_ttl_ms IS NULL "
                    "THEN deadline ELSE ? END WHERE id = ?",
                ),
                updates,
            )
        outcomes: list[Any] = []
        for op in ops:  # the first take of an agent in the batch gets its tasks
            outcomes.append(taken.pop(op.agent_uuid, []))
        return outcomes


_AGENT_CONNECTED = (
    "INSERT INTO agent (uuid, first_seen, last_seen, connected_since, remote_addr, node_id, "
    "token_key) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (uuid) DO UPDATE SET "
    "last_seen = excluded.last_seen, connected_since = excluded.connected_since, "
    "remote_addr = excluded.remote_addr, node_id = excluded.node_id, "
    "token_key = excluded.token_key, deleted_at = NULL"
)


@dataclass(eq=False)
class AgentConnectedOp(HotOp):
    """Record an agent's subscription: a whole reconnect storm is one statement."""

    values: dict[str, Any]

    @classmethod
    async def run_all(cls, raw: Raw, ops: Sequence[Any]) -> list[Any]:
        latest = {op.values["uuid"]: op.values for op in ops}
        row = operator.itemgetter(
            "uuid",
            "first_seen",
            "last_seen",
            "connected_since",
            "remote_addr",
            "node_id",
            "token_key",
        )
        rows = [row(values) for values in latest.values()]
        await raw.execute_many(_sql(raw, _AGENT_CONNECTED), rows)
        items = [f"{u} {v['node_id']}" for u, v in latest.items()]
        await _notify_raw(raw, AGENTS_CHANNEL, items)
        return [None] * len(ops)


_AGENTS_SEEN = (
    "INSERT INTO agent (uuid, first_seen, last_seen) VALUES (?, ?, ?) "
    "ON CONFLICT (uuid) DO UPDATE SET "
    "last_seen = CASE WHEN excluded.last_seen > agent.last_seen "
    "THEN excluded.last_seen ELSE agent.last_seen END, "
    "deleted_at = CASE WHEN agent.deleted_at < excluded.last_seen "
    "THEN NULL ELSE agent.deleted_at END"
)


@dataclass(eq=False)
class AgentsSeenOp(HotOp):
    """Record agents' calls (uuid → ms): an unknown agent gets its row, and one soft-deleted
    before the call is listed again; all waiting ops are one statement."""

    seen: dict[str, int]

    @classmethod
    async def run_all(cls, raw: Raw, ops: Sequence[Any]) -> list[Any]:
        latest: dict[str, int] = {}
        for op in ops:
            for agent_uuid, at in op.seen.items():
                latest[agent_uuid] = max(at, latest.get(agent_uuid, at))
        # in key order, so batches of two nodes cannot deadlock on each other's rows
        rows = [(u, at, at) for u, at in sorted(latest.items())]
        await raw.execute_many(_sql(raw, _AGENTS_SEEN), rows)
        return [None] * len(ops)


# --------------------------------------------------------------------------- the writer


class Writer:
    """Collects writes and commits them in batches; see the module docstring."""

    def __init__(
        self,
        engine: AsyncEngine,
        connect: Callable[[], Awaitable[Raw]],
        batch_observer: Callable[[int], None] | None = None,
    ) -> None:
        self.engine = engine
        self._connect = connect
        self._raw: Raw | None = None
        self._queue: list[Op] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.batch_observer = batch_observer

    def start(self) -> None:
        """Start taking writes."""
        self._task = asyncio.create_task(self._loop(), name="taskd-store-writer")

    async def close(self) -> None:
        """Commit what is waiting, then stop."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
        if self._raw is not None:
            await self._raw.close()
            self._raw = None

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
            outcomes = await self._locked_retry(batch, transaction)
        except Exception as exc:
            # one op's values broke the transaction: halves are retried until only it fails
            isolate = isinstance(exc, _Retry | IntegrityError | sqlite3.IntegrityError)
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

    async def _locked_retry(
        self, batch: list[Op], transaction: Callable[[list[Op]], Awaitable[list[Any]]]
    ) -> list[Any]:
        """Run the batch; while another process holds SQLite's write lock, wait and retry."""
        deadline = asyncio.get_running_loop().time() + LOCKED_WAIT_S
        while True:
            try:
                return await transaction(batch)
            except Exception as exc:
                if not _locked(exc) or asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.02)

    async def _hot_transaction(self, batch: list[Op]) -> list[Any]:
        if self._raw is None:
            self._raw = await self._connect()
        raw = self._raw
        outcomes: dict[int, Any] = {}
        try:
            await raw.begin()
            for kind, indexes in _groups(batch).items():
                ops = [batch[i] for i in indexes]
                results = await kind.run_all(raw, ops)  # type: ignore[attr-defined]
                outcomes.update(zip(indexes, results, strict=True))
            await raw.commit()
        except BaseException as exc:
            try:
                await raw.rollback()
            except Exception:
                # the connection is broken (the database went away): open a new one next time
                self._raw = None
                await _close_quietly(raw)
            if isinstance(exc, OSError | asyncpg.PostgresConnectionError | asyncpg.InterfaceError):
                self._raw = None
                await _close_quietly(raw)
            raise
        return [outcomes[i] for i in range(len(batch))]

    async def _call_transaction(self, batch: list[Op]) -> list[Any]:
        results: list[Any] = []
        async with self.engine.connect() as conn:
            await conn.execution_options(taskd_writer=True)
            async with conn.begin():
                for op in batch:
                    assert isinstance(op, CallOp)
                    try:
                        async with conn.begin_nested():
                            results.append(await op.fn(conn))
                    except TaskdError as exc:
                        results.append(exc)
        return results

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


def _groups(batch: list[Op]) -> dict[type[Op], list[int]]:
    """Indexes of the ops of each class, classes in order of first appearance."""
    groups: dict[type[Op], list[int]] = {}
    for index, op in enumerate(batch):
        groups.setdefault(type(op), []).append(index)
    return groups


async def _close_quietly(raw: Raw) -> None:
    try:
        await raw.close()
    except Exception as exc:
        logger.debug("closing a broken writer connection: %s", exc)
