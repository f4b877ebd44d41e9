"""The ip task kind against real HTTP echo servers on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable

from taskd.agent.tasks import TaskContext, runner_for
from taskd.agent.tasks import ip as ip_task
from taskd.config import parse_agent_config
from taskd.protocol import Ip, parse_task_event_type

UNIT = float(os.environ.get("TASKD_TEST_TIME_FACTOR", "1"))

# Documentation addresses: only text in a response body, never dialled.
PUBLIC_V4 = "203.0.113.7"
PUBLIC_V6 = "2001:db8::1"


@contextlib.asynccontextmanager
async def echo_server(
    body: bytes, *, status: int = 200, delay: float = 0.0, hang: bool = False
) -> AsyncIterator[str]:
    """A one-response HTTP server on 127.0.0.1; yields its URL.

    ``hang`` accepts the request and never answers; ``delay`` answers late.
    """
    handlers: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        try:
            await reader.readuntil(b"\r\n\r\n")
            if hang:
                await reader.read()  # until the client gives up
                return
            await asyncio.sleep(delay)
            head = (
                f"HTTP/1.1 {status} Echo\r\nContent-Type: text/plain\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with server:
            yield f"http://127.0.0.1:{port}/"
    finally:
        for handler in handlers:
            handler.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)


def context(*urls: str) -> TaskContext:
    """A context from a real agent config document whose ip_echo_urls are ``urls``."""
    listed = ", ".join(f'"{url}"' for url in urls)
    settings = parse_agent_config(
        f'ip_echo_urls = [{listed}]\n[[server]]\nws_url = "ws://127.0.0.1:9/ws"\ntoken = "secret"\n'
    )
    assert settings.ip_echo_urls == urls
    return TaskContext(settings=settings, server=settings.servers[0], task_id=1, task_token="t")


def ip_task_event() -> Ip:
    """The parsed unit task "ip"."""
    task = parse_task_event_type("ip")
    assert isinstance(task, Ip)
    return task


async def test_both_slots_fill() -> None:
    """An IPv4 echo fills the first slot and an IPv6 echo the second, whatever the URL order."""
    async with echo_server(PUBLIC_V6.encode()) as v6, echo_server(f"{PUBLIC_V4}\n".encode()) as v4:
        result = await ip_task.run(ip_task_event(), context(v6, v4))
    assert result.ip == (PUBLIC_V4, PUBLIC_V6)
    assert result.to_wire() == {"ip": [PUBLIC_V4, PUBLIC_V6]}


async def test_ipv6_is_written_in_canonical_form() -> None:
    """A long-form IPv6 echo comes back compressed."""
    async with echo_server(b"2001:0db8:0000:0000:0000:0000:0000:0001") as v6:
        result = await ip_task.run(ip_task_event(), context(v6))
    assert result.ip == (None, PUBLIC_V6)


async def test_garbage_and_dead_endpoints_give_null(held_ports: Callable[[], int]) -> None:
    """Bodies that are not addresses, error statuses and unreachable URLs leave both slots null."""
    async with (
        echo_server(b"<html>your ip is 203.0.113.7</html>") as html,
        echo_server(b"\xff\xfe\x00garbage") as binary,
        echo_server(PUBLIC_V4.encode(), status=500) as failing,
        echo_server(b"1" * 2000) as huge,
    ):
        closed = f"http://127.0.0.1:{held_ports()}/"
        urls = (html, binary, failing, huge, closed, "not a url", "http://[::1")
        result = await ip_task.run(ip_task_event(), context(*urls))
    assert result.ip == (None, None)


async def test_one_good_endpoint_among_bad_ones(held_ports: Callable[[], int]) -> None:
    """A working IPv4 echo still counts when the other endpoints fail."""
    closed = f"http://127.0.0.1:{held_ports()}/"
    async with echo_server(b"garbage") as garbage, echo_server(PUBLIC_V4.encode()) as v4:
        result = await ip_task.run(ip_task_event(), context(garbage, closed, v4))
    assert result.ip == (PUBLIC_V4, None)


async def test_no_endpoints_gives_null() -> None:
    """An empty ip_echo_urls list answers null for both families."""
    result = await ip_task.run(ip_task_event(), context())
    assert result.ip == (None, None)


async def test_hanging_endpoint_is_cut_off() -> None:
    """An endpoint that never answers costs at most the echo timeout and gives null."""
    timeout = 0.5 * UNIT
    async with echo_server(b"", hang=True) as hanging:
        started = time.perf_counter()
        result = await ip_task.run(ip_task_event(), context(hanging), echo_timeout_s=timeout)
        elapsed = time.perf_counter() - started
    assert result.ip == (None, None)
    assert timeout <= elapsed < timeout + 1.0 * UNIT


async def test_returns_once_both_slots_are_filled() -> None:
    """With both families known the task ends without waiting for a hanging endpoint."""
    async with (
        echo_server(b"", hang=True) as hanging,
        echo_server(PUBLIC_V4.encode()) as v4,
        echo_server(PUBLIC_V6.encode()) as v6,
    ):
        started = time.perf_counter()
        result = await ip_task.run(
            ip_task_event(), context(hanging, v4, v6), echo_timeout_s=5.0 * UNIT
        )
        elapsed = time.perf_counter() - started
    assert result.ip == (PUBLIC_V4, PUBLIC_V6)
    assert elapsed < 2.0 * UNIT


async def test_endpoints_are_asked_concurrently_and_first_answer_wins() -> None:
    """Two slow IPv4 echoes take one delay, not two, and the prompter one's address is kept."""
    delay = 0.5 * UNIT
    async with (
        echo_server(b"198.51.100.1", delay=2 * delay) as slower,
        echo_server(b"198.51.100.2", delay=delay) as slow,
    ):
        started = time.perf_counter()
        result = await ip_task.run(ip_task_event(), context(slower, slow))
        elapsed = time.perf_counter() - started
    assert result.ip == ("198.51.100.2", None)
    assert elapsed < 3 * delay


def test_hard_timeout_leaves_room_for_the_echo_timeout() -> None:
    """The hard timeout for ip outlasts one echo attempt, so a null answer comes back first."""
    _, timeout = runner_for("ip", context().settings)
    assert timeout == ip_task.TIMEOUT_S
    assert timeout is not None
    assert timeout > ip_task.ECHO_TIMEOUT_S + 1
