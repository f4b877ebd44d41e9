"""ICMP ping against the loopback addresses of this machine."""

from __future__ import annotations

import os
import socket

import pytest

from taskd.agent.tasks import TaskContext, TaskFailed, runner_for
from taskd.agent.tasks.ping import TIMEOUT_S, run
from taskd.config import parse_agent_config
from taskd.protocol import Ping


def _context() -> TaskContext:
    settings = parse_agent_config('[[server]]\nws_url = "ws://127.0.0.1:1/"\ntoken = "t"\n')
    return TaskContext(settings=settings, server=settings.servers[0], task_id=1, task_token="x")


def _icmp_permitted(family: socket.AddressFamily) -> bool:
    if os.geteuid() == 0:
        return True
    proto = socket.IPPROTO_ICMP if family == socket.AF_INET else socket.IPPROTO_ICMPV6
    try:
        socket.socket(family, socket.SOCK_DGRAM, proto).close()
    except OSError:
        return False
    return True


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_icmp = pytest.mark.skipif(
    not _icmp_permitted(socket.AF_INET),
    reason="not root and net.ipv4.ping_group_range does not admit this user's group",
)


def test_interface_finds_runner() -> None:
    """The task-kind interface maps ping to this runner with its 5 s hard limit."""
    runner, limit = runner_for("ping", _context().settings)
    assert runner is run
    assert limit == TIMEOUT_S == 5.0


@needs_icmp
async def test_ipv4_loopback_replies() -> None:
    """An echo to 127.0.0.1 comes back and its round-trip time is reported in milliseconds."""
    result = await run(Ping(ping="127.0.0.1"), _context())
    assert 0 < result.ping < 2000
    assert result.to_wire() == {"ping": result.ping}


@needs_icmp
@pytest.mark.skipif(not _has_ipv6_loopback(), reason="this machine has no IPv6 loopback")
@pytest.mark.skipif(
    not _icmp_permitted(socket.AF_INET6), reason="ICMPv6 datagram sockets not permitted"
)
@pytest.mark.parametrize("host", ["::1", "[::1]"])
async def test_ipv6_loopback_replies(host: str) -> None:
    """An ICMPv6 echo to ::1, bare or bracketed, comes back with a round-trip time."""
    result = await run(Ping(ping=host), _context())
    assert 0 < result.ping < 2000


@needs_icmp
async def test_name_is_resolved() -> None:
    """A host name is resolved and its address pinged."""
    result = await run(Ping(ping="localhost"), _context())
    assert 0 < result.ping < 2000


async def test_unresolvable_name_fails() -> None:
    """A name in the reserved .invalid domain fails with a message saying it cannot be resolved."""
    with pytest.raises(TaskFailed, match=r"^cannot resolve nonexistent\.invalid$"):
        await run(Ping(ping="nonexistent.invalid"), _context())
