"""Server information methods (no token needed)."""

from __future__ import annotations

import platform
import sys
from typing import Any, Literal

from typing_extensions import TypedDict

from taskd import __version__
from taskd.protocol import Uuid
from taskd.rpc import CallContext, method


@method("server_uuid", "nodeget-server_uuid")
async def server_uuid(ctx: CallContext) -> Uuid:
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


class ServerVersion(TypedDict):
    """NodeGet's ``NodeGetVersion`` plus ``version``, taskd's own."""

    version: str
    binary_type: Literal["Server"]
    cargo_version: str
    cargo_target_triple: str
    python_version: str
    build_time: str
    git_branch: str
    git_commit_sha: str
    git_commit_date: str
    git_commit_message: str
    rustc_channel: str
    rustc_version: str
    rustc_commit_date: str
    rustc_commit_hash: str
    rustc_llvm_version: str


_VERSION = ServerVersion(
    version=__version__,
    binary_type="Server",
    cargo_version=NODEGET_WIRE_VERSION,
    cargo_target_triple=f"{platform.machine() or _UNKNOWN}-{sys.platform}",
    python_version=platform.python_version(),
    # build facts a Rust binary carries and a Python package does not
    build_time=_UNKNOWN,
    git_branch=_UNKNOWN,
    git_commit_sha=_UNKNOWN,
    git_commit_date=_UNKNOWN,
    git_commit_message=_UNKNOWN,
    rustc_channel=_UNKNOWN,
    rustc_version=_UNKNOWN,
    rustc_commit_date=_UNKNOWN,
    rustc_commit_hash=_UNKNOWN,
    rustc_llvm_version=_UNKNOWN,
)


@method("server_version", "nodeget-server_version")
async def server_version(ctx: CallContext) -> ServerVersion:
    """The version, in NodeGet's ``NodeGetVersion`` shape plus ``version``."""
    return _VERSION.copy()


@method("rpc.discover")
async def rpc_discover(ctx: CallContext) -> dict[str, Any]:
    """The OpenRPC document of every method."""
    from taskd.schemas import openrpc_document

    return openrpc_document()
