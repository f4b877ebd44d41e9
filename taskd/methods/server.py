"""Server information methods (no token needed)."""

from __future__ import annotations

import platform
import sys
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


_UNKNOWN = "unknown"
NODEGET_WIRE_VERSION = "0.5.15"
"""The NodeGet server release whose wire protocol taskd speaks.

NodeGet clients gate features on ``cargo_version`` (NodeGet-board refuses to delete a
node through a server older than 0.3.3), so it names the protocol level; ``version``
is taskd's own.
"""
_VERSION = {
    "version": __version__,
    "binary_type": "Server",
    "cargo_version": NODEGET_WIRE_VERSION,
    "cargo_target_triple": f"{platform.machine() or _UNKNOWN}-{sys.platform}",
    "python_version": platform.python_version(),
    # build facts a Rust binary carries and a Python package does not
    **dict.fromkeys(
        (
            "build_time",
            "git_branch",
            "git_commit_sha",
            "git_commit_date",
            "git_commit_message",
            "rustc_channel",
            "rustc_version",
            "rustc_commit_date",
            "rustc_commit_hash",
            "rustc_llvm_version",
        ),
        _UNKNOWN,
    ),
}


@method("server_version", "nodeget-server_version")
async def server_version(ctx: CallContext) -> dict[str, str]:
    """The version, in NodeGet's ``NodeGetVersion`` shape plus ``version``."""
    return dict(_VERSION)


@method("rpc.discover")
async def rpc_discover(ctx: CallContext) -> dict[str, Any]:
    """The OpenRPC document of every method."""
    from taskd.schemas import openrpc_document

    return openrpc_document()
