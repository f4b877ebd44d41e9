"""Crontab methods: create, edit, get, delete, enable/disable, and the fire history.

Permissions: ``crontab.read|write|delete`` on every target agent of the cron,
plus ``task.create(<type>)`` on every target for create, edit and enabling (an
edit also needs ``crontab.write`` on the old targets). A cron with an empty
agent list (it fires nothing) needs its ``crontab`` permission on a global scope,
as in NodeGet. The history
(``crontab-result``) needs ``crontab_result.<action>`` on a global scope, and is
limited to the cron names its patterns cover.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from taskd import crontab
from taskd.auth import Need, Principal, allows, authorize, is_global_scope
from taskd.errors import InvalidInput, InvalidParams, PermissionDenied
from taskd.methods.task import MAX_QUEUE_TTL_MS
from taskd.protocol import (
    CRON_TYPE,
    AgentCron,
    CronResultPermission,
    CronResultQuery,
    parse_as,
    parse_cron_result_query,
)
from taskd.rpc import CallContext, method


def _agent_cron(value: Any) -> AgentCron:
    definition = parse_as(CRON_TYPE, "cron_type", value)
    if not isinstance(definition, AgentCron):
        raise InvalidInput("server crons are not supported; use an agent cron")
    return definition


def _queue_ttl(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidParams("queue_ttl_ms: must be an integer")
    if not 1 <= value <= MAX_QUEUE_TTL_MS:
        raise InvalidParams(f"queue_ttl_ms: must be between 1 and {MAX_QUEUE_TTL_MS}")
    return value


def _stored(stored_cron_type: Any) -> AgentCron | None:
    definition = CRON_TYPE.validate_python(stored_cron_type)
    return definition if isinstance(definition, AgentCron) else None


def _targets(stored_cron_type: Any) -> list[str]:
    definition = _stored(stored_cron_type)
    return definition.uuids if definition is not None else []


def _scopes(uuids: Sequence[str]) -> Sequence[str | None]:
    """Where a cron's crontab permissions are checked: its targets, else a global scope."""
    return uuids if uuids else [None]


def _authorize_targets(principal: Principal, need: Need, uuids: Sequence[str]) -> None:
    for agent_uuid in uuids:
        authorize(principal, need, agent_uuid)


def _authorize_cron(principal: Principal, need: Need, uuids: Sequence[str]) -> None:
    """A crontab permission on every target; on a global scope when there is none."""
    for scope in _scopes(uuids):
        authorize(principal, need, scope)


def _holds_anywhere(principal: Principal, need: Need) -> bool:
    """Whether one of the token's own scopes carries ``need``."""
    if principal.is_super:
        return True
    return any(
        allows(principal, need, getattr(scope, "agent_uuid", None))
        for limit in principal.limits
        for scope in limit.scopes
    )


def _cron(row: Any) -> dict[str, Any]:
    record = {
        "id": row.id,
        "name": row.name,
        "enable": row.enable,
        "cron_expression": row.cron_expression,
        "cron_type": row.cron_type,
        "last_run_time": row.last_run_time,
    }
    if row.queue_ttl_ms is not None:
        record["queue_ttl_ms"] = row.queue_ttl_ms  # taskd extension, only when set
    return record


def _definition(
    ctx: CallContext,
    principal: Principal,
    cron_expression: Any,
    cron_type: Any,
    queue_ttl_ms: Any,
) -> dict[str, Any]:
    """Validate a cron's definition and check the token may run it on every target."""
    schedule = crontab.parse_expression(cron_expression, ctx.app.settings.timezone)
    definition = _agent_cron(cron_type)
    ttl = _queue_ttl(queue_ttl_ms)
    _authorize_cron(principal, Need("crontab", "write"), definition.uuids)
    _authorize_targets(principal, Need("task", "create", definition.task.kind), definition.uuids)
    return {
        "cron_expression": schedule.expression,
        "cron_type": definition.to_wire(),
        "task_type": definition.task.kind,
        "queue_ttl_ms": ttl,
    }


@method("crontab_create")
async def crontab_create(
    ctx: CallContext,
    token: Any,
    name: Any,
    cron_expression: Any,
    cron_type: Any,
    queue_ttl_ms: Any = None,
) -> dict[str, int]:
    """Create a cron; it fires from its next slot (queue_ttl_ms: queue tasks for offline agents)."""
    principal = await ctx.app.authenticate(token, ctx.remote)
    cron_name = crontab.validate_name(name)
    values = _definition(ctx, principal, cron_expression, cron_type, queue_ttl_ms)
    row = await ctx.app.store.insert_cron(
        {"name": cron_name, "created_by": principal.key, **values}
    )
    await ctx.app.cron_changed(row.id)
    return {"id": row.id}


@method("crontab_edit")
async def crontab_edit(
    ctx: CallContext,
    token: Any,
    name: Any,
    cron_expression: Any,
    cron_type: Any,
    queue_ttl_ms: Any = None,
) -> dict[str, Any]:
    """Replace a cron's expression, targets and task; it applies from the next slot."""
    principal = await ctx.app.authenticate(token, ctx.remote)
    cron_name = crontab.validate_name(name)
    values = _definition(ctx, principal, cron_expression, cron_type, queue_ttl_ms)

    def may_change(current: Any) -> None:
        _authorize_cron(principal, Need("crontab", "write"), _targets(current.cron_type))

    row = await ctx.app.store.update_cron(cron_name, values, may_change)
    await ctx.app.cron_changed(row.id)
    return {"id": row.id, "success": True}


@method("crontab_get")
async def crontab_get(ctx: CallContext, token: Any) -> list[dict[str, Any]]:
    """Every cron whose target agents the token may read."""
    principal = await ctx.app.authenticate(token, ctx.remote)
    need = Need("crontab", "read")
    if not _holds_anywhere(principal, need):
        authorize(principal, need)  # raises, naming what is missing
    rows = await ctx.app.store.list_crons()
    return [
        _cron(row)
        for row in rows
        if all(allows(principal, need, agent) for agent in _scopes(_targets(row.cron_type)))
    ]


@method("crontab_delete")
async def crontab_delete(ctx: CallContext, token: Any, name: Any) -> dict[str, bool]:
    """Delete a cron: it stops firing; its results stay."""
    principal = await ctx.app.authenticate(token, ctx.remote)
    cron_name = crontab.validate_name(name)

    def may_delete(current: Any) -> None:
        _authorize_cron(principal, Need("crontab", "delete"), _targets(current.cron_type))

    row = await ctx.app.store.delete_cron(cron_name, may_delete)
    await ctx.app.cron_changed(row.id)
    return {"success": True}


@method("crontab_set_enable")
async def crontab_set_enable(
    ctx: CallContext, token: Any, name: Any, enable: Any
) -> dict[str, bool]:
    """Enable (from the next slot on) or disable a cron."""
    principal = await ctx.app.authenticate(token, ctx.remote)
    cron_name = crontab.validate_name(name)
    if not isinstance(enable, bool):
        raise InvalidParams("enable: must be true or false")

    def may_change(current: Any) -> None:
        definition = _stored(current.cron_type)
        targets = definition.uuids if definition is not None else []
        _authorize_cron(principal, Need("crontab", "write"), targets)
        if enable and definition is not None:
            # enabling starts tasks again: the caller must be allowed to create them
            need = Need("task", "create", definition.task.kind)
            _authorize_targets(principal, need, targets)

    row = await ctx.app.store.update_cron(cron_name, {"enable": enable}, may_change)
    await ctx.app.cron_changed(row.id)
    return {"success": True, "enabled": enable}


def _holds_result_permission(principal: Principal, action: str) -> bool:
    """Whether a limit with a global scope grants ``crontab_result.<action>`` for some pattern."""
    if principal.is_super:
        return True
    return any(
        any(is_global_scope(scope) for scope in limit.scopes)
        and any(
            isinstance(permission, CronResultPermission)
            and getattr(permission.crontab_result, action, None) is not None
            for permission in limit.permissions
        )
        for limit in principal.limits
    )


async def _allowed_names(
    ctx: CallContext, principal: Principal, action: str, query: CronResultQuery
) -> list[str] | None:
    """The cron names a query may touch: None for all, else the readable ones (102 if none)."""
    if not _holds_result_permission(principal, action):
        # 102 whether or not there are results: an empty history must not look readable
        authorize(principal, Need("crontab_result", action))  # raises, naming what is missing
    if query.cron_names:
        for cron_name in query.cron_names:
            authorize(principal, Need("crontab_result", action, cron_name))
        return None
    if principal.is_super:
        return None
    names = await ctx.app.store.cron_result_names()
    allowed = [n for n in names if allows(principal, Need("crontab_result", action, n), None)]
    if names and not allowed:
        raise PermissionDenied(
            f"Permission denied: token {principal.key} lacks crontab_result.{action} "
            "on every cron with results"
        )
    return allowed


def _result(row: Any) -> dict[str, Any]:
    return {
        "id": row.id,
        "cron_id": row.cron_id,
        "cron_name": row.cron_name,
        "run_time": row.run_time,
        "relative_id": row.relative_id,
        "success": row.success,
        "message": row.message,
    }


@method("crontab-result_query")
async def crontab_result_query(ctx: CallContext, token: Any, query: Any) -> list[dict[str, Any]]:
    """Cron results matching every condition, newest first (default limit 1000)."""
    principal = await ctx.app.authenticate(token, ctx.remote)
    parsed = parse_cron_result_query(query)
    names = await _allowed_names(ctx, principal, "read", parsed)
    rows = await ctx.app.store.query_cron_results(parsed, names)
    return [_result(row) for row in rows]


@method("crontab-result_delete")
async def crontab_result_delete(ctx: CallContext, token: Any, query: Any) -> dict[str, Any]:
    """Delete the cron results matching every condition (all of them unless limited)."""
    principal = await ctx.app.authenticate(token, ctx.remote)
    parsed = parse_cron_result_query(query)
    names = await _allowed_names(ctx, principal, "delete", parsed)
    deleted = await ctx.app.store.delete_cron_results(parsed, names)
    return {"success": True, "deleted": deleted, "condition_count": parsed.condition_count}
