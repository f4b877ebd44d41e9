"""web_shell with a real PTY and shell, relayed to a local WebSocket server posing as /terminal."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import orjson
import pytest
import websockets
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from taskd.agent.tasks import TaskContext, TaskFailed, runner_for
from taskd.agent.tasks.web_shell import run, session_url
from taskd.config import parse_agent_config
from taskd.protocol import WebShell, WebShellResult, WebShellSpec
from tests.agent.test_cli_agent import nohup_agent
from tests.agent.test_client import running_agent, wait_online
from tests.helpers import (
    Server,
    gone,
    make_settings,
    read_until,
    running_server,
    scaled,
    tmp_sqlite_url,
)

AGENT_UUID = "6f1c1a52-8c43-4d4e-9a51-6c4a3f0e2b10"
TERMINAL_ID = "0b7e5a8e-2f1d-4c55-b1f9-3a2d6c7e8f90"
Script = Callable[[ServerConnection], Awaitable[None]]


def context(
    ws_url: str = "ws://127.0.0.1:1/", extra: str = "", server_extra: str = ""
) -> TaskContext:
    """A task context for task 7 with task_token "tok7", running /bin/sh."""
    settings = parse_agent_config(
        f'agent_uuid = "{AGENT_UUID}"\nterminal_shell = "/bin/sh"\n{extra}\n'
        f'[[server]]\nws_url = "{ws_url}"\ntoken = "k:s"\n{server_extra}\n'
    )
    return TaskContext(settings, settings.servers[0], task_id=7, task_token="tok7")


def shell_task(url: str) -> WebShell:
    """A web_shell task for ``url``."""
    return WebShell(web_shell=WebShellSpec(url=url, terminal_id=TERMINAL_ID))


@contextlib.asynccontextmanager
async def relay(
    script: Script, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[tuple[str, list[str]]]:
    """A local WebSocket server running ``script`` per connection; yields its URL and the paths."""
    paths: list[str] = []

    async def handler(ws: ServerConnection) -> None:
        paths.append(ws.request.path if ws.request is not None else "")
        await script(ws)

    async with serve(handler, "127.0.0.1", 0, ssl=ssl_context) as server:
        port = server.sockets[0].getsockname()[1]
        scheme = "wss" if ssl_context is not None else "ws"
        yield f"{scheme}://127.0.0.1:{port}", paths


def test_interface_finds_runner_with_a_limit_beyond_the_longest_session() -> None:
    """web_shell maps to this runner; the client's hard limit leaves the session its full length."""
    runner, limit = runner_for("web_shell", context().settings)
    assert runner is run
    assert limit > 24 * 3600
    runner, limit = runner_for(
        "web_shell", context(extra="terminal_max_session_ms = 1000").settings
    )
    assert 1 < limit < 60


async def test_session_is_killed_at_terminal_max_session_ms() -> None:
    """A session open at terminal_max_session_ms fails saying so; its shell and jobs are killed."""
    pids: list[int] = []

    async def script(ws: ServerConnection) -> None:
        await ws.send("sleep 1000 & echo PIDS $$ $!\n")
        output = await read_until(ws, rb"PIDS \d+ \d+\r\n")
        pids.extend(map(int, re.findall(rb"PIDS (\d+) (\d+)\r\n", output)[-1]))
        with contextlib.suppress(ConnectionClosed):
            await ws.wait_closed()  # the user stays: only the limit ends the session

    limit_ms = int(scaled(1.0) * 1000)
    ctx = context(extra=f"terminal_max_session_ms = {limit_ms}")
    started = time.monotonic()
    async with relay(script) as (base, _):
        with pytest.raises(TaskFailed) as failed:
            await asyncio.wait_for(run(shell_task(f"{base}/t"), ctx), scaled(20))
    assert time.monotonic() - started >= limit_ms / 1000
    assert str(failed.value) == (
        f"the session reached terminal_max_session_ms ({limit_ms / 1000:g} s); shell killed"
    )
    shell_pid, job_pid = pids
    assert await gone(shell_pid), "the shell outlived its session"
    assert await gone(job_pid), "a background job outlived its session"


async def test_session_limit_result_is_uploaded_through_a_real_server(
    server: Server, tmp_path: Path
) -> None:
    """Through a real server's /terminal, a session cut at its limit is answered success false."""
    agent_uuid = str(uuid.uuid4())
    config = parse_agent_config(
        f'agent_uuid = "{agent_uuid}"\nterminal_shell = "/bin/sh"\n'
        f"terminal_max_session_ms = {int(scaled(1.0) * 1000)}\n"
        f'[[server]]\nname = "s0"\nws_url = "{server.ws_url}"\n'
        f'token = "{server.super_token}"\nallow_web_shell = true\n'
    )
    task = {"web_shell": {"url": server.ws_url + "auto_gen", "terminal_id": str(uuid.uuid4())}}
    async with running_agent(config, tmp_path):
        await wait_online(server, agent_uuid)
        result = await server.su("task_create_task_blocking", agent_uuid, task, 30_000)
    assert result["success"] is False, result
    assert "reached terminal_max_session_ms" in result["error_message"]


def test_auto_gen_url_goes_to_the_servers_terminal_endpoint() -> None:
    """A /auto_gen URL becomes the sending server's /terminal URL with the session's identity."""
    for ws_url, expected in (
        ("ws://10.1.2.3:2211/", "ws://10.1.2.3:2211/terminal"),
        ("wss://taskd.example:8443/rpc", "wss://taskd.example:8443/terminal"),
    ):
        url = session_url(shell_task("wss://anything.example/auto_gen"), context(ws_url))
        base, _, query = url.partition("?")
        assert base == expected
        assert parse_qs(query) == {
            "agent_uuid": [AGENT_UUID],
            "task_id": ["7"],
            "task_token": ["tok7"],
            "terminal_id": [TERMINAL_ID],
        }


def test_other_urls_keep_their_path_and_query() -> None:
    """Any other URL is used as given, with the session's parameters appended to its query."""
    url = session_url(shell_task("wss://relay.example/term/in?x=1"), context())
    parts = urlsplit(url)
    assert (parts.scheme, parts.netloc, parts.path) == ("wss", "relay.example", "/term/in")
    assert parse_qs(parts.query) == {
        "x": ["1"],
        "agent_uuid": [AGENT_UUID],
        "task_id": ["7"],
        "task_token": ["tok7"],
        "terminal_id": [TERMINAL_ID],
    }


async def test_relays_typing_output_and_resize() -> None:
    """Typed frames reach the shell, output comes back as binary, and resize frames resize it."""
    seen: dict[str, bytes] = {}

    async def script(ws: ServerConnection) -> None:
        await ws.send("echo hi\n")
        await read_until(ws, rb"(?<!echo )hi\r\n")
        await ws.send(b"stty size\n")
        seen["before"] = await read_until(ws, rb"(?<!\d)\d+ \d+\r\n")
        await ws.send(orjson.dumps({"type": "resize", "cols": 132, "rows": 50}).decode())
        await ws.send("stty size\n")
        seen["after"] = await read_until(ws, rb"(?<!\d)50 132\r\n")

    async with relay(script) as (base, paths):
        result = await asyncio.wait_for(
            run(shell_task(f"{base}/custom?x=1"), context()), scaled(20)
        )
    assert result == WebShellResult(web_shell=True)
    assert b"24 80" in seen["before"]
    assert b"resize" not in seen["after"], "a resize frame must not be typed into the shell"
    path, _, query = paths[0].partition("?")
    assert path == "/custom"
    assert parse_qs(query)["task_token"] == ["tok7"]
    assert parse_qs(query)["x"] == ["1"]


async def test_shell_exit_closes_the_connection() -> None:
    """When the shell exits, the agent closes the WebSocket normally and reports success."""
    closed: dict[str, Any] = {}

    async def script(ws: ServerConnection) -> None:
        await ws.send("exit 3\n")
        try:
            while True:
                await ws.recv()
        except ConnectionClosed as exc:
            closed["code"] = exc.rcvd.code if exc.rcvd is not None else None

    async with relay(script) as (base, _):
        result = await asyncio.wait_for(run(shell_task(f"{base}/t"), context()), scaled(20))
    assert result == WebShellResult(web_shell=True)
    assert closed["code"] == 1000


async def test_ctrl_c_reaches_the_foreground_job() -> None:
    """The PTY is the shell's controlling terminal: Ctrl-C interrupts a running command."""

    async def script(ws: ServerConnection) -> None:
        await ws.send("sleep 1000\n")
        await asyncio.sleep(0.3)
        await ws.send("\x03")
        await ws.send("echo after\n")
        await read_until(ws, rb"(?<!echo )after\r\n", timeout=5)

    async with relay(script) as (base, _):
        await asyncio.wait_for(run(shell_task(f"{base}/t"), context()), scaled(20))


def _running_in_session(sid: int, command: str) -> list[int]:
    """The pids of processes running ``command`` in the session ``sid``."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            text = stat.read_text()
            name = text[text.index("(") + 1 : text.rindex(")")]
            session = int(text[text.rindex(")") + 2 :].split()[3])
            if session == sid and name == command:
                pids.append(int(stat.parent.name))
    return pids


async def session_member(sid: int, command: str, timeout: float = 10) -> int:
    """Wait for a process running ``command`` in the session ``sid``; its pid."""
    deadline = time.monotonic() + scaled(timeout)
    while time.monotonic() < deadline:
        if pids := _running_in_session(sid, command):
            return pids[0]
        await asyncio.sleep(0.05)
    raise AssertionError(f"no {command} started in session {sid}")


async def test_interrupt_keys_work_in_shells_of_an_agent_started_under_nohup(
    tmp_path: Path,
) -> None:
    """An agent started ignoring SIGHUP, SIGINT and SIGQUIT gives shells obeying Ctrl-C, Ctrl-\\."""
    async with (
        running_server(make_settings(tmp_sqlite_url(tmp_path))) as server,
        nohup_agent(server, tmp_path, "web_shell") as agent_uuid,
    ):
        terminal_id = str(uuid.uuid4())
        shell = {"web_shell": {"url": f"{server.ws_url}auto_gen", "terminal_id": terminal_id}}
        await server.su("task_create_task", agent_uuid, shell)
        query = {"agent_uuid": agent_uuid, "terminal_id": terminal_id, "token": server.super_token}
        async with websockets.connect(f"{server.ws_url}terminal?{urlencode(query)}") as user:
            await user.send("ulimit -c 0; echo SHELL $$\n")  # no core dump on Ctrl-\\
            output = await read_until(user, rb"SHELL \d+\r\n")
            shell_pid = int(re.findall(rb"SHELL (\d+)\r\n", output)[-1])
            for key, signal_name in (("\x03", "SIGINT"), ("\x1c", "SIGQUIT")):
                await user.send("sleep 1000\n")
                sleep_pid = await session_member(shell_pid, "sleep")
                await user.send(key)
                assert await gone(sleep_pid, timeout=5), (
                    f"{key!r} ({signal_name}) left sleep running"
                )
                await user.send(f"echo after {signal_name}\n")
                await read_until(user, rf"(?<!echo )after {signal_name}\r\n".encode())


async def test_closing_kills_the_whole_session_even_if_it_ignores_hangups() -> None:
    """Closing the WebSocket kills the shell and its background jobs, with SIGKILL if needed."""
    pids: list[int] = []

    async def script(ws: ServerConnection) -> None:
        await ws.send("trap '' HUP TERM; sleep 1000 & echo PIDS $$ $!\n")
        output = await read_until(ws, rb"PIDS \d+ \d+\r\n")
        pids.extend(map(int, re.findall(rb"PIDS (\d+) (\d+)\r\n", output)[-1]))

    async with relay(script) as (base, _):
        await asyncio.wait_for(run(shell_task(f"{base}/t"), context()), scaled(20))
    shell_pid, job_pid = pids
    assert await gone(shell_pid), "the shell outlived its session"
    assert await gone(job_pid), "a background job outlived its session"


async def test_error_frame_fails_the_task() -> None:
    """A relay error frame is not typed: it fails the task with the relay's message."""

    async def script(ws: ServerConnection) -> None:
        frame = {"error_id": 105, "error_message": "No task 7 for agent X with that task_token"}
        await ws.send(orjson.dumps(frame).decode())
        await ws.close(1008, "105")

    async with relay(script) as (base, _):
        with pytest.raises(TaskFailed) as failed:
            await asyncio.wait_for(run(shell_task(f"{base}/t"), context()), scaled(20))
    assert str(failed.value) == (
        "the terminal relay refused the session: No task 7 for agent X with that task_token"
    )


async def test_unreachable_relay_fails_the_task(held_ports: Callable[[], int]) -> None:
    """A refused connection fails the task with the reason and the address."""
    port = held_ports()
    with pytest.raises(TaskFailed) as failed:
        await run(shell_task("ws://x.example/auto_gen"), context(f"ws://127.0.0.1:{port}/"))
    assert str(failed.value).startswith(f"cannot connect the terminal to 127.0.0.1:{port}")


async def test_rejected_handshake_fails_the_task() -> None:
    """An HTTP refusal of the WebSocket handshake fails the task with its status."""

    def reject(connection: ServerConnection, request: Request) -> Response:
        return connection.respond(403, "no\n")

    async def never(ws: ServerConnection) -> None:
        raise AssertionError("the handshake was refused")

    async with serve(never, "127.0.0.1", 0, process_request=reject) as server:
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(TaskFailed) as failed:
            await run(shell_task(f"ws://127.0.0.1:{port}/t"), context())
    assert "HTTP 403" in str(failed.value)


async def test_at_most_max_terminals_sessions() -> None:
    """Beyond max_terminals open sessions a task fails; a slot frees when a session ends."""
    release = asyncio.Event()

    async def hold(ws: ServerConnection) -> None:
        await release.wait()

    ctx = context(extra="max_terminals = 2")
    async with relay(hold) as (base, paths):
        first = asyncio.create_task(run(shell_task(f"{base}/a"), ctx))
        second = asyncio.create_task(run(shell_task(f"{base}/b"), ctx))
        for _ in range(int(scaled(10) / 0.01)):
            if len(paths) == 2:
                break
            await asyncio.sleep(0.01)
        with pytest.raises(TaskFailed) as failed:
            await run(shell_task(f"{base}/c"), ctx)
        assert str(failed.value) == "too many terminals: at most 2 may be open at once"
        release.set()
        await asyncio.wait_for(asyncio.gather(first, second), scaled(10))

    async def quit_shell(ws: ServerConnection) -> None:
        await ws.send("exit\n")

    async with relay(quit_shell) as (base, _):
        result = await asyncio.wait_for(run(shell_task(f"{base}/d"), ctx), scaled(10))
    assert result == WebShellResult(web_shell=True)


async def test_terminal_traffic_is_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    """Even at DEBUG, neither the task_token URL nor the keystrokes reach the logs."""
    caplog.set_level(logging.DEBUG)

    async def script(ws: ServerConnection) -> None:
        await ws.send("echo s3cr3t-typed\n")
        await read_until(ws, rb"(?<!echo )s3cr3t-typed\r\n")

    async with relay(script) as (base, _):
        await asyncio.wait_for(run(shell_task(f"{base}/t"), context()), scaled(20))
    agent_side = [r for r in caplog.records if r.name.startswith(("websockets.client", "taskd"))]
    text = "\n".join(record.getMessage() for record in agent_side)
    assert "tok7" not in text
    assert "s3cr3t" not in text


async def test_wss_certificates_are_checked_unless_ignored(certificate: tuple[Path, Path]) -> None:
    """A self-signed wss relay fails the task, unless the server entry sets ignore_cert."""
    cert, key = certificate
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)

    async def quit_shell(ws: ServerConnection) -> None:
        await ws.send("exit\n")

    async with relay(quit_shell, tls) as (base, _):
        with pytest.raises(TaskFailed) as failed:
            await run(shell_task(f"{base}/t"), context())
        assert "CERTIFICATE_VERIFY_FAILED" in str(failed.value)
        trusting = context(server_extra="ignore_cert = true")
        result = await asyncio.wait_for(run(shell_task(f"{base}/t"), trusting), scaled(20))
    assert result == WebShellResult(web_shell=True)
