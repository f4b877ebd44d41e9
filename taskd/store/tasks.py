"""Task rows: inserting, answering, queueing, reaping, querying and deleting them.

The three writes on the hot path (``InsertTasksOp``, ``CompleteOp``,
``TakeQueuedOp``) run on the writer's driver connection, with statements
compiled once from the ``task`` table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import orjson
from sqlalchemy import (
    Connection,
    Row,
    Select,
    bindparam,
    case,
    delete,
    func,
    literal_column,
    select,
    update,
)
from sqlalchemy.sql.expression import ClauseElement

from taskd.clock import now_ms
from taskd.errors import AlreadyUploaded, InvalidInput, NotFound
from taskd.models import OPEN_TASK, QUEUED_TASK, TaskState, task_t
from taskd.protocol import DEFAULT_QUERY_LIMIT, TaskEventResponse, TaskQuery, TaskResponse
from taskd.store.backend import Backend, Driver
from taskd.store.database import Database, each_equal, outcome
from taskd.store.records import NewTask, QueuedTask
from taskd.store.writer import BatchConflict, HotOp

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
NEW_TASK_COLUMNS = tuple(f.name for f in fields(NewTask) if f.name in task_t.c)
"""The columns a new task row is given (``order_ts`` besides: it starts as ``created_at``)."""


def _state(state: TaskState) -> Any:
    """A task state written into the SQL text: a partial index serves only a constant."""
    return literal_column(str(int(state)))


# --------------------------------------------------------------------------- hot writes


def _insert_tasks(backend: Backend) -> ClauseElement:
    values: dict[str, Any] = {name: bindparam(name) for name in NEW_TASK_COLUMNS}
    return task_t.insert().values(values | {"order_ts": bindparam("created_at")})


@dataclass(eq=False)
class InsertTasksOp(HotOp):
    """Insert task rows; the outcome is their ids."""

    tasks: Sequence[NewTask]

    @classmethod
    async def run_all(cls, driver: Driver, ops: Sequence[Any]) -> list[Any]:
        tasks: list[NewTask] = [task for op in ops for task in op.tasks]
        ids = await driver.next_task_ids(len(tasks))
        statement = driver.backend.statement(_insert_tasks)
        channels = driver.backend.channels
        rows = []
        routed: dict[str, set[str]] = {}
        for task, task_id in zip(tasks, ids, strict=True):
            task.id = task_id
            task.state = int(task.state)  # sqlite3 binds an IntEnum member about 1 µs slower
            rows.append(statement.args(task.__dict__))
            if task.route_to is not None and channels is not None:
                routed.setdefault(channels.node(task.route_to), set()).add(task.uuid)
        await driver.execute_many(statement, rows)
        for channel, uuids in routed.items():
            await driver.notify(channel, sorted(uuids), "q:")
        return [[task.id for task in op.tasks] for op in ops]


def _answered_rows(backend: Backend) -> ClauseElement:
    c = task_t.c
    return (
        select(c.id, c.uuid, c.task_token, c.type, c.state, c.waiter_node)
        .where(backend.one_of(c.id, "ids"))
        .with_for_update()
    )


def _answer(backend: Backend) -> ClauseElement:
    c = task_t.c
    return (
        update(task_t)
        .where(c.id == bindparam("b_id"), c.state != _state(TaskState.DONE))
        .values(
            state=_state(TaskState.DONE),
            timestamp=bindparam("timestamp"),
            order_ts=bindparam("timestamp"),
            success=bindparam("success"),
            error_message=bindparam("error_message"),
            task_event_result=bindparam("task_event_result"),
        )
    )


@dataclass(eq=False)
class CompleteOp(HotOp):
    """Store an agent's result: 105 if id/uuid/token do not match, 108 if already done."""

    upload: TaskResponse
    result_kind: str | None
    node_id: str = ""

    @classmethod
    async def run_all(cls, driver: Driver, ops: Sequence[Any]) -> list[Any]:
        backend = driver.backend
        uploads: list[CompleteOp] = list(ops)
        select_rows = backend.statement(_answered_rows)
        ids = backend.list_arg(sorted({op.upload.task_id for op in uploads}))
        found = {
            row[0]: row for row in await driver.fetch(select_rows, *select_rows.args({"ids": ids}))
        }
        outcomes: list[Any] = []
        updates: list[Sequence[Any]] = []
        answer = backend.statement(_answer)
        taken: set[int] = set()
        waiting: dict[str, list[str]] = {}
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
                    channels = backend.channels
                    if channels is not None:
                        waiting.setdefault(channels.node(waiter_node), []).append(str(up.task_id))
                result = (
                    up.task_event_result.to_wire() if up.task_event_result is not None else None
                )
                values = {
                    "b_id": up.task_id,
                    "timestamp": up.timestamp,
                    "success": up.success,
                    "error_message": backend.text(up.error_message),
                    "task_event_result": result,
                }
                updates.append(answer.args(values))
                outcomes.append(
                    TaskEventResponse(
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
            changed = await driver.execute_many(answer, updates)
            # SQLite reports the total; on PostgreSQL the rows are locked by the
            # SELECT ... FOR UPDATE above and cannot have changed
            if changed is not None and changed != len(updates):
                raise BatchConflict("a result row changed under the batch")
        for channel, task_ids in waiting.items():
            await driver.notify(channel, task_ids, "r:")
        return outcomes


def queued_rows(backend: Backend) -> ClauseElement:
    """The queued, unexpired tasks of the agents bound as ``uuids``, locked for the take."""
    c = task_t.c
    return (
        select(c.id, c.uuid, c.task_token, c.task_event_type)
        .where(backend.one_of(c.uuid, "uuids"), QUEUED_TASK, c.deadline > bindparam("now"))
        # each agent's tasks oldest first; by uuid too, so that SQLite reads the partial
        # index of queued tasks (in uuid, id order) rather than every task of the agents
        .order_by(c.uuid, c.id)
        .with_for_update(skip_locked=True)
    )


def _take(backend: Backend) -> ClauseElement:
    c = task_t.c
    # a routed task (no TTL) keeps its creator's deadline
    later = bindparam("new_deadline", type_=c.deadline.type)
    deadline = case((c.queue_ttl_ms.is_(None), c.deadline), else_=later)
    return (
        update(task_t)
        .where(c.id == bindparam("b_id"))
        .values(state=_state(TaskState.RUNNING), deadline=deadline)
    )


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
    async def run_all(cls, driver: Driver, ops: Sequence[Any]) -> list[Any]:
        backend = driver.backend
        now = now_ms()
        uuids = backend.list_arg(sorted({op.agent_uuid for op in ops}))
        select_rows = backend.statement(queued_rows)
        rows = await driver.fetch(select_rows, *select_rows.args({"uuids": uuids, "now": now}))
        taken: dict[str, list[QueuedTask]] = {}
        for task_id, agent_uuid, task_token, event in rows:
            taken.setdefault(agent_uuid, []).append(
                QueuedTask(task_id, task_token, orjson.loads(event))
            )
        take = backend.statement(_take)
        updates = [
            take.args({"new_deadline": now + op.deadline_ms, "b_id": task.id})
            for op in {op.agent_uuid: op for op in ops}.values()
            for task in taken.get(op.agent_uuid, [])
        ]
        if updates:
            await driver.execute_many(take, updates)
        outcomes: list[Any] = []
        for op in ops:  # the first take of an agent in the batch gets its tasks
            outcomes.append(taken.pop(op.agent_uuid, []))
        return outcomes


# --------------------------------------------------------------------------- queries


class TaskQueries(Database):
    """Task rows."""

    async def insert_tasks(self, tasks: Sequence[NewTask]) -> list[int]:
        """Insert task rows; their ids are set once committed."""
        ids: list[int] = await self.submit(InsertTasksOp(tasks))
        return ids

    async def complete_task(self, upload: TaskResponse, node_id: str = "") -> TaskEventResponse:
        """Store an agent's result: 105 if id/uuid/token do not match, 108 if already done.

        A blocking caller waiting on another node (``waiter_node``) is notified at commit.
        """
        kind = upload.task_event_result.kind if upload.task_event_result is not None else None
        result: TaskEventResponse = await self.submit(CompleteOp(upload, kind, node_id))
        return result

    async def take_queued(self, agent_uuid: str, deadline_ms: int) -> list[QueuedTask]:
        """Mark every queued task of an agent as running and return them (see TakeQueuedOp)."""
        taken: list[QueuedTask] = await self.submit(TakeQueuedOp(agent_uuid, deadline_ms))
        return taken

    async def get_result(self, task_id: int) -> TaskEventResponse | None:
        """The committed result of a task, or None while it has none."""
        c = task_t.c
        statement = select(
            c.id, c.uuid, c.task_token, c.timestamp, c.success, c.error_message, c.task_event_result
        ).where(c.id == task_id, c.state >= TaskState.DONE)
        row = await self.fetch_one(statement)
        return TaskEventResponse(*tuple(row)) if row is not None else None

    async def task_identity(self, task_id: int) -> Row[Any] | None:
        """The (uuid, task_token, type) of a task, or None."""
        return await self.fetch_one(
            select(task_t.c.uuid, task_t.c.task_token, task_t.c.type).where(task_t.c.id == task_id)
        )

    async def terminal_task(self, task_id: int) -> Row[Any] | None:
        """The (uuid, task_token, type, state, task_event_type) of a task, or None."""
        c = task_t.c
        return await self.fetch_one(
            select(c.uuid, c.task_token, c.type, c.state, c.task_event_type).where(c.id == task_id)
        )

    async def delete_task_ids(self, ids: Sequence[int]) -> int:
        """Remove task rows by id (a task that could not be delivered)."""

        def remove(conn: Connection) -> int:
            return int(conn.execute(delete(task_t).where(task_t.c.id.in_(ids))).rowcount)

        return await self.write(remove)

    async def requeue(self, ids: Sequence[int]) -> None:
        """Put taken tasks back in the queue (their agent went away before delivery)."""
        c = task_t.c
        statement = (
            update(task_t)
            .where(c.id.in_(ids), c.state == TaskState.RUNNING)
            .values(
                state=TaskState.QUEUED,
                # a routed task (no TTL) keeps the deadline it was given when taken
                deadline=func.coalesce(c.created_at + c.queue_ttl_ms, c.deadline),
            )
        )

        def back(conn: Connection) -> None:
            conn.execute(statement)

        await self.write(back)

    async def reap(self, now: int, limit: int = 5000) -> list[TaskEventResponse]:
        """Fail tasks past their deadline: running ones time out, queued ones expire."""
        c = task_t.c
        due = (
            select(c.id, c.uuid, c.task_token, c.state, c.queue_ttl_ms)
            # the open-task predicate as written: a generic plan of PostgreSQL can use
            # the partial index only for a constant
            .where(OPEN_TASK, c.deadline <= now)
            .order_by(c.deadline)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        fail = (
            update(task_t)
            .where(c.id == bindparam("b_id"), c.state < TaskState.DONE)
            .values(
                state=TaskState.FAILED_BY_SERVER,
                timestamp=now,
                order_ts=now,
                success=False,
                error_message=bindparam("message"),
            )
        )

        def run(conn: Connection) -> list[TaskEventResponse]:
            rows = conn.execute(due).all()
            if not rows:
                return []
            reaped = [
                TaskEventResponse(row.id, row.uuid, row.task_token, now, False, _reason(row), None)
                for row in rows
            ]
            conn.execute(fail, [{"b_id": r.task_id, "message": r.error_message} for r in reaped])
            return reaped

        return await self.write(run)

    async def query_tasks(self, query: TaskQuery) -> list[Row[Any]]:
        """Task records matching every condition, newest first."""
        return await self.fetch_all(_filtered(select(*TASK_RECORD_COLUMNS), query))

    async def delete_tasks(self, query: TaskQuery) -> list[int]:
        """Delete the task records a query selects (newest first, its limit applies).

        Returns the deleted ids; nodes with a blocking call waiting on one of them
        are told (see ``Hub.forget``).
        """
        ids = _filtered(select(task_t.c.id), query).scalar_subquery()
        statement = (
            delete(task_t).where(task_t.c.id.in_(ids)).returning(task_t.c.id, task_t.c.waiter_node)
        )
        channels = self.channels

        def remove(conn: Connection) -> list[int]:
            rows = conn.execute(statement).all()
            if channels is not None:
                waiting: dict[str, list[str]] = {}
                for row in rows:
                    if row.waiter_node is not None:
                        waiting.setdefault(channels.node(row.waiter_node), []).append(str(row.id))
                for channel, task_ids in waiting.items():
                    self.backend.notify(conn, channel, task_ids, "r:")
            return [int(row.id) for row in rows]

        return await self.write(remove)

    async def prune_tasks(self, task_type: str, before_ms: int, chunk: int) -> int:
        """Delete up to ``chunk`` finished tasks of ``task_type`` that got their result
        before ``before_ms``, oldest first; how many went. Queued and running tasks stay."""
        c = task_t.c
        chosen = (
            select(c.id)
            .where(c.type == task_type, c.order_ts < before_ms, c.state >= TaskState.DONE)
            .order_by(c.order_ts, c.id)
            .limit(chunk)
        )
        statement = delete(task_t).where(c.id.in_(chosen.scalar_subquery()))
        return await self.write(lambda conn: int(conn.execute(statement).rowcount))

    async def prune_cron_tasks(self, cron_name: str, before_ms: int, chunk: int) -> int:
        """Delete up to ``chunk`` finished tasks a cron created that got their result before
        ``before_ms``, oldest first; how many went."""
        c = task_t.c
        chosen = (
            select(c.id)
            .where(c.cron_source == cron_name, c.order_ts < before_ms, c.state >= TaskState.DONE)
            .order_by(c.order_ts, c.id)
            .limit(chunk)
        )
        statement = delete(task_t).where(c.id.in_(chosen.scalar_subquery()))
        return await self.write(lambda conn: int(conn.execute(statement).rowcount))

    async def count_tasks(self) -> int:
        """How many task rows exist."""
        statement = select(func.count()).select_from(task_t)
        return await self.read(lambda conn: int(conn.execute(statement).scalar_one()))


def _reason(row: Any) -> str:
    """Why the reaper failed a task."""
    if row.state == TaskState.QUEUED and row.queue_ttl_ms is None:
        return "timed out: the agent's node did not deliver the task"
    if row.state == TaskState.QUEUED:
        return f"expired: agent did not connect within {row.queue_ttl_ms} ms"
    return "timed out: no result from agent"


def _filtered(statement: Select[Any], query: TaskQuery) -> Select[Any]:
    c = task_t.c
    statement = statement.where(
        *each_equal(c.id, query.task_ids),
        *each_equal(c.uuid, query.uuids),
        *each_equal(c.type, query.types),
        *each_equal(c.cron_source, query.cron_sources),
        *outcome(c.success, query.is_success, query.is_failure),
    )
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
    if query.is_running:
        # exactly the rows without a timestamp (every result sets one), written as
        # the predicate of the partial index of open tasks so that index serves it
        statement = statement.where(OPEN_TASK)
    limit = DEFAULT_QUERY_LIMIT if query.limit is None else query.limit
    return statement.order_by(c.order_ts.desc(), c.id.desc()).limit(limit)
