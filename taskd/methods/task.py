"""Task methods: create (plain and blocking), query, delete, subscribe, upload."""

from __future__ import annotations

import asyncio
from typing import Any

from taskd.auth import Need, allows_any_type, authorize, authorize_all_types
from taskd.errors import InvalidParams, TaskTimeout
from taskd.protocol import (
    TaskResponse,
    parse_as,
    parse_task_conditions,
    parse_task_event_type,
    parse_task_query,
    parse_uuid,
)
from taskd.rpc import CallContext, method
from taskd.writer import StoredResult

MAX_BLOCKING_MS = 300_000
MAX_QUEUE_TTL_MS = 30 * 24 * 3600 * 1000


def _int_param(value: Any, field: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidParams(f"{field}: must be an integer")
    if not low <= value <= high:
        raise InvalidParams(f"{field}: must be between {low} and {high}")
    return value


def _record(row: Any) -> dict[str, Any]:
    return {
        "task_id": row.id,
        "uuid": row.uuid,
        "timestamp": row.timestamp,
        "success": row.success,
        "error_message": row.error_message,
        "task_event_type": row.task_event_type,
        "task_event_result": row.task_event_result,
        "cron_source": row.cron_source,
        "created_by": row.created_by,
    }


@method("task_create_task")
async def task_create_task(
    ctx: CallContext, token: Any, target_uuid: Any, task_type: Any, queue_ttl_ms: Any = None
) -> dict[str, int]:
    """Create a task for one agent and push it; with queue_ttl_ms an offline agent gets it later."""
    principal = await ctx.app.authenticate(token, ctx.remote)
    agent_uuid = parse_uuid(target_uuid, "target_uuid")
    task = parse_task_event_type(task_type)
    authorize(principal, Need("task", "create", task.kind), agent_uuid)
    ttl = (
        None
        if queue_ttl_ms is None
        else _int_param(queue_ttl_ms, "queue_ttl_ms", 1, MAX_QUEUE_TTL_MS)
    )
    [created], _ = await ctx.app.hub.create(
        [agent_uuid], task, queue_ttl_ms=ttl, created_by=principal.key
    )
    if created.error is not None:
        raise created.error
    assert created.task_id is not None
    return {"id": created.task_id}


@method("task_create_task_blocking")
async def task_create_task_blocking(
    ctx: CallContext, token: Any, target_uuid: Any, task_type: Any, timeout_ms: Any
) -> dict[str, Any]:
    """Create a task and wait for its result (timeout_ms clamped to 300000)."""
    principal = await ctx.app.authenticate(token, ctx.remote)
    agent_uuid = parse_uuid(target_uuid, "target_uuid")
    task = parse_task_event_type(task_type)
    authorize(principal, Need("task", "create", task.kind), agent_uuid)
    authorize(principal, Need("task", "read", task.kind), agent_uuid)
    timeout = min(_int_param(timeout_ms, "timeout_ms", 1, 1 << 53), MAX_BLOCKING_MS)
    hub = ctx.app.hub
    [created], waiters = await hub.create(
        [agent_uuid], task, deadline_ms=timeout, created_by=principal.key, wait=True
    )
    if created.error is not None:
        raise created.error
    assert created.task_id is not None
    future = waiters[created.task_id]
    try:
        async with asyncio.timeout(timeout / 1000):
            result: StoredResult = await future
    except TimeoutError:
        raise TaskTimeout(f"Task {created.task_id} timed out after {timeout}ms") from None
    finally:
        hub.remove_waiter(created.task_id, future)
    return result.to_wire()


@method("task_query_task", "task_query")
async def task_query_task(
    ctx: CallContext, token: Any, task_data_query: Any
) -> list[dict[str, Any]]:
    """Task records matching every condition, newest first (default limit 1000)."""
    principal = await ctx.app.authenticate(token, ctx.remote)
    query = parse_task_query(task_data_query)
    authorize_all_types(principal, "read", query.uuids, query.types)
    rows = await ctx.app.store.query_tasks(query)
    return [_record(row) for row in rows]


@method("task_delete_task", "task_delete")
async def task_delete_task(ctx: CallContext, token: Any, conditions: Any) -> dict[str, Any]:
    """Delete the task records matching every condition (newest first, default limit 1000)."""
    principal = await ctx.app.authenticate(token, ctx.remote)
    query = parse_task_conditions(conditions, "conditions")
    authorize_all_types(principal, "delete", query.uuids, query.types)
    deleted = await ctx.app.store.delete_tasks(query)
    ctx.app.hub.forget(deleted)
    return {"success": True, "deleted": len(deleted), "condition_count": query.condition_count}


@method("task_register_task", websocket_only=True)
async def task_register_task(ctx: CallContext, token: Any, uuid: Any) -> int:
    """Subscribe this WebSocket to the agent's tasks; returns the subscription id."""
    principal = await ctx.app.authenticate(token, ctx.remote)
    agent_uuid = parse_uuid(uuid, "uuid")
    authorize(principal, Need("task", "listen"), agent_uuid)
    hub = ctx.app.hub
    sub = await hub.subscribe(agent_uuid, ctx.peer, principal.key, principal.timestamp_to)

    async def deliver() -> None:
        await hub.deliver_queued(agent_uuid)

    if not sub.renewed:  # a renewal's queue was delivered when it first subscribed
        ctx.after_reply.append(deliver)
    return sub.id


@method("task_unregister_task")
async def task_unregister_task(ctx: CallContext, subscription_id: Any) -> bool:
    """End a subscription held by this connection."""
    sub_id = _int_param(subscription_id, "subscription_id", 0, 1 << 63)
    if ctx.peer is None:
        return False
    return ctx.app.hub.unsubscribe(sub_id, ctx.peer)


@method("task_upload_task_result")
async def task_upload_task_result(
    ctx: CallContext, token: Any, task_response: Any
) -> dict[str, int]:
    """Store an agent's result for a task it was sent."""
    principal = await ctx.app.authenticate(token, ctx.remote)
    upload = parse_as(TaskResponse.model_validate, "task_response", task_response)
    hub = ctx.app.hub
    # refuse tokens that may write nothing on this agent before touching the row, so
    # they cannot probe task ids; the exact type is known once the row matched
    if not allows_any_type(principal, "write", upload.agent_uuid):
        authorize(principal, Need("task", "write", "*"), upload.agent_uuid)
    task_type = await ctx.app.task_type_of(upload.task_id, upload.agent_uuid, upload.task_token)
    authorize(principal, Need("task", "write", task_type), upload.agent_uuid)
    # an agent that never subscribes (NodeGet's allow_task = false) is known from here
    await hub.agent_called(upload.agent_uuid)
    stored = await ctx.app.store.complete_task(upload, ctx.app.node_id)
    metrics = ctx.app.metrics
    (metrics.results_succeeded if upload.success else metrics.results_failed).inc()
    hub.resolve([stored])
    return {"id": upload.task_id}
