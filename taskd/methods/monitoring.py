"""Monitoring methods: agents' host reports and their queries, in NodeGet's shapes (``agent_*``).

Reports: ``agent_report_static|dynamic|dynamic_summary [token, data]``; the token
needs ``{"<kind>": "write"}`` on a scope covering ``data.uuid``. taskd answers
after the report is committed (``{"status": "stored"}``; NodeGet: ``"buffered"``),
and a static report whose ``data_hash`` equals the agent's newest one is skipped
as in NodeGet. Values no host can have (negative figures, numbers beyond 64 bits,
a time more than ``MAX_FUTURE_MS`` ahead of the server's clock) are 108 and
nothing is stored.

Queries and deletes take NodeGet's conditions; without a ``uuid`` condition they
need the global scope. Queries need ``{"read": field}`` for each field asked
(static and dynamic: with no fields, one readable field, and only ``uuid`` and
``timestamp`` are answered; summary: no fields means every field).

taskd extension: a summary query's ``resolution`` (``raw``, ``1m``, ``1h``, ``auto``)
answers rollup buckets for ``1m``/``1h``: each figure's average, ``<figure>_min`` and
``<figure>_max``, ``timestamp`` being the bucket's start.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from typing_extensions import TypedDict

from taskd.admission import BUFFERED_AGE_MS
from taskd.auth import Need, Principal, allows, authorize
from taskd.errors import InvalidInput, ServerBusy
from taskd.models import TENTHS, summary_point
from taskd.monitoring import retentions
from taskd.protocol import (
    DYNAMIC_FIELDS,
    STATIC_FIELDS,
    SUMMARY_FIELDS,
    AgentUuid,
    DynamicField,
    DynamicMonitoringData,
    DynamicMonitoringSummaryData,
    DynamicQueryParam,
    MonitoringConditions,
    MonitoringWindow,
    Points,
    StaticField,
    StaticMonitoringData,
    StaticQueryParam,
    SummaryField,
    SummaryQueryParam,
    Token,
)
from taskd.rpc import CallContext, method
from taskd.store.monitoring import Kind
from taskd.store.rollups import ROLLUP_RESOLUTIONS

logger = logging.getLogger(__name__)

MAX_FUTURE_MS = 5 * 60 * 1000
"""How far ahead of the server's clock a report's time may be (agents' clocks drift)."""
I64_MAX = 2**63 - 1
SUMMARY_LIMITS: dict[str, int] = {
    "cpu_usage": 1000,
    "gpu_usage": 100,
    **dict.fromkeys(("load_one", "load_five", "load_fifteen"), 2**15 - 1),
    **dict.fromkeys(("uptime", "process_count", "tcp_connections", "udp_connections"), 2**31 - 1),
}
"""The largest value of each summary figure that is not a 64-bit one (its column's range)."""
AUTO_POINTS = 500
"""About how many points an ``auto`` summary query answers over its range."""

Category = Literal["static_monitoring", "dynamic_monitoring", "dynamic_monitoring_summary"]


class ReportStored(TypedDict):
    """A report is committed."""

    status: Literal["stored"]


class ReportSkipped(TypedDict):
    """A static report equal to the stored one (by ``data_hash``) was not stored again."""

    status: Literal["skipped"]
    reason: Literal["duplicate_hash"]


class Deleted(TypedDict):
    """How many rows a delete removed, and how many conditions it had."""

    success: Literal[True]
    deleted: int
    condition_count: int


def _check_values(value: Any, path: str) -> None:
    """108 for a negative or beyond-64-bit number anywhere in a report."""
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, int | float):
        if value < 0:
            raise InvalidInput(f"{path} is negative ({value})")
        if value > I64_MAX:
            raise InvalidInput(f"{path} is too large ({value})")
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _check_values(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_values(item, f"{path}[{index}]")


def _check_report(ctx: CallContext, payload: Mapping[str, Any], kind: str) -> None:
    """108 unless every figure is one a host can have and the time is not in the future."""
    for key, value in payload.items():
        _check_values(value, f"{kind}.{key}")
        limit = SUMMARY_LIMITS.get(key) if kind == "dynamic_monitoring_summary_data" else None
        if limit is not None and value is not None and value > limit:
            raise InvalidInput(f"{kind}.{key} is out of range ({value} > {limit})")
    now = ctx.app.clock.now_ms()
    if payload["time"] > now + MAX_FUTURE_MS:
        raise InvalidInput(
            f"{kind}.time {payload['time']} is more than {MAX_FUTURE_MS // 1000} s "
            f"ahead of the server's clock ({now})"
        )


async def _reporter(ctx: CallContext, token: str, category: Category, agent_uuid: str) -> None:
    """Authorize a report on its agent and record the agent as known."""
    principal = await ctx.app.authenticate(token, ctx.remote)
    authorize(principal, Need(category, "write"), agent_uuid)
    await ctx.app.hub.agent_called(agent_uuid)


@method("agent_report_static")
async def agent_report_static(
    ctx: CallContext, token: Token, static_monitoring_data: StaticMonitoringData
) -> ReportStored | ReportSkipped:
    """Store what a host is (CPU, system, GPUs) unless unchanged since its last report."""
    data = static_monitoring_data
    await _reporter(ctx, token, "static_monitoring", data.uuid)
    payload = data.model_dump(mode="json")
    _check_report(ctx, payload, "static_monitoring_data")
    row = {
        "uuid": data.uuid,
        "time": data.time,
        "storage_time": ctx.app.clock.now_ms(),
        "data_hash": bytes(data.data_hash).hex(),
        "cpu": payload["cpu"],
        "system": payload["system"],
        "gpu": payload["gpu"],
    }
    if not await ctx.app.store.store_static(row):
        return {"status": "skipped", "reason": "duplicate_hash"}
    return {"status": "stored"}


@method("agent_report_dynamic")
async def agent_report_dynamic(
    ctx: CallContext, token: Token, dynamic_monitoring_data: DynamicMonitoringData
) -> ReportStored:
    """Store how a host is doing (CPU, memory, load, system, disks, network, GPUs)."""
    data = dynamic_monitoring_data
    await _reporter(ctx, token, "dynamic_monitoring", data.uuid)
    payload = data.model_dump(mode="json")
    _check_report(ctx, payload, "dynamic_monitoring_data")
    body = {name: payload[name] for name in DYNAMIC_FIELDS}
    row = {
        "uuid": data.uuid,
        "time": data.time,
        "storage_time": ctx.app.clock.now_ms(),
        "data": body,
    }
    await ctx.app.store.store_report("dynamic", row)
    return {"status": "stored"}


@method("agent_report_dynamic_summary")
async def agent_report_dynamic_summary(
    ctx: CallContext,
    token: Token,
    dynamic_monitoring_summary_data: DynamicMonitoringSummaryData,
) -> ReportStored:
    """Store a host's flat summary (what charts read)."""
    data = dynamic_monitoring_summary_data
    await _reporter(ctx, token, "dynamic_monitoring_summary", data.uuid)
    if data.time < ctx.arrived_ms() - BUFFERED_AGE_MS:  # old when sent: from its buffer
        wait_ms = ctx.defer_backlog()
        if wait_ms is not None:  # from the agent's buffer, and agents are crowding in
            raise ServerBusy(wait_ms)
    payload = data.model_dump(mode="json")
    _check_report(ctx, payload, "dynamic_monitoring_summary_data")
    await ctx.app.store.store_report("summary", {**payload, "storage_time": ctx.app.clock.now_ms()})
    return {"status": "stored"}


# --------------------------------------------------------------------------- queries


def _authorize_scope(
    principal: Principal, needs: Iterable[Need], uuids: Iterable[str], *, any_of: bool = False
) -> None:
    """Each need (or, with ``any_of``, one of them) on each agent; the global scope if none.

    A need the token holds on the global scope holds on every agent, so a fleet-wide
    query of a global token costs one check per need, not one per agent."""
    wanted = list(needs)
    if any_of and any(allows(principal, need, None) for need in wanted):
        return
    if not any_of:
        wanted = [need for need in wanted if not allows(principal, need, None)]
    targets: list[str | None] = list(dict.fromkeys(uuids)) or [None]
    for agent_uuid in targets if wanted else ():
        if any_of:
            if not any(allows(principal, need, agent_uuid) for need in wanted):
                authorize(principal, wanted[0], agent_uuid)  # raises, naming one
            continue
        for need in wanted:
            authorize(principal, need, agent_uuid)


def _read_needs(
    category: Category, fields: Sequence[str], every: Sequence[str]
) -> tuple[list[Need], bool]:
    """The read needs of ``fields``; with none, one of ``every`` is enough (True)."""
    if fields:
        return [Need(category, "read", name) for name in dict.fromkeys(fields)], False
    return [Need(category, "read", name) for name in every], True


def _static_item(row: Mapping[str, Any], fields: Sequence[str]) -> dict[str, Any]:
    return {"uuid": row["uuid"], "timestamp": row["time"], **{f: row[f] for f in fields}}


def _dynamic_item(row: Mapping[str, Any], fields: Sequence[str]) -> dict[str, Any]:
    data = row["data"]
    return {"uuid": row["uuid"], "timestamp": row["time"], **{f: data.get(f) for f in fields}}


async def _query(
    ctx: CallContext,
    token: str,
    category: Category,
    kind: Kind,
    fields: Sequence[str],
    every: Sequence[str],
    window: MonitoringWindow,
) -> list[dict[str, Any]]:
    principal = await ctx.app.authenticate(token, ctx.remote)
    needs, any_of = _read_needs(category, fields, every)
    _authorize_scope(principal, needs, window.uuids, any_of=any_of)
    if len(window.uuids) > 1:
        return []  # one row has one uuid
    return await ctx.app.store.monitoring_rows(kind, window)


@method("agent_query_static")
async def agent_query_static(
    ctx: CallContext, token: Token, static_data_query: StaticQueryParam
) -> list[dict[str, Any]]:
    """Static reports matching the conditions: uuid, timestamp and the fields asked."""
    query = static_data_query
    rows = await _query(
        ctx, token, "static_monitoring", "static", query.fields, STATIC_FIELDS, query.window
    )
    return [_static_item(row, query.fields) for row in rows]


@method("agent_query_dynamic")
async def agent_query_dynamic(
    ctx: CallContext, token: Token, dynamic_data_query: DynamicQueryParam
) -> list[dict[str, Any]]:
    """Dynamic reports matching the conditions: uuid, timestamp and the fields asked."""
    query = dynamic_data_query
    rows = await _query(
        ctx, token, "dynamic_monitoring", "dynamic", query.fields, DYNAMIC_FIELDS, query.window
    )
    return [_dynamic_item(row, query.fields) for row in rows]


@method("agent_query_dynamic_summary")
async def agent_query_dynamic_summary(
    ctx: CallContext, token: Token, dynamic_summary_query: SummaryQueryParam
) -> Points:
    """Summaries matching the conditions: uuid, timestamp and the fields asked (none: all);
    ``cpu_usage`` and the loads as values, not tenths."""
    query = dynamic_summary_query
    fields: Sequence[str] = query.fields or SUMMARY_FIELDS
    resolution = query.resolution
    if resolution == "auto":
        kept = retentions(ctx.app.settings)
        resolution = auto_resolution(
            query.window, ctx.app.clock.now_ms(), {"raw": kept["summary"], "1m": kept["1m"]}
        )
    if resolution == "raw":
        rows = await _query(
            ctx, token, "dynamic_monitoring_summary", "summary", fields, fields, query.window
        )
        return [summary_point(row, fields) for row in rows]
    principal = await ctx.app.authenticate(token, ctx.remote)
    _authorize_scope(
        principal, _read_needs("dynamic_monitoring_summary", fields, fields)[0], query.window.uuids
    )
    if len(query.window.uuids) > 1:
        return []
    return await ctx.app.store.rollup_points(resolution, query.window, fields, TENTHS)


def auto_resolution(
    window: MonitoringWindow, now_ms: int, kept_ms: Mapping[str, int] | None = None
) -> Literal["raw", "1m", "1h"]:
    """The finest resolution giving at most about AUTO_POINTS points over the window (its
    end defaults to now, its start to an hour before its end) whose rows are still kept at
    the window's start (``kept_ms``: retention of ``raw`` and ``1m``)."""
    end = window.time_to if window.time_to is not None else now_ms
    start = window.time_from if window.time_from is not None else end - 3_600_000
    step = max(end - start, 0) / AUTO_POINTS
    kept = kept_ms or {}

    def fits(name: str, finest_step: int) -> bool:
        return step < finest_step and start >= now_ms - kept.get(name, now_ms)

    if fits("raw", ROLLUP_RESOLUTIONS["1m"]):
        return "raw"
    if fits("1m", ROLLUP_RESOLUTIONS["1h"]):
        return "1m"
    return "1h"


async def _multi_last(
    ctx: CallContext,
    token: str,
    category: Category,
    kind: Kind,
    uuids: Sequence[str],
    fields: Sequence[str],
    every: Sequence[str],
) -> list[dict[str, Any]]:
    principal = await ctx.app.authenticate(token, ctx.remote)
    needs, any_of = _read_needs(category, fields, every)
    if not uuids:
        return []
    _authorize_scope(principal, needs, uuids, any_of=any_of)
    return await ctx.app.store.monitoring_last(kind, uuids)


@method("agent_static_data_multi_last_query")
async def agent_static_data_multi_last_query(
    ctx: CallContext, token: Token, uuids: list[AgentUuid], fields: list[StaticField]
) -> list[dict[str, Any]]:
    """The newest static report of each agent listed that has one."""
    rows = await _multi_last(
        ctx, token, "static_monitoring", "static", uuids, fields, STATIC_FIELDS
    )
    return [_static_item(row, fields) for row in rows]


@method("agent_dynamic_data_multi_last_query")
async def agent_dynamic_data_multi_last_query(
    ctx: CallContext, token: Token, uuids: list[AgentUuid], fields: list[DynamicField]
) -> list[dict[str, Any]]:
    """The newest dynamic report of each agent listed that has one."""
    rows = await _multi_last(
        ctx, token, "dynamic_monitoring", "dynamic", uuids, fields, DYNAMIC_FIELDS
    )
    return [_dynamic_item(row, fields) for row in rows]


@method("agent_dynamic_summary_multi_last_query")
async def agent_dynamic_summary_multi_last_query(
    ctx: CallContext, token: Token, uuids: list[AgentUuid], fields: list[SummaryField]
) -> Points:
    """The newest summary of each agent listed that has one (no fields: every field)."""
    chosen: Sequence[str] = fields or SUMMARY_FIELDS
    principal = await ctx.app.authenticate(token, ctx.remote)
    if not uuids:
        return []
    needs, any_of = _read_needs("dynamic_monitoring_summary", chosen, chosen)
    _authorize_scope(principal, needs, uuids, any_of=any_of)
    return await ctx.app.store.summary_last_points(uuids, list(dict.fromkeys(chosen)), TENTHS)


async def _delete(
    ctx: CallContext,
    token: str,
    category: Category,
    kind: Kind,
    window: MonitoringWindow,
) -> Deleted:
    principal = await ctx.app.authenticate(token, ctx.remote)
    _authorize_scope(principal, [Need(category, "delete")], window.uuids)
    deleted = 0 if len(window.uuids) > 1 else await ctx.app.store.delete_monitoring(kind, window)
    logger.info("deleted %d %s monitoring rows", deleted, kind)
    return {"success": True, "deleted": deleted, "condition_count": window.condition_count}


@method("agent_delete_static")
async def agent_delete_static(
    ctx: CallContext, token: Token, conditions: MonitoringConditions
) -> Deleted:
    """Delete the static reports matching the conditions (limit/last: the newest ones)."""
    return await _delete(ctx, token, "static_monitoring", "static", conditions)


@method("agent_delete_dynamic")
async def agent_delete_dynamic(
    ctx: CallContext, token: Token, conditions: MonitoringConditions
) -> Deleted:
    """Delete the dynamic reports matching the conditions (limit/last: the newest ones)."""
    return await _delete(ctx, token, "dynamic_monitoring", "dynamic", conditions)


@method("agent_delete_dynamic_summary")
async def agent_delete_dynamic_summary(
    ctx: CallContext, token: Token, conditions: MonitoringConditions
) -> Deleted:
    """Delete the summaries matching the conditions (limit/last: the newest ones)."""
    return await _delete(ctx, token, "dynamic_monitoring_summary", "summary", conditions)
