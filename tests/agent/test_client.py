"""The agent's server links: subscribe, allow-list, reconnect, spool — against real servers."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import websockets

from taskd.agent.client import BACKOFF_CAP_S, Agent, backoff_delays
from taskd.agent.spool import Spool
from taskd.config import AgentSettings, load_agent_settings, parse_agent_config
from tests.helpers import (
    Server,
    add_token,
    agent_token_limits,
    free_port,
    make_settings,
    running_server,
    scaled,
    tmp_sqlite_url,
)


def agent_settings(
    servers: list[tuple[str, str]], agent_uuid: str, extra: str = ""
) -> AgentSettings:
    """Settings for an agent with one [[server]] per (ws_url, token)."""
    text = f'agent_uuid = "{agent_uuid}"\n'
    for index, (url, token) in enumerate(servers):
        text += f'[[server]]\nname = "s{index}"\nws_url = "{url}"\ntoken = "{token}"\n{extra}\n'
    return parse_agent_config(text)


@contextlib.asynccontextmanager
async def running_agent(settings: AgentSettings, state: Path) -> AsyncIterator[Agent]:
    """Run an Agent in this event loop until the block ends."""
    agent = Agent(settings, state)
    task = asyncio.create_task(agent.run())
    try:
        yield agent
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def wait_online(server: Server, agent_uuid: str, timeout: float = 10) -> None:
    """Wait until the agent holds a subscription on ``server``."""
    for _ in range(int(scaled(timeout) / 0.02)):
        if server.service.hub.is_connected(agent_uuid):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"agent {agent_uuid} did not subscribe")


@contextlib.asynccontextmanager
async def slow_http(delay: float) -> AsyncIterator[str]:
    """A local HTTP server that answers every request after ``delay`` seconds."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(delay)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
        await writer.drain()
        writer.close()

    listener = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/slow"
    finally:
        listener.close()


async def test_round_trip_through_a_real_agent(server: Server, tmp_path: Path) -> None:
    """A blocking tcp_ping is run by the agent and answered with a latency."""
    agent_uuid = str(uuid.uuid4())
    token = await add_token(server, agent_token_limits(agent_uuid))
    listener = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    async with running_agent(agent_settings([(server.ws_url, token)], agent_uuid), tmp_path):
        await wait_online(server, agent_uuid)
        result = await server.su(
            "task_create_task_blocking", agent_uuid, {"tcp_ping": f"127.0.0.1:{port}"}, 5000
        )
    listener.close()
    assert result["success"] is True and result["agent_uuid"] == agent_uuid
    assert result["task_event_result"]["ping"] > 0


async def test_refused_kind_is_answered_with_the_reason(server: Server, tmp_path: Path) -> None:
    """execute is off by default: the agent answers success false, it never runs it."""
    agent_uuid = str(uuid.uuid4())
    marker = tmp_path / "ran"
    async with running_agent(
        agent_settings([(server.ws_url, server.super_token)], agent_uuid), tmp_path
    ):
        await wait_online(server, agent_uuid)
        result = await server.su(
            "task_create_task_blocking",
            agent_uuid,
            {"execute": {"cmd": "touch", "args": [str(marker)]}},
            5000,
        )
    assert result["success"] is False
    assert (
        result["error_message"]
        == "permission denied: task type execute is not allowed on this agent"
    )
    assert not marker.exists()


async def test_whitelist_refuses_default_kinds(server: Server, tmp_path: Path) -> None:
    """allow_task_type overrides the defaults: version not listed means refused."""
    agent_uuid = str(uuid.uuid4())
    settings = agent_settings(
        [(server.ws_url, server.super_token)], agent_uuid, 'allow_task_type = ["ping"]'
    )
    async with running_agent(settings, tmp_path):
        await wait_online(server, agent_uuid)
        result = await server.su("task_create_task_blocking", agent_uuid, "version", 5000)
    assert result["success"] is False and "version is not allowed" in result["error_message"]


async def test_reconnects_and_resubscribes_after_a_server_restart(tmp_path: Path) -> None:
    """The agent keeps trying while the server is down and subscribes again when it is back."""
    settings = make_settings(tmp_sqlite_url(tmp_path))
    port = free_port()
    agent_uuid = str(uuid.uuid4())
    async with running_server(settings, port=port) as first:
        token = first.super_token
    config = agent_settings([(f"ws://127.0.0.1:{port}/", token)], agent_uuid)
    async with running_agent(config, tmp_path / "state") as agent:
        await asyncio.sleep(scaled(0.5))  # nothing listens yet: the agent backs off
        link = agent.links[0]
        assert not link.subscribed.is_set()
        async with running_server(settings, token, port=port) as second:
            await wait_online(second, agent_uuid)
            result = await second.su("task_create_task_blocking", agent_uuid, "version", 5000)
            assert result["success"] is True
        for _ in range(int(scaled(5) / 0.02)):
            if not link.subscribed.is_set():
                break
            await asyncio.sleep(0.02)
        assert not link.subscribed.is_set(), "the agent noticed the server going away"
        async with running_server(settings, token, port=port) as third:
            await wait_online(third, agent_uuid)
            result = await third.su("task_create_task_blocking", agent_uuid, "version", 5000)
            assert result["success"] is True


async def test_result_made_while_disconnected_is_delivered_once(tmp_path: Path) -> None:
    """A task finishing while the server is down is spooled and stored after reconnect."""
    settings = make_settings(tmp_sqlite_url(tmp_path))
    port = free_port()
    agent_uuid = str(uuid.uuid4())
    async with slow_http(1.0) as url:
        async with running_server(settings, port=port) as first:
            token = first.super_token
            config = agent_settings([(first.ws_url, token)], agent_uuid)
            agent_cm = running_agent(config, tmp_path / "state")
            agent = await agent_cm.__aenter__()
            try:
                await wait_online(first, agent_uuid)
                created = await first.su("task_create_task", agent_uuid, {"http_ping": url})
                await asyncio.sleep(scaled(0.3))  # the agent has it and is waiting for the reply
            except BaseException:
                await agent_cm.__aexit__(None, None, None)
                raise
        try:
            spool = agent.links[0].spool
            for _ in range(int(scaled(5) / 0.05)):
                if len(spool) == 1:
                    break
                await asyncio.sleep(0.05)
            assert len(spool) == 1, "the result waits in the spool while the server is down"
            async with running_server(settings, token, port=port) as second:
                await wait_online(second, agent_uuid)
                for _ in range(int(scaled(5) / 0.05)):
                    if len(spool) == 0:
                        break
                    await asyncio.sleep(0.05)
                [record] = await second.su(
                    "task_query_task", {"condition": [{"task_id": created["id"]}]}
                )
        finally:
            await agent_cm.__aexit__(None, None, None)
    assert len(spool) == 0
    assert record["success"] is True and record["task_event_result"]["ping"] >= 900


async def test_agent_restart_uploads_what_it_spooled(server: Server, tmp_path: Path) -> None:
    """Results left in the spool by a stopped agent are uploaded by the next agent process."""
    agent_uuid = str(uuid.uuid4())
    created = await server.su("task_create_task", agent_uuid, "version", 60_000)
    state = tmp_path / "state"
    # what a previous agent process left behind: the task was pushed, its result spooled
    pushed = await server.service.store.take_queued(agent_uuid, 60_000)
    Spool(state / "spool" / "s0").put(
        {
            "task_id": created["id"],
            "agent_uuid": agent_uuid,
            "task_token": pushed[0].task_token,
            "timestamp": 1234,
            "success": True,
            "task_event_result": {"version": {"taskd": "old"}},
        }
    )
    async with running_agent(
        agent_settings([(server.ws_url, server.super_token)], agent_uuid), state
    ) as agent:
        await wait_online(server, agent_uuid)
        for _ in range(int(scaled(5) / 0.05)):
            if len(agent.links[0].spool) == 0:
                break
            await asyncio.sleep(0.05)
    [record] = await server.su("task_query_task", {"condition": [{"task_id": created["id"]}]})
    assert record["timestamp"] == 1234
    assert record["task_event_result"] == {"version": {"taskd": "old"}}


async def test_already_uploaded_counts_as_delivered(server: Server, tmp_path: Path) -> None:
    """A spooled result the server already has (108) leaves the spool; the stored one stays."""
    agent_uuid = str(uuid.uuid4())
    async with running_agent(
        agent_settings([(server.ws_url, server.super_token)], agent_uuid), tmp_path
    ) as agent:
        await wait_online(server, agent_uuid)
        result = await server.su("task_create_task_blocking", agent_uuid, "version", 5000)
        link = agent.links[0]
        duplicate = {**result, "task_event_result": {"version": {"again": True}}}
        await link.deliver(duplicate)
        assert len(link.spool) == 0
    [record] = await server.su("task_query_task", {"condition": [{"task_id": result["task_id"]}]})
    assert record["task_event_result"] == result["task_event_result"]


async def test_results_go_back_to_the_server_that_sent_the_task(tmp_path: Path) -> None:
    """With two [[server]] tables the agent subscribes to both and answers each one."""
    agent_uuid = str(uuid.uuid4())
    async with (
        running_server(make_settings(tmp_sqlite_url(tmp_path / "a"))) as one,
        running_server(make_settings(tmp_sqlite_url(tmp_path / "b"))) as two,
    ):
        config = agent_settings(
            [(one.ws_url, one.super_token), (two.ws_url, two.super_token)], agent_uuid
        )
        async with running_agent(config, tmp_path / "state"):
            await wait_online(one, agent_uuid)
            await wait_online(two, agent_uuid)
            first = await one.su("task_create_task_blocking", agent_uuid, "version", 5000)
            second = await two.su("task_create_task_blocking", agent_uuid, "version", 5000)
    assert first["success"] and second["success"]


async def test_unparseable_task_is_answered_not_dropped(tmp_path: Path) -> None:
    """A push whose type the agent cannot parse gets success false with the reason."""
    uploads: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def fake_server(ws: Any) -> None:
        async for message in ws:
            request = orjson.loads(message)
            if request["method"] == "task_register_task":
                await ws.send(
                    orjson.dumps({"jsonrpc": "2.0", "result": 7, "id": request["id"]}).decode()
                )
                push = {
                    "subscription": 7,
                    "result": {
                        "task_id": 9,
                        "task_token": "t",
                        "task_event_type": {"frobnicate": 1},
                    },
                }
                await ws.send(
                    orjson.dumps(
                        {"jsonrpc": "2.0", "method": "task_register_task", "params": push}
                    ).decode()
                )
            elif request["method"] == "task_upload_task_result":
                await uploads.put(request["params"][1])
                await ws.send(
                    orjson.dumps(
                        {"jsonrpc": "2.0", "result": {"id": 9}, "id": request["id"]}
                    ).decode()
                )

    async with websockets.serve(fake_server, "127.0.0.1", 0) as fake:
        port = fake.sockets[0].getsockname()[1]
        agent_uuid = str(uuid.uuid4())
        async with running_agent(
            agent_settings([(f"ws://127.0.0.1:{port}/", "k:s")], agent_uuid), tmp_path
        ):
            upload = await asyncio.wait_for(uploads.get(), scaled(10))
    assert upload["task_id"] == 9 and upload["success"] is False
    assert upload["error_message"].startswith("unparseable task: ")
    assert "frobnicate" in upload["error_message"]


def test_backoff_doubles_to_a_cap_with_jitter() -> None:
    """Delays go 1, 2, 4 ... 60 s, each within ±20%, and stay at the cap."""
    delays = backoff_delays()
    values = [next(delays) for _ in range(12)]
    nominal = [min(2.0**i, BACKOFF_CAP_S) for i in range(12)]
    for value, expected in zip(values, nominal, strict=True):
        assert expected * 0.8 <= value <= expected * 1.2
    assert len({round(v, 6) for v in values}) > 6  # jittered, not constant


@pytest.mark.parametrize("count", [3])
def test_spool_survives_and_orders(tmp_path: Path, count: int) -> None:
    """Spooled results persist in files, come back oldest first and leave when done."""
    spool = Spool(tmp_path)
    for task_id in (30, 4, 200)[:count]:
        spool.put({"task_id": task_id})
    again = Spool(tmp_path)
    assert [r["task_id"] for r in again.pending()] == [4, 30, 200]
    again.done(30)
    assert [r["task_id"] for r in Spool(tmp_path).pending()] == [4, 200]
    (tmp_path / "00000000000000000999.json").write_text("{broken")
    assert [r["task_id"] for r in Spool(tmp_path).pending()] == [4, 200]


async def test_edit_config_is_applied_by_the_running_agent(server: Server, tmp_path: Path) -> None:
    """After edit_config the agent reloads its file: a kind it refused before now runs."""
    agent_uuid = str(uuid.uuid4())
    path = tmp_path / "agent.toml"
    path.write_text(
        f'agent_uuid = "{agent_uuid}"\n[[server]]\nname = "s0"\nws_url = "{server.ws_url}"\n'
        f'token = "{server.super_token}"\nallow_read_config = true\nallow_edit_config = true\n'
    )
    echo = {"execute": {"cmd": "echo", "args": ["reloaded"]}}
    async with running_agent(load_agent_settings(path), tmp_path / "state"):
        await wait_online(server, agent_uuid)
        before = await server.su("task_create_task_blocking", agent_uuid, echo, 5000)
        assert before["success"] is False and "not allowed" in before["error_message"]
        shown = await server.su("task_create_task_blocking", agent_uuid, "read_config", 5000)
        text = shown["task_event_result"]["read_config"]
        assert server.super_token not in text and "***" in text
        edited = text.replace(
            "allow_edit_config = true", "allow_edit_config = true\nallow_execute = true"
        )
        hub = server.service.hub
        old_subscription = hub.connected_agents()[agent_uuid].id
        done = await server.su(
            "task_create_task_blocking", agent_uuid, {"edit_config": edited}, 5000
        )
        assert done["task_event_result"] == {"edit_config": True}, done
        for _ in range(int(scaled(10) / 0.02)):  # the agent reconnects with its new settings
            current = hub.connected_agents().get(agent_uuid)
            if current is not None and current.id != old_subscription:
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("the agent did not reconnect after the edit")
        after = await server.su("task_create_task_blocking", agent_uuid, echo, 5000)
    assert after["success"] is True, after
    assert after["task_event_result"] == {"execute": "reloaded\n"}
    assert server.super_token in path.read_text(), "the secret sent back as *** was kept"
