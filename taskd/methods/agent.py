"""Agent methods: the fleet as the server has seen it, enrollment of new agents, and
NodeGet's agent UUID lists (``nodeget-server_list_all_agent_uuid``, ``agent-uuid_*``).

An agent is known from its first authenticated call of any kind (see
``Hub.agent_called``). ``agent-uuid_delete`` soft-deletes it: it is left out of
every list while its tasks and results stay, and it is listed again once it
calls in after the delete (as in NodeGet, whose reports bring a deleted UUID back).

``agent_list`` also shows what each host is (``host``, from its newest static report)
and how it is doing (``metrics``, from its newest summary). Each part is there only
for a token that may read it on that agent: ``host``'s system facts need
``{"static_monitoring": {"read": "system"}}``, its CPU facts ``{"read": "cpu"}``;
each figure of ``metrics`` needs the summary read of that figure (``"read"``: all).
What cannot be read, or was never reported, is null. Host strings are the agent's
own words, answered as sent: clients must treat them as untrusted text.
"""

from __future__ import annotations

import logging
import uuid as uuid_module
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from typing_extensions import TypedDict

from taskd.auth import (
    Need,
    NewToken,
    Principal,
    allows,
    authorize,
    hash_secret,
    is_global_scope,
    lists_agents,
)
from taskd.errors import PermissionDenied
from taskd.models import TENTHS
from taskd.protocol import AgentScope, AgentUuid, Token
from taskd.roles import agent_limits
from taskd.rpc import CallContext, method

logger = logging.getLogger(__name__)


class AgentHost(TypedDict):
    """What an agent's host is, from its newest static report (``time``, ms). System facts are
    null without ``static_monitoring`` read of ``system``, CPU facts without read of ``cpu``."""

    time: int
    hostname: str | None
    os: str | None
    os_version: str | None
    os_long_version: str | None
    kernel: str | None
    arch: str | None
    virtualization: str | None
    cpu_brand: str | None
    cpu_cores: int | None
    cpu_physical_cores: int | None


class AgentMetrics(TypedDict):
    """How an agent's host is doing, from its newest summary (``time``, ms): CPU in percent,
    sizes in bytes, rates in bytes/s, uptime in seconds; a figure the token may not read, or
    the agent did not report, is null."""

    time: int
    cpu_usage: float | None
    used_memory: int | None
    total_memory: int | None
    used_swap: int | None
    total_swap: int | None
    total_space: int | None
    available_space: int | None
    receive_speed: int | None
    transmit_speed: int | None
    load_one: float | None
    load_five: float | None
    load_fifteen: float | None
    uptime: int | None


class AgentInfo(TypedDict):
    """One agent as agent_list shows it (times in ms); ``host`` and ``metrics`` are null when
    nothing was reported or the token may read none of it."""

    uuid: str
    online: bool
    connected_since: int | None
    first_seen: int
    last_seen: int
    remote_addr: str | None
    node_id: str | None
    host: AgentHost | None
    metrics: AgentMetrics | None


class AgentEnrolled(TypedDict):
    """A new agent's UUID and its agent token (shown once)."""

    uuid: AgentUuid
    token: str


class AgentUuids(TypedDict):
    """NodeGet's list of agent UUIDs."""

    uuids: list[AgentUuid]


class AgentMode(TypedDict):
    """An agent UUID and whether it is soft-deleted."""

    uuid: AgentUuid
    soft_delete: bool


class AgentDeleted(TypedDict):
    """Whether a soft delete found the agent, in words too."""

    success: bool
    message: str


@method("agent_list")
async def agent_list(ctx: CallContext, token: Token) -> list[AgentInfo]:
    """Every agent the token may list: online or not, since when, last seen, address."""
    principal = await ctx.app.authenticate(token, ctx.remote)
    need = Need("agent", "list")
    # refused up front, so a token without the permission learns nothing, not even "no agents"
    if not any(
        allows(principal, need, getattr(scope, "agent_uuid", None))
        for limit in principal.limits
        for scope in limit.scopes
    ):
        authorize(principal, need)
    rows = await ctx.app.store.list_agents()
    visible = [row for row in rows if row.deleted_at is None and allows(principal, need, row.uuid)]
    hosts, metrics = await _host_reports(ctx, principal, [row.uuid for row in visible])
    hub = ctx.app.hub
    cluster = ctx.app.cluster
    return [
        {
            "uuid": row.uuid,
            # an agent on a node that stopped heartbeating is offline for everyone
            "online": row.connected_since is not None and cluster.node_alive(row.node_id),
            "connected_since": row.connected_since,
            "first_seen": row.first_seen,
            "last_seen": max(hub.last_seen(row.uuid) or 0, row.last_seen),
            "remote_addr": row.remote_addr,
            "node_id": row.node_id,
            "host": hosts.get(row.uuid),
            "metrics": metrics.get(row.uuid),
        }
        for row in visible
    ]


HOST_PATHS: dict[str, tuple[str, tuple[str | int, ...]]] = {
    "hostname": ("system", ("system_host_name",)),
    "os": ("system", ("system_name",)),
    "os_version": ("system", ("system_os_version",)),
    "os_long_version": ("system", ("system_os_long_version",)),
    "kernel": ("system", ("system_kernel",)),
    "arch": ("system", ("arch",)),
    "virtualization": ("system", ("virtualization",)),
    "cpu_brand": ("cpu", ("per_core", 0, "brand")),
    "cpu_cores": ("cpu", ("logical_cores",)),
    "cpu_physical_cores": ("cpu", ("physical_cores",)),
}
"""Where in a static report (part, path) each AgentHost fact is."""
METRIC_FIGURES: tuple[str, ...] = tuple(
    name for name in AgentMetrics.__annotations__ if name != "time"
)
"""The summary figures agent_list shows, by their summary names."""


class _Readable:
    """Which monitoring fields a token may read on each agent.

    Only agents named in the token's agent scopes can differ from one another; every
    other agent gets the answer for the global scopes, worked out once.
    """

    def __init__(self, principal: Principal, category: Any, fields: Sequence[str]) -> None:
        self._check: Callable[[str], frozenset[str]] = lambda agent_uuid: frozenset(
            name for name in fields if allows(principal, Need(category, "read", name), agent_uuid)
        )
        self._all = frozenset(fields) if principal.is_super else None
        self._scoped = {
            scope.agent_uuid
            for limit in principal.limits
            for scope in limit.scopes
            if isinstance(scope, AgentScope)
        }
        self._elsewhere: frozenset[str] | None = None

    def of(self, agent_uuid: str) -> frozenset[str]:
        if self._all is not None:
            return self._all
        if agent_uuid in self._scoped:
            return self._check(agent_uuid)
        if self._elsewhere is None:
            self._elsewhere = self._check(agent_uuid)
        return self._elsewhere


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _host(row: Mapping[str, Any], readable: Collection[str]) -> AgentHost:
    """A static report's values as AgentHost, keeping only the parts in ``readable``."""
    value = {
        name: row[name] if column in readable else None for name, (column, _) in HOST_PATHS.items()
    }
    return {
        "time": row["time"],
        "hostname": _text(value["hostname"]),
        "os": _text(value["os"]),
        "os_version": _text(value["os_version"]),
        "os_long_version": _text(value["os_long_version"]),
        "kernel": _text(value["kernel"]),
        "arch": _text(value["arch"]),
        "virtualization": _text(value["virtualization"]),
        "cpu_brand": _text(value["cpu_brand"]),
        "cpu_cores": _count(value["cpu_cores"]),
        "cpu_physical_cores": _count(value["cpu_physical_cores"]),
    }


def _metrics(row: Mapping[str, Any], readable: Collection[str]) -> AgentMetrics:
    """A summary row as AgentMetrics, keeping only the figures in ``readable``."""
    figures: dict[str, Any] = {"time": row["time"]}
    for name in METRIC_FIGURES:
        value = row[name] if name in readable else None
        figures[name] = value / 10 if name in TENTHS and value is not None else value
    return figures  # type: ignore[return-value]


async def _host_reports(
    ctx: CallContext, principal: Principal, uuids: Sequence[str]
) -> tuple[dict[str, AgentHost], dict[str, AgentMetrics]]:
    """The host facts and latest figures of ``uuids`` the token may read: one multi-last
    query per table, asked only for the agents with something readable."""
    static_reads = _Readable(principal, "static_monitoring", ("cpu", "system"))
    summary_reads = _Readable(principal, "dynamic_monitoring_summary", METRIC_FIGURES)
    store = ctx.app.store
    hosts: dict[str, AgentHost] = {}
    with_static = [agent_uuid for agent_uuid in uuids if static_reads.of(agent_uuid)]
    if with_static:
        for row in await store.static_values_last(with_static, HOST_PATHS):
            hosts[row["uuid"]] = _host(row, static_reads.of(row["uuid"]))
    metrics: dict[str, AgentMetrics] = {}
    with_summary = [agent_uuid for agent_uuid in uuids if summary_reads.of(agent_uuid)]
    if with_summary:
        for row in await store.monitoring_last("summary", with_summary):
            metrics[row["uuid"]] = _metrics(row, summary_reads.of(row["uuid"]))
    return hosts, metrics


@method("agent_enroll")
async def agent_enroll(
    ctx: CallContext, token: Token, uuid: AgentUuid | None = None
) -> AgentEnrolled:
    """Enroll a new agent: its UUID (the proposed one if free) and its agent token, shown once.

    ``token`` is an enrollment token (``{"agent": "enroll"}``); each enrollment
    uses up one of its ``max_uses``. A proposed UUID needs the permission on that
    agent's scope (or global); without one the server draws a UUID (global only).
    """
    principal = await ctx.app.authenticate(token, ctx.remote)
    authorize(principal, Need("agent", "enroll"), uuid)
    agent_uuid = uuid or str(uuid_module.uuid4())
    issued = NewToken.generate()
    await ctx.app.store.enroll_agent(
        principal.key,
        agent_uuid,
        {
            "key": issued.key,
            "secret_hash": hash_secret(issued.secret),
            "limits": agent_limits(agent_uuid),
            "description": f"agent {agent_uuid}, enrolled with token {principal.key}",
        },
        ctx.remote or None,
    )
    logger.info(
        "agent %s enrolled from %s with token %s", agent_uuid, ctx.remote or "?", principal.key
    )
    return {"uuid": agent_uuid, "token": str(issued)}


def _listable(principal: Principal) -> set[str] | None:
    """The agent UUIDs ``nodeget-server_list_all_agent_uuid`` shows the token; None for all.

    As in NodeGet: a list permission on a global scope shows every agent; on agent
    scopes it shows those of them on which the token also holds some other permission.
    """
    if principal.is_super:
        return None
    listed: set[str] = set()
    operable: set[str] = set()
    for limit in principal.limits:
        uuids = {scope.agent_uuid for scope in limit.scopes if isinstance(scope, AgentScope)}
        if any(lists_agents(permission) for permission in limit.permissions):
            if any(is_global_scope(scope) for scope in limit.scopes):
                return None
            listed |= uuids
        if any(not lists_agents(permission) for permission in limit.permissions):
            operable |= uuids
    if not listed:
        raise PermissionDenied(
            f"Permission denied: token {principal.key} lacks monitoring_uuid.list "
            "(or node_get.list_all_agent_uuid)"
        )
    return listed & operable


@method("nodeget-server_list_all_agent_uuid")
async def list_all_agent_uuid(ctx: CallContext, token: Token) -> AgentUuids:
    """The UUIDs of the agents the token may list, soft-deleted ones left out, sorted."""
    principal = await ctx.app.authenticate(token, ctx.remote)
    listable = _listable(principal)
    rows = await ctx.app.store.list_agents()
    return {
        "uuids": sorted(
            row.uuid
            for row in rows
            if row.deleted_at is None and (listable is None or row.uuid in listable)
        )
    }


@method("agent-uuid_list_all")
async def agent_uuid_list_all(ctx: CallContext, token: Token) -> list[AgentUuid]:
    """Every agent UUID except the soft-deleted ones, sorted (global monitoring_uuid.list)."""
    principal = await ctx.app.authenticate(token, ctx.remote)
    authorize(principal, Need("monitoring_uuid", "list"))
    rows = await ctx.app.store.list_agents()
    return sorted(row.uuid for row in rows if row.deleted_at is None)


@method("agent-uuid_list_all_with_agent_mode")
async def agent_uuid_list_all_with_agent_mode(ctx: CallContext, token: Token) -> list[AgentMode]:
    """Every agent UUID with whether it is soft-deleted, sorted (global monitoring_uuid.list)."""
    principal = await ctx.app.authenticate(token, ctx.remote)
    authorize(principal, Need("monitoring_uuid", "list"))
    rows = sorted(await ctx.app.store.list_agents(), key=lambda row: str(row.uuid))
    return [{"uuid": row.uuid, "soft_delete": row.deleted_at is not None} for row in rows]


@method("agent-uuid_delete")
async def agent_uuid_delete(ctx: CallContext, token: Token, agent_uuid: AgentUuid) -> AgentDeleted:
    """Soft-delete an agent: left out of the lists, its history kept (global
    monitoring_uuid.delete); ``success`` is false for an unknown UUID."""
    principal = await ctx.app.authenticate(token, ctx.remote)
    authorize(principal, Need("monitoring_uuid", "delete"))
    found = await ctx.app.store.soft_delete_agent(agent_uuid)
    if not found:
        return {"success": False, "message": "Agent UUID not found"}
    ctx.app.hub.agent_deleted(agent_uuid)
    logger.info("agent %s soft-deleted by token %s", agent_uuid, principal.key)
    return {"success": True, "message": "Agent UUID soft-deleted"}
