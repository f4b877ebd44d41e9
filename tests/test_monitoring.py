"""Host monitoring end to end: agents' reports stored after commit, NodeGet's queries,
multi-last queries and deletes, with their permission checks, on SQLite and PostgreSQL.

Reports come from the agent's own ``Monitor`` (what ``taskd agent`` sends), so the
shapes are those a real agent produces.
"""

from __future__ import annotations

import asyncio
import copy
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest

from taskd.agent.monitor import Monitor, summarize
from taskd.config import parse_agent_config
from taskd.protocol import SUMMARY_FIELDS
from taskd.roles import role_limits
from taskd.store.point_cache import ENTRY_OVERHEAD, Chart, PointCache, Seen
from tests.agent.test_client import running_agent
from tests.helpers import (
    RpcError,
    Server,
    add_token,
    make_settings,
    running_server,
    wait_for,
)
from tests.test_scheduler import next_minute

A = str(uuid.uuid4())
B = str(uuid.uuid4())
WRITE = [
    {"static_monitoring": "write"},
    {"dynamic_monitoring": "write"},
    {"dynamic_monitoring_summary": "write"},
]


def reporter_limits(agent_uuid: str) -> list[dict[str, Any]]:
    """An agent token's monitoring limits: write every kind of report for its own UUID."""
    return [{"scopes": [{"agent_uuid": agent_uuid}], "permissions": WRITE}]


async def failed(server: Server, code: int, method: str, *params: Any, **named: Any) -> str:
    """Call ``method``, require error ``code``, return its message."""
    with pytest.raises(RpcError) as error:
        await server.call(method, *params, **named)
    assert error.value.code == code, (method, error.value.message)
    return str(error.value.message)


def reports(agent_uuid: str, now_ms: int) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Static, dynamic and summary reports of this host as the agent makes them, at ``now_ms``."""
    monitor = Monitor(agent_uuid, clock=lambda: now_ms / 1000)
    dynamic = monitor.dynamic()
    return monitor.static(), dynamic, summarize(dynamic)


def summary_at(agent_uuid: str, time_ms: int, cpu_tenths: int = 123) -> dict[str, Any]:
    """A small NodeGet-format summary (only some figures, as NodeGet allows)."""
    return {
        "uuid": agent_uuid,
        "time": time_ms,
        "cpu_usage": cpu_tenths,
        "load_one": 15,
        "used_memory": 1 << 30,
        "total_memory": 1 << 32,
    }


async def query_summary(server: Server, *condition: Any, fields: Any = ()) -> list[Any]:
    """agent_query_dynamic_summary with the super token."""
    query = {"fields": list(fields), "condition": list(condition)}
    result: list[Any] = await server.su("agent_query_dynamic_summary", query)
    return result


async def test_an_agents_reports_are_stored_and_read_back(server: Server) -> None:
    """Static, dynamic and summary reports made by the agent's Monitor are acknowledged as
    stored, read back as sent (summary tenths as values), and make the agent known."""
    token = await add_token(server, reporter_limits(A))
    now = server.clock.now_ms()
    static, dynamic, summary = reports(A, now)

    assert await server.call("agent_report_static", token, static) == {"status": "stored"}
    assert await server.call("agent_report_static", token, {**static, "time": now + 1}) == {
        "status": "skipped",
        "reason": "duplicate_hash",
    }
    assert await server.call("agent_report_dynamic", token, dynamic) == {"status": "stored"}
    reply = await server.call(
        "agent_report_dynamic_summary", token=token, dynamic_monitoring_summary_data=summary
    )
    assert reply == {"status": "stored"}

    [row] = await server.su(
        "agent_query_static", {"fields": ["cpu", "system", "gpu"], "condition": [{"uuid": A}]}
    )
    assert row == {
        "uuid": A,
        "timestamp": now,
        "cpu": static["cpu"],
        "system": static["system"],
        "gpu": static["gpu"],
    }
    [row] = await server.su(
        "agent_query_dynamic", {"fields": ["ram", "disk", "network"], "condition": ["last"]}
    )
    assert row == {
        "uuid": A,
        "timestamp": now,
        "ram": dynamic["ram"],
        "disk": dynamic["disk"],
        "network": dynamic["network"],
    }
    [row] = await query_summary(server, {"uuid": A})
    assert row["timestamp"] == now
    assert row["cpu_usage"] == summary["cpu_usage"] / 10
    assert row["load_one"] == summary["load_one"] / 10
    assert row["used_memory"] == summary["used_memory"]
    assert row["tcp_connections"] == summary["tcp_connections"]
    assert len(row) == 2 + 23

    changed = copy.deepcopy(static)
    changed["system"]["system_host_name"] = "renamed"
    changed["data_hash"] = [(b + 1) % 256 for b in static["data_hash"]]
    assert await server.call("agent_report_static", token, changed) == {"status": "stored"}
    rows = await server.su("agent_query_static", {"fields": ["system"], "condition": []})
    assert [r["system"]["system_host_name"] for r in rows] == [
        static["system"]["system_host_name"],
        "renamed",
    ]
    listed = await server.su("agent_list")
    assert A in [agent["uuid"] for agent in listed]


async def test_a_report_for_an_agent_the_token_does_not_cover_is_refused(server: Server) -> None:
    """102 for a report on another agent's UUID or without the write permission; nothing stored."""
    token = await add_token(server, reporter_limits(A))
    static, dynamic, summary = reports(B, server.clock.now_ms())
    for method, data in (
        ("agent_report_static", static),
        ("agent_report_dynamic", dynamic),
        ("agent_report_dynamic_summary", summary),
    ):
        message = await failed(server, 102, method, token, data)
        assert B in message
    only_static = await add_token(
        server, [{"scopes": [{"agent_uuid": A}], "permissions": [{"static_monitoring": "write"}]}]
    )
    message = await failed(
        server, 102, "agent_report_dynamic_summary", only_static, summary_at(A, 1)
    )
    assert "dynamic_monitoring_summary.write" in message
    assert await query_summary(server) == []
    assert await server.su("agent_query_static", {"fields": [], "condition": []}) == []


async def test_a_malformed_report_is_refused_naming_the_field(server: Server) -> None:
    """-32602 names what is wrong: a missing part, a string for a number, an unknown field."""
    token = await add_token(server, reporter_limits(A))
    static, dynamic, _ = reports(A, server.clock.now_ms())
    broken = copy.deepcopy(dynamic)
    del broken["ram"]["used_memory"]
    message = await failed(server, -32602, "agent_report_dynamic", token, broken)
    assert "ram.used_memory" in message
    broken = copy.deepcopy(dynamic)
    broken["network"]["tcp_connections"] = "many"
    message = await failed(server, -32602, "agent_report_dynamic", token, broken)
    assert "network.tcp_connections" in message
    message = await failed(
        server, -32602, "agent_report_dynamic_summary", token, {**summary_at(A, 1), "cpu": 5}
    )
    assert "cpu" in message
    message = await failed(
        server, -32602, "agent_report_static", token, {**static, "uuid": "not-a-uuid"}
    )
    assert "uuid" in message
    assert await query_summary(server) == []


async def test_absurd_values_are_refused_and_nothing_is_stored(server: Server) -> None:
    """108 for negative sizes, out-of-range figures and times over 5 minutes ahead of the
    server's clock; the same report is stored once the server's clock has caught up."""
    token = await add_token(server, reporter_limits(A))
    now = server.clock.now_ms()
    _, dynamic, _ = reports(A, now)
    negative = copy.deepcopy(dynamic)
    negative["disk"] = [{**dynamic["disk"][0], "total_space": -1}] if dynamic["disk"] else []
    negative["ram"]["total_memory"] = -5
    message = await failed(server, 108, "agent_report_dynamic", token, negative)
    assert "total" in message and "negative" in message
    message = await failed(
        server,
        108,
        "agent_report_dynamic_summary",
        token,
        {**summary_at(A, now), "cpu_usage": 1001},
    )
    assert "cpu_usage" in message
    future = summary_at(A, now + 10 * 60 * 1000)
    message = await failed(server, 108, "agent_report_dynamic_summary", token, future)
    assert "ahead" in message
    assert await query_summary(server) == []
    assert await server.su("agent_query_dynamic", {"fields": [], "condition": []}) == []

    server.clock.advance(10 * 60)
    assert await server.call("agent_report_dynamic_summary", token, future) == {"status": "stored"}
    assert [r["timestamp"] for r in await query_summary(server)] == [future["time"]]


async def test_conditions_select_and_order_rows_as_nodeget(server: Server) -> None:
    """Time bounds are inclusive, limit/last give the newest rows newest first, no limit gives
    rows oldest first, conditions AND together, and a resent report is stored once."""
    token_a = await add_token(server, reporter_limits(A))
    token_b = await add_token(server, reporter_limits(B))
    for second in range(10):
        await server.call("agent_report_dynamic_summary", token_a, summary_at(A, 1000 * second))
        await server.call("agent_report_dynamic_summary", token_b, summary_at(B, 1000 * second))
    await server.call("agent_report_dynamic_summary", token_a, summary_at(A, 3000, 999))

    def times(rows: list[Any]) -> list[int]:
        return [row["timestamp"] for row in rows]

    assert times(await query_summary(server, {"uuid": A})) == [1000 * s for s in range(10)]
    assert times(await query_summary(server, {"uuid": A}, {"timestamp_from_to": [2000, 4000]})) == [
        2000,
        3000,
        4000,
    ]
    assert times(
        await query_summary(server, {"uuid": A}, {"timestamp_from": 5000}, {"timestamp_to": 6000})
    ) == [5000, 6000]
    assert times(await query_summary(server, {"uuid": B}, {"limit": 3})) == [9000, 8000, 7000]
    assert times(await query_summary(server, {"uuid": B}, "last")) == [9000]
    assert times(await query_summary(server, {"uuid": B}, {"last": None})) == [9000]
    assert len(await query_summary(server, {"limit": 20_000})) == 20
    assert await query_summary(server, {"uuid": A}, {"uuid": B}) == []
    [row] = await query_summary(server, {"uuid": A}, {"timestamp_from_to": [3000, 3000]})
    assert row["cpu_usage"] == 12.3  # the first report for that time is kept
    [row] = await query_summary(server, {"uuid": A}, "last", fields=["cpu_usage"])
    assert row == {"uuid": A, "timestamp": 9000, "cpu_usage": 12.3}
    storage = await query_summary(server, {"storage_time_from": server.clock.now_ms() + 60_000})
    assert storage == []

    message = await failed(
        server, -32602, "agent_query_dynamic_summary", server.super_token, {"condition": ["first"]}
    )
    assert "condition.0" in message
    message = await failed(
        server,
        -32602,
        "agent_query_dynamic_summary",
        server.super_token,
        {"fields": ["cpu"], "condition": []},
    )
    assert "fields" in message


async def test_reads_need_each_field_on_each_agent(server: Server) -> None:
    """A query needs read on every field asked (one field when none is asked) on the agent
    named, or the global scope when no agent is named; multi-last needs it on every agent."""
    reporter = await add_token(server, reporter_limits(A))
    static, dynamic, _ = reports(A, server.clock.now_ms())
    await server.call("agent_report_dynamic", reporter, dynamic)
    await server.call("agent_report_static", reporter, static)
    cpu_on_a = await add_token(
        server,
        [{"scopes": [{"agent_uuid": A}], "permissions": [{"dynamic_monitoring": {"read": "cpu"}}]}],
    )

    def query(fields: list[str], *condition: Any) -> dict[str, Any]:
        return {"fields": fields, "condition": list(condition)}

    [row] = await server.call("agent_query_dynamic", cpu_on_a, query(["cpu"], {"uuid": A}))
    assert row["cpu"] == dynamic["cpu"]
    [row] = await server.call("agent_query_dynamic", cpu_on_a, query([], {"uuid": A}))
    assert row == {"uuid": A, "timestamp": dynamic["time"]}
    message = await failed(
        server, 102, "agent_query_dynamic", cpu_on_a, query(["cpu", "ram"], {"uuid": A})
    )
    assert "dynamic_monitoring.read(ram)" in message
    message = await failed(server, 102, "agent_query_dynamic", cpu_on_a, query(["cpu"]))
    assert "global scope" in message
    await failed(server, 102, "agent_query_dynamic", cpu_on_a, query(["cpu"], {"uuid": B}))
    await failed(server, 102, "agent_query_static", cpu_on_a, query([], {"uuid": A}))
    await failed(server, 102, "agent_query_dynamic", reporter, query([], {"uuid": A}))
    await failed(server, 102, "agent_query_dynamic_summary", cpu_on_a, query([], {"uuid": A}))

    rows = await server.call(
        "agent_dynamic_data_multi_last_query", token=cpu_on_a, uuids=[A], fields=["cpu"]
    )
    assert [r["uuid"] for r in rows] == [A]
    await failed(server, 102, "agent_dynamic_data_multi_last_query", cpu_on_a, [A, B], ["cpu"])
    await failed(server, 102, "agent_dynamic_data_multi_last_query", cpu_on_a, [A], ["ram"])

    summary_cpu = await add_token(
        server,
        [
            {
                "scopes": ["global"],
                "permissions": [{"dynamic_monitoring_summary": {"read": "cpu_usage"}}],
            }
        ],
    )
    await server.call("agent_query_dynamic_summary", summary_cpu, query(["cpu_usage"]))
    await failed(server, 102, "agent_query_dynamic_summary", summary_cpu, query([]))
    summary_all = await add_token(
        server, [{"scopes": ["global"], "permissions": [{"dynamic_monitoring_summary": "read"}]}]
    )
    assert await server.call("agent_query_dynamic_summary", summary_all, query([])) == []
    # a field read on the global scope holds on every agent; one read on A only on A
    mixed = await add_token(
        server,
        [
            {
                "scopes": ["global"],
                "permissions": [{"dynamic_monitoring_summary": {"read": "cpu_usage"}}],
            },
            {
                "scopes": [{"agent_uuid": A}],
                "permissions": [{"dynamic_monitoring_summary": {"read": "used_memory"}}],
            },
        ],
    )
    last = "agent_dynamic_summary_multi_last_query"
    assert await server.call(last, mixed, [A, B], ["cpu_usage"]) == []
    assert await server.call(last, mixed, [A, A], ["cpu_usage", "used_memory"]) == []
    message = await failed(server, 102, last, mixed, [A, B], ["used_memory", "cpu_usage"])
    assert f"read(used_memory) on agent {B}" in message


async def test_multi_last_answers_the_newest_row_of_each_agent(server: Server) -> None:
    """The three multi-last queries give each listed agent's newest row, in the order asked,
    leave out agents without one, and answer [] for no agents."""
    token_a = await add_token(server, reporter_limits(A))
    token_b = await add_token(server, reporter_limits(B))
    now = server.clock.now_ms()
    for offset in (0, 1000, 2000):
        static, dynamic, summary = reports(A, now + offset)
        if offset == 0:
            await server.call("agent_report_static", token_a, static)
        await server.call("agent_report_dynamic", token_a, dynamic)
        await server.call("agent_report_dynamic_summary", token_a, summary)
    await server.call("agent_report_dynamic_summary", token_b, summary_at(B, now + 500, 77))
    missing = str(uuid.uuid4())

    rows = await server.su("agent_dynamic_summary_multi_last_query", [B, missing, A], [])
    assert [(r["uuid"], r["timestamp"]) for r in rows] == [(B, now + 500), (A, now + 2000)]
    assert rows[0]["cpu_usage"] == 7.7
    rows = await server.su("agent_dynamic_data_multi_last_query", [A, B], ["load"])
    assert [(r["uuid"], r["timestamp"], set(r)) for r in rows] == [
        (A, now + 2000, {"uuid", "timestamp", "load"})
    ]
    rows = await server.su("agent_static_data_multi_last_query", [A], ["cpu"])
    assert [(r["uuid"], r["timestamp"]) for r in rows] == [(A, now)]
    assert await server.su("agent_static_data_multi_last_query", [], ["cpu"]) == []


async def test_deletes_remove_the_rows_their_conditions_select(server: Server) -> None:
    """Deletes answer how many rows went; last/limit delete the newest; a token needs the
    delete permission on the agent (global without a uuid condition)."""
    token_a = await add_token(server, reporter_limits(A))
    token_b = await add_token(server, reporter_limits(B))
    for second in range(5):
        await server.call("agent_report_dynamic_summary", token_a, summary_at(A, 1000 * second))
        await server.call("agent_report_dynamic_summary", token_b, summary_at(B, 1000 * second))

    assert await server.su("agent_delete_dynamic_summary", [{"uuid": A}, "last"]) == {
        "success": True,
        "deleted": 1,
        "condition_count": 2,
    }
    reply = await server.su("agent_delete_dynamic_summary", [{"timestamp_to": 1000}])
    assert reply["deleted"] == 4
    rows = await query_summary(server)
    assert sorted((r["uuid"], r["timestamp"]) for r in rows) == sorted(
        [(A, 2000), (A, 3000), (B, 2000), (B, 3000), (B, 4000)]
    )
    deleter = await add_token(
        server,
        [
            {
                "scopes": [{"agent_uuid": B}],
                "permissions": [{"dynamic_monitoring_summary": "delete"}],
            }
        ],
    )
    await failed(server, 102, "agent_delete_dynamic_summary", deleter, [{"uuid": A}])
    await failed(server, 102, "agent_delete_dynamic_summary", deleter, [])
    await failed(server, 102, "agent_delete_dynamic", deleter, [{"uuid": B}])
    reply = await server.call("agent_delete_dynamic_summary", deleter, [{"uuid": B}])
    assert reply["deleted"] == 3
    assert (await server.su("agent_delete_static", []))["deleted"] == 0
    assert len(await query_summary(server)) == 2


async def test_a_running_agent_reports_to_the_server(server: Server, tmp_path: Path) -> None:
    """A real agent with an agent-role token reports its host; the server stores its static
    report once, its dynamic reports and its summaries, and lists the agent."""
    agent_uuid = str(uuid.uuid4())
    token = await add_token(server, role_limits("agent", agents=[agent_uuid]))
    settings = parse_agent_config(
        f'agent_uuid = "{agent_uuid}"\n'
        "dynamic_summary_report_interval_ms = 100\n"
        "dynamic_report_interval_ms = 200\n"
        f'[[server]]\nname = "s"\nws_url = "{server.ws_url}"\ntoken = "{token}"\n'
    )

    async def summaries() -> list[Any] | None:
        rows = await query_summary(server, {"uuid": agent_uuid})
        return rows if len(rows) >= 3 else None

    async with running_agent(settings, tmp_path / "state"):
        rows = await wait_for(summaries, timeout=15)
        dynamic = await wait_for(
            lambda: server.su(
                "agent_query_dynamic",
                {"fields": ["cpu", "ram"], "condition": [{"uuid": agent_uuid}]},
            ),
            timeout=15,
        )
    assert all(row["total_memory"] > 0 and 0 <= row["cpu_usage"] <= 100 for row in rows)
    assert dynamic[0]["ram"]["total_memory"] == rows[0]["total_memory"]
    static = await server.su(
        "agent_query_static", {"fields": ["system"], "condition": [{"uuid": agent_uuid}]}
    )
    assert len(static) == 1 and static[0]["system"]["system_host_name"]
    assert agent_uuid in [agent["uuid"] for agent in await server.su("agent_list")]


async def test_rollups_keep_min_avg_max_per_minute_and_hour(server: Server) -> None:
    """Summaries seeded across months roll up into 1-minute and 1-hour buckets as they are
    stored (a resend counts once, a missing figure is left out of its average), and summary
    queries answer from the resolution asked, or for ``auto`` the one fitting ~500 points."""
    token = await add_token(server, reporter_limits(A))
    hour = 3_600_000
    start = server.clock.now_ms() // hour * hour - 90 * 24 * hour  # three months ago
    # minute 0: cpu 10%, 20%, 30%; minute 1: 50%, 70%; then one report a month later
    seeded = [(0, 100), (20_000, 200), (40_000, 300), (60_000, 500), (80_000, 700)]
    for offset, cpu in seeded:
        summary = {**summary_at(A, start + offset, cpu), "gpu_usage": 40 if cpu == 100 else None}
        await server.call("agent_report_dynamic_summary", token, summary)
    await server.call("agent_report_dynamic_summary", token, summary_at(A, start + 20_000, 900))
    twice = summary_at(A, start + 50_000, 200)  # sent twice at once: stored and counted once
    await asyncio.gather(
        *(server.call("agent_report_dynamic_summary", token, twice) for _ in range(2))
    )
    month_later = start + 30 * 24 * hour
    await server.call("agent_report_dynamic_summary", token, summary_at(A, month_later, 400))

    def query(resolution: str, low: int, high: int) -> dict[str, Any]:
        return {
            "fields": ["cpu_usage", "gpu_usage"],
            "condition": [{"uuid": A}, {"timestamp_from_to": [low, high]}],
            "resolution": resolution,
        }

    minutes = await server.su("agent_query_dynamic_summary", query("1m", start, start + hour))
    assert [
        (m["timestamp"], m["cpu_usage_min"], m["cpu_usage"], m["cpu_usage_max"]) for m in minutes
    ] == [
        (start, 10.0, 20.0, 30.0),
        (start + 60_000, 50.0, 60.0, 70.0),
    ]
    assert minutes[0]["gpu_usage"] == 40 and minutes[1]["gpu_usage"] is None
    assert {m["resolution"] for m in minutes} == {"1m"}
    hours = await server.su("agent_query_dynamic_summary", query("1h", start, month_later))
    assert [
        (h["timestamp"], h["cpu_usage_min"], h["cpu_usage"], h["cpu_usage_max"]) for h in hours
    ] == [
        (start, 10.0, pytest.approx(200 / 6), 70.0),
        (month_later, 40.0, 40.0, 40.0),
    ]
    raw = await server.su("agent_query_dynamic_summary", query("raw", start, start + hour))
    assert [r["cpu_usage"] for r in raw] == [10.0, 20.0, 30.0, 20.0, 50.0, 70.0]

    auto_month = await server.su("agent_query_dynamic_summary", query("auto", start, month_later))
    assert {r["resolution"] for r in auto_month} == {"1h"}
    day = 24 * hour
    # three months ago raw rows (4 h) and 1-minute rollups (2 days) are past retention
    auto_old = await server.su("agent_query_dynamic_summary", query("auto", start, start + hour))
    assert {r["resolution"] for r in auto_old} == {"1h"}
    now = server.clock.now_ms()
    recent = summary_at(A, now - 60_000, 250)
    await server.call("agent_report_dynamic_summary", token, recent)
    auto_day = await server.su("agent_query_dynamic_summary", query("auto", now - day, now))
    assert [(r["resolution"], r["cpu_usage"]) for r in auto_day] == [("1m", 25.0)]
    auto_hour = await server.su("agent_query_dynamic_summary", query("auto", now - hour, now))
    assert auto_hour == [
        {"uuid": A, "timestamp": recent["time"], "cpu_usage": 25.0, "gpu_usage": None}
    ]

    message = await failed(
        server, -32602, "agent_query_dynamic_summary", server.super_token, query("5m", 0, 1)
    )
    assert "resolution" in message
    reader = await add_token(
        server,
        [{"scopes": [{"agent_uuid": B}], "permissions": [{"dynamic_monitoring_summary": "read"}]}],
    )
    await failed(server, 102, "agent_query_dynamic_summary", reader, query("1h", 0, month_later))


async def test_a_backlog_sent_at_once_rolls_up_as_its_summaries_sent_one_by_one(
    server: Server,
) -> None:
    """An agent's several summaries stored together (a backlog flushed in one JSON-RPC
    batch, merged per bucket before they are written) give the same 1-minute and 1-hour
    rollups, every figure, as the same summaries stored one at a time (each written to
    both its buckets by one statement)."""
    start = server.clock.now_ms() // 3_600_000 * 3_600_000 - 2 * 3_600_000
    # across two minutes and two hours, figures moving; one report without a GPU figure
    times = [start + offset for offset in (0, 15_000, 59_000, 60_000, 3_600_000, 3_630_000)]
    rows = []
    for index, time_ms in enumerate(times):
        _, _, summary = reports(A, time_ms)
        rows.append(
            {
                **summary,
                "cpu_usage": 37 * index % 1000,
                "used_memory": (1 << 30) + index * 4096,
                "gpu_usage": None if index == 2 else 10 * index,
            }
        )
    for row in rows:  # one at a time
        await server.su("agent_report_dynamic_summary", row)
    batch = [
        {
            "jsonrpc": "2.0",
            "id": index,
            "method": "agent_report_dynamic_summary",
            "params": [server.super_token, {**row, "uuid": B}],
        }
        for index, row in enumerate(rows)
    ]
    replies = (await server.post(batch)).json()
    assert [reply["result"] for reply in replies] == [{"status": "stored"}] * len(rows)

    async def rollups(agent: str, resolution: str) -> list[dict[str, Any]]:
        query = {
            "fields": list(SUMMARY_FIELDS),
            "condition": [{"uuid": agent}, {"timestamp_from_to": [start, times[-1]]}],
            "resolution": resolution,
        }
        points = await server.su("agent_query_dynamic_summary", query)
        return [{k: v for k, v in point.items() if k != "uuid"} for point in points]

    for resolution, buckets in (("1m", 3), ("1h", 2)):
        one_by_one = await rollups(A, resolution)
        assert len(one_by_one) == buckets
        assert await rollups(B, resolution) == one_by_one
    hours = await rollups(A, "1h")
    assert hours[0]["cpu_usage_min"] == 0.0 and hours[0]["cpu_usage_max"] == 11.1
    assert hours[0]["gpu_usage"] == pytest.approx((0 + 10 + 30) / 3)


async def test_a_chart_asked_again_follows_every_change_to_its_buckets(
    database_url: str,
) -> None:
    """A chart asked again is answered from the points the server keeps encoded, and still
    shows a late summary added to an old bucket, the newest bucket growing, a bucket
    pruned, and a bucket made again after pruning with as many samples as it had."""
    settings = make_settings(
        database_url,
        monitoring_rollup_1h_retention_s=30 * 86400,
        monitoring_prune_interval_s=3600,
    )
    async with running_server(settings) as server:
        token = await add_token(server, reporter_limits(A))
        hour = 3_600_000
        first = server.clock.now_ms() // hour * hour - 20 * 24 * hour  # 20 days ago
        buckets = [first + i * 24 * hour for i in range(4)]  # a bucket a day, 4 days
        for bucket in buckets:
            await server.call("agent_report_dynamic_summary", token, summary_at(A, bucket, 100))
        query = {
            "fields": ["cpu_usage"],
            "condition": [
                {"uuid": A},
                {"timestamp_from_to": [first - 60 * 24 * hour, buckets[-1]]},
            ],
            "resolution": "1h",
        }

        async def chart() -> dict[int, tuple[float, float, float]]:
            points = await server.su("agent_query_dynamic_summary", query)
            assert [p["timestamp"] for p in points] == sorted(p["timestamp"] for p in points)
            return {
                p["timestamp"]: (p["cpu_usage_min"], p["cpu_usage"], p["cpu_usage_max"])
                for p in points
            }

        async def report(time_ms: int, cpu_tenths: int) -> None:
            summary = summary_at(A, time_ms, cpu_tenths)
            await server.call("agent_report_dynamic_summary", token, summary)

        assert await chart() == dict.fromkeys(buckets, (10.0, 10.0, 10.0))
        assert await chart() == dict.fromkeys(buckets, (10.0, 10.0, 10.0))  # kept, the same
        cache = server.service.store.point_cache
        assert cache.size > 0  # the second answer came from what the server kept

        await report(buckets[1] + 1000, 300)  # a late summary into an old bucket
        await report(buckets[3] + 2000, 500)  # the newest bucket grows
        expected = dict.fromkeys(buckets, (10.0, 10.0, 10.0))
        expected[buckets[1]] = (10.0, 20.0, 30.0)
        expected[buckets[3]] = (10.0, 30.0, 50.0)
        assert await chart() == expected
        await report(buckets[3] + 3000, 100)  # only the newest bucket grows: the rest reused
        expected[buckets[3]] = (10.0, 70 / 3, 50.0)
        assert await chart() == expected

        # the oldest bucket passes its retention and is pruned: gone from the chart
        server.clock.advance(10 * 86_400 + 12 * 3600)  # retention now ends 19.5 days back
        assert await server.service.pruner.prune() >= 1
        del expected[buckets[0]]
        assert await chart() == expected
        # a summary of its time comes back (late): a new bucket with as many samples (one)
        await report(buckets[0] + 3000, 900)
        assert await chart() == {buckets[0]: (90.0, 90.0, 90.0), **expected}
        # with a limit: the newest buckets, newest first, from the same kept points
        newest = {**query, "condition": [*query["condition"], {"limit": 2}]}
        points = await server.su("agent_query_dynamic_summary", newest)
        assert [(p["timestamp"], p["cpu_usage"]) for p in points] == [
            (buckets[3], 70 / 3),
            (buckets[2], 10.0),
        ]


def test_kept_charts_stay_within_their_bytes_least_recent_chart_first() -> None:
    """The server's kept charts never pass their byte bound: the chart asked least
    recently is forgotten first, and a bound of 0 keeps nothing."""
    point = b"x" * 838  # in a chart of 4: with the brackets and commas, 1,000 bytes a point

    def chart(buckets: int = 4) -> Chart:
        seen: Seen = [(bucket, bucket, 1) for bucket in range(buckets)]
        return Chart.joined(seen, [point] * buckets)

    assert chart().cost == 4 * (len(point) + 1 + ENTRY_OVERHEAD) + 1
    cache = PointCache(max_bytes=11 * (len(point) + 1 + ENTRY_OVERHEAD))
    for key in ("a", "b"):
        cache.keep(key, chart())
    assert cache.chart("a") is not None  # "a" is now the most recent
    cache.keep("c", chart())  # 12 points: too many
    assert cache.size <= cache.max_bytes
    assert cache.chart("b") is None
    assert cache.chart("a") is not None and cache.chart("c") is not None
    cache.keep("a", chart(buckets=2))  # asked again, smaller: counted as it is now
    assert cache.size == chart().cost + chart(buckets=2).cost
    nothing = PointCache(max_bytes=0)
    nothing.keep("a", chart())
    assert nothing.size == 0 and nothing.chart("a") is None


def test_a_kept_chart_answers_from_its_points_at_their_versions() -> None:
    """A chart made of a kept chart's head and new points is the JSON array of them all,
    and gives each point back only at the version it was kept at."""
    points = [orjson.dumps({"bucket": bucket, "v": "x" * bucket}) for bucket in range(5)]
    seen: Seen = [(bucket, bucket, 1) for bucket in range(5)]  # bucket, identity, samples
    first = Chart.joined(seen, points)
    assert orjson.loads(first.body) == [orjson.loads(p) for p in points]
    assert first.unchanged_head(seen) == 5 and first.unchanged_head(seen[:3]) == 3
    changed: Seen = [*seen[:4], (4, 4, 2)]  # the newest bucket counted one more sample
    assert first.unchanged_head(changed) == 4
    assert first.unchanged_head([*seen[1:], (5, 5, 1)]) == 0  # the window moved on
    newer = orjson.dumps({"bucket": 4, "v": "newer"})
    second = Chart.joined(changed, [newer], first, 4)
    assert orjson.loads(second.body) == [orjson.loads(p) for p in [*points[:4], newer]]
    assert [bytes(second.point(entry) or b"") for entry in changed] == [*points[:4], newer]
    assert second.point((4, 4, 1)) is None and second.point((9, 9, 1)) is None
    shorter = Chart.joined(seen[:2], [], first, 2)
    assert orjson.loads(shorter.body) == [orjson.loads(p) for p in points[:2]]


async def test_retention_prunes_each_table_in_chunks_as_the_clock_moves(
    database_url: str,
) -> None:
    """With the server's clock moved ahead (no waiting), a prune pass deletes the raw rows,
    rollups and superseded static reports past their retention, in chunks smaller than the
    backlog, and keeps what is younger and each agent's newest static report."""
    settings = make_settings(
        database_url,
        monitoring_dynamic_retention_s=60,
        monitoring_summary_retention_s=3600,
        monitoring_rollup_1m_retention_s=86400,
        monitoring_rollup_1h_retention_s=30 * 86400,
        monitoring_static_retention_s=86400,
        monitoring_prune_interval_s=3600,
    )
    async with running_server(settings) as server:
        token = await add_token(server, reporter_limits(A))
        # A whole minute (the summaries share it) and the server's time with it: a raw row is
        # 60 s old only when the test moves the clock, however slowly the reports go in.
        server.clock.advance_to(next_minute(server.clock))
        now = server.clock.now_ms()
        static, dynamic, _ = reports(A, now)
        await server.call("agent_report_static", token, static)
        changed = {**static, "data_hash": [(b + 1) % 256 for b in static["data_hash"]]}
        await server.call("agent_report_static", token, {**changed, "time": now + 1})
        await server.call("agent_report_dynamic", token, dynamic)
        for second in range(25):
            await server.call("agent_report_dynamic_summary", token, summary_at(A, now + second))

        async def count(kind: str, resolution: str = "raw") -> int:
            query: dict[str, Any] = {"fields": [], "condition": [{"uuid": A}]}
            if kind == "summary":
                query["resolution"] = resolution
                return len(await server.su("agent_query_dynamic_summary", query))
            return len(await server.su(f"agent_query_{kind}", query))

        assert await server.service.pruner.prune() == 0
        server.clock.advance(2 * 3600)  # past raw dynamic and summary retention
        pruned = server.service.pruner
        pruned.chunk = 10  # the 25 summaries go in three writes
        assert await pruned.prune() == 1 + 25
        assert (await count("dynamic"), await count("summary")) == (0, 0)
        assert await count("summary", "1m") == 1 and await count("summary", "1h") == 1
        assert await count("static") == 2

        server.clock.advance(2 * 86400)  # past 1-minute rollups and static retention
        assert await pruned.prune() == 2
        assert await count("summary", "1m") == 0 and await count("summary", "1h") == 1
        [kept] = await server.su("agent_query_static", {"fields": [], "condition": []})
        assert kept["timestamp"] == now + 1

        server.clock.advance(30 * 86400)
        assert await pruned.prune() == 1
        assert await count("summary", "1h") == 0 and await count("static") == 1


NODEGET_STATIC: dict[str, Any] = {
    "data_hash": [171, 205, 18, 52, 86, 120, 144, 171, 205, 239, 1, 35, 69, 103, 137, 171],
    "cpu": {
        "physical_cores": 16,
        "logical_cores": 32,
        "per_core": [
            {"id": 1, "name": "CPU 1", "vendor_id": "AuthenticAMD", "brand": "AMD Ryzen 9 8945HX"}
        ],
    },
    "system": {
        "system_name": "Windows",
        "system_kernel": "26200",
        "system_kernel_version": "Windows 11 IoT Enterprise LTSC 2024",
        "system_os_version": "11 (26200)",
        "system_os_long_version": "Windows 11 IoT Enterprise LTSC 2024",
        "distribution_id": "windows",
        "system_host_name": "DESKTOP-BI8T1T9",
        "arch": "x86_64",
        "virtualization": "HyperV",
    },
    "gpu": [{"id": 1, "name": "RTX 5060", "cuda_cores": 3328, "architecture": "Blackwell"}],
}
"""NodeGet's documented StaticMonitoringData example (without uuid and time)."""
NODEGET_DYNAMIC: dict[str, Any] = {
    "cpu": {
        "per_core": [{"id": 1, "cpu_usage": 13.43, "frequency_mhz": 2007}],
        "total_cpu_usage": 4.04,
    },
    "ram": {
        "total_memory": 68501925888,
        "available_memory": 41439596544,
        "used_memory": 27062329344,
        "total_swap": 0,
        "used_swap": 0,
    },
    "load": {"one": 0, "five": 0, "fifteen": 0},
    "system": {"boot_time": 1769337198, "uptime": 6970, "process_count": 313},
    "disk": [
        {
            "kind": "Ssd",
            "name": "",
            "file_system": "NTFS",
            "mount_point": "C:\\",
            "total_space": 322057531392,
            "available_space": 91563786240,
            "is_removable": False,
            "is_read_only": False,
            "read_speed": 35741,
            "write_speed": 49550,
        }
    ],
    "network": {
        "interfaces": [
            {
                "interface_name": "WLAN",
                "total_received": 527863209,
                "total_transmitted": 484144450,
                "receive_speed": 5559,
                "transmit_speed": 1626,
            }
        ],
        "udp_connections": 67,
        "tcp_connections": 165,
    },
    "gpu": [
        {
            "id": 1,
            "used_memory": 2169692160,
            "total_memory": 8546942976,
            "graphics_clock_mhz": 510,
            "sm_clock_mhz": 510,
            "memory_clock_mhz": 405,
            "video_clock_mhz": 622,
            "utilization_gpu": 5,
            "utilization_memory": 30,
            "temperature": 51,
        }
    ],
}
"""NodeGet's documented DynamicMonitoringData example (without uuid and time)."""


async def test_nodegets_documented_reports_are_stored_as_sent(server: Server) -> None:
    """NodeGet's own example reports, sent with named params as its agent does, are stored
    and read back unchanged, and NodeGet-board's multi-last reads find them."""
    token = await add_token(server, role_limits("agent", agents=[A]))
    now = server.clock.now_ms()
    static = {"uuid": A.upper(), "time": now, **NODEGET_STATIC}
    dynamic = {"uuid": A, "time": now, **NODEGET_DYNAMIC}
    reply = await server.call("agent_report_static", token=token, static_monitoring_data=static)
    assert reply == {"status": "stored"}
    reply = await server.call("agent_report_dynamic", token=token, dynamic_monitoring_data=dynamic)
    assert reply == {"status": "stored"}
    [row] = await server.su("agent_static_data_multi_last_query", [A], ["cpu", "system", "gpu"])
    assert row == {
        "uuid": A,
        "timestamp": now,
        **{k: NODEGET_STATIC[k] for k in ("cpu", "system", "gpu")},
    }
    fields = ["cpu", "ram", "load", "system", "disk", "network", "gpu"]
    [row] = await server.su("agent_dynamic_data_multi_last_query", [A], fields)
    assert row == {"uuid": A, "timestamp": now, **NODEGET_DYNAMIC}


async def test_summaries_sent_together_roll_up_together(server: Server) -> None:
    """A JSON-RPC batch of summaries (one writer batch) adds up in its buckets as the
    same summaries sent one by one would: counts, sums, min and max per figure, a missing
    figure left out, the newest of them the agent's latest."""
    token = await add_token(server, reporter_limits(A))
    minute = server.clock.now_ms() // 60_000 * 60_000 - 10 * 60_000
    cpus = [120, 80, 400, 250]
    batch = []
    for index, cpu in enumerate(cpus):
        summary = {**summary_at(A, minute + 1000 * index, cpu), "gpu_usage": 30 + index}
        if index == 1:
            summary["gpu_usage"] = None
        batch.append(
            {
                "jsonrpc": "2.0",
                "method": "agent_report_dynamic_summary",
                "params": [token, summary],
                "id": index,
            }
        )
    replies = (await server.post(batch)).json()
    assert sorted(r["id"] for r in replies) == [0, 1, 2, 3]
    assert all(r["result"] == {"status": "stored"} for r in replies), replies
    window = [{"uuid": A}, {"timestamp_from_to": [minute, minute + 59_999]}]
    for resolution in ("1m", "1h"):
        [bucket] = await server.su(
            "agent_query_dynamic_summary",
            {"fields": ["cpu_usage", "gpu_usage"], "condition": window, "resolution": resolution},
        )
        assert (bucket["cpu_usage_min"], bucket["cpu_usage"], bucket["cpu_usage_max"]) == (
            8.0,
            pytest.approx(21.25),
            40.0,
        )
        assert (bucket["gpu_usage_min"], bucket["gpu_usage"], bucket["gpu_usage_max"]) == (
            30,
            pytest.approx((30 + 32 + 33) / 3),
            33,
        )
    [latest] = await server.su("agent_dynamic_summary_multi_last_query", [A], ["cpu_usage"])
    assert (latest["timestamp"], latest["cpu_usage"]) == (minute + 3000, 25.0)


async def test_the_latest_summary_follows_writes_deletes_and_pruning(database_url: str) -> None:
    """Multi-last answers each agent's newest stored summary: an older report arriving late
    does not replace it, deleting the newest brings back the one before, deleting all or
    pruning past the retention leaves the agent out."""
    settings = make_settings(
        database_url, monitoring_summary_retention_s=3600, monitoring_prune_interval_s=3600
    )
    async with running_server(settings) as server:
        token = await add_token(server, reporter_limits(A))
        token_b = await add_token(server, reporter_limits(B))
        now = server.clock.now_ms()

        async def latest() -> list[tuple[str, int, float]]:
            last = "agent_dynamic_summary_multi_last_query"
            rows = await server.su(last, [A, B], ["cpu_usage"])
            # every field: the point kept with the row (made again where a delete rebuilt
            # it), the same as every field asked in another order, made by the database
            every = await server.su(last, [A, B], [])
            assert every == await server.su(last, [A, B], list(reversed(SUMMARY_FIELDS)))
            assert all(list(r) == ["uuid", "timestamp", *SUMMARY_FIELDS] for r in every)
            assert [r["cpu_usage"] for r in every] == [r["cpu_usage"] for r in rows]
            return [(r["uuid"], r["timestamp"], r["cpu_usage"]) for r in rows]

        for offset, cpu in ((0, 100), (1000, 110), (2000, 120)):
            await server.call(
                "agent_report_dynamic_summary", token, summary_at(A, now + offset, cpu)
            )
        await server.call("agent_report_dynamic_summary", token_b, summary_at(B, now, 300))
        assert await latest() == [(A, now + 2000, 12.0), (B, now, 30.0)]
        await server.call("agent_report_dynamic_summary", token, summary_at(A, now + 500, 990))
        assert await latest() == [(A, now + 2000, 12.0), (B, now, 30.0)]

        await server.su("agent_delete_dynamic_summary", [{"uuid": A}, "last"])
        assert await latest() == [(A, now + 1000, 11.0), (B, now, 30.0)]
        await server.su("agent_delete_dynamic_summary", [{"uuid": A}])
        assert await latest() == [(B, now, 30.0)]

        await server.call("agent_report_dynamic_summary", token, summary_at(A, now + 3000, 130))
        assert await latest() == [(A, now + 3000, 13.0), (B, now, 30.0)]
        server.clock.advance(2 * 3600)  # both agents silent past the summaries' retention
        later = server.clock.now_ms()
        await server.call("agent_report_dynamic_summary", token_b, summary_at(B, later, 310))
        await server.service.pruner.prune()
        assert await latest() == [(B, later, 31.0)]
