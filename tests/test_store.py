"""The store's group-commit writer: a bad value fails only its own write, on both databases."""

from __future__ import annotations

import asyncio
import re
import sqlite3
import threading
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection, event, inspect
from sqlmodel import SQLModel

from taskd.auth import NewToken, hash_secret
from taskd.clock import now_ms
from taskd.errors import InvalidInput
from taskd.models import TaskState
from taskd.protocol import TaskResponse, parse_task_conditions
from taskd.store import NewTask, Store, task_t
from taskd.store.tasks import queued_rows
from tests.helpers import scaled

AGENT_A = str(uuid.uuid4())
AGENT_B = str(uuid.uuid4())


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    """A migrated store over a fresh database."""
    async with Store(database_url, pool_size=2) as opened:
        await opened.migrate()
        yield opened


def _token(**fields: object) -> dict[str, object]:
    token = NewToken.generate()
    return {"key": token.key, "secret_hash": hash_secret(token.secret), "limits": []} | fields


async def test_a_value_the_database_refuses_fails_only_its_own_write(store: Store) -> None:
    """Writes batched with one the database cannot store still commit; that one is 108."""
    good = [_token() for _ in range(3)]
    # beyond BIGINT on both databases: the driver or the server refuses it
    bad = _token(max_uses=1 << 64)
    outcomes = await asyncio.gather(
        *(store.insert_token(values) for values in (good[0], bad, *good[1:])),
        return_exceptions=True,
    )
    assert isinstance(outcomes[1], InvalidInput), outcomes[1]
    assert all(isinstance(o, int) for o in outcomes[:1] + outcomes[2:]), outcomes
    stored = {row.key for row in await store.list_tokens()}
    assert stored == {t["key"] for t in good}


async def test_a_write_waits_for_another_processs_sqlite_lock_without_stopping_the_loop(
    tmp_path: Path,
) -> None:
    """While another process holds SQLite's write lock, the writer's hot and plain writes
    wait for it asleep: the event loop keeps turning (it used to stop for 100 ms at each
    attempt, inside SQLite's busy timeout), and both are committed once the lock goes."""
    path = tmp_path / "taskd.db"
    async with Store(f"sqlite:///{path}") as store:
        await store.migrate()
        loop = asyncio.get_running_loop()
        gaps: list[float] = []

        async def tick() -> None:
            last = loop.time()
            while True:
                await asyncio.sleep(0.002)
                gaps.append(loop.time() - last)
                last = loop.time()

        lock = sqlite3.connect(path, isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")
        ticker = asyncio.create_task(tick())
        try:
            now = now_ms()
            task = NewTask(str(uuid.uuid4()), "tok0000001", "version", "version", now + 60_000, now)
            writes = asyncio.gather(store.insert_tasks([task]), store.insert_token(_token()))
            await asyncio.sleep(0.5)
            assert not writes.done()  # still waiting for the lock
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        async with asyncio.timeout(5):
            [task_id], _ = await writes
        ticker.cancel()
        assert len(gaps) > 50 and max(gaps) < 0.06, max(gaps)
        assert (await store.task_identity(task_id)) is not None
        assert len(await store.list_tokens()) == 1


async def test_nul_characters_in_results_are_stored(store: Store) -> None:
    """Output with NUL characters is stored (PostgreSQL text cannot hold NUL: it becomes U+FFFD)."""
    now = now_ms()
    agent = str(uuid.uuid4())
    rows = [
        NewTask(
            agent, f"tok{i:07d}", "execute", {"execute": {"cmd": "x", "args": []}}, now + 1, now
        )
        for i in range(2)
    ]
    await store.insert_tasks(rows)
    uploads = [
        TaskResponse.model_validate(
            {
                "task_id": rows[0].id,
                "agent_uuid": agent,
                "task_token": rows[0].task_token,
                "timestamp": now,
                "success": True,
                "task_event_result": {"execute": "a\x00b"},
            }
        ),
        TaskResponse.model_validate(
            {
                "task_id": rows[1].id,
                "agent_uuid": agent,
                "task_token": rows[1].task_token,
                "timestamp": now,
                "success": False,
                "error_message": "bad\x00thing",
            }
        ),
    ]
    await asyncio.gather(*(store.complete_task(u) for u in uploads))
    kept = "\x00" if store.is_sqlite else "\ufffd"
    first = await store.get_result(rows[0].id)
    second = await store.get_result(rows[1].id)
    assert first is not None and first.task_event_result == {"execute": f"a{kept}b"}
    assert second is not None and second.error_message == f"bad{kept}thing"


async def test_a_lookup_the_database_cannot_make_is_refused_not_a_database_error(
    store: Store,
) -> None:
    """Looking up a NUL-bearing name finds nothing (SQLite) or is 108 (PostgreSQL), never 103."""
    try:
        found = await store.cron_by_name("nul\x00name")
    except InvalidInput:
        assert not store.is_sqlite
    else:
        assert found is None and store.is_sqlite
    assert await store.cron_by_name("plain") is None


async def test_writes_commit_while_every_read_connection_is_taken(store: Store) -> None:
    """A flood of reads holding every read connection never holds back a commit."""
    release = threading.Event()
    # pool_size=2: two read threads on SQLite, 2 + 2 overflow connections on PostgreSQL
    count = 2 if store.is_sqlite else 4
    loop = asyncio.get_running_loop()
    holding: asyncio.Queue[None] = asyncio.Queue()

    def hold(conn: Connection) -> None:
        conn.exec_driver_sql("SELECT 1")  # the connection is checked out and in use
        # a read runs on a SQLite read thread, or in a greenlet on this loop (PostgreSQL)
        loop.call_soon_threadsafe(holding.put_nowait, None)
        while not release.is_set():
            if store.is_sqlite:
                release.wait(0.05)  # the read thread waits
            else:
                conn.exec_driver_sql("SELECT pg_sleep(0.01)")  # awaited: the loop runs on

    holders = [asyncio.create_task(store.read(hold)) for _ in range(count)]
    try:
        async with asyncio.timeout(scaled(10)):  # every read holds its connection
            for _ in range(count):
                await holding.get()
        now = now_ms()
        task = NewTask(str(uuid.uuid4()), "tok0000001", "version", "version", now + 60_000, now)
        async with asyncio.timeout(5):
            [task_id] = await store.insert_tasks([task])
        assert not any(h.done() for h in holders), "the reads were holding their connections"
    finally:
        release.set()
        await asyncio.gather(*holders)
    assert (await store.task_identity(task_id)) is not None


async def _seed(store: Store) -> list[NewTask]:
    """Tasks of two agents and three kinds: queued, running, answered and reaped ones."""
    now = now_ms()
    kinds = [("ping", {"ping": "127.0.0.1"}), ("ip", "ip"), ("version", "version")]
    rows = [
        NewTask(
            AGENT_A if i % 2 else AGENT_B,
            f"tok{i:07d}",
            *kinds[i % 3],
            deadline=now - 1 if i == 11 else now + 60_000,
            created_at=now,
            state=TaskState.QUEUED if i in (9, 10) else TaskState.RUNNING,
            queue_ttl_ms=60_000 if i in (9, 10) else None,
            cron_source="nightly" if i % 4 == 0 else None,
        )
        for i in range(12)
    ]
    await store.insert_tasks(rows)
    results = {"ping": {"ping": 1.0}, "ip": {"ip": ["192.0.2.1", None]}, "version": {"version": {}}}
    for i, row in enumerate(rows[:8]):
        upload = {
            "task_id": row.id,
            "agent_uuid": row.uuid,
            "task_token": row.task_token,
            "timestamp": 1_000 + 250 * i,
            "success": i % 3 != 0,
            "task_event_result": results[row.type],
        }
        await store.complete_task(TaskResponse.model_validate(upload))
    assert len(await store.reap(now_ms())) == 1
    return rows


def _index_lookup_sqlite(plan: list[str]) -> bool:
    """Whether SQLite reads the task table through an index lookup or a partial index only."""
    partial = {
        ix.name for ix in task_t.indexes if ix.dialect_options["sqlite"]["where"] is not None
    }
    reads = [line for line in plan if re.match(r"(SEARCH|SCAN) task\b", line)]

    def served(line: str) -> bool:
        if line.startswith("SEARCH task USING "):
            return True
        scan = re.fullmatch(r"SCAN task USING (?:COVERING )?INDEX (\w+)", line)
        return scan is not None and scan.group(1) in partial

    return bool(reads) and all(served(line) for line in reads)


def _index_lookup_postgresql(plan: dict[str, Any]) -> bool:
    """Whether PostgreSQL reads the task table only through index conditions on an index's
    first column, or through a partial index."""
    leading = {"task_pkey": "id"} | {
        str(ix.name): next(iter(ix.columns)).name for ix in task_t.indexes
    }
    partial = {
        ix.name for ix in task_t.indexes if ix.dialect_options["postgresql"]["where"] is not None
    }
    scans: list[dict[str, Any]] = []

    def walk(node: dict[str, Any]) -> None:
        if node.get("Relation Name") == "task" or "Index Name" in node:
            scans.append(node)
        for child in node.get("Plans", []):
            walk(child)

    walk(plan)
    index_scans = [node for node in scans if "Index Name" in node]
    return (
        bool(index_scans)
        and not any(node["Node Type"] == "Seq Scan" for node in scans)
        and all(
            node["Index Name"] in partial
            or re.search(rf"\b{leading[node['Index Name']]}\b", node.get("Index Cond", ""))
            for node in index_scans
        )
    )


async def test_every_query_form_is_served_by_an_index(store: Store) -> None:
    """Task queries by uuid, type, both, cron_source, task_id, is_running or time are index
    lookups, not scans of the whole table, and is_running selects exactly the unanswered rows."""
    seeded = await _seed(store)
    forms: dict[str, list[Any]] = {
        "uuid": [{"uuid": AGENT_A}],
        "type": [{"type": "ping"}],
        "uuid and type": [{"uuid": AGENT_A}, {"type": "ping"}],
        "cron_source": [{"cron_source": "nightly"}],
        "task_id": [{"task_id": seeded[3].id}],
        "is_running": ["is_running"],
        "timestamp range": [{"timestamp_from_to": [1_000, 2_000]}],
        "timestamp_from": [{"timestamp_from": 1_000}],
        "timestamp_to": [{"timestamp_to": 2_000}],
    }
    executed: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, parameters: Any, *rest: Any) -> None:
        if "FROM task" in statement:
            executed.append((statement, parameters))

    plans: dict[str, tuple[str, Any]] = {}
    found = {}
    for engine in store.read_engines:
        event.listen(engine, "before_cursor_execute", capture)
    try:
        for name, conditions in forms.items():
            executed.clear()
            found[name] = await store.query_tasks(parse_task_conditions(conditions))
            [(statement, parameters)] = executed
            plans[name] = statement, parameters
    finally:
        for engine in store.read_engines:
            event.remove(engine, "before_cursor_execute", capture)
    everything = await store.query_tasks(parse_task_conditions([]))
    assert {row.id for row in found["is_running"]} == {
        row.id for row in everything if row.timestamp is None
    }
    assert len(found["is_running"]) == 3 and all(len(rows) for rows in found.values())

    def explain(conn: Connection) -> dict[str, Any]:
        verdicts = {}
        for name, (statement, parameters) in plans.items():
            if store.is_sqlite:
                rows = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters)
                plan = [str(row[-1]) for row in rows]
                verdicts[name] = (_index_lookup_sqlite(plan), plan)
            else:
                # on a table this small a scan is cheapest: forbid it to see what the
                # planner would use on a large one
                conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
                rows = conn.exec_driver_sql(f"EXPLAIN (FORMAT JSON) {statement}", parameters)
                [document] = rows.scalar_one()  # asyncpg decodes the json column
                verdicts[name] = (_index_lookup_postgresql(document["Plan"]), document["Plan"])
        return verdicts

    verdicts = await store.read(explain)
    assert all(ok for ok, _ in verdicts.values()), {
        name: plan for name, (ok, plan) in verdicts.items() if not ok
    }


async def test_migrations_create_exactly_the_model_tables(store: Store) -> None:
    """After every Alembic migration the schema is what models.py declares: autogenerate finds
    nothing to add, drop or alter, and each partial index has its condition."""

    def differences(conn: Connection) -> tuple[list[Any], dict[str, str], dict[str, str]]:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        where = f"{conn.dialect.name}_where"
        reflected = {
            str(ix["name"]): _predicate(ix.get("dialect_options", {}).get(where))
            for table in SQLModel.metadata.tables
            for ix in inspect(conn).get_indexes(table)
            if "duplicates_constraint" not in ix  # the index behind a UNIQUE constraint
        }
        declared = {
            str(ix.name): _predicate(ix.dialect_options[conn.dialect.name]["where"])
            for table in SQLModel.metadata.tables.values()
            for ix in table.indexes
        }
        return compare_metadata(context, SQLModel.metadata), reflected, declared

    diff, reflected, declared = await store.read(differences)
    assert diff == []
    assert reflected == declared


def _predicate(where: Any) -> str:
    """A partial index condition without the brackets and spaces databases add or drop."""
    return "" if where is None else re.sub(r"[()\s]", "", str(where))


async def test_taking_queued_tasks_reads_only_the_queued_ones(store: Store) -> None:
    """The statement that takes agents' queued tasks reads the partial index of queued tasks,
    not every task those agents ever had, and takes exactly the queued ones."""
    seeded = await _seed(store)
    statement = store.backend.statement(queued_rows)
    uuids = store.backend.list_arg([AGENT_A, AGENT_B])
    args = tuple(statement.args({"uuids": uuids, "now": now_ms()}))

    def plan(conn: Connection) -> str:
        if store.is_sqlite:
            rows = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement.sql}", args)
            return "\n".join(str(row[-1]) for row in rows)
        conn.exec_driver_sql("SET LOCAL enable_seqscan = off")  # as on a large table
        rows = conn.exec_driver_sql(f"EXPLAIN {statement.sql}", args)
        return "\n".join(str(row[0]) for row in rows)

    text = await store.read(plan)
    assert "ix_task_queued_uuid" in text and "ix_task_uuid" not in text.replace(
        "ix_task_queued_uuid", ""
    ), text
    taken = await store.take_queued(AGENT_A, 60_000) + await store.take_queued(AGENT_B, 60_000)
    queued = [row.id for row in seeded if row.state == TaskState.QUEUED]
    assert sorted(task.id for task in taken) == sorted(queued)
