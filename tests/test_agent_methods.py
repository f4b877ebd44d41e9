"""Agent methods end to end: NodeGet's UUID lists, soft delete, the version object, and agents
known from any authenticated call."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from sqlalchemy import select

from taskd import __version__
from taskd.store import task_t
from tests.helpers import RpcError, ScriptedAgent, Server, add_token, agent_token_limits

A = "0a0a0a0a-0000-4000-8000-00000000000a"
B = "0b0b0b0b-0000-4000-8000-00000000000b"
C = "0c0c0c0c-0000-4000-8000-00000000000c"


async def failed(server: Server, code: int, method: str, *params: Any) -> str:
    """Call ``method``, require error ``code``, return its message."""
    with pytest.raises(RpcError) as error:
        await server.call(method, *params)
    assert error.value.code == code, (method, error.value.message)
    return str(error.value.message)


async def listed(server: Server) -> list[str]:
    """The UUIDs NodeGet-board's node list shows (super token)."""
    reply = await server.su("nodeget-server_list_all_agent_uuid")
    assert set(reply) == {"uuids"}
    uuids: list[str] = reply["uuids"]
    return uuids


async def upload_unsubscribed(server: Server, agent_uuid: str, token: str) -> None:
    """Upload a result for a queued task over HTTP, as an agent that never subscribed."""
    created = await server.su("task_create_task", agent_uuid, "version", 60_000)
    row = await server.service.store.fetch_one(
        select(task_t.c.task_token).where(task_t.c.id == created["id"])
    )
    response = {
        "task_id": created["id"],
        "agent_uuid": agent_uuid,
        "task_token": row.task_token,
        "timestamp": int(time.time() * 1000),
        "success": True,
        "task_event_result": {"version": {"version": "1"}},
    }
    assert await server.call("task_upload_task_result", token, response) == {"id": created["id"]}


async def test_uuid_lists_leave_soft_deleted_agents_out_and_keep_their_history(
    server: Server,
) -> None:
    """After agent-uuid_delete the agent is in no list, its tasks remain; deleting is idempotent."""
    token_a = await add_token(server, agent_token_limits(A))
    token_b = await add_token(server, agent_token_limits(B))
    async with (
        ScriptedAgent(server.ws_url, token_a, A) as agent_a,
        ScriptedAgent(server.ws_url, token_b, B),
    ):
        created = await server.su("task_create_task", A, "ip")
        task = await agent_a.next_task()
        await agent_a.upload(task, {"ip": ["192.0.2.1", None]})
    assert await listed(server) == [A, B]
    assert await server.su("agent-uuid_list_all") == [A, B]

    assert await server.su("agent-uuid_delete", A) == {
        "success": True,
        "message": "Agent UUID soft-deleted",
    }
    assert await listed(server) == [B]
    assert await server.su("agent-uuid_list_all") == [B]
    assert await server.su("agent-uuid_list_all_with_agent_mode") == [
        {"uuid": A, "soft_delete": True},
        {"uuid": B, "soft_delete": False},
    ]
    assert [agent["uuid"] for agent in await server.su("agent_list")] == [B]
    history = await server.su("task_query_task", {"condition": [{"uuid": A}]})
    assert [record["task_id"] for record in history] == [created["id"]]

    assert (await server.su("agent-uuid_delete", A))["success"] is True
    assert await server.su("agent-uuid_delete", C) == {
        "success": False,
        "message": "Agent UUID not found",
    }
    assert await server.call("agent-uuid_delete", token=server.super_token, agent_uuid=B) == {
        "success": True,
        "message": "Agent UUID soft-deleted",
    }
    assert await listed(server) == []


async def test_a_deleted_agent_is_listed_again_once_it_calls_in(server: Server) -> None:
    """As in NodeGet, a soft-deleted agent that subscribes or uploads again reappears."""
    token = await add_token(server, agent_token_limits(A))
    async with ScriptedAgent(server.ws_url, token, A):
        pass
    await server.su("agent-uuid_delete", A)
    assert await listed(server) == []
    async with ScriptedAgent(server.ws_url, token, A) as agent:
        assert await listed(server) == [A]
        await server.su("task_create_task", A, "ip")
        task = await agent.next_task()
        await server.su("agent-uuid_delete", A)
        assert await listed(server) == []
        assert (await agent.upload(task, {"ip": [None, None]}))["result"] == {"id": task["task_id"]}
    assert await listed(server) == [A]
    assert await server.su("agent-uuid_list_all_with_agent_mode") == [
        {"uuid": A, "soft_delete": False}
    ]


async def test_an_agent_that_never_subscribes_is_known_from_its_upload(server: Server) -> None:
    """A result upload alone makes an agent known: listed by agent_list and the UUID lists."""
    token = await add_token(server, agent_token_limits(C))
    await server.su("task_create_task", C, "version", 60_000)
    assert await listed(server) == []  # work waiting for an agent does not make it known
    await upload_unsubscribed(server, C, token)
    assert await listed(server) == [C]
    [agent] = await server.su("agent_list")
    assert agent["uuid"] == C and agent["online"] is False and agent["last_seen"] > 0


async def test_calls_after_a_delete_on_another_node_restore_the_agent_at_the_next_flush(
    server: Server,
) -> None:
    """A delete this node did not see is undone by the agent's next call, not by earlier ones."""
    token = await add_token(server, agent_token_limits(C))
    hub, store = server.service.hub, server.service.store
    await upload_unsubscribed(server, C, token)
    await store.soft_delete_agent(C)  # as another node's agent-uuid_delete would
    await hub.flush_seen()
    assert await listed(server) == []  # the upload before the delete does not count
    await asyncio.sleep(0.01)
    await upload_unsubscribed(server, C, token)
    assert await listed(server) == []  # known here: written with the next flush
    await hub.flush_seen()
    assert await listed(server) == [C]


async def test_listing_needs_a_list_permission_and_shows_what_it_covers(server: Server) -> None:
    """Global list permissions show all agents; agent-scoped ones those also otherwise operable."""
    for agent_uuid in (A, B, C):
        async with ScriptedAgent(
            server.ws_url, await add_token(server, agent_token_limits(agent_uuid)), agent_uuid
        ):
            pass
    everyone = [A, B, C]
    for permission in (
        {"node_get": "list_all_agent_uuid"},
        {"monitoring_uuid": "list"},
        {"agent": "list"},
    ):
        token = await add_token(server, [{"scopes": ["global"], "permissions": [permission]}])
        reply = await server.call("nodeget-server_list_all_agent_uuid", token)
        assert reply == {"uuids": everyone}, permission
    caller = await add_token(
        server,
        [
            {
                "scopes": [{"agent_uuid": A}, {"agent_uuid": B}],
                "permissions": [{"monitoring_uuid": "list"}, {"task": {"read": "*"}}],
            },
            {"scopes": [{"agent_uuid": C}], "permissions": [{"monitoring_uuid": "list"}]},
        ],
    )
    assert await server.call("nodeget-server_list_all_agent_uuid", caller) == {"uuids": [A, B]}
    message = await failed(server, 102, "agent-uuid_list_all", caller)
    assert "monitoring_uuid.list with global scope" in message

    nothing = await add_token(server, [{"scopes": ["global"], "permissions": [{"task": "listen"}]}])
    for method in (
        "nodeget-server_list_all_agent_uuid",
        "agent-uuid_list_all",
        "agent-uuid_list_all_with_agent_mode",
    ):
        await failed(server, 102, method, nothing)
    lister = await add_token(
        server, [{"scopes": ["global"], "permissions": [{"monitoring_uuid": "list"}]}]
    )
    assert await server.call("agent-uuid_list_all", lister) == everyone
    assert "monitoring_uuid.delete" in await failed(server, 102, "agent-uuid_delete", lister, A)
    deleter = await add_token(
        server, [{"scopes": ["global"], "permissions": [{"monitoring_uuid": "delete"}]}]
    )
    assert (await server.call("agent-uuid_delete", deleter, A))["success"] is True
    await failed(server, 102, "agent-uuid_list_all", deleter)
    assert await server.call("agent-uuid_list_all", lister) == [B, C]


async def test_a_bad_agent_uuid_names_the_param(server: Server) -> None:
    """agent-uuid_delete with something that is not a UUID is -32602 naming agent_uuid."""
    message = await failed(server, -32602, "agent-uuid_delete", server.super_token, "nope")
    assert "agent_uuid" in message


async def test_the_version_needs_no_token_and_has_nodegets_fields(server: Server) -> None:
    """nodeget-server_version answers NodeGet's version fields, all strings, without a token."""
    version = await server.call("nodeget-server_version")
    assert version["version"] == __version__
    # the NodeGet protocol level: NodeGet-board refuses to delete nodes below 0.3.3
    major, minor, patch = (int(part) for part in version["cargo_version"].split("."))
    assert (major, minor, patch) >= (0, 3, 3)
    assert version["binary_type"] == "Server"
    for field in (
        "build_time",
        "cargo_target_triple",
        "git_branch",
        "git_commit_sha",
        "git_commit_date",
        "git_commit_message",
        "rustc_channel",
        "rustc_version",
        "rustc_commit_date",
        "rustc_commit_hash",
        "rustc_llvm_version",
    ):
        assert isinstance(version[field], str) and version[field], field
    assert await server.call("server_version") == version


async def test_tokens_store_nodegets_agent_and_monitoring_permissions(server: Server) -> None:
    """token_create accepts NodeGet's agent, KV and monitoring permissions and keeps them."""
    limits = [
        {
            "scopes": [{"agent_uuid": A}, {"kv_namespace": A}],
            "permissions": [
                {"static_monitoring": "write"},
                {"static_monitoring": {"read": "cpu"}},
                {"dynamic_monitoring": "delete"},
                {"dynamic_monitoring": {"read": "network"}},
                {"dynamic_monitoring_summary": "read"},
                {"dynamic_monitoring_summary": {"read": "cpu_usage"}},
                {"node_get": "list_all_agent_uuid"},
                {"monitoring_uuid": "list"},
                {"kv": "list_all_keys"},
                {"kv": {"read": "metadata_*"}},
            ],
        }
    ]
    issued = await server.su("token_create", {"token_limit": limits})
    token = f"{issued['key']}:{issued['secret']}"
    assert (await server.call("token_get", token))["token_limit"] == limits
    bad = [{"scopes": ["global"], "permissions": [{"static_monitoring": {"read": "ram"}}]}]
    message = await failed(server, -32602, "token_create", server.super_token, {"token_limit": bad})
    assert "static_monitoring" in message and "'cpu', 'system' or 'gpu'" in message
    unknown = [{"scopes": ["global"], "permissions": [{"js_worker": "create"}]}]
    message = await failed(
        server, -32602, "token_create", server.super_token, {"token_limit": unknown}
    )
    assert "unknown permission" in message
