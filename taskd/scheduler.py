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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from datetime import datetime
from typing import Any

from apscheduler.executors.base import BaseExecutor
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.base import BaseTrigger

from taskd.auth import Need, allows, principal_of
from taskd.clock import now_ms
from taskd.crontab import CronSchedule, parse_expression, zone_of
from taskd.errors import TaskdError
from taskd.hub import Created, Hub
from taskd.protocol import CRON_TYPE, AgentCron
from taskd.store import Store

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
    """An APScheduler trigger whose fire times come from croniter."""

    __slots__ = ("schedule",)

    def __init__(self, schedule: CronSchedule) -> None:
        self.schedule = schedule

    def get_next_fire_time(
        self, previous_fire_time: datetime | None, now: datetime
    ) -> datetime | None:
        """The slot after ``previous_fire_time``; the latest slot up to ``now`` if behind."""
        if previous_fire_time is None:
            return self.schedule.next_after(now)
        following = self.schedule.next_after(previous_fire_time)
        if following is not None and following <= now:
            # behind by more than one slot: skip straight to the latest one, so catching
            # up costs one croniter call instead of one per missed slot
            latest = self.schedule.latest_at_or_before(now)
            if latest is not None and latest > previous_fire_time:
                return latest
        return following

    def __str__(self) -> str:
        return f"cron[{self.schedule.expression}]"


class _FireExecutor(BaseExecutor):  # type: ignore[misc]
    """Runs each fire as its own asyncio task, handing it the run times that are due.

    No slot vanishes here: APScheduler's executors drop a run past ``max_instances``
    with a log line only, and this one hands it to ``skip`` (which records the slot
    as skipped) instead. Misfires cannot drop one either, as APScheduler checks
    ``misfire_grace_time`` only in the ``run_job`` this executor never calls.
    """

    def __init__(self, skip: Callable[..., Coroutine[Any, Any, None]]) -> None:
        super().__init__()
        self._skip = skip
        self._tasks: set[asyncio.Task[None]] = set()

    def submit_job(self, job: Any, run_times: Sequence[datetime]) -> None:
        with self._lock:
            if self._instances[job.id] >= job.max_instances:
                self._spawn(job.id, self._skip(*job.args, *run_times), counted=False)
                return
            super().submit_job(job, run_times)

    def _do_submit_job(self, job: Any, run_times: Sequence[datetime]) -> None:
        self._spawn(job.id, job.func(*job.args, *run_times), counted=True)

    def _spawn(self, job_id: str, coroutine: Coroutine[Any, Any, None], *, counted: bool) -> None:
        task = asyncio.get_running_loop().create_task(coroutine, name=f"taskd-cron-{job_id}")
        self._tasks.add(task)

        def done(finished: asyncio.Task[None]) -> None:
            self._tasks.discard(finished)
            error = None if finished.cancelled() else finished.exception()
            if counted and error is None:
                self._run_job_success(job_id, [])
            elif counted:
                self._run_job_error(job_id, error)
            elif error is not None:
                logger.error("recording a skipped slot of cron %s failed", job_id, exc_info=error)

        task.add_done_callback(done)

    async def drain(self) -> None:
        """Wait for the fires still running."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


class Scheduler:
    """Keeps one APScheduler job per enabled cron and fires them; an async context manager."""

    def __init__(self, store: Store, hub: Hub, *, timezone: str, node_id: str) -> None:
        self.store = store
        self.hub = hub
        self.node_id = node_id
        self.zone = zone_of(timezone)
        self._executor = _FireExecutor(self._skip)
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
        self._resync: asyncio.Task[None] | None = None
        # (cron id, slot) of the fires running here: their pending slots are not cut short
        self._firing: Counter[tuple[int, int]] = Counter()
        # result rows of fires here that could not be stored yet, by (cron id, slot)
        self._unstored: dict[tuple[int, int], list[dict[str, Any]]] = {}

    async def __aenter__(self) -> Scheduler:
        self._scheduler.start()
        # the database is the truth: drop jobs queued while stopped (or from an earlier run)
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
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._resync is not None:
            self._resync.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._resync
        self._scheduler.shutdown(wait=False)
        await asyncio.sleep(0)  # AsyncIOScheduler stops on the next loop iteration
        await self._executor.drain()

    def _load(self, cron: Any) -> None:
        # slots after the last fire (or the last edit) that passed while no one fired them
        self.schedule(cron, missed_since=max(cron.last_run_time or 0, cron.updated_at))

    async def _resync_forever(self) -> None:
        while True:
            await asyncio.sleep(RESYNC_INTERVAL_S)
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
        if not self._scheduler.running:
            return  # another node fires the crons; start() reloads them all from the database
        if not _targets(cron.cron_type):
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
        now = datetime.now(self.zone)
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
            trigger=CronTrigger(schedule),
            args=(cron.id,),
            id=str(cron.id),
            name=cron.name,
            replace_existing=True,
            next_run_time=first,
        )

    def unschedule(self, cron_id: int) -> None:
        """Stop firing a cron."""
        self._versions.pop(cron_id, None)
        self._changed[cron_id] = time.monotonic()
        self._remove_job(cron_id)

    def _remove_job(self, cron_id: int) -> None:
        if self._scheduler.running and self._scheduler.get_job(str(cron_id)) is not None:
            self._scheduler.remove_job(str(cron_id))

    async def settle_interrupted(self) -> None:
        """Store the result rows of claimed slots whose fire ended before it stored them.

        A pending slot of this node that no fire here owns was cut short (or its rows
        were refused: they are stored now); one of another node counts as cut short
        once ``INTERRUPTED_AFTER_MS`` have passed since its claim.
        """
        now = now_ms()
        for fire in await self.store.pending_cron_fires():
            key = (fire.cron_id, fire.slot)
            ours = fire.node_id == self.node_id
            if key in self._firing or (not ours and fire.fired_at > now - INTERRUPTED_AFTER_MS):
                continue
            rows = self._unstored.get(key) if ours else None
            if rows is None:
                name = fire.pending["cron_name"]
                rows = [
                    _row(fire.cron_id, name, fire.slot, agent, None, INTERRUPTED)
                    for agent in _targets(fire.pending["cron_type"])
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
        # APScheduler hands over the due run times (one, as they coalesce); fire the latest
        await self._run_slot(cron_id, run_times[-1], skip=False)

    async def _skip(self, cron_id: int, *run_times: datetime) -> None:
        await self._run_slot(cron_id, run_times[-1], skip=True)

    async def _run_slot(self, cron_id: int, slot: datetime, *, skip: bool) -> None:
        started = now_ms()
        run_time = slot_ms(slot)
        key = (cron_id, run_time)
        # counted, not a set: a replaced job may hand the same slot over twice
        self._firing[key] += 1
        try:
            fired = await self._claim_and_run(cron_id, run_time, started, skip=skip)
        finally:
            self._firing[key] -= 1
            if self._firing[key] <= 0:
                del self._firing[key]
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
        definition = CRON_TYPE.validate_python(cron.cron_type)
        assert isinstance(definition, AgentCron)  # only agent crons are ever stored
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
        now = now_ms()
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


def _targets(stored_cron_type: Any) -> list[str]:
    definition = CRON_TYPE.validate_python(stored_cron_type)
    return definition.uuids if isinstance(definition, AgentCron) else []


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
