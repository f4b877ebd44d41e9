"""Agent methods: the fleet as the server has seen it, and enrollment of new agents."""

from __future__ import annotations

import logging
import uuid as uuid_module
from typing import Any

from taskd.auth import Need, NewToken, allows, authorize, hash_secret
from taskd.protocol import parse_uuid
from taskd.roles import agent_limits
from taskd.rpc import CallContext, method

logger = logging.getLogger(__name__)


@method("agent_list")
async def agent_list(ctx: CallContext, token: Any) -> list[dict[str, Any]]:
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
    visible = [row for row in rows if allows(principal, need, row.uuid)]
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
async def agent_enroll(ctx: CallContext, token: Any, uuid: Any = None) -> dict[str, str]:
    """Enroll a new agent: its UUID (the proposed one if free) and its agent token, shown once.

    ``token`` is an enrollment token (``{"agent": "enroll"}``); each enrollment
    uses up one of its ``max_uses``. A proposed UUID needs the permission on that
    agent's scope (or global); without one the server draws a UUID (global only).
    """
    principal = await ctx.app.authenticate(token, ctx.remote)
    proposed = None if uuid is None else parse_uuid(uuid, "uuid")
    authorize(principal, Need("agent", "enroll"), proposed)
    agent_uuid = proposed or str(uuid_module.uuid4())
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
