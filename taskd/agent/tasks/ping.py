"""ping: one ICMP echo request; the round-trip time in milliseconds."""

from __future__ import annotations

import ipaddress
import os

from icmplib import (
    AsyncSocket,
    ICMPError,
    ICMPLibError,
    ICMPRequest,
    ICMPv4Socket,
    ICMPv6Socket,
    NameLookupError,
    TimeoutExceeded,
    async_resolve,
)
from icmplib.utils import unique_identifier

from taskd.agent.tasks import TaskContext, TaskFailed
from taskd.protocol import Ping, PingResult

TIMEOUT_S = 5.0
REPLY_TIMEOUT_S = 2.0


async def run(task: Ping, ctx: TaskContext) -> PingResult:
    """Send one echo request (a name goes to its first address) and time the reply."""
    host = task.ping.removeprefix("[").removesuffix("]")
    address = await _resolve(host)
    target = host if host == address else f"{host} ({address})"
    socket_type = ICMPv6Socket if ":" in address else ICMPv4Socket
    try:
        # Root gets a raw socket; anyone else the kernel's ICMP datagram socket,
        # which works where net.ipv4.ping_group_range admits the agent's group.
        with AsyncSocket(socket_type(privileged=os.geteuid() == 0)) as sock:
            request = ICMPRequest(destination=address, id=unique_identifier(), sequence=0)
            sock.send(request)
            reply = await sock.receive(request, REPLY_TIMEOUT_S)
            reply.raise_for_status()
    except TimeoutExceeded:
        raise TaskFailed(f"no reply from {target} within {REPLY_TIMEOUT_S:g} s") from None
    except ICMPError as exc:
        raise TaskFailed(f"{target}: {exc}") from None
    except ICMPLibError as exc:
        raise TaskFailed(f"cannot ping {target}: {exc}") from None
    return PingResult(ping=(reply.time - request.time) * 1000)


async def _resolve(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        addresses: list[str] = await async_resolve(host)
    except NameLookupError:
        raise TaskFailed(f"cannot resolve {host}") from None
    return addresses[0]
