"""The scheduler: its croniter trigger, catch-up after downtime, the per-slot guard, precision,
an exact fire history (interrupted, refused and skipped slots), and the configured timezone."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import sqlite3
import statistics
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from taskd.auth import NewToken, hash_secret
from taskd.config import ServerSettings, load_server_settings, write_default_server_config
from taskd.crontab import parse_expression
from taskd.hub import Hub
from taskd.scheduler import (
    INTERRUPTED,
    INTERRUPTED_AFTER_MS,
    MAX_OVERLAPPING_FIRES,
    RESYNC_INTERVAL_S,
    CronTrigger,
    Scheduler,
    slot_ms,
)
from taskd.store import Store
from tests.helpers import scaled

EVERY_SECOND = "* * * * * *"
NEVER_SOON = "0 0 0 1 1 * 2099"


def agent_cron(uuids: list[str]) -> dict[str, Any]:
    """An agent cron_type pinging localhost's discard port on ``uuids``."""
    return {"agent": [uuids, {"task": {"tcp_ping": "127.0.0.1:9"}}]}


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    """A migrated store over a fresh database (no server, so no other scheduler)."""
    async with Store(database_url, pool_size=4) as opened:
        await opened.migrate()
        yield opened


async def add_creator(store: Store) -> str:
    """Insert a token that may create any task anywhere; return its key."""
    token = NewToken.generate()
    limits = [{"scopes": ["global"], "permissions": [{"task": {"create": "*"}}]}]
    await store.insert_token(
        {"key": token.key, "secret_hash": hash_secret(token.secret), "limits": limits}
    )
    return token.key


async def add_cron(store: Store, name: str, expression: str, **values: Any) -> Any:
    """Insert a cron row straight into the store, as another node would."""
    return await store.insert_cron(
        {
            "name": name,
            "cron_expression": expression,
            "cron_type": agent_cron([str(uuid.uuid4())]),
            "task_type": "tcp_ping",
            "created_by": await add_creator(store),
        }
        | values
    )


def new_scheduler(store: Store, timezone: str = "UTC", node_id: str | None = None) -> Scheduler:
    """A scheduler with a real hub (no agent is connected) over ``store``."""
    node_id = node_id or f"test-{uuid.uuid4()}"
    hub = Hub(store, node_id=node_id, task_deadline_ms=60_000)
    return Scheduler(store, hub, timezone=timezone, node_id=node_id)


async def fires_of(store: Store, cron_id: int) -> list[tuple[int, int]]:
    """(slot, fired_at) of every recorded fire of a cron, by slot."""

    async def fetch(conn: Any) -> list[tuple[int, int]]:
        result = await conn.execute(
            text("select slot, fired_at from cron_fire where cron_id = :c order by slot"),
            {"c": cron_id},
        )
        return [(int(r.slot), int(r.fired_at)) for r in result]

    rows: list[tuple[int, int]] = await store.read(fetch)
    return rows


async def results_of(store: Store, cron_id: int) -> list[Any]:
    """Every result row of a cron, by run_time and agent."""

    async def fetch(conn: Any) -> list[Any]:
        result = await conn.execute(
            text(
                "select run_time, agent_uuid, cron_name, relative_id, success, message "
                "from cron_result where cron_id = :c order by run_time, agent_uuid"
            ),
            {"c": cron_id},
        )
        return list(result)

    rows: list[Any] = await store.read(fetch)
    return rows


async def refuse_results(store: Store, refuse: bool) -> None:
    """Make the database itself refuse every cron_result insert (a trigger), or stop refusing."""
    if store.is_sqlite:
        statements = (
            [
                "CREATE TRIGGER refuse_results BEFORE INSERT ON cron_result "
                "BEGIN SELECT RAISE(ABORT, 'cron results refused'); END"
            ]
            if refuse
            else ["DROP TRIGGER refuse_results"]
        )
    else:
        statements = (
            [
                "CREATE FUNCTION refuse_results() RETURNS trigger LANGUAGE plpgsql "
                "AS $$ BEGIN RAISE EXCEPTION 'cron results refused'; END $$",
                "CREATE TRIGGER refuse_results BEFORE INSERT ON cron_result "
                "FOR EACH ROW EXECUTE FUNCTION refuse_results()",
            ]
            if refuse
            else ["DROP TRIGGER refuse_results ON cron_result", "DROP FUNCTION refuse_results()"]
        )

    async def run(conn: Any) -> None:
        for statement in statements:
            await conn.execute(text(statement))

    await store.write(run)


@contextlib.asynccontextmanager
async def cron_fire_locked(store: Store) -> AsyncIterator[None]:
    """Hold a lock from another connection that keeps every claim of a slot waiting."""
    if store.is_sqlite:
        # SQLite has one write lock for the whole file
        path = make_url(store.url).database
        assert path is not None
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            conn.execute("ROLLBACK")
            conn.close()
        return
    dsn = make_url(store.url).set(drivername="postgresql").render_as_string(False)
    pg = await asyncpg.connect(dsn)
    try:
        transaction = pg.transaction()
        await transaction.start()
        await pg.execute("LOCK TABLE cron_fire IN EXCLUSIVE MODE")
        try:
            yield
        finally:
            await transaction.rollback()
    finally:
        await pg.close()


async def result_slots(store: Store, cron_id: int) -> list[int]:
    """The run_time of every result row of a cron."""

    async def fetch(conn: Any) -> list[int]:
        result = await conn.execute(
            text("select run_time from cron_result where cron_id = :c order by run_time"),
            {"c": cron_id},
        )
        return [int(r.run_time) for r in result]

    rows: list[int] = await store.read(fetch)
    return rows


def test_trigger_asks_croniter_and_skips_to_the_latest_missed_slot() -> None:
    """The trigger gives the next slot, or when behind the latest slot up to now (one catch-up)."""
    trigger = CronTrigger(parse_expression("*/5 * * * *"))
    now = datetime(2026, 5, 1, 12, 7, 30, tzinfo=UTC)
    assert trigger.get_next_fire_time(None, now) == datetime(2026, 5, 1, 12, 10, tzinfo=UTC)
    previous = datetime(2026, 5, 1, 12, 5, tzinfo=UTC)
    assert trigger.get_next_fire_time(previous, now) == datetime(2026, 5, 1, 12, 10, tzinfo=UTC)
    long_ago = datetime(2026, 4, 1, 0, 0, tzinfo=UTC)
    assert trigger.get_next_fire_time(long_ago, now) == datetime(2026, 5, 1, 12, 5, tzinfo=UTC)
    seconds = CronTrigger(parse_expression(EVERY_SECOND))
    exact = datetime(2026, 5, 1, 12, 0, 0, tzinfo=UTC)
    assert seconds.get_next_fire_time(exact, exact) == exact + timedelta(seconds=1)
    assert seconds.get_next_fire_time(exact - timedelta(hours=5), exact) == exact


def test_trigger_ends_when_the_expression_never_fires_again() -> None:
    """A 7-field expression past its last year yields None, so APScheduler drops the job."""
    trigger = CronTrigger(parse_expression("0 0 0 1 1 * 2098-2099"))
    last = datetime(2099, 1, 1, tzinfo=UTC)
    assert trigger.get_next_fire_time(None, last - timedelta(seconds=1)) == last
    assert trigger.get_next_fire_time(last, last) is None


async def test_start_fires_the_latest_missed_slot_once(store: Store) -> None:
    """A cron that missed slots while no scheduler ran fires once, for the latest missed slot."""
    long_ago = (int(time.time()) - 30) * 1000
    cron = await add_cron(
        store, "missed", EVERY_SECOND, updated_at=long_ago, last_run_time=long_ago
    )
    before = int(time.time() * 1000)
    async with new_scheduler(store):
        started = int(time.time() * 1000)
        await asyncio.sleep(scaled(1.6))
    fires = [slot for slot, _ in await fires_of(store, cron.id)]
    assert len(fires) >= 2
    # one catch-up slot (at or just before the start), then every slot after it
    assert before - 1000 <= fires[0] <= started
    assert all(b - a == 1000 for a, b in itertools.pairwise(fires))
    assert await result_slots(store, cron.id) == fires


async def test_catch_up_only_for_slots_after_the_last_edit(store: Store) -> None:
    """A daily cron fires its missed midnight only if it existed (unchanged) at that midnight."""
    two_days_ago = int(time.time() * 1000) - 2 * 86_400_000
    stale = await add_cron(store, "stale", "0 0 0 * * *", updated_at=two_days_ago)
    fresh = await add_cron(store, "fresh", "0 0 0 * * *")
    async with new_scheduler(store):
        await asyncio.sleep(scaled(0.5))
    midnight = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    assert [slot for slot, _ in await fires_of(store, stale.id)] == [slot_ms(midnight)]
    assert await fires_of(store, fresh.id) == []


async def test_a_claimed_slot_is_never_fired_again(store: Store) -> None:
    """Slots already recorded (by a previous run or another node) get no second fire."""
    cron = await add_cron(store, "guarded", EVERY_SECOND)
    first = (int(time.time()) + 1) * 1000
    taken = [first + i * 1000 for i in range(2)]
    for slot in taken:
        assert await store.claim_cron_slot(cron.id, slot, slot, "other-node") is not None
    assert await store.claim_cron_slot(cron.id, taken[0], taken[0], "again") is None
    async with new_scheduler(store):
        await asyncio.sleep((taken[-1] - time.time() * 1000) / 1000 + scaled(1.5))
    results = await result_slots(store, cron.id)
    assert results and not set(results) & set(taken)
    fires = await fires_of(store, cron.id)
    assert [slot for slot, _ in fires] == sorted({slot for slot, _ in fires})


async def test_disabled_and_deleted_crons_do_not_fire(store: Store) -> None:
    """A disabled cron is not scheduled; one disabled behind the scheduler's back is not fired."""
    off = await add_cron(store, "off", EVERY_SECOND, enable=False)
    sneaky = await add_cron(store, "sneaky", EVERY_SECOND)
    gone = await add_cron(store, "gone", EVERY_SECOND)
    async with new_scheduler(store):
        await store.update_cron("sneaky", {"enable": False})
        await store.delete_cron("gone")
        await asyncio.sleep(scaled(1.5))
    assert await fires_of(store, off.id) == []
    assert await fires_of(store, sneaky.id) == []
    assert await fires_of(store, gone.id) == []


async def test_a_cron_without_agents_fires_nothing_and_records_nothing(store: Store) -> None:
    """An empty agent list gets no fire, no result row and no last_run_time, even for a missed
    slot that a cron with agents catches up at once; an edit that adds agents makes it fire."""
    long_ago = (int(time.time()) - 30) * 1000
    missed = {"updated_at": long_ago, "last_run_time": long_ago}
    empty = await add_cron(store, "empty", EVERY_SECOND, cron_type=agent_cron([]), **missed)
    control = await add_cron(store, "control", EVERY_SECOND, **missed)

    async def fired(cron_id: int, count: int) -> None:
        deadline = time.monotonic() + scaled(5)
        while len(await result_slots(store, cron_id)) < count:
            assert time.monotonic() < deadline, f"cron {cron_id} did not fire {count} time(s)"
            await asyncio.sleep(0.02)

    async with new_scheduler(store):
        # the control's catch-up fires as the scheduler starts, and then the next slot
        await fired(control.id, 2)
        assert await fires_of(store, empty.id) == []
        assert await result_slots(store, empty.id) == []
        [row] = [c for c in await store.list_crons() if c.id == empty.id]
        assert row.last_run_time == long_ago
        await store.update_cron("empty", {"cron_type": agent_cron([str(uuid.uuid4())])})
        await fired(empty.id, 1)


async def test_fires_land_within_milliseconds_of_their_slot(store: Store) -> None:
    """On an idle server a per-second cron starts each fire within a few ms of its slot."""
    cron = await add_cron(store, "precise", EVERY_SECOND)
    async with new_scheduler(store):
        await asyncio.sleep(scaled(5.2))
    fires = await fires_of(store, cron.id)
    assert len(fires) >= 4
    lateness = sorted(fired_at - slot for slot, fired_at in fires)
    assert all(slot % 1000 == 0 for slot, _ in fires)
    assert lateness[0] >= 0
    print(f"fire lateness ms: p50={statistics.median(lateness)} max={lateness[-1]}")
    assert statistics.median(lateness) <= scaled(25)
    assert lateness[-1] <= scaled(250)


def test_slot_ms_is_exact() -> None:
    """A slot converts to whole epoch milliseconds without float drift."""
    slot = datetime(2099, 12, 31, 23, 59, 59, tzinfo=UTC)
    assert slot_ms(slot) == 4102444799000


async def test_crons_changed_elsewhere_are_picked_up(store: Store) -> None:
    """Crons created, edited and deleted behind the scheduler's back (another node) apply soon."""
    async with new_scheduler(store):
        created = await add_cron(store, "elsewhere", "0 0 0 1 1 * 2099")
        moved = await add_cron(store, "moved", "0 0 0 1 1 * 2099")
        doomed = await add_cron(store, "doomed", "0 0 0 1 1 * 2099")
        await store.update_cron("elsewhere", {"cron_expression": EVERY_SECOND})
        await store.update_cron("moved", {"cron_expression": EVERY_SECOND})
        await asyncio.sleep(RESYNC_INTERVAL_S + scaled(1.5))
        assert len(await fires_of(store, created.id)) >= 1
        assert len(await fires_of(store, moved.id)) >= 1
        await store.update_cron("moved", {"cron_expression": "0 0 0 1 1 * 2099"})
        await store.delete_cron("elsewhere")
        await asyncio.sleep(RESYNC_INTERVAL_S + scaled(0.5))
        settled = {cron.id: len(await fires_of(store, cron.id)) for cron in (created, moved)}
        await asyncio.sleep(scaled(2))
        for cron in (created, moved):
            assert len(await fires_of(store, cron.id)) == settled[cron.id]
    assert await fires_of(store, doomed.id) == []


async def test_stop_and_start_again_reloads_from_the_database(store: Store) -> None:
    """A scheduler that stops and starts again (leadership moving) fires from the database rows."""
    scheduler = new_scheduler(store)
    kept = await add_cron(store, "kept", EVERY_SECOND)
    async with scheduler:
        await asyncio.sleep(scaled(1.2))
    while_stopped = await add_cron(store, "while-stopped", EVERY_SECOND)
    scheduler.schedule(while_stopped)  # stopped: only noted, nothing is fired
    await asyncio.sleep(scaled(1.2))
    assert await fires_of(store, while_stopped.id) == []
    count_stopped = len(await fires_of(store, kept.id))
    async with scheduler:
        await asyncio.sleep(scaled(1.6))
    fires = [slot for slot, _ in await fires_of(store, kept.id)]
    assert len(fires) > count_stopped
    assert fires == sorted(set(fires))
    assert len(await fires_of(store, while_stopped.id)) >= 1


async def test_pending_slots_cut_short_are_settled_as_interrupted(store: Store) -> None:
    """At start, a slot this node claimed without storing its rows, or another node claimed over
    a minute ago, gets one interrupted row per target; another node's fresh claim is left alone."""
    targets = sorted(str(uuid.uuid4()) for _ in range(2))
    cron = await add_cron(store, "cut", NEVER_SOON, cron_type=agent_cron(targets))
    doomed = await add_cron(store, "deleted-since", NEVER_SOON)
    node_id = f"restarted-{uuid.uuid4()}"
    now = int(time.time()) * 1000
    ours, old, fresh = now - 5000, now - 6000, now - 7000
    assert await store.claim_cron_slot(cron.id, ours, ours, node_id) is not None
    long_ago = now - INTERRUPTED_AFTER_MS - 1000
    assert await store.claim_cron_slot(cron.id, old, long_ago, "dead-node") is not None
    assert await store.claim_cron_slot(cron.id, fresh, now, "live-node") is not None
    assert await store.claim_cron_slot(doomed.id, ours, ours, node_id) is not None
    await store.delete_cron("deleted-since")
    async with new_scheduler(store, node_id=node_id) as scheduler:
        rows = await results_of(store, cron.id)
        assert [(r.run_time, r.agent_uuid) for r in rows] == [
            (slot, agent) for slot in (old, ours) for agent in targets
        ]
        assert all(r.message == INTERRUPTED for r in rows)
        assert all(not r.success and r.relative_id is None for r in rows)
        [gone] = await results_of(store, doomed.id)
        assert gone.cron_name == "deleted-since" and gone.message == INTERRUPTED
        pending = [(f.cron_id, f.slot) for f in await store.pending_cron_fires()]
        assert pending == [(cron.id, fresh)]
        await scheduler.settle_interrupted()
        assert await results_of(store, cron.id) == rows
    assert not await store.settle_cron_fire(cron.id, ours, [])


async def test_rows_the_database_refused_are_stored_once_it_accepts_them(store: Store) -> None:
    """While the database refuses result rows the fires keep their outcome; once it accepts
    them again every claimed slot gets exactly its real rows, none twice."""
    target = str(uuid.uuid4())
    cron = await add_cron(store, "refused", EVERY_SECOND, cron_type=agent_cron([target]))
    async with new_scheduler(store):
        await refuse_results(store, True)
        refused_from = int(time.time() * 1000)
        await asyncio.sleep(scaled(1.6))
        stuck = [f.slot for f in await store.pending_cron_fires() if f.slot > refused_from]
        assert stuck, "no fire was refused its rows"
        assert not set(stuck) & set(await result_slots(store, cron.id))
        await refuse_results(store, False)
        await asyncio.sleep(RESYNC_INTERVAL_S + scaled(1))
    slots = [slot for slot, _ in await fires_of(store, cron.id)]
    rows = await results_of(store, cron.id)
    assert Counter(r.run_time for r in rows) == Counter(slots)
    assert set(stuck) <= set(slots)
    assert all(r.message == f"Agent {target} is not connected" for r in rows)
    assert await store.pending_cron_fires() == []


async def test_slots_past_the_overlap_limit_are_recorded_as_skipped(store: Store) -> None:
    """With claims stuck on a lock, the fires past the overlap limit record their slots as
    skipped: every slot keeps exactly one row and none goes missing."""
    target = str(uuid.uuid4())
    cron = await add_cron(store, "stuck", EVERY_SECOND, cron_type=agent_cron([target]))
    async with new_scheduler(store):
        await asyncio.sleep(scaled(1.2))
        async with cron_fire_locked(store):
            await asyncio.sleep(MAX_OVERLAPPING_FIRES + scaled(2.5))
        await asyncio.sleep(scaled(1.5))
    slots = [slot for slot, _ in await fires_of(store, cron.id)]
    assert all(b - a == 1000 for a, b in itertools.pairwise(slots)), slots
    rows = await results_of(store, cron.id)
    assert Counter(r.run_time for r in rows) == Counter(slots)
    skipped = [r for r in rows if r.message.startswith("Slot skipped")]
    assert len(skipped) >= 2
    assert skipped[0].message == (
        f"Slot skipped: {MAX_OVERLAPPING_FIRES} earlier fires of this cron were still running "
        "(a slow database)"
    )
    fired = [r for r in rows if r not in skipped]
    assert all(r.message == f"Agent {target} is not connected" for r in fired)
    assert await store.pending_cron_fires() == []


async def test_slots_follow_the_configured_timezone(store: Store) -> None:
    """In America/New_York, expressions are New York wall-clock times, both for the catch-up
    slot at start and for a live fire."""
    zone = ZoneInfo("America/New_York")
    now = datetime.now(zone)
    missed = (now - timedelta(minutes=1)).replace(second=0, microsecond=0)
    soon = (now + timedelta(seconds=2)).replace(microsecond=0)
    two_days_ago = int(time.time() * 1000) - 2 * 86_400_000
    behind = await add_cron(
        store, "ny-missed", f"0 {missed.minute} {missed.hour} * * *", updated_at=two_days_ago
    )
    live = await add_cron(store, "ny-live", f"{soon.second} {soon.minute} {soon.hour} * * *")
    scheduler = new_scheduler(store, timezone="America/New_York")
    assert scheduler.zone == zone
    async with scheduler:
        await asyncio.sleep((soon - datetime.now(zone)).total_seconds() + scaled(1))
    assert [slot for slot, _ in await fires_of(store, behind.id)] == [slot_ms(missed)]
    assert [slot for slot, _ in await fires_of(store, live.id)] == [slot_ms(soon)]
    # read as UTC, the same wall-clock time is another instant, hours away
    assert abs(slot_ms(soon.replace(tzinfo=UTC)) - slot_ms(soon)) >= 4 * 3_600_000


def test_the_default_timezone_is_utc(tmp_path: Path) -> None:
    """Without a timezone setting the server, and so its scheduler, runs in UTC."""
    bare = tmp_path / "bare.toml"
    bare.write_text(f'[server]\nserver_uuid = "{uuid.uuid4()}"\n')
    assert load_server_settings(bare).timezone == "UTC"
    written = tmp_path / "written.toml"
    write_default_server_config(written)
    assert load_server_settings(written).timezone == "UTC"
    settings = ServerSettings(server_uuid=str(uuid.uuid4()), database_url="sqlite:///unused.db")
    assert settings.timezone == "UTC"
    store = Store(f"sqlite+aiosqlite:///{tmp_path / 'unused.db'}")
    scheduler = Scheduler(
        store,
        Hub(store, node_id="n", task_deadline_ms=1000),
        timezone=settings.timezone,
        node_id="n",
    )
    assert scheduler.zone == ZoneInfo("UTC")
