"""Crons end to end: a real server, scripted agents over real WebSockets, both databases.

The tests drive the server's cron clock (``Server.clock``): minutely crons fire when a test
moves it to the next whole minute (``tick``), not when real time gets there."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from taskd.auth import ensure_super_token
from taskd.clock import Clock
from taskd.protocol import parse_cron_result_query
from taskd.scheduler import INTERRUPTED, slot_ms
from taskd.store import Store
from tests.helpers import (
    RpcError,
    ScriptedAgent,
    Server,
    add_token,
    make_settings,
    running_server,
    scaled,
    unwrap,
)
from tests.test_scheduler import MINUTELY, move_to, next_minute, refuse_results, until

EVERY_SECOND = "* * * * * *"
NEVER_SOON = "0 0 0 1 1 * 2099"


def align(clock: Clock) -> None:
    """Move ``clock`` one second past a whole minute: no minutely slot comes until ``tick``."""
    clock.advance_to(next_minute(clock) + timedelta(seconds=1))


async def tick(server: Server) -> int:
    """Move the server's clock to the next whole minute and wait until every fire of that slot
    is done (its tasks pushed, its result rows stored); return the slot in ms."""
    scheduler = server.service.scheduler
    slot = next_minute(server.clock)
    await move_to(server.clock, slot)  # APScheduler hands the fires out
    await asyncio.sleep(0)  # each fire starts, counted in scheduler.firing

    await until(lambda: not scheduler.firing, "the fires of the slot")
    return slot_ms(slot)


def agent_cron(uuids: list[str], task: Any = None) -> dict[str, Any]:
    """An agent cron_type running ``task`` (a tcp_ping by default) on ``uuids``."""
    return {"agent": [uuids, {"task": task if task is not None else {"tcp_ping": "127.0.0.1:9"}}]}


async def results_of(server: Server, name: str) -> list[dict[str, Any]]:
    """Every result row of a cron, newest first."""
    rows: list[dict[str, Any]] = await server.su(
        "crontab-result_query", {"condition": [{"cron_name": name}]}
    )
    return rows


def by_slot(rows: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    """Result rows grouped by run_time."""
    slots: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
        slots.setdefault(row["run_time"], []).append(row)
    return slots


async def cron_named(server: Server, name: str) -> dict[str, Any] | None:
    """The crontab_get entry of a cron."""
    crons = await server.su("crontab_get")
    return next((c for c in crons if c["name"] == name), None)


async def test_a_cron_fans_out_to_three_agents_one_offline(server: Server) -> None:
    """At its slot a cron creates a task per online agent and a result row per target."""
    offline = str(uuid.uuid4())
    align(server.clock)
    async with (
        ScriptedAgent(server.ws_url, server.super_token) as first,
        ScriptedAgent(server.ws_url, server.super_token) as second,
    ):
        targets = [first.uuid, second.uuid, offline]
        created = await server.su("crontab_create", "fanout", MINUTELY, agent_cron(targets))
        assert isinstance(created["id"], int)
        slot = await tick(server)
        pushed = [await first.next_task(timeout=2), await second.next_task(timeout=2)]
        rows = by_slot(await results_of(server, "fanout"))[slot]
    assert len(rows) == 3
    run_time = rows[0]["run_time"]
    assert run_time == slot and run_time % 1000 == 0
    by_id = {row["relative_id"]: row for row in rows if row["success"]}
    assert set(by_id) == {task["task_id"] for task in pushed}
    for row in rows:
        assert row["cron_id"] == created["id"] and row["cron_name"] == "fanout"
        assert set(row) == {
            "id",
            "cron_id",
            "cron_name",
            "run_time",
            "relative_id",
            "success",
            "message",
        }
    [failed] = [row for row in rows if not row["success"]]
    assert failed["relative_id"] is None
    assert failed["message"] == f"Agent {offline} is not connected"
    for task, agent in zip(pushed, (first, second), strict=True):
        assert (
            by_id[task["task_id"]]["message"]
            == f"Task {task['task_id']} sent to agent {agent.uuid}"
        )
        assert task["task_event_type"] == {"tcp_ping": "127.0.0.1:9"}
    records = await server.su("task_query_task", {"condition": [{"cron_source": "fanout"}]})
    assert {task["task_id"] for task in pushed} <= {r["task_id"] for r in records}
    assert all(r["cron_source"] == "fanout" for r in records)
    assert {r["uuid"] for r in records} == {first.uuid, second.uuid}
    entry = await cron_named(server, "fanout")
    assert entry is not None and entry["last_run_time"] >= run_time
    await server.su("crontab_delete", "fanout")


async def test_fires_do_not_wait_for_results(server: Server) -> None:
    """An agent that never answers gets a new task every slot; each fire is recorded at once."""
    align(server.clock)
    async with ScriptedAgent(server.ws_url, server.super_token) as silent:
        await server.su("crontab_create", "silent", MINUTELY, agent_cron([silent.uuid], "ip"))
        tasks = []
        for _ in range(3):
            await tick(server)
            tasks.append(await silent.next_task(timeout=2))
        await server.su("crontab_set_enable", "silent", False)
    assert len({t["task_id"] for t in tasks}) == 3
    running = await server.su(
        "task_query_task", {"condition": [{"cron_source": "silent"}, "is_running"]}
    )
    assert {t["task_id"] for t in tasks} <= {r["task_id"] for r in running}
    rows = await results_of(server, "silent")
    assert {t["task_id"] for t in tasks} <= {r["relative_id"] for r in rows}
    slots = sorted(r["run_time"] for r in rows)
    assert len(slots) == len(set(slots)) == 3
    assert all(b - a == 60_000 for a, b in itertools.pairwise(slots))


async def test_create_returns_the_wire_shapes(server: Server) -> None:
    """crontab_create/get/edit/set_enable/delete answer with the exact protocol shapes."""
    agent = str(uuid.uuid4())
    created = await server.call(
        "crontab_create",
        token=server.super_token,
        name="shapes",
        cron_expression="0 30 9 * * 1-5",
        cron_type=agent_cron([agent.upper()], "version"),
    )
    assert set(created) == {"id"}
    [entry] = await server.su("crontab_get")
    assert entry == {
        "id": created["id"],
        "name": "shapes",
        "enable": True,
        "cron_expression": "0 30 9 * * 1-5",
        "cron_type": {"agent": [[agent], {"task": "version"}]},
        "last_run_time": None,
    }
    edited = await server.su("crontab_edit", "shapes", "0 0 * * *", agent_cron([agent]))
    assert edited == {"id": created["id"], "success": True}
    assert await server.su("crontab_set_enable", "shapes", False) == {
        "success": True,
        "enabled": False,
    }
    [entry] = await server.su("crontab_get")
    assert entry["enable"] is False and entry["cron_expression"] == "0 0 * * *"
    assert entry["cron_type"] == agent_cron([agent])
    assert await server.su("crontab_delete", "shapes") == {"success": True}
    assert await server.su("crontab_get") == []


async def test_invalid_input_codes(server: Server) -> None:
    """Bad expressions are 101 with the reason; names, server crons, duplicates 108; unknown 105."""
    target = agent_cron([str(uuid.uuid4())])
    cases: list[tuple[tuple[Any, ...], int, str]] = [
        (("bad", "0 0 0 * * 8", target), 101, "day of week"),
        (("bad", "61 * * * *", target), 101, "minute"),
        (("bad", "0 0 24 * * *", target), 101, "hour"),
        (("bad", "* * *", target), 101, "fields"),
        (("bad", "0 0 0 30 2 *", target), 101, "never fires"),
        (("bad", "@reboot", target), 101, "shorthand"),
        (("a/b", EVERY_SECOND, target), 108, "'/'"),
        (("", EVERY_SECOND, target), 108, "empty"),
        (("x" * 129, EVERY_SECOND, target), 108, "128"),
        (("tab\there", EVERY_SECOND, target), 108, "control"),
        (("srv", EVERY_SECOND, {"server": {"script": "x"}}), 108, "server crons are not supported"),
        (("bad", EVERY_SECOND, agent_cron(["not-a-uuid"])), -32602, "UUID"),
        (("bad", EVERY_SECOND, agent_cron([str(uuid.uuid4())], {"nope": 1})), -32602, "cron_type"),
        (("bad", 5, target), -32602, "cron_expression"),
    ]
    for params, code, fragment in cases:
        with pytest.raises(RpcError) as error:
            await server.su("crontab_create", *params)
        assert error.value.code == code, (params, error.value.error)
        assert fragment in error.value.message, (params, error.value.message)
    with pytest.raises(RpcError) as error:
        await server.call("crontab_create", server.super_token, "ttl", EVERY_SECOND, target, 0)
    assert error.value.code == -32602 and "queue_ttl_ms" in error.value.message
    await server.su("crontab_create", "dup", NEVER_SOON, target)
    with pytest.raises(RpcError) as error:
        await server.su("crontab_create", "dup", NEVER_SOON, target)
    assert error.value.code == 108 and "already exists" in error.value.message
    for method, params in (
        ("crontab_edit", ("missing", NEVER_SOON, target)),
        ("crontab_delete", ("missing",)),
        ("crontab_set_enable", ("missing", True)),
    ):
        with pytest.raises(RpcError) as error:
            await server.su(method, *params)
        assert error.value.code == 105, method
    with pytest.raises(RpcError) as error:
        await server.su("crontab_set_enable", "dup", "yes")
    assert error.value.code == -32602


async def test_edit_disable_enable_delete(server: Server) -> None:
    """Edit applies at the next slot; disable stops fires; enable resumes; delete keeps history."""
    align(server.clock)
    async with ScriptedAgent(server.ws_url, server.super_token) as agent:
        await server.su("crontab_create", "life", NEVER_SOON, agent_cron([agent.uuid]))
        await tick(server)
        assert await results_of(server, "life") == []
        await server.su("crontab_edit", "life", MINUTELY, agent_cron([agent.uuid], "ip"))
        edited = await tick(server)
        task = await agent.next_task(timeout=2)
        assert task["task_event_type"] == "ip"

        await server.su("crontab_set_enable", "life", False)
        disabled = await tick(server)
        before_enable = await results_of(server, "life")
        assert [r["run_time"] for r in before_enable] == [edited]

        assert await server.su("crontab_set_enable", "life", True) == {
            "success": True,
            "enabled": True,
        }
        enabled = await tick(server)
        await agent.next_task(timeout=2)
        after_enable = [r for r in await results_of(server, "life") if r["run_time"] > edited]
        # resumed at the next slot: nothing fired for the slot while it was disabled
        assert [r["run_time"] for r in after_enable] == [enabled] and enabled > disabled

        await server.su("crontab_delete", "life")
        await tick(server)
        assert agent.notifications.empty()
    assert await cron_named(server, "life") is None
    history = await results_of(server, "life")
    assert [r["run_time"] for r in history] == [enabled, edited]
    tasks = await server.su("task_query_task", {"condition": [{"uuid": agent.uuid}]})
    assert len(tasks) == 2


async def test_edit_takes_new_targets_immediately(server: Server) -> None:
    """After an edit the next fire goes to the new targets only."""
    align(server.clock)
    async with (
        ScriptedAgent(server.ws_url, server.super_token) as old,
        ScriptedAgent(server.ws_url, server.super_token) as new,
    ):
        await server.su("crontab_create", "move", MINUTELY, agent_cron([old.uuid]))
        await tick(server)
        await old.next_task(timeout=2)
        await server.su("crontab_edit", "move", MINUTELY, agent_cron([new.uuid]))
        await tick(server)
        await new.next_task(timeout=2)
        await server.su("crontab_delete", "move")
    for agent, count in ((old, 1), (new, 1)):
        tasks = await server.su("task_query_task", {"condition": [{"uuid": agent.uuid}]})
        assert len(tasks) == count


async def test_an_empty_agent_list_is_accepted_and_fires_nothing(server: Server) -> None:
    """A cron whose agent list is emptied (how NodeGet-board drops a deleted agent) is kept and
    listed but creates no task and no result row while a cron beside it fires every slot."""
    align(server.clock)
    async with ScriptedAgent(server.ws_url, server.super_token) as agent:
        created = await server.su("crontab_create", "nobody", MINUTELY, agent_cron([]))
        assert isinstance(created["id"], int)
        await server.su("crontab_create", "dropped", MINUTELY, agent_cron([agent.uuid]))
        await server.su("crontab_create", "control", MINUTELY, agent_cron([agent.uuid], "ip"))
        edited_at = await tick(server)
        assert await results_of(server, "dropped")
        # NodeGet-board deletes the agent: it edits every cron to leave it out
        assert await server.su("crontab_edit", "dropped", MINUTELY, agent_cron([])) == {
            "id": (await cron_named(server, "dropped") or {})["id"],
            "success": True,
        }
        for _ in range(2):
            await tick(server)
        slots = {r["run_time"] for r in await results_of(server, "control")}
        assert len([t for t in slots if t > edited_at]) == 2
    entry = await cron_named(server, "nobody")
    assert entry is not None and entry["cron_type"] == agent_cron([])
    assert entry["enable"] is True and entry["last_run_time"] is None
    assert await results_of(server, "nobody") == []
    dropped = await results_of(server, "dropped")
    assert dropped and all(r["run_time"] <= edited_at for r in dropped)
    tasks = await server.su("task_query_task", {"condition": [{"uuid": agent.uuid}]})
    # every task the agent got came from a slot with a result row; none from "nobody"
    assert {t["cron_source"] for t in tasks} == {"dropped", "control"}
    assert sorted(t["task_id"] for t in tasks if t["cron_source"] == "dropped") == sorted(
        r["relative_id"] for r in dropped
    )
    assert await server.su("crontab_set_enable", "nobody", False) == {
        "success": True,
        "enabled": False,
    }
    assert await server.su("crontab_delete", "nobody") == {"success": True}


async def test_an_empty_agent_list_needs_crontab_permissions_on_a_global_scope(
    server: Server,
) -> None:
    """With no target to check, an agent-scoped token may neither create, see, edit nor delete
    a cron without agents; a token with the crontab permissions on a global scope may."""
    a = str(uuid.uuid4())
    permissions = [{"crontab": "read"}, {"crontab": "write"}, {"crontab": "delete"}]
    scoped = await add_token(server, [{"scopes": [{"agent_uuid": a}], "permissions": permissions}])
    global_ = await add_token(server, [{"scopes": ["global"], "permissions": permissions}])
    with pytest.raises(RpcError) as error:
        await server.call("crontab_create", scoped, "empty", NEVER_SOON, agent_cron([]))
    assert error.value.code == 102 and "crontab.write with global scope" in error.value.message
    await server.call("crontab_create", global_, "empty", NEVER_SOON, agent_cron([]))
    assert [c["name"] for c in await server.call("crontab_get", global_)] == ["empty"]
    assert await server.call("crontab_get", scoped) == []
    for method, params in (
        ("crontab_edit", ("empty", NEVER_SOON, agent_cron([]))),
        ("crontab_set_enable", ("empty", False)),
        ("crontab_delete", ("empty",)),
    ):
        with pytest.raises(RpcError) as error:
            await server.call(method, scoped, *params)
        assert error.value.code == 102, method
    assert await server.call("crontab_delete", global_, "empty") == {"success": True}


async def test_queue_ttl_cron_queues_for_offline_agents(server: Server) -> None:
    """With queue_ttl_ms a fire for an offline agent queues its task, delivered on subscribe."""
    offline = str(uuid.uuid4())
    align(server.clock)
    await server.call(
        "crontab_create",
        token=server.super_token,
        name="queued",
        cron_expression=MINUTELY,
        cron_type=agent_cron([offline], "version"),
        queue_ttl_ms=60_000,
    )
    await tick(server)
    [row] = await results_of(server, "queued")
    assert row["success"] is True and isinstance(row["relative_id"], int)
    assert row["message"] == (
        f"Task {row['relative_id']} queued for offline agent {offline} (expires after 60000 ms)"
    )
    entry = await cron_named(server, "queued")
    assert entry is not None and entry["queue_ttl_ms"] == 60_000
    await server.su("crontab_set_enable", "queued", False)
    async with ScriptedAgent(server.ws_url, server.super_token, offline) as agent:
        task = await agent.next_task(timeout=2)
    assert task["task_event_type"] == "version"
    [record] = await server.su("task_query_task", {"condition": [{"task_id": task["task_id"]}]})
    assert record["cron_source"] == "queued"
    # an edit replaces the whole definition: without queue_ttl_ms the cron no longer queues
    await server.su("crontab_edit", "queued", MINUTELY, agent_cron([offline], "version"))
    entry = await cron_named(server, "queued")
    assert entry is not None and "queue_ttl_ms" not in entry


async def test_a_scheduler_taking_over_fires_no_slot_from_before_a_cron_existed(
    server: Server,
) -> None:
    """A cron's stamps are times of the scheduler's clock: a scheduler that starts after the
    cron was created (a node winning the leader lock) finds no slot missed since then."""
    align(server.clock)  # the clock is now ahead of the system clock
    await server.su("crontab_create", "fresh", MINUTELY, agent_cron([str(uuid.uuid4())]))
    scheduler = server.service.scheduler
    await scheduler.stop()
    await scheduler.start()
    slot = await tick(server)
    assert [row["run_time"] for row in await results_of(server, "fresh")] == [slot]


async def _idle(server: Server) -> bool:
    """Whether no cron fire runs on the server."""
    return not server.service.scheduler.firing


async def _slots_by_node(server: Server, cron_id: int) -> list[tuple[int, str]]:
    def fetch(conn: Any) -> list[tuple[int, str]]:
        result = conn.execute(
            text("select slot, node_id from cron_fire where cron_id = :c order by slot"),
            {"c": cron_id},
        )
        return [(int(r.slot), str(r.node_id)) for r in result]

    rows: list[tuple[int, str]] = await server.service.store.read(fetch)
    return rows


async def test_restart_fires_once_after_downtime_and_never_twice(database_url: str) -> None:
    """Across a restart a cron fires every slot once, plus one catch-up for the gap (the two
    servers keep one clock, moved three minutes ahead while none runs)."""
    settings = make_settings(database_url)
    target = str(uuid.uuid4())
    clock = Clock()
    align(clock)
    async with running_server(settings, clock=clock) as first:
        token = first.super_token
        created = await first.su("crontab_create", "steady", MINUTELY, agent_cron([target]))
        for _ in range(2):
            await tick(first)
    stopped_at = clock.now_ms()
    clock.advance(180)
    async with running_server(settings, token, clock=clock) as second:
        started_at = clock.now_ms()

        async def caught_up() -> bool:
            return len(await results_of(second, "steady")) > 2 and await _idle(second)

        try:
            # the catch-up waits for the leadership (polled each second on PostgreSQL)
            await until(caught_up, "the catch-up fire", timeout=15)
        except AssertionError as exc:
            state = {
                "leader": second.service.cluster.is_leader,
                "scheduler running": second.service.scheduler.running,
                "firing": dict(second.service.scheduler.firing),
                "results": await results_of(second, "steady"),
            }
            raise AssertionError(f"{exc}; {state}") from None
        await tick(second)
        slots = await _slots_by_node(second, created["id"])
        rows = await results_of(second, "steady")
    first_node = slots[0][1]
    before = [s for s, node in slots if node == first_node]
    after = [s for s, node in slots if node != first_node]
    assert len(before) >= 2 and len(after) >= 2
    assert Counter(r["run_time"] for r in rows) == Counter(s for s, _ in slots)
    assert all(b - a == 60_000 for a, b in itertools.pairwise(before))
    assert all(b - a == 60_000 for a, b in itertools.pairwise(after))
    catch_up = after[0]
    # the one catch-up is the latest slot missed while down, fired as the server started
    assert catch_up - before[-1] == 180_000
    assert stopped_at < catch_up <= started_at
    assert catch_up > started_at - 60_000


async def test_permissions(server: Server) -> None:
    """Crontab permissions follow the targets; a token limited to agent A cannot target B."""
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    only_a = await add_token(
        server,
        [
            {
                "scopes": [{"agent_uuid": a}],
                "permissions": [
                    {"crontab": "read"},
                    {"crontab": "write"},
                    {"task": {"create": "tcp*"}},
                ],
            }
        ],
    )
    with pytest.raises(RpcError) as error:
        await server.call("crontab_create", only_a, "on-b", NEVER_SOON, agent_cron([b]))
    assert error.value.code == 102 and b in error.value.message
    with pytest.raises(RpcError) as error:
        await server.call("crontab_create", only_a, "ab", NEVER_SOON, agent_cron([a, b]))
    assert error.value.code == 102
    with pytest.raises(RpcError) as error:
        await server.call("crontab_create", only_a, "ping", NEVER_SOON, agent_cron([a], "ip"))
    assert error.value.code == 102 and "task.create(ip)" in error.value.message
    await server.call("crontab_create", only_a, "on-a", NEVER_SOON, agent_cron([a]))
    await server.su("crontab_create", "both", NEVER_SOON, agent_cron([a, b]))
    assert [c["name"] for c in await server.call("crontab_get", only_a)] == ["on-a"]
    assert {c["name"] for c in await server.su("crontab_get")} == {"on-a", "both"}
    # an edit needs write on the old targets too
    with pytest.raises(RpcError) as error:
        await server.call("crontab_edit", only_a, "both", NEVER_SOON, agent_cron([a]))
    assert error.value.code == 102
    with pytest.raises(RpcError) as error:
        await server.call("crontab_edit", only_a, "on-a", NEVER_SOON, agent_cron([b]))
    assert error.value.code == 102
    await server.call("crontab_edit", only_a, "on-a", EVERY_SECOND, agent_cron([a]))
    with pytest.raises(RpcError) as error:
        await server.call("crontab_set_enable", only_a, "both", False)
    assert error.value.code == 102
    with pytest.raises(RpcError) as error:
        await server.call("crontab_delete", only_a, "on-a")
    assert error.value.code == 102 and "crontab.delete" in error.value.message
    assert await server.call("crontab_set_enable", only_a, "on-a", False) == {
        "success": True,
        "enabled": False,
    }
    nothing = await add_token(
        server, [{"scopes": ["global"], "permissions": [{"task": {"read": "*"}}]}]
    )
    with pytest.raises(RpcError) as error:
        await server.call("crontab_get", nothing)
    assert error.value.code == 102 and "crontab.read" in error.value.message
    deleter = await add_token(
        server, [{"scopes": [{"agent_uuid": a}], "permissions": [{"crontab": "delete"}]}]
    )
    with pytest.raises(RpcError) as error:
        await server.call("crontab_delete", deleter, "both")
    assert error.value.code == 102
    assert await server.call("crontab_delete", deleter, "on-a") == {"success": True}


async def test_result_permissions_by_cron_name_pattern(server: Server) -> None:
    """crontab-result read/delete go by cron-name pattern, and only on a global scope."""
    target = str(uuid.uuid4())
    align(server.clock)
    for name in ("probe-1", "other"):
        await server.su("crontab_create", name, MINUTELY, agent_cron([target]))
    await tick(server)
    for name in ("probe-1", "other"):
        assert await results_of(server, name)
        await server.su("crontab_delete", name)
    probes = await add_token(
        server,
        [{"scopes": ["global"], "permissions": [{"crontab_result": {"read": "probe*"}}]}],
    )
    scoped = await add_token(
        server,
        [
            {
                "scopes": [{"agent_uuid": target}],
                "permissions": [{"crontab_result": {"read": "*"}}],
            }
        ],
    )
    rows = await server.call(
        "crontab-result_query", probes, {"condition": [{"cron_name": "probe-1"}]}
    )
    assert rows and {r["cron_name"] for r in rows} == {"probe-1"}
    everything = await server.call("crontab-result_query", probes, {"condition": []})
    assert everything and {r["cron_name"] for r in everything} == {"probe-1"}
    with pytest.raises(RpcError) as error:
        await server.call("crontab-result_query", probes, {"condition": [{"cron_name": "other"}]})
    assert error.value.code == 102
    for token in (scoped,):
        with pytest.raises(RpcError) as error:
            await server.call("crontab-result_query", token, {"condition": []})
        assert error.value.code == 102
    with pytest.raises(RpcError) as error:
        await server.call(
            "crontab-result_delete", probes, {"condition": [{"cron_name": "probe-1"}]}
        )
    assert error.value.code == 102 and "crontab_result.delete" in error.value.message
    deleter = await add_token(
        server,
        [{"scopes": ["global"], "permissions": [{"crontab_result": {"delete": "probe*"}}]}],
    )
    deleted = await server.call("crontab-result_delete", deleter, {"condition": []})
    assert deleted == {"success": True, "deleted": len(everything), "condition_count": 0}
    remaining = await server.su("crontab-result_query", {"condition": []})
    assert remaining and {r["cron_name"] for r in remaining} == {"other"}


async def test_result_query_conditions(server: Server) -> None:
    """Every crontab-result condition filters like the spec says; newest first; limit and last."""
    offline = str(uuid.uuid4())
    align(server.clock)
    async with ScriptedAgent(server.ws_url, server.super_token) as agent:
        a = await server.su("crontab_create", "q-a", MINUTELY, agent_cron([agent.uuid, offline]))
        b = await server.su("crontab_create", "q-b", MINUTELY, agent_cron([offline]))
        for _ in range(3):
            await tick(server)
        await server.su("crontab_delete", "q-a")
        await server.su("crontab_delete", "q-b")
    every = await server.su("crontab-result_query", {"condition": []})
    assert [(r["run_time"], r["id"]) for r in every] == sorted(
        ((r["run_time"], r["id"]) for r in every), reverse=True
    )
    times = sorted({r["run_time"] for r in every})
    mid = times[len(times) // 2]
    some = every[len(every) // 2]

    async def check(conditions: list[Any], keep: Callable[[dict[str, Any]], bool]) -> None:
        rows = await server.su("crontab-result_query", {"condition": conditions})
        assert rows == [r for r in every if keep(r)], conditions

    await check([{"id": some["id"]}], lambda r: r["id"] == some["id"])
    await check([{"cron_id": a["id"]}], lambda r: r["cron_id"] == a["id"])
    await check([{"cron_id": b["id"]}], lambda r: r["cron_name"] == "q-b")
    await check([{"cron_name": "q-b"}], lambda r: r["cron_id"] == b["id"])
    await check([{"cron_name": "q-a"}, {"cron_name": "q-b"}], lambda r: False)
    await check(["is_success"], lambda r: r["success"])
    await check(["is_failure"], lambda r: not r["success"])
    # serde's object form of the unit conditions, as NodeGet-board sends them
    await check([{"is_success": None}], lambda r: r["success"])
    await check([{"is_failure": None}], lambda r: not r["success"])
    await check(["is_success", {"cron_name": "q-b"}], lambda r: False)
    await check([{"run_time_from": mid}], lambda r: r["run_time"] >= mid)
    await check([{"run_time_to": mid}], lambda r: r["run_time"] <= mid)
    await check([{"run_time_from_to": [mid, mid]}], lambda r: r["run_time"] == mid)
    await check(
        [{"run_time_from_to": [times[0], mid]}, "is_failure", {"cron_id": a["id"]}],
        lambda r: times[0] <= r["run_time"] <= mid and not r["success"] and r["cron_id"] == a["id"],
    )
    assert await server.su("crontab-result_query", {"condition": [{"limit": 3}]}) == every[:3]
    assert await server.su("crontab-result_query", {"condition": ["last"]}) == every[:1]
    assert await server.su("crontab-result_query", {"condition": [{"last": None}]}) == every[:1]
    assert (
        await server.su("crontab-result_query", {"condition": ["last", {"limit": 5}]}) == every[:1]
    )
    assert all(r["success"] for r in every if r["relative_id"] is not None)
    with pytest.raises(RpcError) as error:
        await server.su("crontab-result_query", {"condition": [{"bogus": 1}]})
    assert error.value.code == -32602
    with pytest.raises(RpcError) as error:
        await server.su("crontab-result_query", [{"cron_name": "q-a"}])
    assert error.value.code == -32602

    deleted = await server.su(
        "crontab-result_delete",
        {"condition": [{"cron_name": "q-a"}, {"is_failure": None}, {"limit": 2}]},
    )
    assert deleted == {"success": True, "deleted": 2, "condition_count": 3}
    gone = [r for r in every if r["cron_name"] == "q-a" and not r["success"]][:2]
    left = await server.su("crontab-result_query", {"condition": []})
    assert left == [r for r in every if r not in gone]
    deleted = await server.su("crontab-result_delete", {"condition": [{"cron_name": "q-b"}]})
    assert deleted == {
        "success": True,
        "deleted": len([r for r in every if r["cron_name"] == "q-b"]),
        "condition_count": 1,
    }
    left = await server.su("crontab-result_query", {"condition": []})
    assert {r["cron_name"] for r in left} == {"q-a"}


async def _cli(server: Server, *args: str) -> tuple[int, str, str]:
    env = dict(os.environ, TASKD_URL=server.url, TASKD_TOKEN=server.super_token)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "taskd",
        "cron",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), scaled(30))
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_cli_cron_commands(server: Server) -> None:
    """taskd cron create/list/edit/disable/enable/results/delete work against a real server."""
    agent = str(uuid.uuid4())
    task = json.dumps({"tcp_ping": "127.0.0.1:9"})
    align(server.clock)
    code, out, err = await _cli(
        server, "create", "cli", MINUTELY, "--agents", agent, "--task", task, "--json"
    )
    assert code == 0, err
    created = json.loads(out)
    code, out, _ = await _cli(server, "list")
    assert code == 0 and "cli" in out and MINUTELY in out and "tcp_ping" in out
    await tick(server)
    assert await results_of(server, "cli")
    code, out, err = await _cli(server, "disable", "cli")
    assert code == 0, err
    code, out, _ = await _cli(server, "list", "--json")
    [entry] = json.loads(out)
    assert entry["id"] == created["id"] and entry["enable"] is False
    code, out, err = await _cli(
        server, "edit", "cli", "--expr", "0 0 * * *", "--queue-ttl-ms", "5000"
    )
    assert code == 0, err
    [entry] = await server.su("crontab_get")
    assert entry["cron_expression"] == "0 0 * * *" and entry["queue_ttl_ms"] == 5000
    assert entry["cron_type"] == agent_cron([agent]) and entry["enable"] is False
    code, _, err = await _cli(server, "enable", "cli")
    assert code == 0, err
    code, out, _ = await _cli(server, "results", "cli", "--limit", "1", "--json")
    [row] = json.loads(out)
    assert row["cron_name"] == "cli" and row["success"] is False
    code, out, _ = await _cli(server, "results", "cli")
    assert code == 0 and f"Agent {agent} is not connected" in out
    code, _, err = await _cli(
        server, "create", "cli", "61 * * * *", "--agents", agent, "--task", task
    )
    assert code == 1 and "101" in err and "minute" in err
    code, _, err = await _cli(server, "delete", "cli")
    assert code == 0, err
    code, _, err = await _cli(server, "delete", "cli")
    assert code == 1 and "105" in err
    assert await server.su("crontab_get") == []


def key_of(token: str) -> str:
    """The key part of a KEY:SECRET token."""
    return token.split(":", 1)[0]


async def test_result_methods_need_a_global_permission_even_without_results(
    server: Server,
) -> None:
    """With no results at all, a token lacking a global crontab_result permission still gets 102
    from crontab-result_query and crontab-result_delete, not an empty answer."""
    assert await server.su("crontab-result_query", {"condition": []}) == []
    agent = str(uuid.uuid4())
    nothing = await add_token(
        server, [{"scopes": ["global"], "permissions": [{"task": {"read": "*"}}]}]
    )
    scoped = await add_token(
        server,
        [
            {
                "scopes": [{"agent_uuid": agent}],
                "permissions": [
                    {"crontab_result": {"read": "*"}},
                    {"crontab_result": {"delete": "*"}},
                ],
            }
        ],
    )
    for token in (nothing, scoped):
        for method, action in (
            ("crontab-result_query", "read"),
            ("crontab-result_delete", "delete"),
        ):
            with pytest.raises(RpcError) as error:
                await server.call(method, token, {"condition": []})
            assert error.value.code == 102, (method, token)
            assert f"crontab_result.{action} with global scope" in error.value.message
    reader = await add_token(
        server, [{"scopes": ["global"], "permissions": [{"crontab_result": {"read": "probe*"}}]}]
    )
    assert await server.call("crontab-result_query", reader, {"condition": []}) == []
    with pytest.raises(RpcError) as error:
        await server.call("crontab-result_delete", reader, {"condition": []})
    assert error.value.code == 102 and "crontab_result.delete" in error.value.message
    deleter = await add_token(
        server, [{"scopes": ["global"], "permissions": [{"crontab_result": {"delete": "probe*"}}]}]
    )
    assert await server.call("crontab-result_delete", deleter, {"condition": []}) == {
        "success": True,
        "deleted": 0,
        "condition_count": 0,
    }


async def test_enabling_a_cron_needs_task_create_on_every_target(server: Server) -> None:
    """Enabling starts tasks again, so it needs task.create(<type>) on every target like create
    and edit do; disabling needs crontab.write only."""
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    await server.su("crontab_create", "gate", NEVER_SOON, agent_cron([a, b]))
    write_both = {
        "scopes": [{"agent_uuid": a}, {"agent_uuid": b}],
        "permissions": [{"crontab": "write"}],
    }
    half = await add_token(
        server,
        [write_both, {"scopes": [{"agent_uuid": a}], "permissions": [{"task": {"create": "*"}}]}],
    )
    assert await server.call("crontab_set_enable", half, "gate", False) == {
        "success": True,
        "enabled": False,
    }
    with pytest.raises(RpcError) as error:
        await server.call("crontab_set_enable", half, "gate", True)
    assert error.value.code == 102
    assert f"task.create(tcp_ping) on agent {b}" in error.value.message
    entry = await cron_named(server, "gate")
    assert entry is not None and entry["enable"] is False
    wrong_type = await add_token(
        server,
        [
            write_both,
            {
                "scopes": [{"agent_uuid": a}, {"agent_uuid": b}],
                "permissions": [{"task": {"create": "ping"}}],
            },
        ],
    )
    with pytest.raises(RpcError) as error:
        await server.call("crontab_set_enable", wrong_type, "gate", True)
    assert error.value.code == 102 and "task.create(tcp_ping)" in error.value.message
    full = await add_token(
        server,
        [
            write_both,
            {
                "scopes": [{"agent_uuid": a}, {"agent_uuid": b}],
                "permissions": [{"task": {"create": "tcp*"}}],
            },
        ],
    )
    assert await server.call("crontab_set_enable", full, "gate", True) == {
        "success": True,
        "enabled": True,
    }
    entry = await cron_named(server, "gate")
    assert entry is not None and entry["enable"] is True


async def test_fires_check_the_creators_authority_every_time(server: Server) -> None:
    """Each fire re-checks the token that created the cron: targets it no longer covers, or all
    once it is not valid yet, expired or deleted, get a failed row saying why and no task."""
    align(server.clock)
    async with (
        ScriptedAgent(server.ws_url, server.super_token) as a,
        ScriptedAgent(server.ws_url, server.super_token) as b,
    ):
        grant = [{"crontab": "write"}, {"task": {"create": "tcp*"}}]
        scopes = [{"agent_uuid": a.uuid}, {"agent_uuid": b.uuid}]
        issued = await server.su(
            "token_create", {"token_limit": [{"scopes": scopes, "permissions": grant}]}
        )
        key = issued["key"]
        await server.call(
            "crontab_create",
            f"{key}:{issued['secret']}",
            "authority",
            MINUTELY,
            agent_cron([a.uuid, b.uuid]),
        )
        await tick(server)
        await a.next_task(timeout=2)
        await b.next_task(timeout=2)

        async def next_fire() -> list[dict[str, Any]]:
            """The rows of the next slot (one per target)."""
            slot = await tick(server)
            rows = by_slot(await results_of(server, "authority"))[slot]
            assert len(rows) == 2
            return rows

        await server.su(
            "token_edit", key, [{"scopes": [{"agent_uuid": a.uuid}], "permissions": grant}]
        )
        narrowed = await next_fire()
        [sent] = [r for r in narrowed if r["success"]]
        assert sent["message"] == f"Task {sent['relative_id']} sent to agent {a.uuid}"
        [refused] = [r for r in narrowed if not r["success"]]
        assert refused["relative_id"] is None
        assert refused["message"] == (
            f"Task not created: token {key} that created the cron lacks task.create(tcp_ping) "
            f"on agent {b.uuid}"
        )
        assert (await a.next_task(timeout=2))["task_event_type"] == {"tcp_ping": "127.0.0.1:9"}
        tasks_of_b = await server.su("task_query_task", {"condition": [{"uuid": b.uuid}]})
        assert len(tasks_of_b) == 1  # the one before the token was narrowed

        later = server.clock.now_ms() + 3_600_000
        phases: list[tuple[dict[str, Any], str]] = [
            ({"timestamp_from": later}, "is not valid yet"),
            ({"timestamp_from": None, "timestamp_to": time.time_ns() // 1_000_000}, "has expired"),
        ]
        for change, reason in phases:
            await server.call("token_edit", token=server.super_token, target_token=key, **change)
            rows = await next_fire()
            assert [r["message"] for r in rows] == [
                f"Task not created: token {key} that created the cron {reason}"
            ] * 2
            assert not any(r["success"] or r["relative_id"] for r in rows)
        await server.su("token_delete", key)
        rows = await next_fire()
        assert [r["message"] for r in rows] == [
            f"Task not created: token {key} that created the cron no longer exists"
        ] * 2
        await server.su("crontab_set_enable", "authority", False)
    records = await server.su("task_query_task", {"condition": [{"cron_source": "authority"}]})
    tasks_of = {result["relative_id"] for result in await results_of(server, "authority")}
    assert {r["task_id"] for r in records} == tasks_of - {None}


async def test_cron_tasks_are_created_by_the_crons_creator(server: Server) -> None:
    """The tasks a cron fires carry created_by = the key of the token that created the cron."""
    async with ScriptedAgent(server.ws_url, server.super_token) as agent:
        creator = await add_token(
            server,
            [
                {
                    "scopes": [{"agent_uuid": agent.uuid}],
                    "permissions": [{"crontab": "write"}, {"task": {"create": "*"}}],
                }
            ],
        )
        align(server.clock)
        await server.call(
            "crontab_create", creator, "owned", MINUTELY, agent_cron([agent.uuid], "version")
        )
        tasks = []
        for _ in range(2):
            await tick(server)
            tasks.append(await agent.next_task(timeout=2))
        await server.su("crontab_set_enable", "owned", False)
    await server.su("task_create_task", agent.uuid, "version", 60_000)
    records = await server.su("task_query_task", {"condition": [{"cron_source": "owned"}]})
    assert {t["task_id"] for t in tasks} <= {r["task_id"] for r in records}
    assert {r["created_by"] for r in records} == {key_of(creator)}
    assert key_of(creator) != key_of(server.super_token)


def _tail(log: Path) -> str:
    """The end of a server log, for a failure message."""
    return log.read_text(errors="replace")[-3000:]


async def _serve(config: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    """Start `taskd serve` as a child process and wait until it answers /healthz."""
    with log.open("ab") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "taskd", "serve", "--config", str(config)],
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + scaled(30)
    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                reply = await client.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
                if reply.status_code == 200:
                    return process
            assert process.poll() is None, _tail(log)
            await asyncio.sleep(0.1)
    process.kill()
    process.wait()
    raise TimeoutError(_tail(log))


async def test_a_server_killed_before_storing_rows_records_those_slots_once_as_interrupted(
    database_url: str, tmp_path: Path, held_ports: Callable[[], int]
) -> None:
    """A `taskd serve` SIGKILLed after claiming slots whose rows the database had refused comes
    back and records each such slot once as interrupted; every claimed slot has one row."""
    node_id = f"node-{uuid.uuid4()}"
    settings = make_settings(database_url, node_id=node_id)
    async with Store(database_url, pool_size=2) as store:
        await store.migrate()
        token = await ensure_super_token(store)
        assert token is not None
        port = held_ports()
        config = tmp_path / "taskd.toml"
        config.write_text(
            "[server]\n"
            f'server_uuid = "{settings.server_uuid}"\n'
            f'listen = "127.0.0.1:{port}"\n'
            f'database_url = "{database_url}"\n'
            f'node_id = "{node_id}"\n'
        )
        await refuse_results(store, True)
        process = await _serve(config, port, tmp_path / "serve.log")
        try:
            target = str(uuid.uuid4())
            body = {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "crontab_create",
                "params": [token, "crashy", EVERY_SECOND, agent_cron([target])],
            }
            async with httpx.AsyncClient() as client:
                reply = await client.post(f"http://127.0.0.1:{port}/", json=body, timeout=10)
            cron_id = unwrap(reply.json())["id"]

            async def two_pending() -> bool:
                return len(await store.pending_cron_fires()) >= 2

            await until(two_pending, "two claimed slots")
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
        cut_short = sorted(f.slot for f in await store.pending_cron_fires())
        assert await store.query_cron_results(parse_cron_result_query({"condition": []})) == []
        await refuse_results(store, False)
    async with running_server(settings, token) as server:

        async def settled() -> list[dict[str, Any]] | None:
            rows = await results_of(server, "crashy")
            interrupted = [r for r in rows if r["message"] == INTERRUPTED]
            return interrupted if len(interrupted) >= len(cut_short) else None

        interrupted = await until(settled, "the interrupted rows")
        assert sorted(r["run_time"] for r in interrupted) == cut_short
        assert all(not r["success"] and r["relative_id"] is None for r in interrupted)
        await server.su("crontab_set_enable", "crashy", False)
        await until(lambda: _idle(server), "the last fire")  # one that had started lands
        slots = [slot for slot, _ in await _slots_by_node(server, cron_id)]
        rows = await results_of(server, "crashy")
        assert await server.service.store.pending_cron_fires() == []
    assert Counter(r["run_time"] for r in rows) == Counter(slots)
    assert set(cut_short) <= set(slots)
