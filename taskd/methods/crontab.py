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
from typing import Annotated, Any, NotRequired

from pydantic import Field
from typing_extensions import TypedDict

from taskd import crontab
from taskd.auth import Need, Principal, allows, authorize, is_global_scope
from taskd.errors import InvalidInput, PermissionDenied
from taskd.protocol import (
    CRON_TYPE,
    AgentCron,
    CronResultPermission,
    CronResultQuery,
    CronResultQueryParam,
    CronType,
    IdReply,
    Parse,
    QueueTtlMs,
    ResultRetentionMs,
    Token,
    parse_as,
)
from taskd.rpc import CallContext, method


def _agent_cron(value: Any, field: str) -> AgentCron:
    definition = parse_as(CRON_TYPE, field, value)
    if not isinstance(definition, AgentCron):
        raise InvalidInput("server crons are not supported; use an agent cron")
    return definition


def _name(value: Any, field: str) -> str:
    return crontab.validate_name(value)


CronName = Annotated[
    str, Parse(_name, wire=Annotated[str, Field(min_length=1, max_length=crontab.MAX_NAME_LENGTH)])
]
CronExpression = Annotated[
    str,
    Field(
        description="sec min hour dom month dow [year], the classic five fields or a @shorthand, "
        "in the server's timezone"
    ),
]
"""Parsed by the method: the server's timezone is part of it."""
AgentCronParam = Annotated[AgentCron, Parse(_agent_cron, wire=CronType)]
"""A cron type; only agent crons are accepted."""
Enable = Annotated[bool, Field(strict=True)]


class CronInfo(TypedDict):
    """One cron as crontab_get shows it."""

    id: int
    name: str
    enable: bool
    cron_expression: str
    cron_type: CronType
    last_run_time: int | None
    queue_ttl_ms: NotRequired[int]
    """taskd extension, only when set."""
    result_retention_ms: NotRequired[int]
    """taskd extension, only when set (else the server's ``cron_result_retention_s``)."""


class CronEdited(TypedDict):
    """The cron edited."""

    id: int
    success: bool


class CronDeleted(TypedDict):
    """The change went through."""

    success: bool


class CronEnabled(TypedDict):
    """The cron's new state."""

    success: bool
    enabled: bool


class CronResultRecord(TypedDict):
    """One fire's outcome for one agent, as crontab-result_query shows it."""

    id: int
    cron_id: int
    cron_name: str
    run_time: int
    relative_id: int | None
    success: bool
    message: str


class CronResultsDeleted(TypedDict):
    """What crontab-result_delete removed."""

    success: bool
    deleted: int
    condition_count: int


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


def _cron(row: Any) -> CronInfo:
    record: CronInfo = {
        "id": row.id,
        "name": row.name,
        "enable": row.enable,
        "cron_expression": row.cron_expression,
        "cron_type": row.cron_type,
        "last_run_time": row.last_run_time,
    }
    if row.queue_ttl_ms is not None:
        record["queue_ttl_ms"] = row.queue_ttl_ms  # taskd extension, only when set
    if row.result_retention_ms is not None:
        record["result_retention_ms"] = row.result_retention_ms  # taskd extension
    return record


def _definition(
    ctx: CallContext,
    principal: Principal,
    cron_expression: str,
    definition: AgentCron,
    queue_ttl_ms: int | None,
) -> dict[str, Any]:
    """Validate a cron's definition and check the token may run it on every target."""
    schedule = crontab.parse_expression(cron_expression, ctx.app.settings.timezone)
    _authorize_cron(principal, Need("crontab", "write"), definition.uuids)
    _authorize_targets(principal, Need("task", "create", definition.task.kind), definition.uuids)
    return {
        "cron_expression": schedule.expression,
        "cron_type": definition.to_wire(),
        "task_type": definition.task.kind,
        "queue_ttl_ms": queue_ttl_ms,
    }


@method("crontab_create")
async def crontab_create(
    ctx: CallContext,
    token: Token,
    name: CronName,
    cron_expression: CronExpression,
    cron_type: AgentCronParam,
    queue_ttl_ms: QueueTtlMs | None = None,
    result_retention_ms: ResultRetentionMs | None = None,
) -> IdReply:
    """Create a cron; it fires from its next slot (queue_ttl_ms: queue tasks for offline agents;
    result_retention_ms: keep its results this long instead of the server's default)."""
    principal = await ctx.app.authenticate(token, ctx.remote)
    values = _definition(ctx, principal, cron_expression, cron_type, queue_ttl_ms)
    values["result_retention_ms"] = result_retention_ms or None
    row = await ctx.app.store.insert_cron(
        {"name": name, "created_by": principal.key, **values}, now=ctx.app.clock.now_ms()
    )
    await ctx.app.scheduler.cron_changed(row.id)
    return {"id": row.id}


@method("crontab_edit")
async def crontab_edit(
    ctx: CallContext,
    token: Token,
    name: CronName,
    cron_expression: CronExpression,
    cron_type: AgentCronParam,
    queue_ttl_ms: QueueTtlMs | None = None,
    result_retention_ms: ResultRetentionMs | None = None,
) -> CronEdited:
    """Replace a cron's expression, targets and task; it applies from the next slot.

    Its result retention stays unless ``result_retention_ms`` is given (0: back to the
    server's default), so a client that does not know the field leaves it as it was."""
    principal = await ctx.app.authenticate(token, ctx.remote)
    values = _definition(ctx, principal, cron_expression, cron_type, queue_ttl_ms)
    if result_retention_ms is not None:
        values["result_retention_ms"] = result_retention_ms or None

    def may_change(current: Any) -> None:
        _authorize_cron(
            principal, Need("crontab", "write"), crontab.cron_targets(current.cron_type)
        )

    row = await ctx.app.store.update_cron(name, values, may_change, now=ctx.app.clock.now_ms())
    await ctx.app.scheduler.cron_changed(row.id)
    return {"id": row.id, "success": True}


@method("crontab_get")
async def crontab_get(ctx: CallContext, token: Token) -> list[CronInfo]:
    """Every cron whose target agents the token may read."""
    principal = await ctx.app.authenticate(token, ctx.remote)
    need = Need("crontab", "read")
    if not _holds_anywhere(principal, need):
        authorize(principal, need)  # raises, naming what is missing
    rows = await ctx.app.store.list_crons()
    return [
        _cron(row)
        for row in rows
        if all(
            allows(principal, need, agent) for agent in _scopes(crontab.cron_targets(row.cron_type))
        )
    ]


@method("crontab_delete")
async def crontab_delete(ctx: CallContext, token: Token, name: CronName) -> CronDeleted:
    """Delete a cron: it stops firing; its results stay."""
    principal = await ctx.app.authenticate(token, ctx.remote)

    def may_delete(current: Any) -> None:
        _authorize_cron(
            principal, Need("crontab", "delete"), crontab.cron_targets(current.cron_type)
        )

    row = await ctx.app.store.delete_cron(name, may_delete)
    await ctx.app.scheduler.cron_changed(row.id)
    return {"success": True}


@method("crontab_set_enable")
async def crontab_set_enable(
    ctx: CallContext, token: Token, name: CronName, enable: Enable
) -> CronEnabled:
    """Enable (from the next slot on) or disable a cron."""
    principal = await ctx.app.authenticate(token, ctx.remote)

    def may_change(current: Any) -> None:
        definition = crontab.stored_agent_cron(current.cron_type)
        targets = definition.uuids if definition is not None else []
        _authorize_cron(principal, Need("crontab", "write"), targets)
        if enable and definition is not None:
            # enabling starts tasks again: the caller must be allowed to create them
            need = Need("task", "create", definition.task.kind)
            _authorize_targets(principal, need, targets)

    row = await ctx.app.store.update_cron(
        name, {"enable": enable}, may_change, now=ctx.app.clock.now_ms()
    )
    await ctx.app.scheduler.cron_changed(row.id)
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


def _result(row: Any) -> CronResultRecord:
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
async def crontab_result_query(
    ctx: CallContext, token: Token, query: CronResultQueryParam
) -> list[CronResultRecord]:
    """Cron results matching every condition, newest first (default limit 1000)."""
    principal = await ctx.app.authenticate(token, ctx.remote)
    names = await _allowed_names(ctx, principal, "read", query)
    rows = await ctx.app.store.query_cron_results(query, names)
    return [_result(row) for row in rows]


@method("crontab-result_delete")
async def crontab_result_delete(
    ctx: CallContext, token: Token, query: CronResultQueryParam
) -> CronResultsDeleted:
    """Delete the cron results matching every condition (all of them unless limited)."""
    principal = await ctx.app.authenticate(token, ctx.remote)
    names = await _allowed_names(ctx, principal, "delete", query)
    deleted = await ctx.app.store.delete_cron_results(query, names)
    return {"success": True, "deleted": deleted, "condition_count": query.condition_count}
