"""The scheduler: its croniter trigger, catch-up after downtime, the per-slot guard, precision."""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import text

from taskd.crontab import parse_expression
from taskd.hub import Hub
from taskd.scheduler import RESYNC_INTERVAL_S, CronTrigger, Scheduler, slot_ms
from taskd.store import Store
from tests.helpers import scaled

EVERY_SECOND = "* * * * * *"


def agent_cron(uuids: list[str]) -> dict[str, Any]:
    """An agent cron_type pinging localhost's discard port on ``uuids``."""
    return {"agent": [uuids, {"task": {"tcp_ping": "127.0.0.1:9"}}]}


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    """A migrated store over a fresh database (no server, so no other scheduler)."""
    async with Store(database_url, pool_size=4) as opened:
        await opened.migrate()
        yield opened


async def add_cron(store: Store, name: str, expression: str, **values: Any) -> Any:
    """Insert a cron row straight into the store, as another node would."""
    return await store.insert_cron(
        {
            "name": name,
            "cron_expression": expression,
            "cron_type": agent_cron([str(uuid.uuid4())]),
            "task_type": "tcp_ping",
        }
        | values
    )


def new_scheduler(store: Store) -> Scheduler:
    """A scheduler with a real hub (no agent is connected) over ``store``."""
    node_id = f"test-{uuid.uuid4()}"
    hub = Hub(store, node_id=node_id, task_deadline_ms=60_000)
    return Scheduler(store, hub, timezone="UTC", node_id=node_id)


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
