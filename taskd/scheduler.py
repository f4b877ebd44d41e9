"""Fires crons at their slots: APScheduler keeps time, croniter decides the slots.

APScheduler 3 (``AsyncIOScheduler``, in-memory job store rebuilt from the
database at start) only wakes up at the times a small trigger hands it; the
trigger asks ``taskd.crontab`` (croniter), so APScheduler never interprets an
expression. A fire claims its (cron, slot) row in the database first — a slot
fires at most once, across restarts and nodes — then checks that the token that
created the cron may still create its task on each target, creates one task per
allowed target through ``Hub.create`` and stores one result row per target. It
never waits for the agents' answers, and each fire runs as its own asyncio task.

The history is exact: a claimed slot stays pending until its result rows are
stored, and a pending slot that no running fire owns (the server was killed, or
the rows could not be written) is settled with rows saying the fire was
interrupted, at start-up and on every resync.

Missed slots (downtime, a stalled event loop) collapse into one fire for the
latest missed slot. A cron with an empty agent list gets no job: it fires
nothing and records nothing. Changes made through this node apply at once; every few
seconds the jobs are also reconciled with the database, which picks up crons
created, edited or removed through other nodes.

Slots are times of the ``Clock`` the scheduler is given; APScheduler runs on the
system clock, which that one is ahead of by ``Clock.ahead`` (zero on a server, moved
by tests): the trigger and the executor translate, and the jobs are re-timed when
the clock jumps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from apscheduler.executors.base import BaseExecutor
from apscheduler.job import Job
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.base import BaseTrigger

from taskd.auth import Need, allows, principal_of
from taskd.clock import Clock
from taskd.crontab import CronSchedule, cron_targets, parse_expression, stored_agent_cron, zone_of
from taskd.errors import TaskdError
from taskd.hub import Created, Hub
from taskd.protocol import AgentCron
from taskd.store import Store

if TYPE_CHECKING:
    from taskd.cluster import Cluster

logger = logging.getLogger(__name__)

# fires of one cron allowed to overlap (a slow database); a slot past that is recorded
# as skipped rather than fired
MAX_OVERLAPPING_FIRES = 4
RESYNC_INTERVAL_S = 2.0
# a fire settles within milliseconds, or within the writer's 30 s wait for a locked
# database; one pending this long on another node was cut short
INTERRUPTED_AFTER_MS = 60_000
INTERRUPTED = (
    "Fire interrupted after its slot was claimed (the server stopped, or could not "
    "store the outcome): whether a task was created is unknown; look for it with "
    "task_query_task and cron_source"
)


def slot_ms(slot: datetime) -> int:
    """A slot as milliseconds since the epoch (slots are whole seconds)."""
    return round(slot.timestamp() * 1000)


class CronTrigger(BaseTrigger):  # type: ignore[misc]
    """An APScheduler trigger whose fire times come from croniter, as times of ``clock``.

    APScheduler hands over and expects system-clock times; the slots are the clock's.
    """

    __slots__ = ("clock", "schedule")

    def __init__(self, schedule: CronSchedule, clock: Clock) -> None:
        self.schedule = schedule
        self.clock = clock

    def get_next_fire_time(
        self, previous_fire_time: datetime | None, now: datetime
    ) -> datetime | None:
        """The slot after ``previous_fire_time``; the latest slot up to ``now`` if behind."""
        ahead = self.clock.ahead
        slot = self.next_slot(
            None if previous_fire_time is None else previous_fire_time + ahead, now + ahead
        )
        return None if slot is None else slot - ahead

    def next_slot(self, previous: datetime | None, now: datetime) -> datetime | None:
        """The slot after ``previous``, or the latest one up to ``now`` if behind (clock times)."""
        if previous is None:
            return self.schedule.next_after(now)
        following = self.schedule.next_after(previous)
        if following is not None and following <= now:
            # behind by more than one slot: skip straight to the latest one, so catching
            # up costs one croniter call instead of one per missed slot
            latest = self.schedule.latest_at_or_before(now)
            if latest is not None and latest > previous:
                return latest
        return following

    def __str__(self) -> str:
        return f"cron[{self.schedule.expression}]"


Run = Callable[..., Coroutine[Any, Any, None]]
"""A fire (or a skip) of a cron: called with its id and the slot."""


class _FireExecutor(BaseExecutor):  # type: ignore[misc]
    """Runs each fire as its own asyncio task, handing it the slot that is due.

    It counts each cron's running fires itself: a slot due while ``max_instances`` fires
    run is handed to ``skip`` (which records it as skipped), where APScheduler's executors
    drop it with a log line. Misfires cannot drop one either: APScheduler checks
    ``misfire_grace_time`` only in the ``run_job`` this executor never calls.
    """

    def __init__(self, fire: Run, skip: Run, clock: Clock) -> None:
        super().__init__()
        self._fire = fire
        self._skip = skip
        self._clock = clock
        self._running: Counter[str] = Counter()
        self._tasks: set[asyncio.Task[None]] = set()

    def submit_job(self, job: Job, run_times: Sequence[datetime]) -> None:
        """Start a fire for the latest due run time, or record it as skipped."""
        if self._running[job.id] >= job.max_instances:
            cron_id, slot = self._slot(job, run_times)
            self._spawn(job.id, self._skip(cron_id, slot), counted=False)
        else:
            self._do_submit_job(job, run_times)

    def _do_submit_job(self, job: Job, run_times: Sequence[datetime]) -> None:
        self._running[job.id] += 1
        cron_id, slot = self._slot(job, run_times)
        self._spawn(job.id, self._fire(cron_id, slot), counted=True)

    def _slot(self, job: Job, run_times: Sequence[datetime]) -> tuple[int, datetime]:
        """The job's cron and its slot: the latest run time (they coalesce into one), as a
        time of the clock, translated now, before the clock can move again."""
        cron_id: int = job.args[0]
        return cron_id, run_times[-1] + self._clock.ahead

    def _spawn(self, job_id: str, coroutine: Coroutine[Any, Any, None], *, counted: bool) -> None:
        task = asyncio.get_running_loop().create_task(coroutine, name=f"taskd-cron-{job_id}")
        self._tasks.add(task)

        def done(finished: asyncio.Task[None]) -> None:
            self._tasks.discard(finished)
            if counted:
                self._running[job_id] -= 1
                if self._running[job_id] <= 0:
                    del self._running[job_id]
            error = None if finished.cancelled() else finished.exception()
            if error is not None:
                what = "a fire" if counted else "recording a skipped slot"
                logger.error("%s of cron %s failed", what, job_id, exc_info=error)

        task.add_done_callback(done)

    async def drain(self) -> None:
        """Wait for the fires still running."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


class Scheduler:
    """Keeps one APScheduler job per enabled cron and fires them while started.

    An async context manager entered once: ``start`` and ``stop`` follow whether this
    node fires the crons (the only node, or the cluster's leader); leaving stops it.
    """

    def __init__(
        self,
        store: Store,
        hub: Hub,
        *,
        clock: Clock,
        timezone: str,
        node_id: str,
        cluster: Cluster | None = None,
        resync_interval_s: float = RESYNC_INTERVAL_S,
    ) -> None:
        self.store = store
        self.hub = hub
        self.clock = clock
        self.node_id = node_id
        self.cluster = cluster
        self.zone = zone_of(timezone)
        self.running = False
        """Whether this scheduler fires crons now (between ``start`` and ``stop``)."""
        self._closed = False
        self._executor = _FireExecutor(self._fire, self._skip, clock)
        self._scheduler = AsyncIOScheduler(
            timezone=self.zone,
            executors={"default": self._executor},
            job_defaults={
                # a late fire is never dropped: slots missed while the loop stalled coalesce
                # into one fire for the latest (the others were never claimed, like downtime)
                "coalesce": True,
                "misfire_grace_time": None,
                # past it a slot is not dropped but recorded as skipped (see _FireExecutor)
                "max_instances": MAX_OVERLAPPING_FIRES,
            },
        )
        # cron id -> updated_at of the row the job was built from (enabled crons only)
        self._versions: dict[int, int] = {}
        # cron id -> when this node last changed its job (monotonic seconds)
        self._changed: dict[int, float] = {}
        self.resync_interval_s = resync_interval_s
        self._resync: asyncio.Task[None] | None = None
        self.firing: Counter[tuple[int, int]] = Counter()
        """(cron id, slot) of the fires running here: their pending slots are not cut short."""
        # result rows of fires here that could not be stored yet, by (cron id, slot)
        self._unstored: dict[tuple[int, int], list[dict[str, Any]]] = {}
        clock.listen(self._clock_jumped)

    async def __aenter__(self) -> Scheduler:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._closed = True
        await self.stop()

    async def start(self) -> None:
        """Begin firing: load every enabled cron from the database (the truth) and settle
        the slots that earlier fires left pending."""
        if self.running or self._closed:
            return
        self.running = True
        self._scheduler.start()
        # drop jobs queued while stopped (or from an earlier run)
        self._scheduler.remove_all_jobs()
        self._versions.clear()
        self._changed.clear()
        crons = await self.store.list_crons(enabled_only=True)
        for cron in crons:
            self._load(cron)
        try:
            await self.settle_interrupted()
        except TaskdError as exc:
            logger.warning("interrupted cron fires not settled: %s", exc.message)
        self._resync = asyncio.create_task(self._resync_forever(), name="taskd-cron-resync")
        logger.info("scheduler started with %d enabled cron(s) in %s", len(crons), self.zone)

    async def stop(self) -> None:
        """Stop firing, and wait for the fires still running to store their results."""
        if not self.running:
            return
        self.running = False
        if self._resync is not None:
            self._resync.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._resync
        self._scheduler.shutdown(wait=False)
        await asyncio.sleep(0)  # AsyncIOScheduler stops on the next loop iteration
        await self._executor.drain()

    async def cron_changed(self, cron_id: int) -> None:
        """A cron change was committed here: this scheduler follows if it fires crons, and the
        other nodes are told (their leader follows)."""
        if self.running:
            await self._reload(cron_id)
        if self.cluster is not None:
            await self.cluster.announce_crons([cron_id])

    def crons_changed_elsewhere(self, cron_ids: list[int]) -> None:
        """Crons were changed through another node: follow them if this scheduler fires."""
        if self.running:
            for cron_id in cron_ids:
                self.hub.spawn(self._reload(cron_id))

    async def _reload(self, cron_id: int) -> None:
        row = await self.store.cron_by_id(cron_id)
        if row is None:
            self.unschedule(cron_id)
        else:
            self.schedule(row)

    def _clock_jumped(self, jump: timedelta) -> None:
        """Re-time every job for the clock's new time: what fell due fires at once."""
        if not self.running:
            return
        for job in self._scheduler.get_jobs():
            if job.next_run_time is not None:
                job.modify(next_run_time=job.next_run_time - jump)

    def _load(self, cron: Any) -> None:
        # slots after the last fire (or the last edit) that passed while no one fired them
        self.schedule(cron, missed_since=max(cron.last_run_time or 0, cron.updated_at))

    async def _resync_forever(self) -> None:
        while True:
            await asyncio.sleep(self.resync_interval_s)
            try:
                await self.resync()
                await self.settle_interrupted()
            except TaskdError as exc:
                logger.warning("cron resync failed: %s", exc.message)

    async def resync(self) -> None:
        """Reconcile the jobs with the crons in the database (changed through other nodes)."""
        began = time.monotonic()
        crons = {cron.id: cron for cron in await self.store.list_crons(enabled_only=True)}
        # a job this node changed while the rows were being read is newer than the rows
        stale = [
            cron_id
            for cron_id in self._versions
            if cron_id not in crons and self._changed.get(cron_id, 0.0) < began
        ]
        for cron_id in stale:
            self.unschedule(cron_id)
        for cron in crons.values():
            if self._versions.get(cron.id) != cron.updated_at and (
                self._changed.get(cron.id, 0.0) < began
            ):
                self._load(cron)

    def schedule(self, cron: Any, *, missed_since: int | None = None) -> None:
        """(Re)schedule a cron row from its next slot; disabled crons are unscheduled.

        With ``missed_since`` (ms), a slot missed after that time fires at once (the latest one).
        """
        if not cron.enable:
            self.unschedule(cron.id)
            return
        self._versions[cron.id] = cron.updated_at
        self._changed[cron.id] = time.monotonic()
        if not self.running:
            return  # another node fires the crons; start() reloads them all from the database
        if not cron_targets(cron.cron_type):
            # no agents (NodeGet-board empties a cron whose last agent it deleted): no job,
            # so no claims, no result rows and no last_run_time until an edit adds agents
            self._remove_job(cron.id)
            return
        try:
            schedule = parse_expression(cron.cron_expression, self.zone)
        except TaskdError as exc:
            logger.error("cron %s is not scheduled: %s", cron.name, exc.message)
            self._remove_job(cron.id)
            return
        now = self.clock.now().astimezone(self.zone)
        first = schedule.next_after(now)
        if missed_since is not None:
            missed = schedule.latest_at_or_before(now)
            if missed is not None and slot_ms(missed) > missed_since:
                first = missed
        if first is None:
            self._remove_job(cron.id)
            return
        self._scheduler.add_job(
            self._fire,
            trigger=CronTrigger(schedule, self.clock),
            args=(cron.id,),
            id=str(cron.id),
            name=cron.name,
            replace_existing=True,
            next_run_time=first - self.clock.ahead,
        )

    def unschedule(self, cron_id: int) -> None:
        """Stop firing a cron."""
        self._versions.pop(cron_id, None)
        self._changed[cron_id] = time.monotonic()
        self._remove_job(cron_id)

    def _remove_job(self, cron_id: int) -> None:
        if self.running and self._scheduler.get_job(str(cron_id)) is not None:
            self._scheduler.remove_job(str(cron_id))

    async def settle_interrupted(self) -> None:
        """Store the result rows of claimed slots whose fire ended before it stored them.

        A pending slot of this node that no fire here owns was cut short (or its rows
        were refused: they are stored now); one of another node counts as cut short
        once ``INTERRUPTED_AFTER_MS`` have passed since its claim.
        """
        now = self.clock.now_ms()
        for fire in await self.store.pending_cron_fires():
            key = (fire.cron_id, fire.slot)
            ours = fire.node_id == self.node_id
            if key in self.firing or (not ours and fire.fired_at > now - INTERRUPTED_AFTER_MS):
                continue
            rows = self._unstored.get(key) if ours else None
            if rows is None:
                name = fire.pending["cron_name"]
                rows = [
                    _row(fire.cron_id, name, fire.slot, agent, None, INTERRUPTED)
                    for agent in cron_targets(fire.pending["cron_type"])
                ]
                logger.warning(
                    "cron %s: slot %d was claimed by node %s but its outcome never stored; "
                    "recording it as interrupted",
                    name,
                    fire.slot,
                    fire.node_id,
                )
            await self.store.settle_cron_fire(fire.cron_id, fire.slot, rows)
            self._unstored.pop(key, None)

    async def _fire(self, cron_id: int, *run_times: datetime) -> None:
        # the job's function: APScheduler calls it with the job's args (and checks that it
        # can), the executor adds the slot that is due
        await self._run_slot(cron_id, run_times[-1], skip=False)

    async def _skip(self, cron_id: int, *run_times: datetime) -> None:
        await self._run_slot(cron_id, run_times[-1], skip=True)

    async def _run_slot(self, cron_id: int, slot: datetime, *, skip: bool) -> None:
        started = self.clock.now_ms()
        run_time = slot_ms(slot)
        key = (cron_id, run_time)
        # counted, not a set: a replaced job may hand the same slot over twice
        self.firing[key] += 1
        try:
            fired = await self._claim_and_run(cron_id, run_time, started, skip=skip)
        finally:
            self.firing[key] -= 1
            if self.firing[key] <= 0:
                del self.firing[key]
        if fired is not None:
            name, rows = fired
            logger.info(
                "cron %s %s slot %s: %d of %d target(s) dispatched, %d ms after the slot",
                name,
                "skipped" if skip else "fired",
                slot.isoformat(),
                sum(row["success"] for row in rows),
                len(rows),
                started - run_time,
            )

    async def _claim_and_run(
        self, cron_id: int, run_time: int, started: int, *, skip: bool
    ) -> tuple[str, list[dict[str, Any]]] | None:
        """Claim the slot, run it (or record it as skipped) and store its rows."""
        try:
            cron = await self.store.claim_cron_slot(cron_id, run_time, started, self.node_id)
        except TaskdError as exc:
            logger.error("cron %d could not fire slot %d: %s", cron_id, run_time, exc.message)
            return None
        if cron is None:
            return None  # disabled or deleted meanwhile, or the slot has fired already
        definition = stored_agent_cron(cron.cron_type)
        assert definition is not None  # only agent crons are ever stored
        if skip:
            message = (
                f"Slot skipped: {MAX_OVERLAPPING_FIRES} earlier fires of this cron were "
                "still running (a slow database)"
            )
            rows = [
                _row(cron.id, cron.name, run_time, agent, None, message)
                for agent in definition.uuids
            ]
        else:
            rows = await self._dispatch(cron, definition, run_time)
        try:
            await self.store.settle_cron_fire(cron.id, run_time, rows)
        except TaskdError as exc:
            # kept for settle_interrupted, which stores them once the database takes them
            self._unstored[(cron.id, run_time)] = rows
            logger.error(
                "cron %s: results of slot %d not stored yet: %s", cron.name, run_time, exc.message
            )
        return cron.name, rows

    async def _dispatch(
        self, cron: Any, definition: AgentCron, run_time: int
    ) -> list[dict[str, Any]]:
        """Create the task on each target the cron's creator may still create it on."""
        rows: dict[str, dict[str, Any]] = {}
        try:
            refused = await self._refused(cron, definition)
            allowed = [agent for agent in definition.uuids if agent not in refused]
            for agent, reason in refused.items():
                message = f"Task not created: {reason}"
                rows[agent] = _row(cron.id, cron.name, run_time, agent, None, message)
            if allowed:
                created, _ = await self.hub.create(
                    allowed,
                    definition.task,
                    queue_ttl_ms=cron.queue_ttl_ms,
                    cron_source=cron.name,
                    created_by=cron.created_by,
                )
                for outcome in created:
                    rows[outcome.agent_uuid] = _result_row(cron, run_time, outcome)
        except TaskdError as exc:
            message = f"Task not created: {exc.message}"
            for agent in definition.uuids:
                rows.setdefault(agent, _row(cron.id, cron.name, run_time, agent, None, message))
        return [rows[agent] for agent in definition.uuids if agent in rows]

    async def _refused(self, cron: Any, definition: AgentCron) -> dict[str, str]:
        """The targets the cron's creating token may no longer create its task on, and why.

        A cron acts with its creator's authority, so that authority is checked at every
        fire: a token deleted, expired or narrowed since stops the tasks it no longer covers.
        """
        key = cron.created_by
        row = None if key is None else await self.store.token_by_key(key)
        now = self.clock.now_ms()
        if row is None:
            reason = (
                "the cron records no creating token"
                if key is None
                else f"token {key} that created the cron no longer exists"
            )
        elif row.timestamp_from is not None and now < row.timestamp_from:
            reason = f"token {key} that created the cron is not valid yet"
        elif row.timestamp_to is not None and now > row.timestamp_to:
            reason = f"token {key} that created the cron has expired"
        else:
            creator = principal_of(row)
            need = Need("task", "create", definition.task.kind)
            return {
                agent: f"token {key} that created the cron lacks {need} on agent {agent}"
                for agent in definition.uuids
                if not allows(creator, need, agent)
            }
        return dict.fromkeys(definition.uuids, reason)


def _row(
    cron_id: int,
    cron_name: str,
    run_time: int,
    agent_uuid: str,
    task_id: int | None,
    message: str,
) -> dict[str, Any]:
    return {
        "cron_id": cron_id,
        "cron_name": cron_name,
        "run_time": run_time,
        "agent_uuid": agent_uuid,
        "relative_id": task_id,
        "success": task_id is not None,
        "message": message,
    }


def _result_row(cron: Any, run_time: int, created: Created) -> dict[str, Any]:
    if created.error is not None or created.task_id is None:
        message = created.error.message if created.error else "Task not created"
        return _row(cron.id, cron.name, run_time, created.agent_uuid, None, message)
    if created.queued:
        message = (
            f"Task {created.task_id} queued for offline agent {created.agent_uuid} "
            f"(expires after {cron.queue_ttl_ms} ms)"
        )
    else:
        message = f"Task {created.task_id} sent to agent {created.agent_uuid}"
    return _row(cron.id, cron.name, run_time, created.agent_uuid, created.task_id, message)
