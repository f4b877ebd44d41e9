"""tcp_ping: the time to establish a TCP connection to ``host:port``, in milliseconds."""

from __future__ import annotations

import asyncio
import socket
import time

from taskd.agent.tasks import TaskContext, TaskFailed
from taskd.protocol import TcpPing, TcpPingResult, split_host_port

TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 3.0


async def run(
    task: TcpPing, ctx: TaskContext, *, connect_timeout_s: float = CONNECT_TIMEOUT_S
) -> TcpPingResult:
    """Connect to the target's first address, time the handshake and close the connection."""
    host, port = split_host_port(task.tcp_ping)
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise TaskFailed(f"cannot resolve {host}: {exc.strerror}") from None
    # Like ping, measure one address: the name lookup stays out of the time, and
    # a failure names the address that failed instead of a bundle of attempts.
    family, kind, proto, _, sockaddr = infos[0]
    address = sockaddr[0]
    target = task.tcp_ping if address == host else f"{task.tcp_ping} ({address})"
    with socket.socket(family, kind, proto) as sock:
        sock.setblocking(False)
        started = time.perf_counter()
        try:
            async with asyncio.timeout(connect_timeout_s):
                await loop.sock_connect(sock, sockaddr)
        except TimeoutError:
            raise TaskFailed(
                f"no TCP connection to {target} within {connect_timeout_s:g} s"
            ) from None
        except ConnectionRefusedError:
            raise TaskFailed(f"connection to {target} refused") from None
        except OSError as exc:
            raise TaskFailed(f"cannot connect to {target}: {exc.strerror or exc}") from None
        return TcpPingResult(tcp_ping=(time.perf_counter() - started) * 1000)
