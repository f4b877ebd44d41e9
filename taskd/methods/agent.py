"""Agent methods: the fleet as the server has seen it, enrollment of new agents, and
NodeGet's agent UUID lists (``nodeget-server_list_all_agent_uuid``, ``agent-uuid_*``).

An agent is known from its first authenticated call of any kind (see
``Hub.agent_called``). ``agent-uuid_delete`` soft-deletes it: it is left out of
every list while its tasks and results stay, and it is listed again once it
calls in after the delete (as in NodeGet, whose reports bring a deleted UUID back).
"""

from __future__ import annotations

import logging
import uuid as uuid_module

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
from taskd.protocol import AgentScope, AgentUuid, Token
from taskd.roles import agent_limits
from taskd.rpc import CallContext, method

logger = logging.getLogger(__name__)


class AgentInfo(TypedDict):
    """One agent as agent_list shows it (times in ms)."""

    uuid: str
    online: bool
    connected_since: int | None
    first_seen: int
    last_seen: int
    remote_addr: str | None
    node_id: str | None


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
        }
        for row in visible
    ]


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
