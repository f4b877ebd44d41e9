"""Task methods: create (plain and blocking), query, delete, subscribe, upload."""

from __future__ import annotations

import asyncio
from typing import Any

from taskd.auth import Need, allows_any_type, authorize, authorize_all_types
from taskd.errors import TaskTimeout
from taskd.protocol import (
    MAX_BLOCKING_MS,
    AgentUuid,
    IdReply,
    QueueTtlMs,
    SubscriptionId,
    TaskConditions,
    TaskDeleted,
    TaskEventResponse,
    TaskQueryParam,
    TaskRecord,
    TaskResponse,
    TaskType,
    TimeoutMs,
    Token,
)
from taskd.rpc import CallContext, method


def _record(row: Any) -> TaskRecord:
    return TaskRecord(
        task_id=row.id,
        uuid=row.uuid,
        timestamp=row.timestamp,
        success=row.success,
        error_message=row.error_message,
        task_event_type=row.task_event_type,
        task_event_result=row.task_event_result,
        cron_source=row.cron_source,
        created_by=row.created_by,
    )


@method("task_create_task")
async def task_create_task(
    ctx: CallContext,
    token: Token,
    target_uuid: AgentUuid,
    task_type: TaskType,
    queue_ttl_ms: QueueTtlMs | None = None,
) -> IdReply:
    """Create a task for one agent and push it; with queue_ttl_ms an offline agent gets it later."""
    principal = await ctx.app.authenticate(token, ctx.remote)
    authorize(principal, Need("task", "create", task_type.kind), target_uuid)
    [created], _ = await ctx.app.hub.create(
        [target_uuid], task_type, queue_ttl_ms=queue_ttl_ms, created_by=principal.key
    )
    if created.error is not None:
        raise created.error
    assert created.task_id is not None
    return {"id": created.task_id}


@method("task_create_task_blocking")
async def task_create_task_blocking(
    ctx: CallContext,
    token: Token,
    target_uuid: AgentUuid,
    task_type: TaskType,
    timeout_ms: TimeoutMs,
) -> TaskEventResponse:
    """Create a task and wait for its result (timeout_ms clamped to 300000)."""
    principal = await ctx.app.authenticate(token, ctx.remote)
    authorize(principal, Need("task", "create", task_type.kind), target_uuid)
    authorize(principal, Need("task", "read", task_type.kind), target_uuid)
    timeout = min(timeout_ms, MAX_BLOCKING_MS)
    hub = ctx.app.hub
    [created], waiters = await hub.create(
        [target_uuid], task_type, deadline_ms=timeout, created_by=principal.key, wait=True
    )
    if created.error is not None:
        raise created.error
    assert created.task_id is not None
    future = waiters[created.task_id]
    try:
        async with asyncio.timeout(timeout / 1000):
            return await future
    except TimeoutError:
        raise TaskTimeout(f"Task {created.task_id} timed out after {timeout}ms") from None
    finally:
        hub.remove_waiter(created.task_id, future)


@method("task_query_task", "task_query")
async def task_query_task(
    ctx: CallContext, token: Token, task_data_query: TaskQueryParam
) -> list[TaskRecord]:
    """Task records matching every condition, newest first (default limit 1000)."""
    principal = await ctx.app.authenticate(token, ctx.remote)
    authorize_all_types(principal, "read", task_data_query.uuids, task_data_query.types)
    rows = await ctx.app.store.query_tasks(task_data_query)
    return [_record(row) for row in rows]


@method("task_delete_task", "task_delete")
async def task_delete_task(
    ctx: CallContext, token: Token, conditions: TaskConditions
) -> TaskDeleted:
    """Delete the task records matching every condition (newest first, default limit 1000)."""
    principal = await ctx.app.authenticate(token, ctx.remote)
    authorize_all_types(principal, "delete", conditions.uuids, conditions.types)
    deleted = await ctx.app.store.delete_tasks(conditions)
    ctx.app.hub.forget(deleted)
    return {
        "success": True,
        "deleted": len(deleted),
        "condition_count": conditions.condition_count,
    }


@method("task_register_task", websocket_only=True)
async def task_register_task(ctx: CallContext, token: Token, uuid: AgentUuid) -> int:
    """Subscribe this WebSocket to the agent's tasks; returns the subscription id."""
    principal = await ctx.app.authenticate(token, ctx.remote)
    authorize(principal, Need("task", "listen"), uuid)
    hub = ctx.app.hub
    sub = await hub.subscribe(uuid, ctx.peer, principal.key, principal.timestamp_to)

    async def deliver() -> None:
        await hub.deliver_queued(uuid)

    if not sub.renewed:  # a renewal's queue was delivered when it first subscribed
        ctx.after_reply.append(deliver)
    return sub.id


@method("task_unregister_task")
async def task_unregister_task(ctx: CallContext, subscription_id: SubscriptionId) -> bool:
    """End a subscription held by this connection."""
    if ctx.peer is None:
        return False
    return ctx.app.hub.unsubscribe(subscription_id, ctx.peer)


@method("task_upload_task_result")
async def task_upload_task_result(
    ctx: CallContext, token: Token, task_response: TaskResponse
) -> IdReply:
    """Store an agent's result for a task it was sent."""
    principal = await ctx.app.authenticate(token, ctx.remote)
    hub = ctx.app.hub
    # refuse tokens that may write nothing on this agent before touching the row, so
    # they cannot probe task ids; the exact type is known once the row matched
    if not allows_any_type(principal, "write", task_response.agent_uuid):
        authorize(principal, Need("task", "write", "*"), task_response.agent_uuid)
    task_type = await ctx.app.hub.task_type_of(
        task_response.task_id, task_response.agent_uuid, task_response.task_token
    )
    authorize(principal, Need("task", "write", task_type), task_response.agent_uuid)
    # an agent that never subscribes (NodeGet's allow_task = false) is known from here
    await hub.agent_called(task_response.agent_uuid)
    stored = await ctx.app.store.complete_task(task_response, ctx.app.node_id)
    metrics = ctx.app.metrics
    (metrics.results_succeeded if task_response.success else metrics.results_failed).inc()
    hub.resolve([stored])
    return {"id": task_response.task_id}
