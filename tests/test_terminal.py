"""The /terminal relay end to end: a real server, the real web_shell runner, real user sockets."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import orjson
import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from taskd.agent.tasks import TaskContext
from taskd.agent.tasks.web_shell import run
from taskd.auth import normal_origin, origin_allowed
from taskd.config import parse_agent_config
from taskd.protocol import WebShell, parse_task_event_type
from taskd.server import HideTokens
from tests.helpers import (
    ScriptedAgent,
    Server,
    add_token,
    agent_token_limits,
    alive,
    gone,
    make_settings,
    postgres_database,
    read_until,
    running_server,
    scaled,
    unwrap,
)


@dataclass
class ShellTask:
    """A web_shell task pushed to a scripted agent."""

    agent: ScriptedAgent
    task: dict[str, Any]
    terminal_id: str

    @property
    def agent_query(self) -> dict[str, Any]:
        """The agent side's query parameters."""
        return {
            "agent_uuid": self.agent.uuid,
            "task_id": self.task["task_id"],
            "task_token": self.task["task_token"],
            "terminal_id": self.terminal_id,
        }


@contextlib.asynccontextmanager
async def shell_task(
    server: Server, agent_token: str | None = None, agent_uuid: str | None = None
) -> AsyncIterator[ShellTask]:
    """A subscribed agent holding a pushed web_shell task for a fresh terminal_id."""
    token = agent_token or server.super_token
    async with ScriptedAgent(server.ws_url, token, agent_uuid) as agent:
        terminal_id = str(uuid.uuid4())
        url = f"ws://127.0.0.1:{server.port}/auto_gen"
        await server.su(
            "task_create_task",
            agent.uuid,
            {"web_shell": {"url": url, "terminal_id": terminal_id}},
        )
        yield ShellTask(agent, await agent.next_task(), terminal_id)


def terminal_url(server: Server, **query: Any) -> str:
    """The /terminal URL of ``server`` with ``query``."""
    return f"ws://127.0.0.1:{server.port}/terminal?{urlencode(query)}"


def user_url(server: Server, shell: ShellTask, token: str) -> str:
    """The user side's URL for a shell task."""
    return terminal_url(
        server, agent_uuid=shell.agent.uuid, terminal_id=shell.terminal_id, token=token
    )


async def terminal_token(server: Server, agent_uuid: str) -> str:
    """A token holding terminal.connect on one agent only."""
    limits = [{"scopes": [{"agent_uuid": agent_uuid}], "permissions": [{"terminal": "connect"}]}]
    return await add_token(server, limits)


def start_runner(server: Server, shell: ShellTask) -> asyncio.Task[Any]:
    """Run the real web_shell runner for the pushed task, with /bin/sh as the shell."""
    settings = parse_agent_config(
        f'agent_uuid = "{shell.agent.uuid}"\nterminal_shell = "/bin/sh"\n'
        f'[[server]]\nws_url = "{server.ws_url}"\ntoken = "{server.super_token}"\n'
    )
    task = parse_task_event_type(shell.task["task_event_type"])
    assert isinstance(task, WebShell)
    ctx = TaskContext(
        settings, settings.servers[0], shell.task["task_id"], shell.task["task_token"]
    )
    return asyncio.create_task(run(task, ctx))


async def refusal(url: str, **connect: Any) -> tuple[dict[str, Any], int | None]:
    """Connect, expect one error frame and a close; return the frame and the close code."""
    async with websockets.connect(url, **connect) as ws:
        frame = await asyncio.wait_for(ws.recv(), scaled(15))
        assert isinstance(frame, str)
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), scaled(5))
    return orjson.loads(frame), ws.close_code


async def test_shell_session_end_to_end(server: Server) -> None:
    """A user types into the agent's shell, resizes it, and closing the user kills the shell."""
    async with shell_task(server) as shell:
        runner = start_runner(server, shell)
        token = await terminal_token(server, shell.agent.uuid)
        async with websockets.connect(user_url(server, shell, token)) as user:
            await user.send("echo hi\n")
            await read_until(user, rb"(?<!echo )hi\r\n")
            await user.send("stty size\n")
            await read_until(user, rb"(?<!\d)24 80\r\n")
            await user.send(orjson.dumps({"type": "resize", "cols": 100, "rows": 40}).decode())
            await user.send(b"stty size\n")
            await read_until(user, rb"(?<!\d)40 100\r\n")
            await user.send("sleep 1000 & echo PIDS $$ $!\n")
            output = await read_until(user, rb"PIDS \d+ \d+\r\n")
            shell_pid, job_pid = map(int, re.findall(rb"PIDS (\d+) (\d+)\r\n", output)[-1])
            assert alive(shell_pid) and alive(job_pid)
        result = await asyncio.wait_for(runner, scaled(15))
        assert result.to_wire() == {"web_shell": True}
        assert await gone(shell_pid), "the shell outlived its session"
        assert await gone(job_pid), "a background job outlived its session"
        assert server.app.state.terminals.slot(shell.agent.uuid, shell.terminal_id) is None
        unwrap(await shell.agent.upload(shell.task, result.to_wire()))
    [record] = await server.su(
        "task_query_task", {"condition": [{"task_id": shell.task["task_id"]}]}
    )
    assert record["task_event_result"] == {"web_shell": True}


async def test_shell_exit_closes_the_user(server: Server) -> None:
    """When the shell exits, the user's socket is closed and the runner reports success."""
    async with shell_task(server) as shell:
        runner = start_runner(server, shell)
        async with websockets.connect(user_url(server, shell, server.super_token)) as user:
            await user.send("exit\n")
            with pytest.raises(websockets.ConnectionClosed):
                while True:
                    await asyncio.wait_for(user.recv(), scaled(10))
        assert user.close_code == 1000
        assert user.close_reason == "the agent closed the terminal"
        assert (await asyncio.wait_for(runner, scaled(10))).to_wire() == {"web_shell": True}


async def test_user_may_connect_before_the_agent(server: Server) -> None:
    """A user who arrives first waits for the agent to open the slot."""
    async with shell_task(server) as shell:
        user = await websockets.connect(user_url(server, shell, server.super_token))
        async with user:
            await asyncio.sleep(0.3)
            runner = start_runner(server, shell)
            await user.send("echo $((6*7))\n")
            await read_until(user, rb"(?<!\d)42\r\n")
        await asyncio.wait_for(runner, scaled(10))


async def test_user_gets_105_when_no_agent_opens_the_slot(server: Server) -> None:
    """A user waits only a short while for the agent, then gets error 105."""
    server.app.state.terminals.user_wait_s = 0.3
    query = {"agent_uuid": str(uuid.uuid4()), "terminal_id": str(uuid.uuid4())}
    started = time.monotonic()
    frame, code = await refusal(terminal_url(server, token=server.super_token, **query))
    assert frame["error_id"] == 105
    assert "is not open" in frame["error_message"]
    assert code == 1008
    assert time.monotonic() - started >= 0.3


async def test_agent_side_refusals(server: Server) -> None:
    """Wrong task_token or terminal_id is 105; a non-web_shell or answered task is 108."""
    async with shell_task(server) as shell:
        wrong_token = dict(shell.agent_query, task_token="AAAAAAAAAA")
        frame, code = await refusal(terminal_url(server, **wrong_token))
        assert (frame["error_id"], code) == (105, 1008)
        wrong_terminal = dict(shell.agent_query, terminal_id=str(uuid.uuid4()))
        frame, _ = await refusal(terminal_url(server, **wrong_terminal))
        assert frame["error_id"] == 105
        other_agent = dict(shell.agent_query, agent_uuid=str(uuid.uuid4()))
        frame, _ = await refusal(terminal_url(server, **other_agent))
        assert frame["error_id"] == 105
        missing = dict(shell.agent_query, task_id=10**9)
        frame, _ = await refusal(terminal_url(server, **missing))
        assert frame["error_id"] == 105
        bad_id = dict(shell.agent_query, task_id="x")
        frame, _ = await refusal(terminal_url(server, **bad_id))
        assert frame["error_id"] == 108

        await server.su("task_create_task", shell.agent.uuid, {"ping": "127.0.0.1"})
        ping = await shell.agent.next_task()
        not_shell = dict(shell.agent_query, task_id=ping["task_id"], task_token=ping["task_token"])
        frame, _ = await refusal(terminal_url(server, **not_shell))
        assert frame["error_id"] == 108
        assert "not web_shell" in frame["error_message"]

        unwrap(await shell.agent.upload(shell.task, {"web_shell": True}))
        frame, _ = await refusal(terminal_url(server, **shell.agent_query))
        assert frame["error_id"] == 108
        assert "already has a result" in frame["error_message"]
        assert server.app.state.terminals.slot(shell.agent.uuid, shell.terminal_id) is None


async def test_malformed_requests_are_108(server: Server) -> None:
    """A /terminal URL without credentials or with a bad UUID is refused with 108."""
    frame, _ = await refusal(terminal_url(server))
    assert frame["error_id"] == 108
    frame, _ = await refusal(
        terminal_url(server, agent_uuid="nope", terminal_id=str(uuid.uuid4()), token="a:b")
    )
    assert frame["error_id"] == 108
    assert "agent_uuid" in frame["error_message"]


async def test_second_agent_connection_is_refused(server: Server) -> None:
    """An open slot refuses another agent connection for the same terminal."""
    async with shell_task(server) as shell:
        url = terminal_url(server, **shell.agent_query)
        async with websockets.connect(url):
            await wait_for_slot(server, shell)
            frame, _ = await refusal(url)
        assert frame["error_id"] == 108
        assert "already open" in frame["error_message"]


async def wait_for_slot(server: Server, shell: ShellTask) -> None:
    """Wait until the relay holds the slot of ``shell``."""
    relay = server.app.state.terminals
    for _ in range(int(scaled(10) / 0.01)):
        if relay.slot(shell.agent.uuid, shell.terminal_id) is not None:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the agent did not open the slot")


async def test_user_needs_terminal_connect_on_that_agent(server: Server) -> None:
    """Tokens without terminal.connect, scoped to another agent, or wrong are refused with 102."""
    async with (
        shell_task(server) as shell,
        websockets.connect(terminal_url(server, **shell.agent_query)),
    ):
        await wait_for_slot(server, shell)
        task_only = await add_token(
            server,
            [
                {
                    "scopes": [{"agent_uuid": shell.agent.uuid}],
                    "permissions": [{"task": {"create": "*"}}, {"task": {"read": "*"}}],
                }
            ],
        )
        other_agent = await terminal_token(server, str(uuid.uuid4()))
        wrong_secret = (await terminal_token(server, shell.agent.uuid)).split(":")[0] + ":nope"
        for token in (task_only, other_agent, wrong_secret):
            frame, code = await refusal(user_url(server, shell, token))
            assert (frame["error_id"], code) == (102, 1008), token
        slot = server.app.state.terminals.slot(shell.agent.uuid, shell.terminal_id)
        assert slot is not None and slot.user is None


async def test_one_user_per_slot(server: Server) -> None:
    """A second user on an attached slot is refused while the first keeps working."""
    async with shell_task(server) as shell:
        runner = start_runner(server, shell)
        async with websockets.connect(user_url(server, shell, server.super_token)) as first:
            await first.send("echo one\n")
            await read_until(first, rb"(?<!echo )one\r\n")
            frame, _ = await refusal(user_url(server, shell, server.super_token))
            assert frame["error_id"] == 108
            assert "already has a user" in frame["error_message"]
            await first.send("echo two\n")
            await read_until(first, rb"(?<!echo )two\r\n")
        await asyncio.wait_for(runner, scaled(10))


async def test_agent_closing_frees_the_slot_and_closes_the_user(server: Server) -> None:
    """When the agent goes, the user is closed, the slot is freed and can be opened again."""
    async with shell_task(server) as shell:
        url = terminal_url(server, **shell.agent_query)
        async with websockets.connect(url) as agent:
            await wait_for_slot(server, shell)
            async with websockets.connect(user_url(server, shell, server.super_token)) as user:
                await user.send("ls\n")
                assert await asyncio.wait_for(agent.recv(), scaled(5)) == "ls\n"
                await agent.send(b"\x1b[1mout\x00")
                assert await asyncio.wait_for(user.recv(), scaled(5)) == b"\x1b[1mout\x00"
                await agent.close()
                with pytest.raises(websockets.ConnectionClosed):
                    await asyncio.wait_for(user.recv(), scaled(5))
            assert user.close_code == 1000
        assert server.app.state.terminals.slot(shell.agent.uuid, shell.terminal_id) is None
        async with websockets.connect(url):
            await wait_for_slot(server, shell)


async def test_user_closing_closes_the_agent(server: Server) -> None:
    """When the user goes, the agent's socket is closed with a normal close."""
    async with (
        shell_task(server) as shell,
        websockets.connect(terminal_url(server, **shell.agent_query)) as agent,
    ):
        await wait_for_slot(server, shell)
        user = await websockets.connect(user_url(server, shell, server.super_token))
        await user.close()
        with pytest.raises(websockets.ConnectionClosedOK):
            await asyncio.wait_for(agent.recv(), scaled(5))
        assert agent.close_reason == "the user closed the terminal"


async def test_output_before_the_user_attaches_is_delivered(server: Server) -> None:
    """Agent output sent before any user is held and delivered first, in order."""
    async with shell_task(server) as shell:
        async with websockets.connect(terminal_url(server, **shell.agent_query)) as agent:
            await agent.send(b"$ ")
            await agent.send("prompt text")
            await wait_for_slot(server, shell)
            async with websockets.connect(user_url(server, shell, server.super_token)) as user:
                await agent.send(b"later")
                frames = [await asyncio.wait_for(user.recv(), scaled(5)) for _ in range(3)]
        assert frames == [b"$ ", "prompt text", b"later"]


async def test_oversized_frames_are_refused(server: Server) -> None:
    """A message over 1 MiB gets error 108 and ends the session on both sides."""
    async with (
        shell_task(server) as shell,
        websockets.connect(terminal_url(server, **shell.agent_query)) as agent,
    ):
        await wait_for_slot(server, shell)
        async with websockets.connect(
            user_url(server, shell, server.super_token), max_size=None
        ) as user:
            await user.send(b"x" * ((1 << 20) + 1))
            frame = orjson.loads(await asyncio.wait_for(user.recv(), scaled(5)))
            assert frame["error_id"] == 108
            assert "limited to 1048576 bytes" in frame["error_message"]
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(user.recv(), scaled(5))
            assert user.close_code == 1008
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(agent.recv(), scaled(5))


async def test_a_user_that_stops_reading_stalls_the_agent(database_url: str) -> None:
    """A user that does not read blocks the agent's sends long before 64 MiB are buffered."""
    settings = make_settings(database_url, ws_ping_interval_s=60.0, ws_ping_timeout_s=60.0)
    chunk = os.urandom(65536)
    async with (
        running_server(settings) as server,
        shell_task(server) as shell,
        websockets.connect(
            terminal_url(server, **shell.agent_query), compression=None, close_timeout=0.1
        ) as agent,
    ):
        await wait_for_slot(server, shell)
        # megabytes are still in flight to the user: don't wait for a clean close
        async with websockets.connect(
            user_url(server, shell, server.super_token), compression=None, close_timeout=0.1
        ) as user:
            sent = 0
            while sent < 128 << 20:
                try:
                    await asyncio.wait_for(agent.send(chunk), scaled(1))
                except TimeoutError:
                    break
                sent += len(chunk)
            assert sent < 64 << 20, f"{sent} bytes went into a user that does not read"
            assert await asyncio.wait_for(user.recv(), scaled(5)) == chunk


async def test_origin_is_checked_before_anything_else(database_url: str) -> None:
    """A disallowed browser Origin gets 102; an allowed one or none at all is let through."""
    settings = make_settings(database_url, allowed_origins=("https://dash.example",))
    async with running_server(settings) as server, shell_task(server) as shell:
        runner = start_runner(server, shell)
        await wait_for_slot(server, shell)
        url = user_url(server, shell, server.super_token)
        frame, code = await refusal(url, origin="https://evil.example")
        assert (frame["error_id"], code) == (102, 1008)
        assert "Origin https://evil.example is not allowed" in frame["error_message"]
        frame, _ = await refusal(url, origin="null")
        assert frame["error_id"] == 102
        slot = server.app.state.terminals.slot(shell.agent.uuid, shell.terminal_id)
        assert slot is not None and slot.user is None
        async with websockets.connect(url, origin="https://dash.example") as user:
            await user.send("echo allowed\n")
            await read_until(user, rb"(?<!echo )allowed\r\n")
        await asyncio.wait_for(runner, scaled(10))

        await server.su(
            "task_create_task",
            shell.agent.uuid,
            {"web_shell": {"url": server.ws_url + "auto_gen", "terminal_id": shell.terminal_id}},
        )
        shell.task = await shell.agent.next_task()
        runner = start_runner(server, shell)
        async with websockets.connect(url) as user:
            await user.send("echo no origin\n")
            await read_until(user, rb"(?<!echo )no origin\r\n")
        await asyncio.wait_for(runner, scaled(10))


def test_origin_comparison() -> None:
    """Origins match on scheme, host and port; case, a final slash, default ports don't count."""
    allowed = ("https://Dash.example/", "http://localhost:8080")
    assert origin_allowed(None, allowed)
    assert origin_allowed("https://dash.example", allowed)
    assert origin_allowed("https://dash.example:443", allowed)
    assert origin_allowed("http://localhost:8080", allowed)
    assert not origin_allowed("http://dash.example", allowed)
    assert not origin_allowed("https://dash.example.evil", allowed)
    assert not origin_allowed("http://localhost:8081", allowed)
    assert not origin_allowed("null", allowed)
    assert not origin_allowed("https://dash.example", ())
    assert normal_origin("HTTP://X:80/") == "http://x"


async def test_tokens_never_reach_the_logs(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    """Neither the user's token secret nor the task_token appears in any INFO+ log record."""
    caplog.set_level(logging.INFO)
    async with shell_task(server) as shell:
        secret = server.super_token.split(":")[1]
        async with websockets.connect(terminal_url(server, **shell.agent_query)):
            await wait_for_slot(server, shell)
            async with websockets.connect(user_url(server, shell, server.super_token)):
                await asyncio.sleep(0.1)
        frame, _ = await refusal(user_url(server, shell, server.super_token.split(":")[0] + ":x"))
        assert frame["error_id"] == 102
    text = "\n".join(record.getMessage() for record in caplog.records)
    assert "/terminal?" in text, "uvicorn logs WebSocket paths; the test must see them"
    assert secret not in text
    assert shell.task["task_token"] not in text
    assert "token=***" in text


def test_hide_tokens_filter() -> None:
    """The filter masks both token parameters and leaves other arguments alone."""
    record = logging.LogRecord(
        "uvicorn.error",
        logging.INFO,
        __file__,
        1,
        '%s - "WebSocket %s" %d',
        ("1.2.3.4:5", "/terminal?agent_uuid=u&task_token=SeCrEt&token=K%3AS&x=1", 403),
        None,
    )
    assert HideTokens().filter(record)
    assert record.getMessage() == (
        '1.2.3.4:5 - "WebSocket /terminal?agent_uuid=u&task_token=***&token=***&x=1" 403'
    )


async def refused_while_attached(user: ClientConnection, code: int, words: str) -> None:
    """The attached ``user`` gets one error frame with ``code`` naming ``words``, then 1008."""
    frame = orjson.loads(await asyncio.wait_for(user.recv(), scaled(5)))
    assert frame["error_id"] == code and words in frame["error_message"], frame
    with pytest.raises(websockets.ConnectionClosed):
        await asyncio.wait_for(user.recv(), scaled(5))
    assert user.close_code == 1008


@pytest.mark.parametrize("change", ["token_delete", "token_roll_token_secret", "token_edit"])
async def test_revoking_the_users_token_closes_its_terminal(server: Server, change: str) -> None:
    """A user attached with token T gets 102 and is closed once T is deleted, rolled or rescoped."""
    async with (
        shell_task(server) as shell,
        websockets.connect(terminal_url(server, **shell.agent_query)) as agent,
    ):
        await wait_for_slot(server, shell)
        token = await terminal_token(server, shell.agent.uuid)
        key = token.split(":")[0]
        async with websockets.connect(user_url(server, shell, token)) as user:
            await user.send("ls\n")
            assert await asyncio.wait_for(agent.recv(), scaled(5)) == "ls\n"
            if change == "token_edit":
                await server.su(change, key, agent_token_limits(shell.agent.uuid))
            else:
                await server.su(change, key)
            await refused_while_attached(user, 102, f"Token {key} was revoked")
        with pytest.raises(websockets.ConnectionClosedOK):
            await asyncio.wait_for(agent.recv(), scaled(5))
        assert server.app.state.terminals.slot(shell.agent.uuid, shell.terminal_id) is None


async def test_revoking_the_agents_token_closes_its_terminal(server: Server) -> None:
    """When the token the agent subscribed with is deleted, its open terminal ends on both sides."""
    agent_uuid = str(uuid.uuid4())
    agent_token = await add_token(server, agent_token_limits(agent_uuid))
    async with (
        shell_task(server, agent_token, agent_uuid) as shell,
        websockets.connect(terminal_url(server, **shell.agent_query)) as agent,
    ):
        await wait_for_slot(server, shell)
        async with websockets.connect(user_url(server, shell, server.super_token)) as user:
            await agent.send(b"$ ")
            assert await asyncio.wait_for(user.recv(), scaled(5)) == b"$ "
            await server.su("token_delete", agent_token.split(":")[0])
            await refused_while_attached(agent, 102, "was revoked")
            with pytest.raises(websockets.ConnectionClosedOK):
                await asyncio.wait_for(user.recv(), scaled(5))
        assert await shell.agent.closed() == 1008


async def test_a_user_whose_token_is_revoked_while_waiting_is_refused(server: Server) -> None:
    """A user waiting for the agent with a token deleted meanwhile gets 102 once the slot opens."""
    async with shell_task(server) as shell:
        token = await terminal_token(server, shell.agent.uuid)
        async with websockets.connect(user_url(server, shell, token)) as user:
            await asyncio.sleep(0.3)  # authenticated, now waiting for the slot
            await server.su("token_delete", token.split(":")[0])
            async with websockets.connect(terminal_url(server, **shell.agent_query)) as agent:
                frame = orjson.loads(await asyncio.wait_for(user.recv(), scaled(15)))
                assert frame["error_id"] == 102, frame
                slot = server.app.state.terminals.slot(shell.agent.uuid, shell.terminal_id)
                assert slot is not None and not slot.claimed
                await agent.send(b"$ ")
                with pytest.raises(websockets.ConnectionClosed):
                    await asyncio.wait_for(user.recv(), scaled(5))


async def test_a_users_terminal_ends_when_its_token_expires(server: Server) -> None:
    """A user attached with a token valid for one more second gets 102 and is closed then."""
    async with (
        shell_task(server) as shell,
        websockets.connect(terminal_url(server, **shell.agent_query)) as agent,
    ):
        await wait_for_slot(server, shell)
        limits = [
            {"scopes": [{"agent_uuid": shell.agent.uuid}], "permissions": [{"terminal": "connect"}]}
        ]
        expires_at = time.time_ns() // 1_000_000 + int(scaled(1.0) * 1000)
        token = await add_token(server, limits, timestamp_to=expires_at)
        async with websockets.connect(user_url(server, shell, token)) as user:
            await user.send("ls\n")
            assert await asyncio.wait_for(agent.recv(), scaled(5)) == "ls\n"
            await refused_while_attached(user, 102, "has expired")
            assert time.time() * 1000 >= expires_at
        with pytest.raises(websockets.ConnectionClosedOK):
            await asyncio.wait_for(agent.recv(), scaled(5))


async def test_a_revocation_on_another_node_closes_the_terminal() -> None:
    """Deleting T through one node of a cluster closes the terminal T holds on another node."""
    async with postgres_database() as url, running_server(make_settings(url)) as first:
        settings = make_settings(url, server_uuid=first.settings.server_uuid)
        async with (
            running_server(settings, super_token=first.super_token) as second,
            shell_task(first) as shell,
            websockets.connect(terminal_url(first, **shell.agent_query)) as agent,
        ):
            await wait_for_slot(first, shell)
            token = await terminal_token(first, shell.agent.uuid)
            async with websockets.connect(user_url(first, shell, token)) as user:
                await user.send("ls\n")
                assert await asyncio.wait_for(agent.recv(), scaled(5)) == "ls\n"
                await second.su("token_delete", token.split(":")[0])
                await refused_while_attached(user, 102, "was revoked")
