"""The agent's server links: subscribe, allow-list, reconnect, spool — against real servers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import websockets

from taskd.admission import parse_retry_after
from taskd.agent.client import BACKOFF_CAP_S, Agent, backoff_delays, hinted_delay
from taskd.agent.spool import Spool, link_id
from taskd.config import AgentSettings, load_agent_settings, parse_agent_config
from tests.helpers import (
    Server,
    add_token,
    agent_token_limits,
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


async def wait_spool_empty(spool: Spool, timeout: float = 15) -> None:
    """Wait until every result in ``spool`` was acknowledged."""
    for _ in range(int(scaled(timeout) / 0.05)):
        if len(spool) == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{len(spool)} result(s) still spooled in {spool.directory}")


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


class Proxy:
    """A TCP proxy to a local port that can go silent: it then drops bytes but closes nothing."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.silent = False
        self.writers: list[asyncio.StreamWriter] = []
        self.pumps: set[asyncio.Task[None]] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Connect a client to the target and pass bytes both ways."""
        self.writers.append(writer)
        try:
            upstream_reader, upstream = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self.writers.append(upstream)
        for source, sink in ((reader, upstream), (upstream_reader, writer)):
            pump = asyncio.create_task(self._pump(source, sink))
            self.pumps.add(pump)
            pump.add_done_callback(self.pumps.discard)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await source.read(65536):
                if not self.silent:
                    sink.write(data)
                    await sink.drain()
            if not self.silent:  # a silent path does not pass a close on either
                sink.close()


@contextlib.asynccontextmanager
async def proxy_to(target_port: int) -> AsyncIterator[Proxy]:
    """Run a Proxy on a free local port until the block ends."""
    proxy = Proxy(target_port)
    listener = await asyncio.start_server(proxy.handle, "127.0.0.1", 0)
    proxy.port = listener.sockets[0].getsockname()[1]
    try:
        yield proxy
    finally:
        listener.close()
        for pump in list(proxy.pumps):
            pump.cancel()
        for writer in proxy.writers:
            writer.close()
        await asyncio.gather(*proxy.pumps, return_exceptions=True)
        await listener.wait_closed()


async def test_round_trip_through_a_real_agent(server: Server, tmp_path: Path) -> None:
    """A blocking tcp_ping is run by the agent and answered with a tcp_ping latency."""
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
    [(variant, latency)] = result["task_event_result"].items()
    assert variant == "tcp_ping" and latency > 0


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


async def test_reconnects_and_resubscribes_after_a_server_restart(
    tmp_path: Path, held_ports: Callable[[], int]
) -> None:
    """The agent keeps trying while the server is down and subscribes again when it is back."""
    settings = make_settings(tmp_sqlite_url(tmp_path))
    port = held_ports()
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


async def test_result_made_while_disconnected_is_delivered_once(
    tmp_path: Path, held_ports: Callable[[], int]
) -> None:
    """A task finishing while the server is down is spooled and stored after reconnect."""
    settings = make_settings(tmp_sqlite_url(tmp_path))
    port = held_ports()
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
    assert record["success"] is True and record["task_event_result"]["http_ping"] >= 900


async def test_agent_restart_uploads_what_it_spooled(server: Server, tmp_path: Path) -> None:
    """Results left in the spool by a stopped agent are uploaded by the next agent process."""
    agent_uuid = str(uuid.uuid4())
    created = await server.su("task_create_task", agent_uuid, "version", 60_000)
    state = tmp_path / "state"
    # what a previous agent process left behind: the task was pushed, its result spooled
    pushed = await server.service.store.take_queued(agent_uuid, 60_000)
    link = link_id(server.ws_url, agent_uuid)
    Spool(state / "spool" / link, link, server.ws_url).put(
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
        await wait_spool_empty(agent.links[0].spool)
    [record] = await server.su("task_query_task", {"condition": [{"task_id": created["id"]}]})
    assert record["timestamp"] == 1234
    assert record["task_event_result"] == {"version": {"taskd": "old"}}


async def test_old_name_keyed_spool_is_taken_over(server: Server, tmp_path: Path) -> None:
    """A bare result in a spool directory named after the server is adopted and uploaded."""
    agent_uuid = str(uuid.uuid4())
    created = await server.su("task_create_task", agent_uuid, "version", 60_000)
    pushed = await server.service.store.take_queued(agent_uuid, 60_000)
    old = tmp_path / "state" / "spool" / "s0"
    old.mkdir(parents=True)
    response = {
        "task_id": created["id"],
        "agent_uuid": agent_uuid,
        "task_token": pushed[0].task_token,
        "timestamp": 4321,
        "success": True,
        "task_event_result": {"version": {"taskd": "older"}},
    }
    (old / f"{created['id']:020d}.json").write_bytes(orjson.dumps(response))
    async with running_agent(
        agent_settings([(server.ws_url, server.super_token)], agent_uuid), tmp_path / "state"
    ) as agent:
        await wait_online(server, agent_uuid)
        await wait_spool_empty(agent.links[0].spool)
    assert not old.exists(), "the emptied old directory is removed"
    [record] = await server.su("task_query_task", {"condition": [{"task_id": created["id"]}]})
    assert record["timestamp"] == 4321
    assert record["task_event_result"] == {"version": {"taskd": "older"}}


async def test_unattributable_old_spool_is_left_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With several servers, an old directory matching no server name is kept and reported."""
    caplog.set_level(logging.WARNING, logger="taskd.agent.client")
    agent_uuid = str(uuid.uuid4())
    old = tmp_path / "state" / "spool" / "retired"
    old.mkdir(parents=True)
    entry = old / f"{7:020d}.json"
    entry.write_bytes(orjson.dumps({"task_id": 7, "agent_uuid": agent_uuid, "success": True}))
    config = agent_settings(
        [("ws://127.0.0.1:1/", "k:s"), ("ws://127.0.0.1:2/", "k:s")], agent_uuid
    )
    async with running_agent(config, tmp_path / "state") as agent:
        for _ in range(int(scaled(5) / 0.01)):
            if len(agent.links) == 2:
                break
            await asyncio.sleep(0.01)
    assert len(agent.links) == 2
    assert entry.exists()
    assert all(len(link.spool) == 0 for link in agent.links)
    assert any(
        "1 spooled result(s) in" in r.getMessage() and "retired" in r.getMessage()
        for r in caplog.records
    )


async def test_renamed_servers_keep_their_spooled_results(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, held_ports: Callable[[], int]
) -> None:
    """A result spooled for a server reaches it exactly once after the server names are swapped."""
    caplog.set_level(logging.INFO, logger="taskd.agent.client")
    agent_uuid = str(uuid.uuid4())
    first_settings = make_settings(tmp_sqlite_url(tmp_path / "a"))
    first_port = held_ports()
    state = tmp_path / "state"
    async with (
        running_server(make_settings(tmp_sqlite_url(tmp_path / "b"))) as other,
        slow_http(1.0) as url,
    ):
        async with running_server(first_settings, port=first_port) as first:
            token = first.super_token
            before = parse_agent_config(
                f'agent_uuid = "{agent_uuid}"\n'
                f'[[server]]\nname = "alpha"\nws_url = "{first.ws_url}"\ntoken = "{token}"\n'
                f'[[server]]\nname = "beta"\nws_url = "{other.ws_url}"\n'
                f'token = "{other.super_token}"\n'
            )
            agent_cm = running_agent(before, state)
            agent = await agent_cm.__aenter__()
            try:
                await wait_online(first, agent_uuid)
                await wait_online(other, agent_uuid)
                created = await first.su("task_create_task", agent_uuid, {"http_ping": url})
                await asyncio.sleep(scaled(0.3))  # the agent has it and is waiting for the reply
            except BaseException:
                await agent_cm.__aexit__(None, None, None)
                raise
        try:  # the first server is down: the result is spooled for it
            spool = agent.links[0].spool
            for _ in range(int(scaled(5) / 0.05)):
                if len(spool) == 1:
                    break
                await asyncio.sleep(0.05)
            assert len(spool) == 1
        finally:
            await agent_cm.__aexit__(None, None, None)
        swapped = parse_agent_config(
            f'agent_uuid = "{agent_uuid}"\n'
            f'[[server]]\nname = "alpha"\nws_url = "{other.ws_url}"\n'
            f'token = "{other.super_token}"\n'
            f'[[server]]\nname = "beta"\nws_url = "{first.ws_url}"\ntoken = "{token}"\n'
        )
        async with running_agent(swapped, state) as agent:
            await wait_online(other, agent_uuid)
            await asyncio.sleep(scaled(0.5))
            assert len(agent.links[1].spool) == 1, "the other server must not be offered it"
            async with running_server(first_settings, token, port=first_port) as again:
                await wait_online(again, agent_uuid, timeout=20)
                await wait_spool_empty(agent.links[1].spool)
                [record] = await again.su(
                    "task_query_task", {"condition": [{"task_id": created["id"]}]}
                )
    assert record["success"] is True and record["task_event_result"]["http_ping"] >= 900
    assert not [r for r in caplog.records if "refused the result" in r.getMessage()]
    assert not list((state / "spool").rglob("*.json"))


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


def test_a_retry_hint_is_waited_out_never_shortened() -> None:
    """Retry-After in seconds is read (anything else is no hint), and the wait on it is the
    hint plus up to 25%, never less, and never more than the backoff's cap allows."""
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(" 2.5 ") == 2.5
    for bad in (None, "", "soon", "-1", "nan", "Wed, 21 Oct 2026 07:28:00 GMT"):
        assert parse_retry_after(bad) is None
    waits = [hinted_delay(4.0) for _ in range(200)]
    assert all(4.0 <= w <= 5.0 for w in waits)
    assert len({round(w, 6) for w in waits}) > 100  # jittered
    assert hinted_delay(3600) <= BACKOFF_CAP_S * 1.25


async def test_a_503_without_a_hint_is_an_ordinary_failed_handshake(tmp_path: Path) -> None:
    """A proxy answering 503 without Retry-After: no hint; the agent backs off as usual and
    keeps trying (it does not take the 503 for a server that speaks only HTTP)."""
    hits: list[float] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        hits.append(asyncio.get_running_loop().time())
        writer.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    listener = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    config = agent_settings([(f"ws://127.0.0.1:{port}/", "k:s")], str(uuid.uuid4()))
    try:
        async with running_agent(config, tmp_path / "state") as agent:
            for _ in range(int(scaled(10) / 0.05)):
                if len(hits) >= 2:
                    break
                await asyncio.sleep(0.05)
            link = agent.links[0]
            assert link.retry_hint is None and not link.upgrade_refused
            assert len(hits) >= 2 and hits[1] - hits[0] >= 0.8  # the backoff's first wait
    finally:
        listener.close()


def test_spool_survives_and_orders(tmp_path: Path) -> None:
    """Spooled results persist in files, come back oldest first and leave when done."""
    spool = Spool(tmp_path, "L1", "ws://h/")
    for task_id in (30, 4, 200):
        spool.put({"task_id": task_id})
    again = Spool(tmp_path, "L1", "ws://h/")
    assert [r["task_id"] for r in again.pending()] == [4, 30, 200]
    again.done(30)
    assert [r["task_id"] for r in Spool(tmp_path, "L1", "ws://h/").pending()] == [4, 200]
    (tmp_path / "00000000000000000999.json").write_text("{broken")
    assert [r["task_id"] for r in Spool(tmp_path, "L1", "ws://h/").pending()] == [4, 200]


def test_spool_hands_out_only_its_own_results(tmp_path: Path) -> None:
    """A result recorded for another link, or a bare one, is never handed out, and stays on disk."""
    Spool(tmp_path, "other", "ws://elsewhere/").put({"task_id": 1})
    (tmp_path / f"{2:020d}.json").write_bytes(orjson.dumps({"task_id": 2}))
    spool = Spool(tmp_path, "mine", "ws://here/")
    spool.put({"task_id": 3})
    assert [r["task_id"] for r in spool.pending()] == [3]
    assert len(spool) == 3


def test_link_id_ignores_the_name_and_separates_urls_and_agents() -> None:
    """The spool key depends on ws_url and agent UUID only."""
    assert link_id("ws://a/", "u1") == link_id("ws://a/", "u1")
    assert len({link_id("ws://a/", "u1"), link_id("ws://b/", "u1"), link_id("ws://a/", "u2")}) == 3


async def test_edit_config_is_applied_by_the_running_agent(server: Server, tmp_path: Path) -> None:
    """After edit_config the agent reloads its file: a kind the edit turned off is refused."""
    agent_uuid = str(uuid.uuid4())
    path = tmp_path / "agent.toml"
    path.write_text(
        f'agent_uuid = "{agent_uuid}"\n[[server]]\nname = "s0"\nws_url = "{server.ws_url}"\n'
        f'token = "{server.super_token}"\nallow_read_config = true\nallow_edit_config = true\n'
        "allow_execute = true\n"
    )
    echo = {"execute": {"cmd": "echo", "args": ["reloaded"]}}
    async with running_agent(load_agent_settings(path), tmp_path / "state"):
        await wait_online(server, agent_uuid)
        before = await server.su("task_create_task_blocking", agent_uuid, echo, 5000)
        assert before["task_event_result"] == {"execute": "reloaded\n"}, before
        shown = await server.su("task_create_task_blocking", agent_uuid, "read_config", 5000)
        text = shown["task_event_result"]["read_config"]
        assert server.super_token not in text and "***" in text
        edited = text.replace("allow_execute = true", "allow_execute = false")
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
        assert after["success"] is False and "not allowed" in after["error_message"], after
        widen = edited.replace("allow_execute = false", "allow_execute = true")
        refused = await server.su(
            "task_create_task_blocking", agent_uuid, {"edit_config": widen}, 5000
        )
        again = await server.su("task_create_task_blocking", agent_uuid, echo, 5000)
    assert refused["success"] is False
    assert refused["error_message"] == (
        "edit_config can narrow what this agent allows but not widen it: "
        "server s0: allow_execute would be enabled"
    )
    assert again["success"] is False and "not allowed" in again["error_message"], again
    assert "allow_execute = false" in path.read_text()
    assert server.super_token in path.read_text(), "the secret sent back as *** was kept"


async def test_silent_server_is_noticed_by_pings_and_reconnected(
    server: Server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Pings notice a silent path: the agent logs the disconnect and reconnects once it works."""
    caplog.set_level(logging.INFO, logger="taskd.agent.client")
    agent_uuid = str(uuid.uuid4())
    hub = server.service.hub
    async with proxy_to(server.port) as proxy:
        config = parse_agent_config(
            f'agent_uuid = "{agent_uuid}"\n'
            f"ping_interval_ms = {int(scaled(0.2) * 1000)}\n"
            f"ping_timeout_ms = {int(scaled(0.3) * 1000)}\n"
            f"connect_timeout_ms = {int(scaled(0.5) * 1000)}\n"
            f'[[server]]\nname = "s0"\nws_url = "ws://127.0.0.1:{proxy.port}/"\n'
            f'token = "{server.super_token}"\n'
        )
        async with running_agent(config, tmp_path) as agent:
            await wait_online(server, agent_uuid)
            link = agent.links[0]
            await asyncio.wait_for(link.subscribed.wait(), scaled(5))
            first = hub.connected_agents()[agent_uuid].id
            proxy.silent = True
            for _ in range(int(scaled(3) / 0.02)):  # the defaults would take 40 s
                if not link.subscribed.is_set():
                    break
                await asyncio.sleep(0.02)
            assert not link.subscribed.is_set(), "the agent did not notice the silence"
            proxy.silent = False
            for _ in range(int(scaled(10) / 0.02)):
                current = hub.connected_agents().get(agent_uuid)
                if current is not None and current.id != first:
                    break
                await asyncio.sleep(0.02)
            else:
                raise AssertionError("the agent did not reconnect once the path worked again")
            result = await server.su("task_create_task_blocking", agent_uuid, "version", 5000)
    assert result["success"] is True
    lines = [r.getMessage() for r in caplog.records]
    assert any("[s0] disconnected (connection lost (keepalive ping timeout))" in m for m in lines)


async def test_server_with_another_server_uuid_is_refused(
    server: Server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A server whose server_uuid is not the pinned one is not subscribed to; a log says why."""
    caplog.set_level(logging.INFO, logger="taskd.agent.client")
    agent_uuid = str(uuid.uuid4())
    wrong = str(uuid.uuid4())
    pinned = agent_settings(
        [(server.ws_url, server.super_token)], agent_uuid, f'server_uuid = "{wrong}"'
    )
    expected = (
        f"[s0] disconnected (refused: server_uuid is {server.settings.server_uuid}, "
        f"expected {wrong})"
    )
    async with running_agent(pinned, tmp_path / "wrong") as agent:
        for _ in range(int(scaled(5) / 0.02)):
            if any(expected in r.getMessage() for r in caplog.records):
                break
            await asyncio.sleep(0.02)
        assert not agent.links[0].subscribed.is_set()
        assert not server.service.hub.is_connected(agent_uuid)
    assert any(expected in r.getMessage() for r in caplog.records)
    right = agent_settings(
        [(server.ws_url, server.super_token)],
        agent_uuid,
        f'server_uuid = "{server.settings.server_uuid}"',
    )
    async with running_agent(right, tmp_path / "right"):
        await wait_online(server, agent_uuid)


@contextlib.asynccontextmanager
async def counting_http(delay: float) -> AsyncIterator[tuple[str, dict[str, int]]]:
    """A local HTTP server answering after ``delay`` s; yields its URL and request counts."""
    counts = {"active": 0, "peak": 0, "total": 0}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        counts["active"] += 1
        counts["total"] += 1
        counts["peak"] = max(counts["peak"], counts["active"])
        try:
            await reader.readuntil(b"\r\n\r\n")
            await asyncio.sleep(delay)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
            await writer.drain()
        finally:
            counts["active"] -= 1
            writer.close()

    listener = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/slow", counts
    finally:
        listener.close()


async def test_max_concurrency_bounds_network_tasks(server: Server, tmp_path: Path) -> None:
    """With max_concurrency = 2, five slow http_ping tasks run two at a time and all complete."""
    agent_uuid = str(uuid.uuid4())
    config = parse_agent_config(
        f'agent_uuid = "{agent_uuid}"\nmax_concurrency = 2\n'
        f'[[server]]\nws_url = "{server.ws_url}"\ntoken = "{server.super_token}"\n'
    )
    async with counting_http(scaled(0.4)) as (url, counts), running_agent(config, tmp_path):
        await wait_online(server, agent_uuid)
        results = await asyncio.gather(
            *(
                server.su("task_create_task_blocking", agent_uuid, {"http_ping": url}, 30_000)
                for _ in range(5)
            )
        )
    assert [r["success"] for r in results] == [True] * 5, results
    assert counts["total"] == 5
    assert counts["peak"] == 2, "more tasks than the bound wait for a slot"
