"""Retention of tasks and cron results: seeded across months, pruned as the server's clock
moves (no waiting), in chunks, by one node of a cluster."""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import event, select

from taskd.models import TaskState, cron_fire_t
from taskd.protocol import TaskResponse
from taskd.store import Store
from taskd.store.records import NewTask
from tests.helpers import RpcError, Server, make_settings, postgres_database, running_server, scaled

DAY = 86_400_000
HOUR = 3_600_000
A = str(uuid.uuid4())
TASKS = {
    "ping": {"ping": "127.0.0.1"},
    "execute": {"execute": {"cmd": "true", "args": []}},
    "version": "version",
    "ip": "ip",
}
RESULTS = {"ping": {"ping": 1.5}, "execute": {"execute": "ok"}, "version": None, "ip": None}


async def seed_tasks(
    store: Store,
    task_type: str,
    finished_at: list[int],
    *,
    state: TaskState | None = None,
    cron: str | None = None,
) -> list[int]:
    """Tasks of agent A (created by ``cron`` if given): each answered at its time in
    ``finished_at`` through the store's result path, or left ``state`` (queued/running)
    with that creation time."""
    now = max(finished_at)
    rows = [
        NewTask(
            A,
            f"t{i:09d}",
            task_type,
            TASKS[task_type],
            deadline=now + 365 * DAY,
            created_at=when if state is not None else now,
            state=state if state is not None else TaskState.RUNNING,
            queue_ttl_ms=365 * DAY if state == TaskState.QUEUED else None,
            cron_source=cron,
        )
        for i, when in enumerate(finished_at)
    ]
    ids = await store.insert_tasks(rows)
    if state is None:
        uploads = [
            TaskResponse.model_validate(
                {
                    "task_id": row.id,
                    "agent_uuid": A,
                    "task_token": row.task_token,
                    "timestamp": when,
                    "success": True,
                    **(
                        {"task_event_result": RESULTS[task_type]}
                        if RESULTS[task_type] is not None
                        else {}
                    ),
                }
            )
            for row, when in zip(rows, finished_at, strict=True)
        ]
        await asyncio.gather(*(store.complete_task(upload) for upload in uploads))
    return ids


async def task_ids(server: Server, *conditions: Any) -> set[int]:
    """The ids task_query answers with (limit high enough for every seeded row)."""
    query = {"condition": [{"uuid": A}, *conditions, {"limit": 10_000}]}
    return {row["task_id"] for row in await server.su("task_query", query)}


@contextmanager
def deletes_on(store: Store, table: str) -> Iterator[list[int]]:
    """The row counts of the DELETE statements on ``table`` the writer runs while the
    context lasts (those that deleted rows)."""
    engine = store.backend.write_engine
    engine = getattr(engine, "sync_engine", engine)
    counts: list[int] = []

    def capture(conn: Any, cursor: Any, statement: str, *rest: Any) -> None:
        deleting = statement.lstrip().upper().startswith(f"DELETE FROM {table.upper()} ")
        if deleting and cursor.rowcount > 0:
            counts.append(cursor.rowcount)

    event.listen(engine, "after_cursor_execute", capture)
    try:
        yield counts
    finally:
        event.remove(engine, "after_cursor_execute", capture)


async def test_finished_tasks_go_after_their_types_retention(database_url: str) -> None:
    """The default retention applies to every type but the one given its own; queued and
    running tasks stay whatever their age; moving the clock on prunes what aged past it;
    task_query answers with what is left."""
    settings = make_settings(
        database_url,
        task_retention_s=30 * 86400,
        task_retention_by_type={"ping": 86400},
        monitoring_prune_interval_s=3600,
    )
    async with running_server(settings) as server:
        store, pruner = server.service.store, server.service.pruner
        now = server.clock.now_ms()
        ping_old, ping_new = await seed_tasks(store, "ping", [now - 2 * DAY, now - HOUR])
        exec_old, exec_mid = await seed_tasks(store, "execute", [now - 40 * DAY, now - 10 * DAY])
        [version_old] = await seed_tasks(store, "version", [now - 90 * DAY])
        [running] = await seed_tasks(store, "ping", [now - 90 * DAY], state=TaskState.RUNNING)
        [queued] = await seed_tasks(store, "ip", [now - 90 * DAY], state=TaskState.QUEUED)
        seeded = {ping_old, ping_new, exec_old, exec_mid, version_old, running, queued}
        assert await task_ids(server) == seeded

        assert await pruner.prune() == 3
        assert await task_ids(server) == {ping_new, exec_mid, running, queued}

        server.clock.advance(25 * 86400)  # the 10-day-old execute task is now 35 days old
        assert await pruner.prune() == 2
        assert await task_ids(server) == {running, queued}
        assert await task_ids(server, "is_running") == {running, queued}
        assert await pruner.prune() == 0


async def test_a_backlog_goes_in_chunks_one_write_each(database_url: str) -> None:
    """2,500 expired tasks go in three DELETEs of at most 1,000 rows, and a result uploaded
    meanwhile is stored."""
    settings = make_settings(
        database_url, task_retention_by_type={"ping": 86400}, monitoring_prune_interval_s=3600
    )
    async with running_server(settings) as server:
        store, pruner = server.service.store, server.service.pruner
        assert pruner.chunk == 1000
        now = server.clock.now_ms()
        old = [now - 2 * DAY - i for i in range(2500)]
        await seed_tasks(store, "ping", old)
        [kept] = await seed_tasks(store, "ping", [now])
        [open_task] = await seed_tasks(store, "execute", [now], state=TaskState.RUNNING)
        with deletes_on(store, "task") as deletes:
            pruning = asyncio.create_task(pruner.prune())
            upload = TaskResponse.model_validate(
                {
                    "task_id": open_task,
                    "agent_uuid": A,
                    "task_token": "t000000000",
                    "timestamp": now,
                }
                | {"success": True, "task_event_result": {"execute": "ok"}}
            )
            await store.complete_task(upload)
            assert await pruning == 2500
        assert deletes == [1000, 1000, 500]
        assert await task_ids(server, "is_running") == set()
        assert await task_ids(server) == {kept, open_task}
        assert await store.count_tasks() == 2


async def create_cron(server: Server, name: str, retention_ms: int | None) -> int:
    """A disabled cron (moving the clock fires nothing) targeting agent A."""
    params: dict[str, Any] = {
        "name": name,
        "cron_expression": "0 0 0 1 1 *",
        "cron_type": {"agent": [[A], {"task": "version"}]},
    }
    if retention_ms is not None:
        params["result_retention_ms"] = retention_ms
    created = await server.call("crontab_create", token=server.super_token, **params)
    cron_id: int = created["id"]
    return cron_id


async def seed_results(store: Store, cron_id: int, name: str, run_times: list[int]) -> None:
    """One fire per time, settled with one result row, as the scheduler stores them."""
    for run_time in run_times:
        assert await store.claim_cron_slot(cron_id, run_time, run_time, "seed") is not None
        row = {"cron_id": cron_id, "cron_name": name, "run_time": run_time, "agent_uuid": A}
        assert await store.settle_cron_fire(cron_id, run_time, [row | {"message": "ok"}])


async def result_times(server: Server, name: str) -> list[int]:
    """The run times crontab-result_query answers with for a cron, newest first."""
    query = {"condition": [{"cron_name": name}]}
    return [row["run_time"] for row in await server.su("crontab-result_query", query)]


async def fire_slots(store: Store, cron_id: int) -> list[int]:
    """The slots a cron's fire records are kept for, oldest first."""
    c = cron_fire_t.c
    rows = await store.fetch_all(select(c.slot).where(c.cron_id == cron_id).order_by(c.slot))
    return [row.slot for row in rows]


async def test_cron_results_go_after_their_crons_retention(database_url: str) -> None:
    """A cron's own result retention beats the server default (shorter or longer); crons
    without one, and deleted crons, get the default; the settled fire records of pruned
    slots go too, except the cron's latest."""
    settings = make_settings(
        database_url, cron_result_retention_s=30 * 86400, monitoring_prune_interval_s=3600
    )
    async with running_server(settings) as server:
        store, pruner = server.service.store, server.service.pruner
        now = server.clock.now_ms()
        times = [now - 40 * DAY, now - 10 * DAY, now - 2 * DAY, now - 30 * 60_000]
        crons = {
            "probe": await create_cron(server, "probe", DAY),
            "long": await create_cron(server, "long", 60 * DAY),
            "plain": await create_cron(server, "plain", None),
            "gone": await create_cron(server, "gone", DAY),
        }
        for name, cron_id in crons.items():
            await seed_results(store, cron_id, name, times)
            await server.su("crontab_set_enable", name, False)
        await server.su("crontab_delete", "gone")  # its own retention goes with it
        listed = {c["name"]: c for c in await server.su("crontab_get")}
        assert listed["probe"]["result_retention_ms"] == DAY
        assert "result_retention_ms" not in listed["plain"]

        # a cron's own retention applies to its tasks too, the type's as well (30 days)
        probe_tasks = await seed_tasks(
            store, "version", [now - 2 * DAY, now - 30 * 60_000], cron="probe"
        )
        await seed_tasks(store, "version", [now - 40 * DAY], cron="long")
        [plain_task] = await seed_tasks(store, "version", [now - 10 * DAY], cron="plain")

        newest_first = times[::-1]
        assert await pruner.prune() == (3 + 0 + 1 + 1) + (1 + 1)
        assert await task_ids(server) == {probe_tasks[1], plain_task}
        assert await result_times(server, "probe") == newest_first[:1]
        assert await result_times(server, "long") == newest_first
        assert await result_times(server, "plain") == newest_first[:3]
        assert await result_times(server, "gone") == newest_first[:3]
        assert await fire_slots(store, crons["probe"]) == times[-1:]

        server.clock.advance(25 * 86400)
        assert await pruner.prune() == (1 + 1 + 1 + 1) + (1 + 1)
        assert await task_ids(server) == set()
        assert await result_times(server, "probe") == []
        # the latest fire stays: it guards the cron's last slot
        assert await fire_slots(store, crons["probe"]) == times[-1:]
        assert await fire_slots(store, crons["plain"]) == times[-2:]
        assert await result_times(server, "long") == newest_first[:3]
        assert await result_times(server, "plain") == newest_first[:2]
        assert len(await server.su("crontab-result_query", {"condition": []})) == 0 + 3 + 2 + 2


async def test_result_retention_is_set_kept_and_reset_on_edit(server: Server) -> None:
    """crontab_edit without the field (a NodeGet client) keeps a cron's retention; a value
    replaces it; 0 returns to the server default; a bad value is -32602 naming it."""
    await create_cron(server, "edited", 5000)
    edit = {"cron_expression": "0 0 0 1 1 *", "cron_type": {"agent": [[A], {"task": "ip"}]}}

    async def retention() -> Any:
        [cron] = await server.su("crontab_get")
        return cron.get("result_retention_ms")

    await server.call("crontab_edit", token=server.super_token, name="edited", **edit)
    assert await retention() == 5000
    await server.call(
        "crontab_edit", token=server.super_token, name="edited", result_retention_ms=7000, **edit
    )
    assert await retention() == 7000
    await server.call(
        "crontab_edit", token=server.super_token, name="edited", result_retention_ms=0, **edit
    )
    assert await retention() is None
    for bad in (-1, "1d", 1.5, 10**15):
        with pytest.raises(RpcError) as error:
            await server.call(
                "crontab_edit",
                token=server.super_token,
                name="edited",
                result_retention_ms=bad,
                **edit,
            )
        assert error.value.code == -32602 and "result_retention_ms" in error.value.message


async def taskd_cli(server: Server, *args: str) -> str:
    """Run the real ``taskd`` command against the server; its output (it must succeed)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "taskd",
        *args,
        "--url",
        server.url,
        "--token",
        server.super_token,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), scaled(60))
    assert process.returncode == 0, err.decode()
    return out.decode()


async def test_cli_sets_and_resets_a_crons_retention(server: Server) -> None:
    """`taskd cron create|edit --retention-ms` set the field crontab_get shows; edit without
    it keeps it; 0 returns to the server default."""
    agents = ["--agents", A]
    await taskd_cli(server, "cron", "create", "cli", "0 0 0 1 1 *", *agents, "--task", '"ip"')
    await taskd_cli(server, "cron", "edit", "cli", "--retention-ms", "90000")
    [cron] = await server.su("crontab_get")
    assert cron["result_retention_ms"] == 90000
    await taskd_cli(server, "cron", "edit", "cli", "--expr", "0 0 0 2 1 *")
    [cron] = await server.su("crontab_get")
    assert (cron["result_retention_ms"], cron["cron_expression"]) == (90000, "0 0 0 2 1 *")
    await taskd_cli(server, "cron", "edit", "cli", "--retention-ms", "0")
    [cron] = await server.su("crontab_get")
    assert "result_retention_ms" not in cron
    created = await taskd_cli(
        server, "cron", "create", "cli2", "@daily", *agents, "--task", '"ip"', "--retention-ms", "5"
    )
    assert "created cron cli2" in created
    crons = {c["name"]: c for c in await server.su("crontab_get")}
    assert crons["cli2"]["result_retention_ms"] == 5


async def test_only_the_cron_leader_prunes() -> None:
    """Two nodes on one PostgreSQL: the leader prunes, the other node leaves the rows alone."""
    async with postgres_database() as url:
        settings = make_settings(
            url, task_retention_by_type={"ping": 86400}, monitoring_prune_interval_s=3600
        )
        async with (
            running_server(settings) as first,
            running_server(settings, super_token=first.super_token) as second,
        ):
            for _ in range(100):
                if first.service.cluster.is_leader or second.service.cluster.is_leader:
                    break
                await asyncio.sleep(0.1)
            leader, other = (first, second) if first.service.cluster.is_leader else (second, first)
            assert leader.service.cluster.is_leader and not other.service.cluster.is_leader
            now = leader.clock.now_ms()
            await seed_tasks(leader.service.store, "ping", [now - 2 * DAY, now - 3 * DAY])
            assert await other.service.pruner.prune() == 0
            assert len(await task_ids(other)) == 2
            assert await leader.service.pruner.prune() == 2
            assert await task_ids(other) == set()
