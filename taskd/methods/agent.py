"""Agent methods: the fleet as the server has seen it."""

from __future__ import annotations

from typing import Any

from taskd.auth import Need, allows, authorize
from taskd.rpc import CallContext, method


@method("agent_list")
async def agent_list(ctx: CallContext, token: Any) -> list[dict[str, Any]]:
    """Every agent the token may list: online or not, since when, last seen, address."""
    principal = await ctx.app.authenticate(token, ctx.remote)
    need = Need("agent", "list")
    rows = await ctx.app.store.list_agents()
    visible = [row for row in rows if allows(principal, need, row.uuid)]
    if not visible and rows:
        authorize(principal, need)
    hub = ctx.app.hub
    return [
        {
            "uuid": row.uuid,
            "online": row.connected_since is not None,
            "connected_since": row.connected_since,
            "first_seen": row.first_seen,
            "last_seen": max(hub.last_seen(row.uuid) or 0, row.last_seen),
            "remote_addr": row.remote_addr,
            "node_id": row.node_id,
        }
        for row in visible
    ]
