"""Admission control: an overloaded server refuses agents' handshakes with a retry hint.

Real servers on port 0, the real agent (``taskd.agent.client.Agent``) over real
WebSockets; callers (HTTP POST and a caller's WebSocket) must be answered all along.
"""

from __future__ import annotations

import asyncio
import socket
import sqlite3
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest
import websockets

from taskd.admission import (
    AGENT_USER_AGENT,
    BACKLOG_SPREAD_S,
    BUFFERED_AGE_MS,
    SHED_SPREAD_S,
    TURN_HEADER,
    WINDOW_S,
    AcceptQueue,
    Lane,
)
from taskd.config import ServerSettings, load_server_settings
from taskd.errors import InvalidInput
from tests.agent.test_client import agent_settings, running_agent, wait_online
from tests.helpers import (
    ScriptedAgent,
    Server,
    WsClient,
    make_settings,
    running_server,
    scaled,
    tmp_sqlite_url,
)

HINT_S = 2
REPORT_WINDOW = 4
"""The report window of the shedding test (the server's is larger)."""
REPORT = "agent_report_dynamic_summary"


def refused(server: Server) -> dict[str, int]:
    """Handshakes refused so far, by reason."""
    return dict(server.app.state.admission.refused_total)


async def metric(server: Server, name: str) -> float:
    """One sample of /metrics (``name`` with its labels, as exposed)."""
    text = (await server.http.get("/metrics")).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} is not in /metrics:\n{text}")


def one_place(tmp_path: Path, low_s: int, high_s: int) -> ServerSettings:
    """A server admitting one agent connection at a time, with retry hints of ``low_s``
    to ``high_s`` seconds."""
    return make_settings(
        tmp_sqlite_url(tmp_path),
        admission_max_in_progress=1,
        admission_retry_after_min_s=low_s,
        admission_retry_after_max_s=high_s,
    )


async def agent_handshake(server: Server, turn: str | None = None) -> websockets.ClientConnection:
    """A WebSocket that says it is an agent (and never subscribes), bringing the ticket
    ``turn`` if given."""
    return await websockets.connect(
        server.ws_url,
        user_agent_header=f"{AGENT_USER_AGENT} (test)",
        additional_headers={TURN_HEADER: turn} if turn else None,
        proxy=None,
    )


async def refusal(server: Server, turn: str | None = None) -> tuple[int, str]:
    """An agent handshake that must be refused: its Retry-After and the turn it was given."""
    with pytest.raises(websockets.InvalidStatus) as caught:
        await agent_handshake(server, turn)
    response = caught.value.response
    assert response.status_code == 503
    return int(response.headers["Retry-After"]), response.headers[TURN_HEADER]


async def callers_answered(server: Server) -> None:
    """A caller over HTTP POST and one over a fresh WebSocket are both answered."""
    assert isinstance(await server.su("task_query_task", {"condition": [{"limit": 1}]}), list)
    async with WsClient(server.ws_url) as caller:
        assert isinstance(await caller.call("server_uuid"), str)


async def test_busy_server_refuses_the_agent_which_comes_back_after_the_hint(
    tmp_path: Path,
) -> None:
    """The one in-progress place is taken: the real agent is refused with 503 + Retry-After,
    waits the whole hint (not its 1 s backoff), then subscribes; callers are served meanwhile."""
    settings = make_settings(
        tmp_sqlite_url(tmp_path),
        admission_max_in_progress=1,
        admission_retry_after_min_s=HINT_S,
        admission_retry_after_max_s=HINT_S,
    )
    async with running_server(settings) as server:
        holder = await agent_handshake(server)  # admitted, not subscribed: holds the place
        agent_uuid = str(uuid.uuid4())
        config = agent_settings([(server.ws_url, server.super_token)], agent_uuid)
        async with running_agent(config, tmp_path / "state"):
            for _ in range(int(scaled(10) / 0.001)):
                if refused(server)["busy"]:
                    break
                await asyncio.sleep(0.001)
            refused_at = time.monotonic()
            assert refused(server) == {"busy": 1, "rate": 0, "queue": 0}
            await holder.close()  # the place is free again: only the hint keeps the agent out
            await callers_answered(server)
            await wait_online(server, agent_uuid, timeout=10)
            waited = time.monotonic() - refused_at
            # (10 ms: how late the poll above may have seen the refusal)
            assert waited >= HINT_S - 0.01, f"the agent came back {waited:.3f} s after the refusal"
            assert waited <= HINT_S * 1.25 + scaled(1.5), f"it waited {waited:.3f} s"
            assert refused(server)["busy"] == 1, "it did not try again before the hint"
            result = await server.su("task_create_task_blocking", agent_uuid, "version", 5000)
            assert result["success"] is True
        assert await metric(server, 'taskd_admission_refused_total{reason="busy"}') == 1
        assert await metric(server, "taskd_admission_admitted_total") == 2
        assert await metric(server, "taskd_admission_in_progress") == 0


async def test_refusal_is_a_503_with_retry_after_and_callers_are_always_admitted(
    tmp_path: Path,
) -> None:
    """Agents are refused at the door while the place is taken; a caller's WebSocket (no agent
    User-Agent) and HTTP calls are not, and a refused agent changes nothing on the server."""
    async with running_server(one_place(tmp_path, 3, 7)) as server:
        holder = await agent_handshake(server)
        hints = set()
        for _ in range(20):
            with pytest.raises(websockets.InvalidStatus) as caught:
                await agent_handshake(server)
            response = caught.value.response
            assert response.status_code == 503
            hints.add(int(response.headers["Retry-After"]))
        assert hints <= set(range(3, 8)) and len(hints) > 1, f"hints not jittered: {hints}"
        for _ in range(5):
            await callers_answered(server)
        assert refused(server)["busy"] == 20
        assert server.service.hub.connected_agents() == {}
        await holder.close()
        for _ in range(int(scaled(5) / 0.01)):
            if server.app.state.admission.in_progress == 0:
                break
            await asyncio.sleep(0.01)
        admitted = await agent_handshake(server)  # the place is free again
        await admitted.close()


async def test_buffered_summaries_wait_while_agents_crowd_in_and_are_taken_after(
    tmp_path: Path,
) -> None:
    """While agents are being refused at the door, an agent's buffered summary (older than
    BUFFERED_AGE_MS) is answered "server busy" (-32000) with a retry_after_ms past the
    crowd's turns, and
    not stored; a live one is stored; a caller's connection is never deferred. Once the
    crowd has passed, the same summary sent again is stored."""
    async with running_server(one_place(tmp_path, 1, 4)) as server:
        agent_uuid = str(uuid.uuid4())
        token = server.super_token
        now = time.time_ns() // 1_000_000
        old = {"uuid": agent_uuid, "time": now - BUFFERED_AGE_MS - 60_000, "cpu_usage": 50}
        live = {"uuid": agent_uuid, "time": now, "cpu_usage": 70}
        reporter = await agent_handshake(server)  # an agent's connection: takes the one place

        async def report(ws: Any, data: dict[str, Any]) -> dict[str, Any]:
            request = {"jsonrpc": "2.0", "id": 1, "method": REPORT, "params": [token, data]}
            await ws.send(orjson.dumps(request).decode())
            reply: dict[str, Any] = orjson.loads(await ws.recv())
            return reply

        waits = set()
        for _ in range(8):
            with pytest.raises(websockets.InvalidStatus):
                await agent_handshake(server)  # a crowd at the door
            reply = await report(reporter, old)
            assert reply["error"]["code"] == -32000, reply
            assert "busy" in reply["error"]["message"].lower()
            waits.add(reply["error"]["data"]["retry_after_ms"])
        # past the turns the refused agents were given (1-2 s here), spread over 10 s
        assert all(1000 <= w <= 2000 + BACKLOG_SPREAD_S * 1000 for w in waits), waits
        assert len(waits) > 1, waits
        assert (await report(reporter, live))["result"] == {"status": "stored"}
        async with websockets.connect(server.ws_url, proxy=None) as caller:  # not an agent's
            assert (await report(caller, {**old, "time": old["time"] - 1000}))["result"]
        assert await metric(server, "taskd_admission_deferred_reports_total") == 8
        stored = await server.su(
            "agent_query_dynamic_summary",
            {"fields": ["cpu_usage"], "condition": [{"uuid": agent_uuid}]},
        )
        assert [p["timestamp"] for p in stored] == [old["time"] - 1000, live["time"]]

        # the crowd is gone: no refusals for a while, and the loop keeps time
        for _ in range(int(scaled(30) / 0.25)):
            await asyncio.sleep(0.25)
            reply = await report(reporter, old)
            if "result" in reply:
                break
        assert reply.get("result") == {"status": "stored"}, reply
        await reporter.close()
        stored = await server.su(
            "agent_query_dynamic_summary",
            {"fields": ["cpu_usage"], "condition": [{"uuid": agent_uuid}]},
        )
        assert [p["timestamp"] for p in stored] == [old["time"] - 1000, old["time"], live["time"]]


async def test_a_lagging_loop_defers_backlogs_only_while_agents_come_in(tmp_path: Path) -> None:
    """While the loop lags and agents were admitted lately, a buffered summary waits; once
    no agent came in for a while, it is stored (in the agents' lane), though the loop
    still lags: every deferral is sent again, so the server defers no longer than a storm."""
    settings = make_settings(tmp_sqlite_url(tmp_path), admission_max_lag_ms=0)
    async with running_server(settings) as server:
        agent_uuid = str(uuid.uuid4())
        old = time.time_ns() // 1_000_000 - BUFFERED_AGE_MS - 60_000
        reporter = await agent_handshake(server)

        async def report(at_ms: int) -> dict[str, Any]:
            data = {"uuid": agent_uuid, "time": at_ms}
            request = {"jsonrpc": "2.0", "id": 1, "method": REPORT, "params": [token, data]}
            await reporter.send(orjson.dumps(request).decode())
            reply: dict[str, Any] = orjson.loads(await reporter.recv())
            return reply

        token = server.super_token
        assert (await report(old))["error"]["code"] == -32000  # just admitted: a storm
        await asyncio.sleep(WINDOW_S + 0.2)
        assert server.app.state.admission.lagging()
        assert (await report(old + 1000)).get("result") == {"status": "stored"}
        await reporter.close()
        assert await metric(server, "taskd_admission_deferred_reports_total") == 1
        assert await summaries(server, agent_uuid) == 1


async def test_an_agent_that_leaves_before_it_subscribes_is_counted(tmp_path: Path) -> None:
    """An admitted agent connection that closes without subscribing (its agent gave up
    waiting) frees its place and counts in taskd_admission_abandoned_total."""
    async with running_server(one_place(tmp_path, 1, 2)) as server:
        first = await agent_handshake(server)
        await first.close()
        for _ in range(int(scaled(5) / 0.01)):
            if await metric(server, "taskd_admission_abandoned_total") == 1:
                break
            await asyncio.sleep(0.01)
        assert await metric(server, "taskd_admission_abandoned_total") == 1
        again = await agent_handshake(server)  # its place is free
        await again.close()


async def test_a_handshake_whose_agent_gave_up_in_the_accept_queue_is_dropped(
    tmp_path: Path,
) -> None:
    """An agent's upgrade request that waited in the kernel's accept queue while the server
    was busy, and whose agent closed meanwhile, is dropped unanswered: it is not admitted
    (no place taken, nothing counted as abandoned) and counts in taskd_admission_gone_total;
    a live agent's handshake after it is admitted as usual."""
    async with running_server(one_place(tmp_path, 1, 2)) as server:
        request = (
            b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\nUser-Agent: " + AGENT_USER_AGENT.encode() + b"\r\n\r\n"
        )
        # the event loop does not run in between (a busy server): the kernel completes the
        # connection, holds the request, and sees the client close before taskd accepts it
        with socket.create_connection(("127.0.0.1", server.port)) as gave_up:
            gave_up.sendall(request)
        deadline = time.monotonic() + scaled(5)
        while await metric(server, "taskd_admission_gone_total") < 1:
            assert time.monotonic() < deadline, "the closed handshake was not dropped"
            await asyncio.sleep(0.01)
        admission = server.app.state.admission
        assert admission.admitted_total == 0
        assert await metric(server, "taskd_admission_abandoned_total") == 0
        live = await agent_handshake(server)  # the one place is free
        assert admission.admitted_total == 1
        await live.close()
        assert admission.gone_total == 1


async def test_reports_beyond_a_connections_window_are_answered_busy_as_they_are_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection with its window of calls in progress (reports waiting for a commit
    that another process holds up) gets its next report answered "server busy" at once,
    with a retry hint, and that report is not stored; its other calls are still handled;
    once the window drains, reports are stored again. Nothing waits without bound.
    (A window of 4 here, a small number of reports to send.)"""
    monkeypatch.setattr("taskd.server.REPORT_WINDOW", REPORT_WINDOW)
    settings = make_settings(tmp_sqlite_url(tmp_path))
    async with running_server(settings) as server, WsClient(server.ws_url) as agent:
        agent_uuid = str(uuid.uuid4())
        token = server.super_token
        now = time.time_ns() // 1_000_000

        async def report(second: int) -> asyncio.Future[dict[str, Any]]:
            data = {"uuid": agent_uuid, "time": now + 1000 * second, "cpu_usage": second}
            return asyncio.ensure_future(agent.request(REPORT, [token, data]))

        lock = sqlite3.connect(tmp_path / "taskd.db", isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        try:
            waiting = [await report(second) for second in range(REPORT_WINDOW)]
            shed = await (await report(REPORT_WINDOW))
            assert shed["error"]["code"] == -32000, shed
            assert 1000 <= shed["error"]["data"]["retry_after_ms"] <= 1000 + 1000 * SHED_SPREAD_S
            assert isinstance(await agent.call("server_uuid"), str)  # not a report: handled
            assert not any(reply.done() for reply in waiting)
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        for reply in waiting:
            assert (await reply)["result"] == {"status": "stored"}
        assert (await (await report(REPORT_WINDOW + 1)))["result"] == {"status": "stored"}
        rows = await server.su(
            "agent_query_dynamic_summary",
            {"fields": ["cpu_usage"], "condition": [{"uuid": agent_uuid}]},
        )
        stored = sorted(round(row["cpu_usage"] * 10) for row in rows)  # tenths of a percent
        assert stored == [*range(REPORT_WINDOW), REPORT_WINDOW + 1]
        assert await metric(server, "taskd_reports_shed_total") == 1


async def test_a_live_summary_that_waited_in_the_server_is_not_taken_for_a_backlog(
    tmp_path: Path,
) -> None:
    """Whether a summary comes from an agent's buffer is judged by its age when it
    arrived: a live one that then waited in the agents' lane longer than BUFFERED_AGE_MS
    while agents crowd in is stored, not deferred; an old one is still deferred."""
    settings = make_settings(
        tmp_sqlite_url(tmp_path),
        admission_max_in_progress=1,
        admission_max_lag_ms=0,  # the lane is always enforced
        admission_lane_size=1,
        admission_retry_after_min_s=1,
        admission_retry_after_max_s=4,
    )
    async with running_server(settings) as server:
        token = server.super_token
        reporter = ScriptedAgent(server.ws_url, token)
        reporter.user_agent = f"{AGENT_USER_AGENT} (test)"
        async with reporter:  # subscribed: its calls take turns in the lane
            await server.su("task_create_task", reporter.uuid, {"ping": "127.0.0.1"})
            task = await reporter.next_task()
            holder = await agent_handshake(server)  # takes the one place
            now = server.clock.now_ms()
            lock = sqlite3.connect(tmp_path / "taskd.db", isolation_level=None)
            lock.execute("BEGIN IMMEDIATE")
            try:
                holding = asyncio.ensure_future(reporter.upload(task, {"ping": 1.5}))
                await asyncio.sleep(0.2)  # it holds the lane's one turn until its commit
                live = {"uuid": reporter.uuid, "time": now, "cpu_usage": 70}
                waited = asyncio.ensure_future(reporter.request(REPORT, [token, live]))
                old = {"uuid": reporter.uuid, "time": now - BUFFERED_AGE_MS - 1, "cpu_usage": 1}
                backlog = asyncio.ensure_future(reporter.request(REPORT, [token, old]))
                await asyncio.sleep(0.2)
                # the live one waits for a turn, and the connection is not read meanwhile
                assert server.app.state.admission.lane.waiting == 1
                server.clock.advance(BUFFERED_AGE_MS / 1000 + 60)  # the lane was slow
                await refusal(server)  # agents are crowding in
            finally:
                lock.execute("ROLLBACK")
                lock.close()
            assert "result" in await holding
            assert (await waited)["result"] == {"status": "stored"}
            assert (await backlog)["error"]["code"] == -32000
            await holder.close()


async def test_agents_that_send_without_waiting_wait_in_tcp_one_call_each_in_the_lane(
    tmp_path: Path,
) -> None:
    """Agents sending reports faster than the server stores them (NodeGet's agent sends
    every second and reads no answers) are not read further while one of their calls
    waits for its turn: the server holds at most one waiting call per connection, the
    rest stays in the kernel's buffers, and every report is stored once the store is
    back (none answered "busy", none lost)."""
    settings = make_settings(
        tmp_sqlite_url(tmp_path),
        admission_max_lag_ms=0,  # the lane is always enforced
        admission_lane_size=1,
    )
    async with running_server(settings) as server:
        token = server.super_token
        agents = [ScriptedAgent(server.ws_url, token) for _ in range(3)]
        for agent in agents:
            agent.user_agent = f"{AGENT_USER_AGENT} (test)"
            await agent.__aenter__()
        try:
            now = server.clock.now_ms()
            lock = sqlite3.connect(tmp_path / "taskd.db", isolation_level=None)
            lock.execute("BEGIN IMMEDIATE")  # the store is held up: nothing commits
            try:
                replies = [
                    asyncio.ensure_future(
                        agent.request(REPORT, [token, {"uuid": agent.uuid, "time": now - 100 * n}])
                    )
                    for n in range(20)
                    for agent in agents
                ]
                await asyncio.sleep(0.5)
                lane = server.app.state.admission.lane
                assert lane.used == 1 and lane.waiting == len(agents)  # one per connection
                assert not any(reply.done() for reply in replies)
            finally:
                lock.execute("ROLLBACK")
                lock.close()
            answers = await asyncio.gather(*replies)
            assert all(a.get("result") == {"status": "stored"} for a in answers), answers
            for agent in agents:
                rows = await server.su(
                    "agent_query_dynamic_summary",
                    {"fields": ["cpu_usage"], "condition": [{"uuid": agent.uuid}]},
                )
                assert len(rows) == 20
            assert lane.used == 0 and lane.waiting == 0
        finally:
            for agent in agents:
                await agent.__aexit__(None, None, None)


async def test_lane_takes_turns_in_order_while_engaged_and_not_otherwise() -> None:
    """Engaged: at most ``size`` at once, the others in arrival order, a cancelled waiter
    passes its turn on; not engaged: everyone goes straight through."""
    engaged = True
    lane = Lane(2, lambda: engaged)
    order: list[int] = []
    gate = asyncio.Event()

    async def call(n: int) -> None:
        await lane.acquire()
        try:
            order.append(n)
            await gate.wait()
        finally:
            lane.release()

    tasks = [asyncio.create_task(call(n)) for n in range(6)]
    await asyncio.sleep(0.01)
    assert order == [0, 1] and lane.waiting == 4
    tasks[2].cancel()
    await asyncio.sleep(0.01)
    gate.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert order == [0, 1, 3, 4, 5] and lane.used == 0 and lane.waiting == 0
    engaged, gate = False, asyncio.Event()
    order.clear()
    tasks = [asyncio.create_task(call(n)) for n in range(6)]
    await asyncio.sleep(0.01)
    assert order == list(range(6)) and lane.used == 6  # not engaged: no waiting
    engaged = True  # engaged again while overfull: nobody new gets in until room is made
    late = asyncio.create_task(call(6))
    await asyncio.sleep(0.01)
    assert lane.waiting == 1
    gate.set()
    await asyncio.gather(*tasks, late)
    assert order[-1] == 6 and lane.used == 0


async def test_agents_calls_in_an_always_engaged_lane_of_one_still_flow(tmp_path: Path) -> None:
    """Lane enforced all the time, one call at a time: the real agent subscribes, its
    result comes back, its host reports are stored; callers never wait in the lane."""
    settings = make_settings(
        tmp_sqlite_url(tmp_path), admission_max_lag_ms=0, admission_lane_size=1
    )
    async with running_server(settings) as server:
        agent_uuid = str(uuid.uuid4())
        config = replace(
            agent_settings([(server.ws_url, server.super_token)], agent_uuid),
            dynamic_summary_report_interval_ms=200,
            dynamic_report_interval_ms=200,
        )
        async with running_agent(config, tmp_path / "state"):
            await wait_online(server, agent_uuid)
            results = await asyncio.gather(
                *(
                    server.su("task_create_task_blocking", agent_uuid, "version", 5000)
                    for _ in range(5)
                )
            )
            assert all(r["success"] is True for r in results)
            await callers_answered(server)
            for _ in range(int(scaled(10) / 0.05)):
                if await metric(server, "taskd_agent_calls_waiting") == 0 and await summaries(
                    server, agent_uuid
                ):
                    break
                await asyncio.sleep(0.05)
            assert await summaries(server, agent_uuid) > 0
        assert server.app.state.admission.lane.used == 0


async def summaries(server: Server, agent_uuid: str) -> int:
    """Summary rows the server stored for the agent."""
    rows = await server.service.store.monitoring_last("summary", [agent_uuid])
    return len(rows)


async def test_handshakes_beyond_the_rate_are_refused_with_a_hint(tmp_path: Path) -> None:
    """admission_rate_per_s = 10: a burst of one (a tenth), then about ten a second."""
    settings = make_settings(tmp_sqlite_url(tmp_path), admission_rate_per_s=10)
    async with running_server(settings) as server:
        first = await agent_handshake(server)
        with pytest.raises(websockets.InvalidStatus) as caught:
            await agent_handshake(server)
        assert caught.value.response.status_code == 503
        assert int(caught.value.response.headers["Retry-After"]) >= 1
        assert refused(server) == {"busy": 0, "rate": 1, "queue": 0}
        await callers_answered(server)
        await asyncio.sleep(0.15)  # a token back
        second = await agent_handshake(server)
        for ws in (first, second):
            await ws.close()
        assert await metric(server, 'taskd_admission_refused_total{reason="rate"}') == 1


async def test_admission_off_admits_every_agent(tmp_path: Path) -> None:
    """admission_max_in_progress = 0: no agent handshake is ever refused."""
    settings = make_settings(tmp_sqlite_url(tmp_path), admission_max_in_progress=0)
    async with running_server(settings) as server:
        held = [await agent_handshake(server) for _ in range(10)]
        time.sleep(0.2)  # noqa: ASYNC251 - a stall: no lag refusal either
        await asyncio.sleep(0.01)
        held.append(await agent_handshake(server))
        for ws in held:
            await ws.close()
        assert refused(server) == {"busy": 0, "rate": 0, "queue": 0}


def test_admission_settings_load_and_are_checked(tmp_path: Path) -> None:
    """The admission settings come from the [server] table or TASKD_* overrides, and are checked."""
    path = tmp_path / "taskd.toml"
    path.write_text(
        f'[server]\nserver_uuid = "{uuid.uuid4()}"\nadmission_max_in_progress = 10\n'
        "admission_max_lag_ms = 0\nadmission_lane_size = 3\nadmission_retry_after_min_s = 2\n"
        "admission_retry_after_max_s = 20\n"
    )
    settings = load_server_settings(path)
    assert (
        settings.admission_max_in_progress,
        settings.admission_max_lag_ms,
        settings.admission_lane_size,
        settings.admission_retry_after_min_s,
        settings.admission_retry_after_max_s,
    ) == (10, 0, 3, 2, 20)
    assert (
        load_server_settings(path, {"admission_max_in_progress": "0"}).admission_max_in_progress
        == 0
    )
    assert load_server_settings(path, {"admission_rate_per_s": "0"}).admission_rate_per_s == 0
    with pytest.raises(InvalidInput, match="admission_retry_after_min_s: must not exceed"):
        load_server_settings(path, {"admission_retry_after_min_s": "31"})
    with pytest.raises(InvalidInput, match="admission_max_in_progress"):
        load_server_settings(path, {"admission_max_in_progress": "-1"})
    with pytest.raises(InvalidInput, match="admission_lane_size"):
        load_server_settings(path, {"admission_lane_size": "0"})
    with pytest.raises(InvalidInput, match="admission_retry_after_max_s"):
        load_server_settings(path, {"admission_retry_after_max_s": "0"})


async def test_an_agent_whose_turn_has_come_goes_ahead_of_newcomers(tmp_path: Path) -> None:
    """admission_rate_per_s = 1: each refused agent gets a turn, a second apart. One that
    brings its ticket back when its turn has come is admitted although a newcomer just took
    the second's one place; one that comes early keeps its turn; the newcomers after it are
    refused, and a ticket the server never gave counts for nothing."""
    settings = make_settings(tmp_sqlite_url(tmp_path), admission_rate_per_s=1)
    async with running_server(settings) as server:
        admission = server.app.state.admission
        open_sockets = [await agent_handshake(server)]  # the burst of one
        first_wait, first = await refusal(server)
        second_wait, second = await refusal(server)
        assert first != second and 1 <= first_wait <= second_wait
        assert set(admission.turns) == {int(first), int(second)}
        # back before its turn: refused, and told the time left until it (not sent back)
        early_wait, early = await refusal(server, second)
        assert early == second and early_wait <= second_wait
        await asyncio.sleep(admission.turns[int(first)] - time.monotonic())
        open_sockets.append(await agent_handshake(server))  # a newcomer takes the token
        open_sockets.append(await agent_handshake(server, first))  # its turn: in all the same
        assert int(first) not in admission.turns, "the turn is used up"
        _, newcomer = await refusal(server)  # the turns taken leave none for newcomers
        assert int(newcomer) in admission.turns
        _, forged = await refusal(server, "12345")
        assert forged != "12345"
        assert refused(server) == {"busy": 0, "rate": 5, "queue": 0}
        for ws in open_sockets:
            await ws.close()


async def test_the_real_agent_brings_its_turn_back(tmp_path: Path) -> None:
    """The real agent, refused for the rate, comes back with the turn it was given: the
    server takes it in on that turn (the ticket is used up)."""
    settings = make_settings(tmp_sqlite_url(tmp_path), admission_rate_per_s=1)
    async with running_server(settings) as server:
        admission = server.app.state.admission
        holder = await agent_handshake(server)  # the burst of one
        agent_uuid = str(uuid.uuid4())
        config = agent_settings([(server.ws_url, server.super_token)], agent_uuid)
        async with running_agent(config, tmp_path / "state"):
            for _ in range(int(scaled(10) / 0.005)):
                if admission.turns:
                    break
                await asyncio.sleep(0.005)
            [turn] = admission.turns
            await wait_online(server, agent_uuid, timeout=10)
            assert turn not in admission.turns, "the agent did not bring its turn back"
            assert refused(server)["rate"] == 1
        await holder.close()


def test_accept_queue_reads_how_full_the_kernel_queue_is() -> None:
    """Connections the kernel completed but nobody accepted fill a listening socket's queue:
    three of a backlog of eight read 3/8, and accepting them empties it."""
    if not hasattr(socket, "TCP_INFO"):
        pytest.skip("the kernel does not tell (no TCP_INFO)")
    with socket.create_server(("127.0.0.1", 0), backlog=8) as listener:
        queue = AcceptQueue([listener])
        clients = [socket.create_connection(listener.getsockname()) for _ in range(3)]
        try:
            deadline = time.monotonic() + scaled(5)
            while queue() < 3 / 8 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert queue() == 3 / 8
            accepted = [listener.accept()[0] for _ in clients]
            assert queue() == 0
            for sock in accepted:
                sock.close()
        finally:
            for sock in clients:
                sock.close()
            queue.close()
        listener.getsockname()  # the listener itself is still open
