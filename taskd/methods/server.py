"""Server information methods (no token needed)."""

from __future__ import annotations

from typing import Any

from taskd import __version__
from taskd.rpc import CallContext, method


@method("server_uuid", "nodeget-server_uuid")
async def server_uuid(ctx: CallContext) -> str:
    """The server's (cluster's) UUID."""
    return ctx.app.settings.server_uuid


@method("server_hello", "nodeget-server_hello")
async def server_hello(ctx: CallContext) -> str:
    """A greeting with the version."""
    return f"hello from taskd {__version__}"


@method("rpc.discover")
async def rpc_discover(ctx: CallContext) -> dict[str, Any]:
    """The OpenRPC document of every method."""
    from taskd.schemas import openrpc_document

    return openrpc_document()
