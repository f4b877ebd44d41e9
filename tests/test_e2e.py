"""End to end: a real server, scripted agents over real WebSockets, both databases."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from typing import Any

import orjson
import pytest
import websockets

from taskd.server import MAX_QUEUED_BYTES
from tests.helpers import (
    RpcError,
    ScriptedAgent,
    Server,
    WsClient,
    add_token,
    agent_token_limits,
    make_settings,
    running_server,
    scaled,
    unwrap,
)


async def _answer_next(agent: ScriptedAgent, result: Any = None, **kw: Any) -> dict[str, Any]:
    task = await agent.next_task()
    [kind] = task["task_event_type"]  # a ping, tcp_ping or http_ping: answered by its own variant
    unwrap(await agent.upload(task, result if result is not None else {kind: 1.25}, **kw))
    return task


async def test_push_frame_has_the_exact_wire_shape(server: Server) -> None:
    """A created task reaches the agent as a task_register_task notification: id, token, type."""
    async with WsClient(server.ws_url) as agent:
        agent_uuid = str(uuid.uuid4())
        sub = await agent.call("task_register_task", server.super_token, agent_uuid)
        assert isinstance(sub, int) and 0 < sub < 2**53
        created = await server.su("task_create_task", agent_uuid, {"tcp_ping": "127.0.0.1:22"})
        frame = await asyncio.wait_for(agent.notifications.get(), scaled(5))
    assert set(frame) == {"jsonrpc", "method", "params"}
    assert frame["method"] == "task_register_task"
    assert frame["params"]["subscription"] == sub
    result = frame["params"]["result"]
    assert set(result) == {"task_id", "task_token", "task_event_type"}
    assert result["task_id"] == created["id"]
    assert result["task_event_type"] == {"tcp_ping": "127.0.0.1:22"}
    assert len(result["task_token"]) == 10 and result["task_token"].isalnum()


async def test_blocking_call_returns_the_agents_result(server: Server) -> None:
    """task_create_task_blocking returns the TaskEventResponse the agent uploaded."""
    async with ScriptedAgent(server.ws_url, server.super_token) as agent:
        call = asyncio.create_task(
            server.su("task_create_task_blocking", agent.uuid, "version", 5000)
        )
        task = await agent.next_task()
        unwrap(await agent.upload(task, {"version": {"taskd": "x"}}, timestamp=1234))
        response = await call
    assert response == {
        "task_id": task["task_id"],
        "agent_uuid": agent.uuid,
        "task_token": task["task_token"],
        "timestamp": 1234,
        "success": True,
        "error_message": None,
        "task_event_result": {"version": {"taskd": "x"}},
    }


async def test_blocking_call_times_out_with_999_and_keeps_the_row(server: Server) -> None:
    """A blocking call with no answer fails with 999; a later upload is still stored."""
    async with ScriptedAgent(server.ws_url, server.super_token) as agent:
        with pytest.raises(RpcError) as error:
            await server.su("task_create_task_blocking", agent.uuid, "ip", 200)
        assert error.value.code == 999
        assert "timed out after 200ms" in error.value.message
        task = await agent.next_task()
        unwrap(await agent.upload(task, {"ip": ["1.2.3.4", None]}))
    [record] = await server.su("task_query_task", {"condition": [{"task_id": task["task_id"]}]})
    assert record["success"] is True
    assert record["task_event_result"] == {"ip": ["1.2.3.4", None]}


async def test_deleting_a_task_answers_its_blocking_caller_at_once(server: Server) -> None:
    """A blocking call whose task is deleted gets 105 right away, not a timeout; the
    agent's late upload is 105 too."""
    async with ScriptedAgent(server.ws_url, server.super_token) as agent:
        call = asyncio.create_task(server.su("task_create_task_blocking", agent.uuid, "ip", 30_000))
        task = await agent.next_task()
        started = time.monotonic()
        deleted = await server.su("task_delete_task", [{"task_id": task["task_id"]}])
        assert deleted["deleted"] == 1
        with pytest.raises(RpcError) as error:
            await call
        assert time.monotonic() - started < scaled(2)
        assert error.value.code == 105
        assert f"Task {task['task_id']} was deleted" in error.value.message
        late = await agent.upload(task, {"ip": ["192.0.2.7", None]})
        assert late["error"]["code"] == 105


async def test_blocking_timeout_is_clamped_to_300000(server: Server) -> None:
    """timeout_ms above 300000 is clamped (the deadline stored proves it)."""
    async with ScriptedAgent(server.ws_url, server.super_token) as agent:
        call = asyncio.create_task(server.su("task_create_task_blocking", agent.uuid, "ip", 10**9))
        task = await agent.next_task()
        row = await server.service.store.read(lambda c: _deadline_of(c, task["task_id"]))
        assert row - time.time_ns() // 1_000_000 <= 300_000
        unwrap(await agent.upload(task, {"ip": [None, None]}))
        await call


def _deadline_of(conn: Any, task_id: int) -> int:
    from sqlalchemy import text

    result = conn.execute(text("select deadline from task where id = :i"), {"i": task_id})
    return int(result.scalar_one())


async def test_offline_agent_is_104_and_keeps_no_row(server: Server) -> None:
    """Creating a task for an agent with no subscription fails with 104 and stores nothing."""
    agent_uuid = str(uuid.uuid4())
    with pytest.raises(RpcError) as error:
        await server.su("task_create_task", agent_uuid, {"ping": "127.0.0.1"})
    assert error.value.code == 104
    assert error.value.message == f"Unable to connect agent: Agent {agent_uuid} is not connected"
    assert await server.service.store.count_tasks() == 0


async def test_queued_task_is_delivered_when_the_agent_subscribes(server: Server) -> None:
    """With queue_ttl_ms a task for an offline agent waits and is pushed on subscribe."""
    agent_uuid = str(uuid.uuid4())
    created = await server.call(
        "task_create_task",
        token=server.super_token,
        target_uuid=agent_uuid,
        task_type="version",
        queue_ttl_ms=60_000,
    )
    [record] = await server.su("task_query_task", {"condition": ["is_running"]})
    assert record["task_id"] == created["id"] and record["timestamp"] is None
    async with ScriptedAgent(server.ws_url, server.super_token, agent_uuid) as agent:
        task = await agent.next_task()
        assert task["task_id"] == created["id"]
        unwrap(await agent.upload(task, {"version": {}}))
    [record] = await server.su("task_query_task", {"condition": [{"task_id": created["id"]}]})
    assert record["success"] is True


async def test_queued_task_survives_a_server_restart(database_url: str) -> None:
    """A queued task is delivered by the next server process over the same database."""
    settings = make_settings(database_url)
    agent_uuid = str(uuid.uuid4())
    async with running_server(settings) as first:
        created = await first.su("task_create_task", agent_uuid, "ip", 60_000)
        token = first.super_token
    async with (
        running_server(settings, token) as second,
        ScriptedAgent(second.ws_url, token, agent_uuid) as agent,
    ):
        task = await agent.next_task()
        assert task["task_id"] == created["id"]


async def test_queued_task_expires_with_a_reason(server: Server) -> None:
    """A queued task whose TTL passes fails with 'expired: ...' and is never pushed."""
    agent_uuid = str(uuid.uuid4())
    created = await server.su("task_create_task", agent_uuid, "ip", 100)
    await asyncio.sleep(scaled(0.6))
    [record] = await server.su("task_query_task", {"condition": [{"task_id": created["id"]}]})
    assert record["success"] is False
    assert record["error_message"] == "expired: agent did not connect within 100 ms"
    async with ScriptedAgent(server.ws_url, server.super_token, agent_uuid) as agent:
        with pytest.raises(asyncio.TimeoutError):
            await agent.next_task(timeout=0.3)


async def test_unanswered_task_is_reaped_after_its_deadline(database_url: str) -> None:
    """A pushed task with no result by its deadline is marked failed 'timed out'."""
    settings = make_settings(database_url, task_deadline_ms=200)
    async with running_server(settings) as server:
        agent = ScriptedAgent(server.ws_url, server.super_token)
        async with agent:
            created = await server.su("task_create_task", agent.uuid, "ip")
            await agent.next_task()
            await asyncio.sleep(scaled(0.6))
            [record] = await server.su(
                "task_query_task", {"condition": [{"task_id": created["id"]}]}
            )
    assert record["success"] is False
    assert record["error_message"] == "timed out: no result from agent"
    assert record["timestamp"] is not None


async def test_newest_subscription_wins(server: Server) -> None:
    """When an agent subscribes again, only the newest subscription receives tasks."""
    agent_uuid = str(uuid.uuid4())
    old = ScriptedAgent(server.ws_url, server.super_token, agent_uuid)
    new = ScriptedAgent(server.ws_url, server.super_token, agent_uuid)
    async with old, new:  # subscribes after old
        assert new.subscription != old.subscription
        await server.su("task_create_task", agent_uuid, "version")
        task = await new.next_task()
        assert task["task_event_type"] == "version"
        with pytest.raises(asyncio.TimeoutError):
            await old.next_task(timeout=0.3)


async def test_subscribing_again_on_the_same_socket_is_a_renewal(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    """A NodeGet agent's minutely re-subscription on its own socket keeps connected_since, logs
    nothing at INFO and writes nothing; the new subscription id carries the pushes, and only a
    changed token is written (still keeping connected_since)."""
    caplog.set_level(logging.INFO, logger="taskd.hub")
    store = server.service.store
    async with ScriptedAgent(server.ws_url, server.super_token) as agent:
        [first] = await store.list_agents()
        await asyncio.sleep(0.05)  # a write now would move last_seen
        caplog.clear()
        for _ in range(3):
            renewed = await agent.call("task_register_task", server.super_token, agent.uuid)
            assert renewed != agent.subscription
            agent.subscription = renewed
        assert await store.list_agents() == [first]
        assert [r.getMessage() for r in caplog.records] == []
        [listed] = await server.su("agent_list")
        assert listed["online"] is True and listed["connected_since"] == first.connected_since
        await server.su("task_create_task", agent.uuid, "version")
        task = await agent.next_task()  # pushed once, with the newest subscription id
        unwrap(await agent.upload(task, {"version": {}}))
        with pytest.raises(asyncio.TimeoutError):
            await agent.next_task(timeout=0.3)

        own = await add_token(server, agent_token_limits(agent.uuid))
        await agent.call("task_register_task", own, agent.uuid)
        [changed] = await store.list_agents()
        assert changed.token_key == own.split(":")[0] and changed.last_seen > first.last_seen
        assert changed.connected_since == first.connected_since
        assert [r.getMessage() for r in caplog.records] == []
    for _ in range(int(scaled(500))):
        if (await store.list_agents())[0].connected_since is None:
            break
        await asyncio.sleep(0.01)
    assert [r.getMessage() for r in caplog.records] == [f"agent {agent.uuid} disconnected"]


async def test_closed_websocket_drops_its_subscription_at_once(server: Server) -> None:
    """After the agent's socket closes, the next create is 104, not a silently lost task."""
    agent = ScriptedAgent(server.ws_url, server.super_token)
    async with agent:
        await server.su("task_create_task", agent.uuid, "version")
    for _ in range(100):
        if not server.service.hub.is_connected(agent.uuid):
            break
        await asyncio.sleep(0.01)
    with pytest.raises(RpcError) as error:
        await server.su("task_create_task", agent.uuid, "version")
    assert error.value.code == 104
    [agent_row] = await server.su("agent_list")
    assert agent_row["uuid"] == agent.uuid


async def test_unregister_stops_pushes(server: Server) -> None:
    """task_unregister_task ends the subscription of the calling connection only."""
    async with ScriptedAgent(server.ws_url, server.super_token) as agent:
        assert await server.call("task_unregister_task", agent.subscription) is False
        assert await agent.call("task_unregister_task", agent.subscription) is True
        with pytest.raises(RpcError) as error:
            await server.su("task_create_task", agent.uuid, "version")
        assert error.value.code == 104


async def test_upload_checks(server: Server) -> None:
    """Wrong id/uuid/token is 105; a second upload and a mismatched variant are 108."""
    async with ScriptedAgent(server.ws_url, server.super_token) as agent:
        await server.su("task_create_task", agent.uuid, {"tcp_ping": "127.0.0.1:1"})
        task = await agent.next_task()
        for override in (
            {"task_token": "wrongtoken"},
            {"task_id": task["task_id"] + 1000},
            {"agent_uuid": str(uuid.uuid4())},
        ):
            reply = await agent.upload(task, {"tcp_ping": 1.0}, **override)
            assert reply["error"]["code"] == 105, override
        for wrong in ({"execute": "nope"}, {"ping": 1.0}, {"http_ping": 1.0}):
            reply = await agent.upload(task, wrong)
            assert reply["error"]["code"] == 108, wrong
            assert reply["error"]["message"].startswith("Invalid input: ")
            assert "'tcp_ping' result" in reply["error"]["message"]
        assert unwrap(await agent.upload(task, {"tcp_ping": 3.5})) == {"id": task["task_id"]}
        reply = await agent.upload(task, {"tcp_ping": 9.9})
        assert reply["error"]["code"] == 108
    [record] = await server.su("task_query_task", {"condition": [{"task_id": task["task_id"]}]})
    assert record["task_event_result"] == {"tcp_ping": 3.5}


async def test_concurrent_duplicate_uploads_store_exactly_one(server: Server) -> None:
    """Twenty simultaneous uploads of one task: one succeeds, the rest are 108."""
    async with ScriptedAgent(server.ws_url, server.super_token) as agent:
        await server.su("task_create_task", agent.uuid, "ip")
        task = await agent.next_task()
        replies = await asyncio.gather(
            *(agent.upload(task, {"ip": [f"10.0.0.{i}", None]}) for i in range(20))
        )
    ok = [r for r in replies if "result" in r]
    assert len(ok) == 1
    assert all(r["error"]["code"] == 108 for r in replies if "error" in r)


async def test_failed_result_is_stored_with_its_message(server: Server) -> None:
    """success false with an error message is stored and queryable with is_failure."""
    async with ScriptedAgent(server.ws_url, server.super_token) as agent:
        await server.su("task_create_task", agent.uuid, {"ping": "127.0.0.1"})
        await _answer_next(agent, success=False, error_message="no reply")
        await server.su("task_create_task", agent.uuid, {"ping": "127.0.0.1"})
        await _answer_next(agent)
    failures = await server.su("task_query_task", {"condition": ["is_failure"]})
    assert [r["error_message"] for r in failures] == ["no reply"]


async def test_every_query_condition(server: Server) -> None:
    """Each of the twelve TaskQueryCondition forms selects exactly the right rows."""
    a = ScriptedAgent(server.ws_url, server.super_token)
    b = ScriptedAgent(server.ws_url, server.super_token)
    async with a, b:
        ids: dict[str, int] = {}
        for name, agent, task_type, ts, ok in (
            ("a1", a, {"ping": "127.0.0.1"}, 1000, True),
            ("a2", a, {"tcp_ping": "127.0.0.1:80"}, 2000, False),
            ("b1", b, {"ping": "127.0.0.1"}, 3000, True),
        ):
            created = await server.su("task_create_task", agent.uuid, task_type)
            ids[name] = created["id"]
            await _answer_next(agent, success=ok, timestamp=ts)
        running = await server.su("task_create_task", b.uuid, "version")
        ids["run"] = running["id"]
        await b.next_task()

        async def query(*conditions: Any) -> list[int]:
            rows = await server.su("task_query_task", {"condition": list(conditions)})
            return [r["task_id"] for r in rows]

        everything = await query()
        assert everything[1:] == [ids["b1"], ids["a2"], ids["a1"]]
        assert everything[0] == ids["run"]  # running rows sort by creation time (now)
        assert await query({"task_id": ids["a2"]}) == [ids["a2"]]
        assert await query({"uuid": a.uuid}) == [ids["a2"], ids["a1"]]
        assert await query({"timestamp_from_to": [1000, 2000]}) == [ids["a2"], ids["a1"]]
        assert await query({"timestamp_from": 2000}) == [ids["b1"], ids["a2"]]
        assert await query({"timestamp_to": 1000}) == [ids["a1"]]
        assert await query("is_success") == [ids["b1"], ids["a1"]]
        assert await query("is_failure") == [ids["a2"]]
        assert await query("is_running") == [ids["run"]]
        assert await query({"type": "ping"}) == [ids["b1"], ids["a1"]]
        assert await query({"type": "tcp_ping"}) == [ids["a2"]]
        assert await query({"cron_source": "nothing"}) == []
        assert await query({"limit": 2}) == everything[:2]
        assert await query("last") == everything[:1]
        assert await query({"limit": 3}, "last") == everything[:1]
        # unit conditions in serde's object form, as NodeGet-board sends them
        assert await query({"is_success": None}) == [ids["b1"], ids["a1"]]
        assert await query({"is_failure": None}) == [ids["a2"]]
        assert await query({"is_running": None}) == [ids["run"]]
        assert await query({"last": None}) == everything[:1]
        assert await query({"limit": 3}, {"last": None}) == everything[:1]
        assert await query({"uuid": a.uuid}, {"type": "ping"}, "is_success") == [ids["a1"]]
        [record] = await server.su("task_query_task", {"condition": [{"task_id": ids["a1"]}]})
        assert record == {
            "task_id": ids["a1"],
            "uuid": a.uuid,
            "timestamp": 1000,
            "success": True,
            "error_message": None,
            "task_event_type": {"ping": "127.0.0.1"},
            "task_event_result": {"ping": 1.25},
            "cron_source": None,
            "created_by": server.super_token.split(":")[0],
        }


async def test_query_alias_and_default_limit(server: Server) -> None:
    """task_query answers like task_query_task, and no limit means the newest 1000."""
    agent_uuid = str(uuid.uuid4())
    for _ in range(1005):
        await server.service.store.insert_tasks([_queued(agent_uuid)])
    rows = await server.su("task_query", {"condition": []})
    assert len(rows) == 1000
    assert rows[0]["task_id"] == 1005 and rows[-1]["task_id"] == 6


def _queued(agent_uuid: str) -> Any:
    from taskd.store import NewTask

    now = time.time_ns() // 1_000_000
    return NewTask(
        uuid=agent_uuid,
        task_token="abcdefghij",
        type="ip",
        task_event_type="ip",
        deadline=now + 3_600_000,
        created_at=now,
        state=0,
        queue_ttl_ms=3_600_000,
    )


async def test_delete_with_and_without_limit(server: Server) -> None:
    """Delete removes the newest matching rows: all up to 1000 without a limit, n with one."""
    agent_uuid = str(uuid.uuid4())
    other = str(uuid.uuid4())
    await server.service.store.insert_tasks([_queued(agent_uuid) for _ in range(5)])
    await server.service.store.insert_tasks([_queued(other) for _ in range(2)])
    result = await server.su("task_delete_task", [{"uuid": agent_uuid}, {"limit": 2}])
    assert result == {"success": True, "deleted": 2, "condition_count": 2}
    remaining = await server.su("task_query_task", {"condition": [{"uuid": agent_uuid}]})
    assert [r["task_id"] for r in remaining] == [3, 2, 1]
    result = await server.su("task_delete", [{"uuid": agent_uuid}])
    assert result == {"success": True, "deleted": 3, "condition_count": 1}
    assert len(await server.su("task_query_task", {"condition": []})) == 2


async def test_batch_with_bad_items_answers_every_other_item(server: Server) -> None:
    """One malformed item of a batch gets its own error; the valid items are answered."""
    response = await server.post(
        [
            {"jsonrpc": "2.0", "method": "server_hello", "id": "a"},
            {"jsonrpc": "1.0", "method": "server_hello", "id": "b"},
            42,
            {"jsonrpc": "2.0", "method": "no_such_method", "id": "c"},
            {"jsonrpc": "2.0", "method": "server_uuid", "id": 7},
            {"jsonrpc": "2.0", "method": "server_hello"},
            {"jsonrpc": "2.0", "method": "task_query_task", "params": [], "id": "d"},
        ]
    )
    replies = response.json()
    assert len(replies) == 6
    by_id = {r["id"]: r for r in replies if r["id"] is not None}
    assert by_id["a"]["result"].startswith("hello from taskd")
    assert by_id["b"]["error"]["code"] == -32600
    assert by_id["c"]["error"]["code"] == -32601
    assert by_id[7]["result"] == server.settings.server_uuid
    assert by_id["d"]["error"]["code"] == -32602
    assert "token" in by_id["d"]["error"]["message"]
    assert [r["error"]["code"] for r in replies if r["id"] is None] == [-32600]


async def test_notifications_get_no_reply(server: Server) -> None:
    """A notification (no id) is executed but answered with HTTP 204 and no body."""
    agent_uuid = str(uuid.uuid4())
    response = await server.post(
        {
            "jsonrpc": "2.0",
            "method": "task_create_task",
            "params": [server.super_token, agent_uuid, "ip", 60000],
        }
    )
    assert response.status_code == 204 and response.content == b""
    assert len(await server.su("task_query_task", {"condition": [{"uuid": agent_uuid}]})) == 1
    response = await server.post([{"jsonrpc": "2.0", "method": "server_hello"}])
    assert response.status_code == 204


async def test_websocket_notification_gets_no_reply(server: Server) -> None:
    """Over WebSocket a notification produces no frame while requests keep being answered."""
    async with WsClient(server.ws_url) as client:
        await client.ws.send('{"jsonrpc":"2.0","method":"server_hello"}')
        assert (await client.call("server_hello")).startswith("hello")
        assert client.notifications.empty()


async def test_oversize_input_gets_a_clear_error(database_url: str) -> None:
    """A body over the limit is refused with a message naming the limit, over HTTP and WS."""
    settings = make_settings(database_url, max_message_bytes=1000)
    async with running_server(settings) as server:
        big = b'{"jsonrpc":"2.0","method":"server_hello","id":1,"params":["' + b"x" * 1200 + b'"]}'
        response = await server.post(big)
        assert response.status_code == 413
        assert "1000-byte limit" in response.json()["error"]["message"]
        async with WsClient(server.ws_url) as client:
            await client.ws.send(big.decode())
            reply = await asyncio.wait_for(client.notifications.get(), scaled(5))
            assert reply["error"]["code"] == -32600
            assert (await client.call("server_hello")).startswith("hello")


async def test_parse_errors_and_garbage(server: Server) -> None:
    """Truncated JSON, random bytes and an empty batch get well-formed errors, never a crash."""
    for body, code in (
        (b'{"jsonrpc": "2.0", "meth', -32700),
        (b"\xff\xfe\x00", -32700),
        (b"[]", -32600),
    ):
        reply = (await server.post(body)).json()
        assert reply["error"]["code"] == code and reply["id"] is None
    assert (await server.call("server_hello")).startswith("hello")


async def test_invalid_params_name_the_field(server: Server) -> None:
    """Bad task types and conditions are -32602 with the offending field in the message."""
    agent_uuid = str(uuid.uuid4())
    cases = [
        (
            ("task_create_task", agent_uuid, {"execute": {"cmd": "ls", "args": "-l"}}),
            "task_event_type.execute.args",
        ),
        (("task_create_task", agent_uuid, {"tcp_ping": "nohostport"}), "task_event_type.tcp_ping"),
        (("task_create_task", "not-a-uuid", "ip"), "target_uuid"),
        (("task_create_task", agent_uuid, "bogus"), "unknown task type 'bogus'"),
        (
            ("task_query_task", {"condition": [{"type": "pingg"}]}),
            "task_data_query.condition.0.type",
        ),
        (("task_delete_task", "not a list"), "conditions"),
        (("task_create_task_blocking", agent_uuid, "ip", "soon"), "timeout_ms"),
    ]
    for (name, *params), expected in cases:
        with pytest.raises(RpcError) as error:
            await server.su(name, *params)
        assert error.value.code == -32602, (name, error.value.message)
        assert expected in error.value.message, error.value.message


async def test_permission_denials(server: Server) -> None:
    """Tokens without the permission, scope or type get 102 and nothing is created."""
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    agent_token = await add_token(server, agent_token_limits(a))
    pinger = await add_token(
        server,
        [
            {
                "scopes": [{"agent_uuid": a}],
                "permissions": [{"task": {"create": "tcp*"}}, {"task": {"read": "*"}}],
            }
        ],
    )
    async with (
        ScriptedAgent(server.ws_url, agent_token, a) as agent_a,
        ScriptedAgent(server.ws_url, server.super_token, b),
    ):
        denied = [
            ("task_create_task", agent_token, a, "ip"),
            ("task_create_task", pinger, a, "ip"),
            ("task_create_task", pinger, b, {"tcp_ping": "127.0.0.1:1"}),
            ("task_query_task", pinger, {"condition": []}),
            ("task_query_task", pinger, {"condition": [{"uuid": b}]}),
            ("task_delete_task", pinger, [{"uuid": a}]),
            ("task_create_task", "nokey:nosecret", a, "ip"),
            ("task_create_task", "nobody|wrong", a, "ip"),
            ("agent_list", pinger),
        ]
        for name, *params in denied:
            with pytest.raises(RpcError) as error:
                await server.call(name, *params)
            assert error.value.code == 102, (name, params)
            assert error.value.message.startswith("Permission denied: ")
            assert not error.value.message.startswith("Permission denied: Permission denied")
        with pytest.raises(RpcError) as error:
            await agent_a.call("task_register_task", agent_token, b)
        assert error.value.code == 102
        assert await server.service.store.count_tasks() == 0
        created = await server.call("task_create_task", pinger, a, {"tcp_ping": "127.0.0.1:1"})
        rows = await server.call("task_query_task", pinger, {"condition": [{"uuid": a}]})
        assert [r["task_id"] for r in rows] == [created["id"]]


async def test_error_codes_and_messages_are_nodegets(server: Server) -> None:
    """Codes follow NodeGet (blank cmd 108, malformed credential 101, non-string token -32602)
    and each message starts with NodeGet's prefix for its code, once."""
    offline = str(uuid.uuid4())
    cases: list[tuple[tuple[Any, ...], int, str]] = [
        (
            (
                "task_create_task",
                server.super_token,
                offline,
                {"execute": {"cmd": " ", "args": []}},
            ),
            108,
            "Invalid input: task_event_type.execute.cmd: must not be empty or blank",
        ),
        (
            ("task_create_task", "no-separator", offline, "ip"),
            101,
            "Parse error: Invalid token format: expected KEY:SECRET or USERNAME|PASSWORD",
        ),
        (
            ("task_create_task", "", offline, "ip"),
            101,
            "Parse error: Invalid token format: expected KEY:SECRET or USERNAME|PASSWORD",
        ),
        (
            ("task_create_task", None, offline, "ip"),
            -32602,
            "token: must be a string KEY:SECRET or USERNAME|PASSWORD",
        ),
        (
            ("task_create_task", server.super_token, offline, "ip"),
            104,
            f"Unable to connect agent: Agent {offline} is not connected",
        ),
        (
            ("crontab_delete", server.super_token, "no-such-cron"),
            105,
            "Not found in database: ",
        ),
    ]
    for (name, *params), code, message in cases:
        reply = await server.request(name, params)
        assert reply["error"]["code"] == code, (name, params, reply)
        assert reply["error"]["message"].startswith(message), reply
    assert await server.service.store.count_tasks() == 0
    async with ScriptedAgent(server.ws_url, server.super_token) as agent:
        reply = await server.request(
            "task_create_task_blocking", [server.super_token, agent.uuid, "ip", 100]
        )
    assert reply["error"]["code"] == 999
    assert reply["error"]["message"].startswith("Other error: Task ")


async def test_unit_task_types_in_object_form_are_stored_and_pushed_bare(server: Server) -> None:
    """{"ip": null}, {"version": null} and {"read_config": null} are accepted as task types; the
    agent gets and queries return the bare string; object-form conditions select and delete."""
    async with ScriptedAgent(server.ws_url, server.super_token) as agent:
        for name in ("ip", "version", "read_config"):
            created = await server.su("task_create_task", agent.uuid, {name: None})
            pushed = await agent.next_task()
            assert pushed["task_event_type"] == name
            [record] = await server.su(
                "task_query_task", {"condition": [{"task_id": created["id"]}]}
            )
            assert record["task_event_type"] == name
        running = await server.su("task_query_task", {"condition": [{"is_running": None}]})
        assert len(running) == 3
        deleted = await server.su("task_delete_task", [{"uuid": agent.uuid}, {"last": None}])
        assert deleted == {"success": True, "deleted": 1, "condition_count": 2}
        left = await server.su("task_query_task", {"condition": [{"type": "read_config"}]})
        assert left == []


async def test_server_info_and_discover(server: Server) -> None:
    """server_uuid, server_hello and rpc.discover answer without a token, with aliases."""
    assert await server.call("server_uuid") == server.settings.server_uuid
    assert await server.call("nodeget-server_uuid") == server.settings.server_uuid
    assert "taskd" in await server.call("nodeget-server_hello")
    document = await server.call("rpc.discover")
    names = {m["name"] for m in document["methods"]}
    assert {
        "task_create_task",
        "task_create_task_blocking",
        "task_query_task",
        "task_delete_task",
        "task_register_task",
        "task_unregister_task",
        "task_upload_task_result",
    } <= names


async def test_register_over_http_is_refused(server: Server) -> None:
    """task_register_task needs a WebSocket; over HTTP it is a clear error."""
    with pytest.raises(RpcError) as error:
        await server.su("task_register_task", str(uuid.uuid4()))
    assert error.value.code == -32601
    assert "WebSocket" in error.value.message


async def test_all_rpc_paths_serve(server: Server) -> None:
    """/, /rpc and /nodeget/rpc all answer JSON-RPC; /healthz answers ok."""
    for path in ("/", "/rpc", "/nodeget/rpc"):
        response = await server.http.post(
            path, json={"jsonrpc": "2.0", "method": "server_uuid", "id": 1}
        )
        assert response.json()["result"] == server.settings.server_uuid
    health = await server.http.get("/healthz")
    assert health.json()["status"] == "ok"


async def test_pipelined_websocket_creates(server: Server) -> None:
    """500 creates pipelined over one WebSocket get 500 distinct ids; the agent gets each task."""
    async with (
        ScriptedAgent(server.ws_url, server.super_token) as agent,
        WsClient(server.ws_url) as caller,
    ):
        replies = await asyncio.gather(
            *(
                caller.request("task_create_task", [server.super_token, agent.uuid, "ip"])
                for _ in range(500)
            )
        )
        ids = {unwrap(r)["id"] for r in replies}
        assert len(ids) == 500
        pushed = {(await agent.next_task())["task_id"] for _ in range(500)}
        assert pushed == ids


async def test_an_unstorable_result_is_refused_alone(server: Server) -> None:
    """A result nested too deep to store is -32602; an upload beside it is still stored."""

    def nested(depth: int) -> Any:
        value: Any = "leaf"
        for _ in range(depth):
            value = {"k": value}
        return value

    async with ScriptedAgent(server.ws_url, server.super_token) as agent:
        for bad in ({"version": nested(300)}, {"version": nested(32)}, {"version": [nested(31)]}):
            await server.su("task_create_task", agent.uuid, "version")
            await server.su("task_create_task", agent.uuid, "version")
            tasks = [await agent.next_task(), await agent.next_task()]
            uploads = [
                {
                    "task_id": task["task_id"],
                    "agent_uuid": agent.uuid,
                    "task_token": task["task_token"],
                    "timestamp": 1,
                    "success": True,
                    "task_event_result": result,
                }
                for task, result in zip(tasks, (bad, {"version": {"ok": True}}), strict=True)
            ]
            batch = [
                {"jsonrpc": "2.0", "method": "task_upload_task_result", "params": params, "id": i}
                for i, params in enumerate([[server.super_token, u] for u in uploads])
            ]
            # the standard encoder: orjson refuses to write what this test must send
            await agent.ws.send(json.dumps(batch))
            replies = {r["id"]: r for r in await _batch_reply(agent)}
            assert replies[0].get("error", {}).get("code") == -32602, (bad, replies[0])
            assert "version" in replies[0]["error"]["message"]
            assert replies[1]["result"] == {"id": tasks[1]["task_id"]}, replies[1]
    records = await server.su("task_query_task", {"condition": [{"uuid": agent.uuid}]})
    assert sorted(r["success"] is None for r in records) == [False] * 3 + [True] * 3


async def _batch_reply(client: WsClient) -> list[dict[str, Any]]:
    """The next batch reply a WsClient's reader queued (replies without a pending id land there)."""
    while True:
        item = await asyncio.wait_for(client.notifications.get(), scaled(10))
        if "method" not in item:
            replies = [item]
            while not client.notifications.empty():
                replies.append(client.notifications.get_nowait())
            return replies


async def test_a_client_that_stops_reading_is_cut_off_by_bytes(server: Server) -> None:
    """A WebSocket client leaving 64 MiB of replies unread is closed with 1008; others go on."""
    body = orjson.dumps({"jsonrpc": "2.0", "method": "rpc.discover", "id": 1}).decode()
    reply_size = len((await server.post(body)).content)
    count = MAX_QUEUED_BYTES // reply_size * 2
    async with websockets.connect(server.ws_url, max_size=None, ping_interval=None) as ws:
        ws.transport.pause_reading()
        with contextlib.suppress(websockets.ConnectionClosed):
            for _ in range(count):
                await ws.send(body)
        ws.transport.resume_reading()
        with pytest.raises(websockets.ConnectionClosed) as closed:
            async with asyncio.timeout(scaled(60)):
                while True:
                    await ws.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    assert (await server.call("server_hello")).startswith("hello")


PROTOCOL_PARAMS = {
    "task_create_task": ("token", "target_uuid", "task_type", "queue_ttl_ms"),
    "task_create_task_blocking": ("token", "target_uuid", "task_type", "timeout_ms"),
    "task_query_task": ("token", "task_data_query"),
    "task_delete_task": ("token", "conditions"),
    "task_register_task": ("token", "uuid"),
    "task_unregister_task": ("subscription_id",),
    "task_upload_task_result": ("token", "task_response"),
}
"""Each task method's params in PROTOCOL.md's positional order, by their documented names."""


def _params(method: str, named: bool, **values: Any) -> Any:
    """The params of a call as a named object or as a positional array."""
    order = PROTOCOL_PARAMS[method]
    assert tuple(values) == order[: len(values)], "values in protocol order, none skipped"
    return values if named else list(values.values())


async def _create_by(server: Server, named: bool) -> Any:
    async with ScriptedAgent(server.ws_url, server.super_token) as agent:
        params = _params(
            "task_create_task",
            named,
            token=server.super_token,
            target_uuid=agent.uuid,
            task_type={"tcp_ping": "127.0.0.1:9"},
            queue_ttl_ms=60_000,
        )
        created = unwrap(await server.request("task_create_task", params))
        pushed = await agent.next_task()
    return sorted(created), pushed["task_id"] == created["id"], pushed["task_event_type"]


async def _blocking_by(server: Server, named: bool) -> Any:
    async with ScriptedAgent(server.ws_url, server.super_token) as agent:
        params = _params(
            "task_create_task_blocking",
            named,
            token=server.super_token,
            target_uuid=agent.uuid,
            task_type="version",
            timeout_ms=10_000,
        )
        call = asyncio.create_task(server.request("task_create_task_blocking", params))
        unwrap(await agent.upload(await agent.next_task(), {"version": {"v": 1}}, timestamp=7))
        response = unwrap(await call)
    return {k: v for k, v in response.items() if k not in ("task_id", "agent_uuid", "task_token")}


async def _query_by(server: Server, named: bool) -> Any:
    query = {"condition": [{"type": "ip"}, "is_success"]}
    params = _params("task_query_task", named, token=server.super_token, task_data_query=query)
    return unwrap(await server.request("task_query_task", params))


async def _delete_by(server: Server, named: bool) -> Any:
    agent_uuid = str(uuid.uuid4())
    created = await server.su("task_create_task", agent_uuid, "ip", 60_000)
    conditions = [{"task_id": created["id"]}]
    params = _params("task_delete_task", named, token=server.super_token, conditions=conditions)
    deleted = unwrap(await server.request("task_delete_task", params))
    return deleted, await server.su("task_query_task", {"condition": conditions})


async def _register_by(server: Server, named: bool) -> Any:
    agent_uuid = str(uuid.uuid4())
    async with WsClient(server.ws_url) as client:
        params = _params("task_register_task", named, token=server.super_token, uuid=agent_uuid)
        subscription = unwrap(await client.request("task_register_task", params))
        await server.su("task_create_task", agent_uuid, "version")
        frame = await asyncio.wait_for(client.notifications.get(), scaled(5))
    pushed = frame["params"]
    return (
        isinstance(subscription, int),
        pushed["subscription"] == subscription,
        pushed["result"]["task_event_type"],
    )


async def _unregister_by(server: Server, named: bool) -> Any:
    async with ScriptedAgent(server.ws_url, server.super_token) as agent:
        params = _params("task_unregister_task", named, subscription_id=agent.subscription)
        ended = unwrap(await agent.request("task_unregister_task", params))
        with pytest.raises(RpcError) as error:
            await server.su("task_create_task", agent.uuid, "version")
    return ended, error.value.code


async def _upload_by(server: Server, named: bool) -> Any:
    async with ScriptedAgent(server.ws_url, server.super_token) as agent:
        await server.su("task_create_task", agent.uuid, "ip")
        task = await agent.next_task()
        response = {
            "task_id": task["task_id"],
            "agent_uuid": agent.uuid,
            "task_token": task["task_token"],
            "timestamp": 99,
            "success": True,
            "task_event_result": {"ip": ["192.0.2.9", None]},
        }
        params = _params(
            "task_upload_task_result", named, token=server.super_token, task_response=response
        )
        stored = unwrap(await agent.request("task_upload_task_result", params))
    [record] = await server.su("task_query_task", {"condition": [{"task_id": task["task_id"]}]})
    return stored == {"id": task["task_id"]}, record["timestamp"], record["task_event_result"]


NAMED_PARAM_CASES = {
    "task_create_task": _create_by,
    "task_create_task_blocking": _blocking_by,
    "task_query_task": _query_by,
    "task_delete_task": _delete_by,
    "task_register_task": _register_by,
    "task_unregister_task": _unregister_by,
    "task_upload_task_result": _upload_by,
}


@pytest.mark.parametrize("method", list(NAMED_PARAM_CASES))
async def test_named_params_with_the_protocol_names_act_like_positional(
    server: Server, method: str
) -> None:
    """Each task method called with PROTOCOL.md's param names as an object does what the
    same call with positional params does."""
    async with ScriptedAgent(server.ws_url, server.super_token) as agent:
        await server.su("task_create_task", agent.uuid, "ip")
        unwrap(await agent.upload(await agent.next_task(), {"ip": ["192.0.2.1", None]}))
    positional = await NAMED_PARAM_CASES[method](server, False)
    named = await NAMED_PARAM_CASES[method](server, True)
    assert named == positional


async def test_agent_list_follows_a_connection_and_its_end(server: Server) -> None:
    """agent_list shows a connected agent online since it subscribed, from its address, seen
    when it last uploaded; once it disconnects it is offline with connected_since null and
    keeps its last_seen and address."""
    before = time.time_ns() // 1_000_000
    agent = ScriptedAgent(server.ws_url, server.super_token)
    async with agent:
        [online] = await server.su("agent_list")
        assert online["uuid"] == agent.uuid and online["online"] is True
        assert before <= online["first_seen"] <= online["connected_since"]
        assert online["connected_since"] <= online["last_seen"] <= time.time_ns() // 1_000_000
        assert online["remote_addr"] == "127.0.0.1"
        await server.su("task_create_task", agent.uuid, "ip")
        task = await agent.next_task()
        await asyncio.sleep(0.02)
        uploaded_at = time.time_ns() // 1_000_000
        unwrap(await agent.upload(task, {"ip": [None, None]}))
        [active] = await server.su("agent_list")
        assert active["last_seen"] >= uploaded_at > active["connected_since"]
    for _ in range(int(scaled(500))):
        [offline] = await server.su("agent_list")
        if not offline["online"]:
            break
        await asyncio.sleep(0.01)
    assert offline["online"] is False
    assert offline["connected_since"] is None
    assert offline["last_seen"] >= active["last_seen"]
    assert offline["remote_addr"] == "127.0.0.1"
    assert offline["first_seen"] == online["first_seen"]


class StallingProxy:
    """A local TCP proxy that can go silent: it stops forwarding both ways, closing nothing."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.silent = asyncio.Event()
        self.port = 0
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> StallingProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cut()
        assert self._server is not None
        self._server.close()

    def cut(self) -> None:
        """Close every connection (so both ends notice at last)."""
        for writer in self._writers:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(
            "127.0.0.1", self.target_port
        )
        self._writers += [writer, upstream_writer]
        await asyncio.gather(
            self._pipe(reader, upstream_writer), self._pipe(upstream_reader, writer)
        )

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                if self.silent.is_set():
                    return  # swallowed; nothing is read or written from now on
                writer.write(data)
                await writer.drain()


async def test_a_silent_agent_connection_is_dropped_by_the_ping_timeout(database_url: str) -> None:
    """An agent connection that stops answering pings (without closing) is dropped within the
    ping interval plus timeout: the agent is no longer connected and creates are 104."""
    settings = make_settings(database_url, ws_ping_interval_s=0.3, ws_ping_timeout_s=0.3)
    async with running_server(settings) as server, StallingProxy(server.port) as proxy:
        agent = ScriptedAgent(f"ws://127.0.0.1:{proxy.port}/", server.super_token)
        async with agent:
            await asyncio.sleep(scaled(1.2))  # several pings, answered through the proxy
            assert server.service.hub.is_connected(agent.uuid)
            await server.su("task_create_task", agent.uuid, "version")
            await agent.next_task()
            proxy.silent.set()
            for _ in range(int(scaled(300))):
                if not server.service.hub.is_connected(agent.uuid):
                    break
                await asyncio.sleep(0.01)
            assert not server.service.hub.is_connected(agent.uuid)
            with pytest.raises(RpcError) as error:
                await server.su("task_create_task", agent.uuid, "version")
            assert error.value.code == 104
            proxy.cut()
