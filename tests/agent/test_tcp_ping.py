"""tcp_ping against real listeners, closed ports and a full accept queue on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import pytest

from taskd.agent.tasks import TaskContext, TaskFailed, runner_for
from taskd.agent.tasks.tcp_ping import TIMEOUT_S, run
from taskd.config import parse_agent_config
from taskd.protocol import TcpPing
from tests.helpers import has_ipv6_loopback, scaled


def _context() -> TaskContext:
    settings = parse_agent_config('[[server]]\nws_url = "ws://127.0.0.1:1/"\ntoken = "t"\n')
    return TaskContext(settings=settings, server=settings.servers[0], task_id=1, task_token="x")


@contextlib.asynccontextmanager
async def _listener(host: str) -> AsyncIterator[tuple[int, asyncio.Queue[str]]]:
    """A TCP server on a free port that queues the peer address of every connection."""
    peers: asyncio.Queue[str] = asyncio.Queue()

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peers.put_nowait(writer.get_extra_info("peername")[0])
        writer.close()

    server = await asyncio.start_server(accept, host, 0)
    try:
        yield server.sockets[0].getsockname()[1], peers
    finally:
        server.close()
        await server.wait_closed()


def test_interface_finds_runner() -> None:
    """The task-kind interface maps tcp_ping to this runner with its 5 s hard limit."""
    runner, limit = runner_for("tcp_ping", _context().settings)
    assert runner is run
    assert limit == TIMEOUT_S == 5.0


async def test_connects_to_listener() -> None:
    """A connection to a real listener is made, and its set-up time is reported."""
    async with _listener("127.0.0.1") as (port, peers):
        result = await run(TcpPing(tcp_ping=f"127.0.0.1:{port}"), _context())
        peer = await asyncio.wait_for(peers.get(), scaled(5))
    assert 0 < result.tcp_ping < 3000
    assert result.to_wire() == {"tcp_ping": result.tcp_ping}
    assert peer == "127.0.0.1"
    assert peers.empty()


async def test_name_is_resolved() -> None:
    """A host name is resolved before the connection is timed."""
    async with _listener("127.0.0.1") as (port, peers):
        result = await run(TcpPing(tcp_ping=f"localhost:{port}"), _context())
        peer = await asyncio.wait_for(peers.get(), scaled(5))
    assert result.tcp_ping > 0
    assert peer == "127.0.0.1"


@pytest.mark.skipif(not has_ipv6_loopback(), reason="this machine has no IPv6 loopback")
async def test_connects_over_ipv6() -> None:
    """A bracketed IPv6 target connects over IPv6."""
    async with _listener("::1") as (port, peers):
        result = await run(TcpPing(tcp_ping=f"[::1]:{port}"), _context())
        peer = await asyncio.wait_for(peers.get(), scaled(5))
    assert result.tcp_ping > 0
    assert peer == "::1"


async def test_closed_port_is_refused() -> None:
    """A port that is bound but not listening fails with a message saying it was refused."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        with pytest.raises(TaskFailed, match=rf"^connection to 127\.0\.0\.1:{port} refused$"):
            await run(TcpPing(tcp_ping=f"127.0.0.1:{port}"), _context())


async def test_unresolvable_name_fails() -> None:
    """A name in the reserved .invalid domain fails with a message saying it cannot be resolved."""
    with pytest.raises(TaskFailed, match=r"^cannot resolve nonexistent\.invalid: "):
        await run(TcpPing(tcp_ping="nonexistent.invalid:80"), _context())


async def test_unanswered_connect_times_out() -> None:
    """A connect that gets no answer within the limit fails with a message naming the limit."""
    loop = asyncio.get_running_loop()
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        port = server.getsockname()[1]
        # Fill the accept queue: once it is full the kernel drops further SYNs.
        fillers: list[socket.socket] = []
        try:
            for _ in range(16):
                filler = socket.socket()
                filler.setblocking(False)
                fillers.append(filler)
                try:
                    async with asyncio.timeout(scaled(0.3)):
                        await loop.sock_connect(filler, ("127.0.0.1", port))
                except TimeoutError:
                    break
            else:
                pytest.skip("this kernel answers connects beyond a full accept queue")
            limit = scaled(0.3)
            with pytest.raises(TaskFailed, match=rf"^no TCP connection to 127\.0\.0\.1:{port} "):
                await run(
                    TcpPing(tcp_ping=f"127.0.0.1:{port}"), _context(), connect_timeout_s=limit
                )
        finally:
            for filler in fillers:
                filler.close()
