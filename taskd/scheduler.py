"""Fires crons at their slots: APScheduler keeps time, croniter decides the slots.

APScheduler 3 (``AsyncIOScheduler``, in-memory job store rebuilt from the
database at start) only wakes up at the times a small trigger hands it; the
trigger asks ``taskd.crontab`` (croniter), so APScheduler never interprets an
expression. A fire claims its (cron, slot) row in the database first — a slot
fires at most once, across restarts and nodes — then creates one task per
target through ``Hub.create`` and stores one result row per target. It never
waits for the agents' answers, and each fire runs as its own asyncio task.

Missed slots (downtime, a stalled event loop) collapse into one fire for the
latest missed slot. Changes made through this node apply at once; every few
seconds the jobs are also reconciled with the database, which picks up crons
created, edited or removed through other nodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine, Sequence
from datetime import datetime
from typing import Any

from apscheduler.executors.base import BaseExecutor
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.base import BaseTrigger

from taskd.clock import now_ms
from taskd.crontab import CronSchedule, parse_expression, zone_of
from taskd.errors import TaskdError
from taskd.hub import Created, Hub
from taskd.protocol import CRON_TYPE, AgentCron
from taskd.store import Store

logger = logging.getLogger(__name__)

# fires of one cron allowed to overlap (a slow database); beyond that slots are skipped
MAX_OVERLAPPING_FIRES = 4
RESYNC_INTERVAL_S = 2.0


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
    """Runs each fire as its own asyncio task, handing it the run times that are due."""

    def __init__(self) -> None:
        super().__init__()
        self._tasks: set[asyncio.Task[None]] = set()

    def _do_submit_job(self, job: Any, run_times: Sequence[datetime]) -> None:
        coroutine: Coroutine[Any, Any, None] = job.func(*job.args, *run_times)
        task = asyncio.get_running_loop().create_task(coroutine, name=f"taskd-cron-{job.id}")
        self._tasks.add(task)

        def done(finished: asyncio.Task[None]) -> None:
            self._tasks.discard(finished)
            if finished.cancelled() or finished.exception() is None:
                self._run_job_success(job.id, [])
            else:
                self._run_job_error(job.id, finished.exception())

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
        self._executor = _FireExecutor()
        self._scheduler = AsyncIOScheduler(
            timezone=self.zone,
            executors={"default": self._executor},
            job_defaults={
                # a late fire is never dropped: missed slots coalesce into one fire
                "coalesce": True,
                "misfire_grace_time": None,
                "max_instances": MAX_OVERLAPPING_FIRES,
            },
        )
        # cron id -> updated_at of the row the job was built from (enabled crons only)
        self._versions: dict[int, int] = {}
        # cron id -> when this node last changed its job (monotonic seconds)
        self._changed: dict[int, float] = {}
        self._resync: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Scheduler:
        self._scheduler.start()
        # the database is the truth: drop jobs queued while stopped (or from an earlier run)
        self._scheduler.remove_all_jobs()
        self._versions.clear()
        self._changed.clear()
        crons = await self.store.list_crons(enabled_only=True)
        for cron in crons:
            self._load(cron)
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

    async def _fire(self, cron_id: int, *run_times: datetime) -> None:
        # APScheduler hands over the due run times (one, as they coalesce); fire the latest
        slot = run_times[-1]
        started = now_ms()
        run_time = slot_ms(slot)
        try:
            cron = await self.store.claim_cron_slot(cron_id, run_time, started, self.node_id)
        except TaskdError as exc:
            logger.error("cron %d could not fire slot %d: %s", cron_id, run_time, exc.message)
            return
        if cron is None:
            return  # disabled or deleted meanwhile, or the slot has fired already
        definition = CRON_TYPE.validate_python(cron.cron_type)
        assert isinstance(definition, AgentCron)  # only agent crons are ever stored
        try:
            created, _ = await self.hub.create(
                definition.uuids,
                definition.task,
                queue_ttl_ms=cron.queue_ttl_ms,
                cron_source=cron.name,
                created_by=cron.created_by,
            )
            rows = [_result_row(cron, run_time, c) for c in created]
        except TaskdError as exc:
            rows = [
                _row(cron, run_time, agent_uuid, None, f"Task not created: {exc.message}")
                for agent_uuid in definition.uuids
            ]
        try:
            await self.store.insert_cron_results(rows)
        except TaskdError as exc:
            logger.error("cron %s: results of slot %d not stored: %s", cron.name, run_time, exc)
        dispatched = sum(row["success"] for row in rows)
        logger.info(
            "cron %s fired slot %s: %d of %d target(s) dispatched, %d ms after the slot",
            cron.name,
            slot.isoformat(),
            dispatched,
            len(rows),
            started - run_time,
        )


def _row(
    cron: Any, run_time: int, agent_uuid: str, task_id: int | None, message: str
) -> dict[str, Any]:
    return {
        "cron_id": cron.id,
        "cron_name": cron.name,
        "run_time": run_time,
        "agent_uuid": agent_uuid,
        "relative_id": task_id,
        "success": task_id is not None,
        "message": message,
    }


def _result_row(cron: Any, run_time: int, created: Created) -> dict[str, Any]:
    if created.error is not None or created.task_id is None:
        message = created.error.message if created.error else "Task not created"
        return _row(cron, run_time, created.agent_uuid, None, message)
    if created.queued:
        message = (
            f"Task {created.task_id} queued for offline agent {created.agent_uuid} "
            f"(expires after {cron.queue_ttl_ms} ms)"
        )
    else:
        message = f"Task {created.task_id} sent to agent {created.agent_uuid}"
    return _row(cron, run_time, created.agent_uuid, created.task_id, message)
