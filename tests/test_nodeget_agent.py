"""A NodeGet agent works against taskd unchanged.

The agent is ``tests.nodeget_agent.NodeGetAgent``: it speaks exactly as NodeGet's
Rust agent does (ids always 1, the ``nodeget-server_uuid`` check first, positional
``task_register_task`` re-sent on the same socket, uploads with all seven fields
and null for absent ones, NodeGet's result variants). Against a real server on
SQLite and PostgreSQL this proves: a blocking round trip of every task kind, for
callers over HTTP and over WebSocket, returns and stores exactly what the agent
uploaded; a refused task comes back as NodeGet's failure; a per-second cron's
results are stored and queryable; and periodic re-subscription on the same
socket is not a new connection.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from tests.helpers import Server, WsClient, unwrap, wait_for
from tests.nodeget_agent import (
    NOT_ALLOWED,
    NodeGetAgent,
    nodeget_agent,
    nodeget_agent_config,
    task_kind,
)

EVERY_SECOND = "* * * * * *"
BLOCKING_MS = 5000

TASK_KINDS = (
    "ping",
    "tcp_ping",
    "http_ping",
    "http_request",
    "dns",
    "execute",
    "web_shell",
    "read_config",
    "edit_config",
    "ip",
    "version",
    "self_update",
)

RESPONSE_FIELDS = {
    "task_id",
    "agent_uuid",
    "task_token",
    "timestamp",
    "success",
    "error_message",
    "task_event_result",
}
RECORD_FIELDS = {
    "task_id",
    "uuid",
    "timestamp",
    "success",
    "error_message",
    "task_event_type",
    "task_event_result",
    "cron_source",
}
CRON_RESULT_FIELDS = {"id", "cron_id", "cron_name", "run_time", "relative_id", "success", "message"}


def edit_config_document(server: Server, agent: NodeGetAgent) -> str:
    """An agent config using only keys both NodeGet's and taskd's agents read."""
    return f"""agent_uuid = "{agent.uuid}"
log_level = "info"
connect_timeout_ms = 1000
terminal_shell = "bash"
exec_max_character = 10000

[[server]]
name = "main"
server_uuid = "{server.settings.server_uuid}"
token = "{agent.token}"
ws_url = "{server.ws_url}"
allow_task = true
allow_task_type = ["ping", "tcp_ping", "dns", "ip"]
ignore_cert = false
"""


def task_type_of(kind: str, server: Server, agent: NodeGetAgent) -> Any:
    """A TaskEventType of ``kind`` as NodeGet's docs and NodeGet-board write it."""
    return {
        "ping": {"ping": "www.example.com"},
        "tcp_ping": {"tcp_ping": "www.example.com:443"},
        "http_ping": {"http_ping": "https://www.example.com/"},
        "http_request": {
            "http_request": {
                "url": "https://example.com/api",
                "method": "POST",
                "headers": {"content-type": "application/json"},
                "body": '{"hello":"world"}',
                "ip": "ipv4 auto",
            }
        },
        "dns": {"dns": {"domain": "example.com", "record_types": ["a", "aaaa"]}},
        "execute": {"execute": {"cmd": "echo", "args": ["hello", "nodeget"]}},
        "web_shell": {
            "web_shell": {
                "url": f"ws://127.0.0.1:{server.port}/auto_gen",
                "terminal_id": str(uuid.uuid4()),
            }
        },
        "read_config": "read_config",
        "edit_config": {"edit_config": edit_config_document(server, agent)},
        "ip": "ip",
        "version": "version",
        "self_update": {"self_update": "v0.3.6"},
    }[kind]


def as_stored(response: dict[str, Any]) -> dict[str, Any]:
    """A TaskEventResponse with null fields inside an http_request result left out.

    NodeGet's agent serialises ``body_base64: None`` as null; a server may write
    optional result fields as null or leave them out. Clients read both the same.
    """
    result = response["task_event_result"]
    if isinstance(result, dict) and isinstance(result.get("http_request"), dict):
        inner = {k: v for k, v in result["http_request"].items() if v is not None}
        return {**response, "task_event_result": {"http_request": inner}}
    return response


async def blocking_over_websocket(server: Server, agent_uuid: str, task_type: Any) -> Any:
    """A blocking call over WebSocket with named params, as NodeGet-board sends it."""
    async with WsClient(server.ws_url) as caller:
        reply = await caller.request(
            "task_create_task_blocking",
            {
                "token": server.super_token,
                "target_uuid": agent_uuid,
                "task_type": task_type,
                "timeout_ms": BLOCKING_MS,
            },
        )
    return unwrap(reply)


async def record_of(server: Server, task_id: int) -> dict[str, Any]:
    """The stored record of one task."""
    [record] = await server.su("task_query_task", {"condition": [{"task_id": task_id}]})
    assert isinstance(record, dict)
    return record


@pytest.mark.parametrize("kind", TASK_KINDS)
async def test_blocking_round_trip_of_every_kind(server: Server, kind: str) -> None:
    """Each kind's blocking call, over HTTP and WebSocket, returns and stores the agent's result."""
    async with nodeget_agent(server) as agent:
        over_http = await server.su(
            "task_create_task_blocking", agent.uuid, task_type_of(kind, server, agent), BLOCKING_MS
        )
        over_ws = await blocking_over_websocket(
            server, agent.uuid, task_type_of(kind, server, agent)
        )
        await wait_for(lambda: _acked(agent, 2))
    assert agent.errors == []
    assert over_http["task_id"] != over_ws["task_id"]
    for response in (over_http, over_ws):
        uploaded = agent.uploads[response["task_id"]]
        assert set(response) == RESPONSE_FIELDS
        assert as_stored(response) == as_stored(uploaded)
        assert response["success"] is True and response["error_message"] is None
        [variant] = response["task_event_result"]
        assert variant == kind
        record = await record_of(server, response["task_id"])
        assert set(record) >= RECORD_FIELDS
        assert record["uuid"] == agent.uuid
        assert record["timestamp"] == uploaded["timestamp"]
        assert record["success"] is True and record["error_message"] is None
        assert task_kind(record["task_event_type"]) == kind
        assert record["task_event_result"] == response["task_event_result"]
        assert record["cron_source"] is None
    if kind == "web_shell":
        assert len(agent.terminal_urls) == 2
        assert all("/terminal?agent_uuid=" in url for url in agent.terminal_urls)


async def _acked(agent: NodeGetAgent, uploads: int) -> bool:
    """Whether the server has acknowledged ``uploads`` uploads of the agent."""
    return len(agent.upload_acks) >= uploads


async def test_pushed_task_has_nodeget_task_event_shape(server: Server) -> None:
    """A push carries task_id, a 10-character task_token and the type exactly as created."""
    async with nodeget_agent(server) as agent:
        created = await server.su(
            "task_create_task", agent.uuid, {"tcp_ping": "www.example.com:443"}
        )
        await wait_for(lambda: _acked(agent, 1))
    [task] = agent.tasks
    assert set(task) == {"task_id", "task_token", "task_event_type"}
    assert task["task_id"] == created["id"]
    assert len(task["task_token"]) == 10 and task["task_token"].isalnum()
    assert task["task_event_type"] == {"tcp_ping": "www.example.com:443"}
    assert agent.upload_acks == [{"id": created["id"]}]


async def test_refused_task_comes_back_as_nodeget_failure(server: Server) -> None:
    """A task type the agent refuses comes back failed, with NodeGet's message and no result."""
    async with nodeget_agent(server, allow={"ping", "tcp_ping"}) as agent:
        response = await server.su(
            "task_create_task_blocking",
            agent.uuid,
            {"execute": {"cmd": "id", "args": []}},
            BLOCKING_MS,
        )
        await wait_for(lambda: _acked(agent, 1))
    assert agent.errors == []
    assert response == agent.uploads[response["task_id"]]
    assert response["success"] is False
    assert response["error_message"] == NOT_ALLOWED
    assert response["task_event_result"] is None
    record = await record_of(server, response["task_id"])
    assert record["success"] is False
    assert record["error_message"] == NOT_ALLOWED
    assert record["task_event_result"] is None
    [failed] = await server.su(
        "task_query_task", {"condition": [{"uuid": agent.uuid}, "is_failure"]}
    )
    assert failed["task_id"] == response["task_id"]


async def test_edit_config_takes_a_nodeget_agent_config(server: Server) -> None:
    """An edit_config with the NodeGet agent's own config.toml (from read_config) reaches it."""
    async with nodeget_agent(server) as agent:
        read = await server.su("task_create_task_blocking", agent.uuid, "read_config", BLOCKING_MS)
        document = read["task_event_result"]["read_config"]
        edited = document.replace('log_level = "info"', 'log_level = "debug"')
        response = await server.su(
            "task_create_task_blocking", agent.uuid, {"edit_config": edited}, BLOCKING_MS
        )
    assert document == nodeget_agent_config(
        agent.uuid, server.settings.server_uuid, agent.token, server.ws_url
    )
    assert response["task_event_result"] == {"edit_config": True}
    assert agent.tasks[-1]["task_event_type"] == {"edit_config": edited}


async def test_per_second_tcp_ping_cron_results_are_stored(server: Server) -> None:
    """A per-second tcp_ping cron stores its cron results and tasks with the agent's results."""
    name = "nodeget-tcp-ping"
    async with nodeget_agent(server) as agent:
        await server.su(
            "crontab_create",
            name,
            EVERY_SECOND,
            {"agent": [[agent.uuid], {"task": {"tcp_ping": "www.example.com:443"}}]},
        )

        async def answered() -> tuple[list[dict[str, Any]], list[dict[str, Any]]] | None:
            rows = await server.su("crontab-result_query", {"condition": [{"cron_name": name}]})
            tasks = await server.su(
                "task_query_task", {"condition": [{"cron_source": name}, "is_success"]}
            )
            done = {t["task_id"] for t in tasks}
            linked = [r for r in rows if r["relative_id"] in done]
            return (linked, tasks) if len(linked) >= 2 else None

        linked, tasks = await wait_for(answered, timeout=6)
        await server.su("crontab_delete", name)
    assert agent.errors == []
    [cron_id] = {row["cron_id"] for row in linked}
    for row in linked:
        assert set(row) == CRON_RESULT_FIELDS
        assert row["cron_name"] == name and row["success"] is True
        assert isinstance(row["run_time"], int)
    for task in tasks:
        uploaded = agent.uploads[task["task_id"]]
        assert task["uuid"] == agent.uuid
        assert task["cron_source"] == name
        assert task["task_event_type"] == {"tcp_ping": "www.example.com:443"}
        assert task["task_event_result"] == uploaded["task_event_result"]
        assert task["task_event_result"] == {"tcp_ping": 12.345678}
        assert task["timestamp"] == uploaded["timestamp"]
    assert isinstance(cron_id, int)


async def test_resubscribing_on_the_same_socket_is_not_a_new_connection(server: Server) -> None:
    """Re-sent task_register_task keeps agent_list's connected_since, and tasks keep arriving."""

    async def listed(agent_uuid: str) -> dict[str, Any]:
        [row] = [a for a in await server.su("agent_list") if a["uuid"] == agent_uuid]
        assert isinstance(row, dict)
        return row

    async with nodeget_agent(server, resubscribe_every=0.3) as agent:
        before = await listed(agent.uuid)
        responses = []
        for _ in range(8):
            responses.append(
                await server.su(
                    "task_create_task_blocking", agent.uuid, {"ping": "www.example.com"}, 3000
                )
            )
            await asyncio.sleep(0.1)

        async def resubscribed() -> bool:
            return len(agent.subscription_acks) >= 3

        await wait_for(resubscribed, timeout=5)
        after = await listed(agent.uuid)
        last = await server.su("task_create_task_blocking", agent.uuid, "version", 3000)
    assert agent.resubscriptions >= 3
    assert agent.errors == []
    assert before["online"] is True and after["online"] is True
    assert after["connected_since"] == before["connected_since"]
    for response in (*responses, last):
        assert as_stored(response) == as_stored(agent.uploads[response["task_id"]])
    assert last["task_event_result"]["version"]["binary_type"] == "Agent"


async def test_queued_task_arrives_after_the_subscription_reply(server: Server) -> None:
    """A task queued for an offline agent is pushed after the register reply NodeGet waits for."""
    agent_uuid = str(uuid.uuid4())
    queued = await server.su(
        "task_create_task", agent_uuid, {"tcp_ping": "www.example.com:443"}, 60_000
    )
    async with nodeget_agent(server, agent_uuid=agent_uuid) as agent:
        await wait_for(lambda: _acked(agent, 1))
    assert agent.errors == []
    assert [task["task_id"] for task in agent.tasks] == [queued["id"]]
    record = await record_of(server, queued["id"])
    assert record["success"] is True
    assert record["task_event_result"] == agent.uploads[queued["id"]]["task_event_result"]
