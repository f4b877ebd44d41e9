"""The scheduler: its croniter trigger, catch-up after downtime, the per-slot guard, precision,
an exact fire history (interrupted, refused and skipped slots), and the configured timezone.

Each test drives the scheduler's clock instead of waiting for real slots: it starts just past a
whole minute, and minutely crons fire only when the test moves it to the next minute."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import sqlite3
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from taskd.auth import NewToken, hash_secret
from taskd.clock import Clock
from taskd.config import ServerSettings, load_server_settings, write_default_server_config
from taskd.crontab import parse_expression
from taskd.errors import DatabaseError
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
MINUTELY = "0 * * * * *"
NEVER_SOON = "0 0 0 1 1 * 2099"


def agent_cron(uuids: list[str]) -> dict[str, Any]:
    """An agent cron_type pinging localhost's discard port on ``uuids``."""
    return {"agent": [uuids, {"task": {"tcp_ping": "127.0.0.1:9"}}]}


def next_minute(clock: Clock, minutes: int = 1) -> datetime:
    """The whole minute ``minutes`` after the clock's current minute."""
    return clock.now().replace(second=0, microsecond=0) + timedelta(minutes=minutes)


async def move_to(clock: Clock, when: datetime) -> None:
    """Move ``clock`` ahead to ``when`` and let the scheduler hand out what fell due.

    The jump re-times the jobs and queues APScheduler's wake-up; yielding once runs it.
    """
    clock.advance_to(when)
    await asyncio.sleep(0)


async def until(probe: Callable[[], Any], what: str, timeout: float = 5.0) -> Any:
    """Poll ``probe`` (plain or async) until it returns something truthy: a condition to
    wait for, never a latency to assert."""
    deadline = time.monotonic() + scaled(timeout)
    while True:
        value = probe()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} did not happen"
        await asyncio.sleep(0.01)


async def len_at_least(rows: Awaitable[list[Any]], count: int) -> bool:
    """Whether ``rows`` has ``count`` items or more."""
    return len(await rows) >= count


@pytest.fixture
def clock() -> Clock:
    """A clock one second past a whole minute: no minutely slot comes until a test moves it."""
    clock = Clock()
    clock.advance_to(next_minute(clock) + timedelta(seconds=1))
    return clock


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


async def add_cron(store: Store, clock: Clock, name: str, expression: str, **values: Any) -> Any:
    """Insert a cron row straight into the store, as another node would, at ``clock``'s time."""
    return await store.insert_cron(
        {
            "name": name,
            "cron_expression": expression,
            "cron_type": agent_cron([str(uuid.uuid4())]),
            "task_type": "tcp_ping",
            "created_by": await add_creator(store),
        }
        | values,
        now=clock.now_ms(),
    )


def new_scheduler(
    store: Store,
    clock: Clock,
    timezone: str = "UTC",
    node_id: str | None = None,
    resync_interval_s: float = 3600,
) -> Scheduler:
    """A scheduler with a real hub (no agent is connected) over ``store``, keeping ``clock``.

    Its resync loop waits an hour: a test that needs a resync asks for it.
    """
    node_id = node_id or f"test-{uuid.uuid4()}"
    hub = Hub(store, node_id=node_id, task_deadline_ms=60_000)
    return Scheduler(
        store,
        hub,
        clock=clock,
        timezone=timezone,
        node_id=node_id,
        resync_interval_s=resync_interval_s,
    )


@contextlib.asynccontextmanager
async def running(scheduler: Scheduler) -> AsyncIterator[Scheduler]:
    """The scheduler entered and firing; leaving waits for the fires still running."""
    async with scheduler:
        await scheduler.start()
        yield scheduler


async def fires_of(store: Store, cron_id: int) -> list[tuple[int, int]]:
    """(slot, fired_at) of every recorded fire of a cron, by slot."""

    def fetch(conn: Any) -> list[tuple[int, int]]:
        result = conn.execute(
            text("select slot, fired_at from cron_fire where cron_id = :c order by slot"),
            {"c": cron_id},
        )
        return [(int(r.slot), int(r.fired_at)) for r in result]

    rows: list[tuple[int, int]] = await store.read(fetch)
    return rows


async def results_of(store: Store, cron_id: int) -> list[Any]:
    """Every result row of a cron, by run_time and agent."""

    def fetch(conn: Any) -> list[Any]:
        result = conn.execute(
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

    def run(conn: Any) -> None:
        for statement in statements:
            conn.execute(text(statement))

    for attempt in range(5):
        try:
            await store.write(run)
            return
        except DatabaseError:
            # committed with a refused result write of the same group, it was rolled back
            # with it: the writer's callers retry, and so does this one
            if attempt == 4:
                raise
            await asyncio.sleep(0.05)


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

    def fetch(conn: Any) -> list[int]:
        result = conn.execute(
            text("select run_time from cron_result where cron_id = :c order by run_time"),
            {"c": cron_id},
        )
        return [int(r.run_time) for r in result]

    rows: list[int] = await store.read(fetch)
    return rows


def test_trigger_asks_croniter_and_skips_to_the_latest_missed_slot() -> None:
    """The trigger gives the next slot, or when behind the latest slot up to now (one catch-up)."""
    trigger = CronTrigger(parse_expression("*/5 * * * *"), Clock())
    now = datetime(2026, 5, 1, 12, 7, 30, tzinfo=UTC)
    assert trigger.get_next_fire_time(None, now) == datetime(2026, 5, 1, 12, 10, tzinfo=UTC)
    previous = datetime(2026, 5, 1, 12, 5, tzinfo=UTC)
    assert trigger.get_next_fire_time(previous, now) == datetime(2026, 5, 1, 12, 10, tzinfo=UTC)
    long_ago = datetime(2026, 4, 1, 0, 0, tzinfo=UTC)
    assert trigger.get_next_fire_time(long_ago, now) == datetime(2026, 5, 1, 12, 5, tzinfo=UTC)
    seconds = CronTrigger(parse_expression(EVERY_SECOND), Clock())
    exact = datetime(2026, 5, 1, 12, 0, 0, tzinfo=UTC)
    assert seconds.get_next_fire_time(exact, exact) == exact + timedelta(seconds=1)
    assert seconds.get_next_fire_time(exact - timedelta(hours=5), exact) == exact


def test_trigger_translates_between_the_clock_and_the_system_clock() -> None:
    """With the clock an hour ahead, APScheduler (on the system clock) is handed each slot an
    hour earlier, and the system times it hands back are read as the clock's."""
    clock = Clock()
    clock.ahead = timedelta(hours=1)
    trigger = CronTrigger(parse_expression("*/5 * * * *"), clock)
    system_now = datetime(2026, 5, 1, 11, 7, 30, tzinfo=UTC)  # 12:07:30 on the clock
    slot = datetime(2026, 5, 1, 12, 10, tzinfo=UTC)
    assert trigger.get_next_fire_time(None, system_now) == slot - clock.ahead
    assert trigger.get_next_fire_time(slot - clock.ahead, slot - clock.ahead) == (
        slot + timedelta(minutes=5) - clock.ahead
    )


def test_trigger_ends_when_the_expression_never_fires_again() -> None:
    """A 7-field expression past its last year yields None, so APScheduler drops the job."""
    trigger = CronTrigger(parse_expression("0 0 0 1 1 * 2098-2099"), Clock())
    last = datetime(2099, 1, 1, tzinfo=UTC)
    assert trigger.get_next_fire_time(None, last - timedelta(seconds=1)) == last
    assert trigger.get_next_fire_time(last, last) is None


async def test_start_fires_the_latest_missed_slot_once(store: Store, clock: Clock) -> None:
    """A cron that missed slots while no scheduler ran fires once, for the latest missed slot,
    and then every slot after it."""
    long_ago = clock.now_ms() - 5 * 60_000
    cron = await add_cron(
        store, clock, "missed", MINUTELY, updated_at=long_ago, last_run_time=long_ago
    )
    missed = slot_ms(next_minute(clock, 0))
    async with running(new_scheduler(store, clock)):
        await until(lambda: result_slots(store, cron.id), "the catch-up fire")
        await move_to(clock, next_minute(clock))
        await until(
            lambda: len_at_least(result_slots(store, cron.id), 2), "the fire of the next slot"
        )
    fires = [slot for slot, _ in await fires_of(store, cron.id)]
    assert fires == [missed, missed + 60_000]
    assert await result_slots(store, cron.id) == fires


async def test_catch_up_only_for_slots_after_the_last_edit(store: Store, clock: Clock) -> None:
    """A daily cron fires its missed midnight only if it existed (unchanged) at that midnight."""
    two_days_ago = clock.now_ms() - 2 * 86_400_000
    stale = await add_cron(store, clock, "stale", "0 0 0 * * *", updated_at=two_days_ago)
    fresh = await add_cron(store, clock, "fresh", "0 0 0 * * *")
    midnight = clock.now().replace(hour=0, minute=0, second=0, microsecond=0)
    async with running(new_scheduler(store, clock)):
        await until(lambda: result_slots(store, stale.id), "the stale cron's catch-up")
    assert [slot for slot, _ in await fires_of(store, stale.id)] == [slot_ms(midnight)]
    assert await fires_of(store, fresh.id) == []


async def test_a_claimed_slot_is_never_fired_again(store: Store, clock: Clock) -> None:
    """Slots already recorded (by a previous run or another node) get no second fire."""
    cron = await add_cron(store, clock, "guarded", MINUTELY)
    first = next_minute(clock)
    taken = [slot_ms(first) + i * 60_000 for i in range(2)]
    for slot in taken:
        assert await store.claim_cron_slot(cron.id, slot, slot, "other-node") is not None
        assert await store.settle_cron_fire(cron.id, slot, [])  # that node is done with it
    assert await store.claim_cron_slot(cron.id, taken[0], taken[0], "again") is None
    free = taken[-1] + 60_000
    async with running(new_scheduler(store, clock)):
        for minutes in range(3):  # each slot handed out on its own, not coalesced
            await move_to(clock, first + timedelta(minutes=minutes))
        await until(lambda: result_slots(store, cron.id), "the fire of the free slot")
    assert await result_slots(store, cron.id) == [free]
    assert [slot for slot, _ in await fires_of(store, cron.id)] == [*taken, free]


async def test_disabled_and_deleted_crons_do_not_fire(store: Store, clock: Clock) -> None:
    """A disabled cron is not scheduled; one disabled behind the scheduler's back is not fired."""
    off = await add_cron(store, clock, "off", MINUTELY, enable=False)
    sneaky = await add_cron(store, clock, "sneaky", MINUTELY)
    gone = await add_cron(store, clock, "gone", MINUTELY)
    control = await add_cron(store, clock, "control", MINUTELY)
    async with running(new_scheduler(store, clock)):
        await store.update_cron("sneaky", {"enable": False}, now=clock.now_ms())
        await store.delete_cron("gone")
        await move_to(clock, next_minute(clock))
        await until(lambda: result_slots(store, control.id), "the control cron's fire")
    # leaving the scheduler waited for the fires of that slot: every one of them is done
    assert await fires_of(store, off.id) == []
    assert await fires_of(store, sneaky.id) == []
    assert await fires_of(store, gone.id) == []


async def test_a_cron_without_agents_fires_nothing_and_records_nothing(
    store: Store, clock: Clock
) -> None:
    """An empty agent list gets no fire, no result row and no last_run_time, even for a missed
    slot that a cron with agents catches up at once; an edit that adds agents makes it fire."""
    long_ago = clock.now_ms() - 5 * 60_000
    missed = {"updated_at": long_ago, "last_run_time": long_ago}
    empty = await add_cron(store, clock, "empty", MINUTELY, cron_type=agent_cron([]), **missed)
    control = await add_cron(store, clock, "control", MINUTELY, **missed)

    def fired(cron_id: int, count: int) -> Callable[[], Awaitable[bool]]:
        return lambda: len_at_least(result_slots(store, cron_id), count)

    async with running(new_scheduler(store, clock)) as scheduler:
        # the control's catch-up fires as the scheduler starts, and then the next slot
        await until(fired(control.id, 1), "the control cron's catch-up")
        await move_to(clock, next_minute(clock))
        await until(fired(control.id, 2), "the control cron's next slot")
        assert await fires_of(store, empty.id) == []
        assert await result_slots(store, empty.id) == []
        [row] = [c for c in await store.list_crons() if c.id == empty.id]
        assert row.last_run_time == long_ago
        await store.update_cron(
            "empty", {"cron_type": agent_cron([str(uuid.uuid4())])}, now=clock.now_ms()
        )
        await scheduler.resync()  # what the loop does every few seconds
        await move_to(clock, next_minute(clock))
        await until(fired(empty.id, 1), "the edited cron's fire")


async def test_a_fire_starts_when_the_clock_reaches_its_slot(store: Store, clock: Clock) -> None:
    """On a clock a day ahead of the system's, a fire is claimed for its exact slot, stamped
    with the clock's time, and starts once the clock reaches the slot, not before."""
    clock.advance(86_400)
    cron = await add_cron(store, clock, "precise", MINUTELY)
    slot = next_minute(clock)
    async with running(new_scheduler(store, clock)):
        await move_to(clock, slot - timedelta(seconds=0.3))
        await until(lambda: fires_of(store, cron.id), "the fire")
    [(fired_slot, fired_at)] = await fires_of(store, cron.id)
    assert fired_slot == slot_ms(slot) and fired_slot % 1000 == 0
    assert fired_at >= fired_slot


async def test_a_clock_jump_fires_the_latest_slot_it_passed_once(
    store: Store, clock: Clock
) -> None:
    """Slots passed while the loop stalled (here: the clock jumping ten minutes) coalesce into
    one fire for the latest of them."""
    cron = await add_cron(store, clock, "jumped", MINUTELY)
    async with running(new_scheduler(store, clock)):
        await move_to(clock, next_minute(clock, 10) + timedelta(seconds=5))
        await until(lambda: result_slots(store, cron.id), "the fire")
    assert [slot for slot, _ in await fires_of(store, cron.id)] == [slot_ms(next_minute(clock, 0))]


def test_slot_ms_is_exact() -> None:
    """A slot converts to whole epoch milliseconds without float drift."""
    slot = datetime(2099, 12, 31, 23, 59, 59, tzinfo=UTC)
    assert slot_ms(slot) == 4102444799000


async def test_crons_changed_elsewhere_are_picked_up(store: Store, clock: Clock) -> None:
    """Crons created, edited and deleted behind the scheduler's back (another node) apply at
    the next resync."""
    control = await add_cron(store, clock, "control", MINUTELY)
    async with running(new_scheduler(store, clock)) as scheduler:
        created = await add_cron(store, clock, "elsewhere", NEVER_SOON)
        moved = await add_cron(store, clock, "moved", NEVER_SOON)
        doomed = await add_cron(store, clock, "doomed", NEVER_SOON)
        await store.update_cron("elsewhere", {"cron_expression": MINUTELY}, now=clock.now_ms())
        await store.update_cron("moved", {"cron_expression": MINUTELY}, now=clock.now_ms())
        await scheduler.resync()  # what the loop does every few seconds
        await move_to(clock, next_minute(clock))
        for cron in (created, moved):
            await until(lambda cron=cron: fires_of(store, cron.id), f"a fire of {cron.name}")
        await store.update_cron("moved", {"cron_expression": NEVER_SOON}, now=clock.now_ms())
        await store.delete_cron("elsewhere")
        await scheduler.resync()  # what the loop does every few seconds
        settled = {cron.id: len(await fires_of(store, cron.id)) for cron in (created, moved)}
        fired = len(await result_slots(store, control.id))
        for count in (fired + 1, fired + 2):
            await move_to(clock, next_minute(clock))
            await until(
                lambda count=count: len_at_least(result_slots(store, control.id), count),
                "a control fire",
            )
    for cron in (created, moved):
        assert len(await fires_of(store, cron.id)) == settled[cron.id]
    assert await fires_of(store, doomed.id) == []


async def test_the_resync_loop_runs_every_interval(store: Store, clock: Clock) -> None:
    """Without being asked, the scheduler reloads the crons every resync interval: one created
    through another node fires its slot (at once if the slot came before the reload)."""
    async with running(new_scheduler(store, clock, resync_interval_s=0.05)):
        created = await add_cron(store, clock, "elsewhere", MINUTELY)
        await move_to(clock, next_minute(clock))
        await until(lambda: result_slots(store, created.id), "the fire of the new cron")
    assert [slot for slot, _ in await fires_of(store, created.id)] == [
        slot_ms(next_minute(clock, 0))
    ]
    assert RESYNC_INTERVAL_S <= 5  # a server's loop: "every few seconds"


async def test_stop_and_start_again_reloads_from_the_database(store: Store, clock: Clock) -> None:
    """A scheduler that stops and starts again (leadership moving) fires from the database rows:
    slots missed while stopped catch up once, crons added while stopped fire."""
    scheduler = new_scheduler(store, clock)
    kept = await add_cron(store, clock, "kept", MINUTELY)
    first = next_minute(clock)
    async with scheduler:
        await scheduler.start()
        await move_to(clock, first)
        await until(lambda: result_slots(store, kept.id), "the first fire")
        await scheduler.stop()
        while_stopped = await add_cron(store, clock, "while-stopped", MINUTELY)
        scheduler.schedule(while_stopped)  # stopped: only noted, nothing is fired
        await move_to(clock, first + timedelta(minutes=1))
        assert await fires_of(store, while_stopped.id) == []
        assert len(await fires_of(store, kept.id)) == 1
        await scheduler.start()
        await move_to(clock, first + timedelta(minutes=2))
        await until(
            lambda: len_at_least(result_slots(store, kept.id), 3), "the fires after the restart"
        )
        await until(lambda: result_slots(store, while_stopped.id), "the new cron's fire")
    fires = [slot for slot, _ in await fires_of(store, kept.id)]
    assert fires == [slot_ms(first) + i * 60_000 for i in range(3)]
    assert len(await fires_of(store, while_stopped.id)) >= 1


async def test_pending_slots_cut_short_are_settled_as_interrupted(
    store: Store, clock: Clock
) -> None:
    """At start, a slot this node claimed without storing its rows, or another node claimed over
    a minute ago, gets one interrupted row per target; another node's fresh claim is left alone."""
    targets = sorted(str(uuid.uuid4()) for _ in range(2))
    cron = await add_cron(store, clock, "cut", NEVER_SOON, cron_type=agent_cron(targets))
    doomed = await add_cron(store, clock, "deleted-since", NEVER_SOON)
    node_id = f"restarted-{uuid.uuid4()}"
    now = clock.now_ms() // 1000 * 1000
    ours, old, fresh = now - 5000, now - 6000, now - 7000
    assert await store.claim_cron_slot(cron.id, ours, ours, node_id) is not None
    long_ago = now - INTERRUPTED_AFTER_MS - 1000
    assert await store.claim_cron_slot(cron.id, old, long_ago, "dead-node") is not None
    assert await store.claim_cron_slot(cron.id, fresh, now, "live-node") is not None
    assert await store.claim_cron_slot(doomed.id, ours, ours, node_id) is not None
    await store.delete_cron("deleted-since")
    async with running(new_scheduler(store, clock, node_id=node_id)) as scheduler:
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


async def test_rows_the_database_refused_are_stored_once_it_accepts_them(
    store: Store, clock: Clock
) -> None:
    """While the database refuses result rows the fires keep their outcome; once it accepts
    them again every claimed slot gets exactly its real rows, none twice."""
    target = str(uuid.uuid4())
    cron = await add_cron(store, clock, "refused", MINUTELY, cron_type=agent_cron([target]))

    async def pending() -> list[int]:
        return [f.slot for f in await store.pending_cron_fires()]

    async with running(new_scheduler(store, clock)) as scheduler:
        await refuse_results(store, True)
        stuck: list[int] = []
        for _ in range(2):
            slot = next_minute(clock)
            stuck.append(slot_ms(slot))
            await move_to(clock, slot)
            await until(lambda: len_at_least(pending(), len(stuck)), "a refused fire")
        assert sorted(await pending()) == stuck
        assert not set(stuck) & set(await result_slots(store, cron.id))
        await refuse_results(store, False)
        await scheduler.settle_interrupted()  # what the resync loop does every few seconds
    slots = [slot for slot, _ in await fires_of(store, cron.id)]
    rows = await results_of(store, cron.id)
    assert Counter(r.run_time for r in rows) == Counter(slots)
    assert set(stuck) <= set(slots)
    assert all(r.message == f"Agent {target} is not connected" for r in rows)
    assert await store.pending_cron_fires() == []


async def test_slots_past_the_overlap_limit_are_recorded_as_skipped(
    store: Store, clock: Clock
) -> None:
    """With claims stuck on a lock, the fires past the overlap limit record their slots as
    skipped: every slot keeps exactly one row and none goes missing."""
    target = str(uuid.uuid4())
    cron = await add_cron(store, clock, "stuck", MINUTELY, cron_type=agent_cron([target]))
    async with running(new_scheduler(store, clock)) as scheduler:
        await move_to(clock, next_minute(clock))
        await until(lambda: result_slots(store, cron.id), "the first fire")
        async with cron_fire_locked(store):
            for _ in range(MAX_OVERLAPPING_FIRES + 2):
                slot = next_minute(clock)
                await move_to(clock, slot)
                key = (cron.id, slot_ms(slot))
                await until(lambda key=key: key in scheduler.firing, "a stuck fire")
        await move_to(clock, next_minute(clock))
        await until(
            lambda: len_at_least(result_slots(store, cron.id), MAX_OVERLAPPING_FIRES + 4),
            "every slot's row",
        )
    slots = [slot for slot, _ in await fires_of(store, cron.id)]
    assert len(slots) == MAX_OVERLAPPING_FIRES + 4
    assert all(b - a == 60_000 for a, b in itertools.pairwise(slots)), slots
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


async def test_slots_follow_the_configured_timezone(store: Store, clock: Clock) -> None:
    """In America/New_York, expressions are New York wall-clock times, both for the catch-up
    slot at start and for a live fire."""
    zone = ZoneInfo("America/New_York")
    now = clock.now().astimezone(zone)
    missed = (now - timedelta(minutes=1)).replace(second=0, microsecond=0)
    later = (now + timedelta(hours=2)).replace(microsecond=0)
    two_days_ago = clock.now_ms() - 2 * 86_400_000
    behind = await add_cron(
        store,
        clock,
        "ny-missed",
        f"0 {missed.minute} {missed.hour} * * *",
        updated_at=two_days_ago,
    )
    live = await add_cron(
        store, clock, "ny-live", f"{later.second} {later.minute} {later.hour} * * *"
    )
    scheduler = new_scheduler(store, clock, timezone="America/New_York")
    assert scheduler.zone == zone
    async with running(scheduler):
        await until(lambda: result_slots(store, behind.id), "the catch-up")
        await move_to(clock, later)
        await until(lambda: result_slots(store, live.id), "the live fire")
    assert [slot for slot, _ in await fires_of(store, behind.id)] == [slot_ms(missed)]
    assert [slot for slot, _ in await fires_of(store, live.id)] == [slot_ms(later)]
    # read as UTC, the same wall-clock time is another instant, hours away
    assert abs(slot_ms(later.replace(tzinfo=UTC)) - slot_ms(later)) >= 4 * 3_600_000


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
        clock=Clock(),
        timezone=settings.timezone,
        node_id="n",
    )
    assert scheduler.zone == ZoneInfo("UTC")
