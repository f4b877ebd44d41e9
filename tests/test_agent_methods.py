"""Agent methods end to end: NodeGet's UUID lists, soft delete, the version object, agents
known from any authenticated call, and agent_list's host facts and latest metrics."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid as uuid_module
from pathlib import Path
from typing import Any

import psutil
import pytest
from sqlalchemy import select

from taskd import __version__
from taskd.agent.monitor import Monitor
from taskd.config import parse_agent_config
from taskd.roles import role_limits
from taskd.store import task_t
from tests.agent.test_client import running_agent
from tests.helpers import (
    RpcError,
    ScriptedAgent,
    Server,
    add_token,
    agent_token_limits,
    wait_for,
)

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
        "timestamp": time.time_ns() // 1_000_000,
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


# --------------------------------------------------------------------------- host facts

LISTER = [{"scopes": ["global"], "permissions": [{"agent": "list"}]}]
READ_ALL = [
    {"static_monitoring": {"read": "cpu"}},
    {"static_monitoring": {"read": "system"}},
    {"dynamic_monitoring_summary": "read"},
]


def host_static(agent_uuid: str, now_ms: int, **system: Any) -> dict[str, Any]:
    """This host's static report as the agent's Monitor makes it, with ``system`` overrides
    (and a data hash of its own, so a changed report is stored)."""
    static = Monitor(agent_uuid, clock=lambda: now_ms / 1000).static()
    static["system"].update(system)
    if system:
        static["data_hash"] = [(byte + len(str(system))) % 256 for byte in static["data_hash"]]
    return static


def summary(agent_uuid: str, time_ms: int, **figures: Any) -> dict[str, Any]:
    """A NodeGet-format summary: cpu_usage and loads in tenths, sizes in bytes."""
    return {
        "uuid": agent_uuid,
        "time": time_ms,
        "cpu_usage": 425,
        "used_memory": 3 << 30,
        "total_memory": 8 << 30,
        "used_swap": 0,
        "total_swap": 1 << 30,
        "total_space": 100 << 30,
        "available_space": 40 << 30,
        "receive_speed": 2048,
        "transmit_speed": 1024,
        "load_one": 12,
        "load_five": 8,
        "load_fifteen": 5,
        "uptime": 86_400,
        "process_count": 120,
        **figures,
    }


async def report(server: Server, agent_uuid: str, *reports: tuple[str, dict[str, Any]]) -> None:
    """Send reports with the agent's own token; each must be stored."""
    token = await add_token(server, agent_token_limits(agent_uuid))
    for method, data in reports:
        assert await server.call(method, token, data) == {"status": "stored"}, method


async def test_agent_list_shows_host_facts_and_the_newest_metrics(server: Server) -> None:
    """agent_list carries each agent's facts from its newest static report and figures from
    its newest summary (values, not tenths); an agent that reported nothing has nulls."""
    now = server.clock.now_ms()
    static = host_static(A, now - 5000)
    newer = host_static(A, now - 4000, system_host_name="web-1", virtualization="kvm")
    await report(
        server,
        A,
        ("agent_report_static", static),
        ("agent_report_static", newer),
        ("agent_report_dynamic_summary", summary(A, now - 1000)),
        ("agent_report_dynamic_summary", summary(A, now - 2000, cpu_usage=999)),
    )
    token_b = await add_token(server, agent_token_limits(B))
    async with ScriptedAgent(server.ws_url, token_b, B):
        by_uuid = {agent["uuid"]: agent for agent in await server.su("agent_list")}
    system, cpu = newer["system"], newer["cpu"]
    assert by_uuid[A]["host"] == {
        "time": now - 4000,
        "hostname": "web-1",
        "os": system["system_name"],
        "os_version": system["system_os_version"],
        "os_long_version": system["system_os_long_version"],
        "kernel": system["system_kernel"],
        "arch": system["arch"],
        "virtualization": "kvm",
        "cpu_brand": cpu["per_core"][0]["brand"],
        "cpu_cores": cpu["logical_cores"],
        "cpu_physical_cores": cpu["physical_cores"],
    }
    assert by_uuid[A]["metrics"] == {
        "time": now - 1000,
        "cpu_usage": 42.5,
        "used_memory": 3 << 30,
        "total_memory": 8 << 30,
        "used_swap": 0,
        "total_swap": 1 << 30,
        "total_space": 100 << 30,
        "available_space": 40 << 30,
        "receive_speed": 2048,
        "transmit_speed": 1024,
        "load_one": 1.2,
        "load_five": 0.8,
        "load_fifteen": 0.5,
        "uptime": 86_400,
    }
    assert by_uuid[A]["online"] is False
    assert by_uuid[B]["online"] is True
    assert by_uuid[B]["host"] is None and by_uuid[B]["metrics"] is None


async def test_a_running_agents_host_shows_in_agent_list(server: Server, tmp_path: Path) -> None:
    """A real taskd agent's own reports fill agent_list: this machine's hostname and CPU
    count, memory and disk totals, online."""
    agent_uuid = str(uuid_module.uuid4())
    token = await add_token(server, role_limits("agent", agents=[agent_uuid]))
    settings = parse_agent_config(
        f'agent_uuid = "{agent_uuid}"\n'
        "dynamic_summary_report_interval_ms = 100\n"
        f'[[server]]\nname = "s"\nws_url = "{server.ws_url}"\ntoken = "{token}"\n'
    )

    async def reported() -> Any:
        [agent] = await server.su("agent_list") or [None]
        return agent if agent and agent["host"] and agent["metrics"] else None

    async with running_agent(settings, tmp_path / "state"):
        agent = await wait_for(reported, timeout=15)
    assert agent["uuid"] == agent_uuid and agent["online"] is True
    assert agent["host"]["hostname"] == socket.gethostname()
    assert agent["host"]["cpu_cores"] == psutil.cpu_count()
    assert agent["metrics"]["total_memory"] == psutil.virtual_memory().total
    assert agent["metrics"]["total_space"] > 0 and 0 <= agent["metrics"]["cpu_usage"] <= 100


async def test_host_facts_and_metrics_need_their_read_permissions(server: Server) -> None:
    """Without monitoring reads agent_list has no host or metrics; each static part and each
    summary figure shows only where the token may read it, agent by agent."""
    now = server.clock.now_ms()
    for agent_uuid in (A, B):
        await report(
            server,
            agent_uuid,
            ("agent_report_static", host_static(agent_uuid, now - 3000)),
            ("agent_report_dynamic_summary", summary(agent_uuid, now - 1000)),
        )

    async def listing(limits: list[dict[str, Any]]) -> dict[str, Any]:
        token = await add_token(server, limits)
        return {agent["uuid"]: agent for agent in await server.call("agent_list", token)}

    plain = await listing(LISTER)
    assert [(a["host"], a["metrics"]) for a in plain.values()] == [(None, None), (None, None)]
    full = await listing([{"scopes": ["global"], "permissions": [{"agent": "list"}, *READ_ALL]}])
    assert all(a["host"]["hostname"] and a["metrics"]["total_memory"] for a in full.values())

    system_only = await listing(
        [
            {
                "scopes": ["global"],
                "permissions": [
                    {"agent": "list"},
                    {"static_monitoring": {"read": "system"}},
                    {"dynamic_monitoring_summary": {"read": "cpu_usage"}},
                ],
            }
        ]
    )
    host = system_only[A]["host"]
    assert host["hostname"] == full[A]["host"]["hostname"] and host["cpu_brand"] is None
    assert host["cpu_cores"] is None
    metrics = system_only[A]["metrics"]
    assert metrics["cpu_usage"] == 42.5
    assert {name for name, value in metrics.items() if value is not None} == {"time", "cpu_usage"}

    only_a = await listing([*LISTER, {"scopes": [{"agent_uuid": A}], "permissions": READ_ALL}])
    assert only_a[A]["host"] == full[A]["host"] and only_a[A]["metrics"] == full[A]["metrics"]
    assert only_a[B]["host"] is None and only_a[B]["metrics"] is None


async def test_host_strings_are_answered_as_sent(server: Server) -> None:
    """A hostname with escape sequences and control characters is data: agent_list answers
    it unchanged (JSON-escaped), and a non-string where a string belongs is null."""
    hostile = "evil\x1b[2J\x1b]0;owned\x07\r\nhost\u202e"
    now = server.clock.now_ms()
    await report(
        server,
        A,
        ("agent_report_static", host_static(A, now, system_host_name=hostile, arch=["x"])),
    )
    response = await server.request("agent_list", [server.super_token])
    [agent] = response["result"]
    assert agent["host"]["hostname"] == hostile
    assert agent["host"]["arch"] is None
