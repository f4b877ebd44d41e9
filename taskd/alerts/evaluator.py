"""Alert evaluation: when a rule's condition starts or ends on an agent, record it once.

Only one node evaluates (the cron leader; on SQLite the one server): ``start`` when
it leads, ``stop`` when it no longer does. What it works from:

- agent connections, as events (``presence.py``); an offline agent is put on a
  timer heap at ``offline since + grace_ms`` and fires only if it is still offline
  then (confirmed against the agent table), so an agent that reconnects inside the
  grace never fires, and a quiet fleet costs one look at the heap per sweep;
- the results of the crons that probe rules name, read by id from the task table
  (an index range, only rows newer than the last one read);
- the newest summary of each watched agent for metric rules, every metric interval.

Firing events are in the database (``alert_event.open_key``): a new leader or a
restarted node loads them and neither starts them again nor forgets to resolve them.
Every start, reminder and resolution is committed with its deliveries (the outbox),
which the notifier sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from taskd.alerts.events import duration
from taskd.alerts.notifier import Notifier
from taskd.alerts.presence import Presence
from taskd.alerts.rules import (
    METRIC_FIELDS,
    AgentOffline,
    Metric,
    ProbeFailed,
    ProbeLatency,
    Rule,
    rule_from_row,
)
from taskd.models import TaskState
from taskd.store.alerts import EventChange, EventStart

if TYPE_CHECKING:
    from taskd.clock import Clock
    from taskd.cluster import Cluster
    from taskd.hub import Hub
    from taskd.metrics import Metrics
    from taskd.store import Store

logger = logging.getLogger(__name__)

PROBE_LOOKBACK_MS = 600_000
"""How far back a starting evaluator reads probe results (to rebuild failure streaks)."""


@dataclass(frozen=True)
class EvaluatorSettings:
    """How often each kind of condition is looked at (ms)."""

    sweep_ms: int = 500
    probe_interval_ms: int = 1_000
    metric_interval_ms: int = 5_000
    rules_interval_ms: int = 2_000
    resync_ms: int = 30_000


@dataclass
class Firing:
    """A firing event as the evaluator keeps it."""

    event_id: int
    started_at: int
    notified_at: int
    """When its start or its last reminder was queued."""


def _when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _latency(result: Any) -> float | None:
    """The milliseconds of a ping-like result (``{"tcp_ping": 0.8}``), if it is one."""
    if isinstance(result, dict) and len(result) == 1:
        value = next(iter(result.values()))
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    return None


class Evaluator:
    """Watches the rules on this node while it leads; see the module docstring."""

    def __init__(
        self,
        store: Store,
        hub: Hub,
        cluster: Cluster | None,
        clock: Clock,
        notifier: Notifier,
        settings: EvaluatorSettings,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.notifier = notifier
        self.settings = settings
        self.metrics = metrics
        self.now: Callable[[], int] = clock.now_ms
        self.presence = Presence(store, hub, cluster, self.now, self._presence_changed)
        self.rules: dict[int, Rule] = {}
        self.firing: dict[tuple[int, str], Firing] = {}
        self._versions: dict[int, int] = {}
        self._since: dict[int, int] = {}
        self._heap: list[tuple[int, int, str, str]] = []
        self._came_online: set[str] = set()
        self._streaks: dict[tuple[int, str], int] = {}
        self._last_task: dict[tuple[str, str], int] = {}
        self._cursors: dict[str, int | None] = {}
        self._breach_since: dict[tuple[int, str], int] = {}
        self._next: dict[str, int] = {}
        self._reload = False
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        clock.listen(lambda jump: self._wake.set())

    @property
    def running(self) -> bool:
        """Whether this node evaluates."""
        return self._task is not None

    # ------------------------------------------------------------------ life

    async def start(self) -> None:
        """Begin evaluating (this node leads): load rules, firing events and agents."""
        if self._task is not None:
            return
        now = self.now()
        await self._load_rules(now)
        await self._load_firing(now)
        await self.presence.start(now)
        self._next = {"rules": now + self.settings.rules_interval_ms}
        self._next["resync"] = now + self.settings.resync_ms
        self._task = asyncio.create_task(self._run(), name="taskd-alert-evaluator")
        await self.notifier.start()
        logger.info(
            "alert evaluation started (%d rule(s), %d firing)", len(self.rules), len(self.firing)
        )

    async def stop(self) -> None:
        """Stop evaluating (another node leads now, or this one stops)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.presence.stop()
        await self.notifier.stop()
        self._clear()

    def _clear(self) -> None:
        self.rules.clear()
        self.firing.clear()
        self._versions.clear()
        self._since.clear()
        self._heap.clear()
        self._came_online.clear()
        self._streaks.clear()
        self._last_task.clear()
        self._cursors.clear()
        self._breach_since.clear()
        self.presence.online.clear()
        self.presence.offline_since.clear()

    async def __aenter__(self) -> Evaluator:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------ hooks

    def hub_changed(self, agent_uuid: str, online: bool) -> None:
        """The hub's hook: an agent subscribed on this node, or its subscription here ended."""
        if self._task is not None:
            self.presence.hub_changed(agent_uuid, online)

    def rules_changed(self) -> None:
        """A rule was created, edited or deleted through this node: look at it now."""
        self._reload = True
        self._wake.set()

    def _presence_changed(self, agent_uuid: str, online: bool, at: int) -> None:
        if online:
            self._came_online.add(agent_uuid)
        else:
            for rule in self.rules.values():
                if (
                    rule.enable
                    and isinstance(rule.params, AgentOffline)
                    and rule.covers(agent_uuid)
                ):
                    due = max(at, self._since[rule.id]) + rule.params.grace_ms
                    heapq.heappush(self._heap, (due, rule.id, agent_uuid, "offline"))
        self._wake.set()

    # ------------------------------------------------------------------ loop

    async def _run(self) -> None:
        while True:
            try:
                await self._tick()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("alert evaluation failed (tried again): %s", exc, exc_info=exc)
            wait = self.settings.sweep_ms
            if self._heap:
                wait = min(wait, max(self._heap[0][0] - self.now(), 0))
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(wait, 10) / 1000)

    def _time_for(self, what: str, now: int, every_ms: int) -> bool:
        if now < self._next.get(what, 0):
            return False
        self._next[what] = now + every_ms
        return True

    async def _tick(self) -> None:
        now = self.now()
        s = self.settings
        if self._reload or self._time_for("rules", now, s.rules_interval_ms):
            self._reload = False
            await self._load_rules(now)
        if self._time_for("resync", now, s.resync_ms):
            await self.presence.resync(now, whole=False)
        if self._came_online:
            await self._back_online(now)
        if self._heap and self._heap[0][0] <= now:
            await self._due(now)
        kinds = {type(rule.params) for rule in self.rules.values() if rule.enable}
        if kinds & {ProbeFailed, ProbeLatency} and self._time_for(
            "probes", now, s.probe_interval_ms
        ):
            await self._probes(now)
        if Metric in kinds and self._time_for("metrics", now, s.metric_interval_ms):
            await self._metrics(now)

    # ------------------------------------------------------------------ rules

    async def _load_firing(self, now: int) -> None:
        self.firing = {
            (row.rule_id, row.uuid): Firing(
                row.id, row.started_at, row.reminded_at or max(row.started_at, now)
            )
            for row in await self.store.open_alert_events()
        }
        for (rule_id, agent_uuid), event in self.firing.items():
            self._schedule_reminder(rule_id, agent_uuid, event)

    async def _load_rules(self, now: int) -> None:
        rows = await self.store.alert_rules()
        seen: set[int] = set()
        for row in rows:
            seen.add(row.id)
            if self._versions.get(row.id) == row.updated_at:
                continue
            rule = rule_from_row(row)
            self._versions[row.id] = row.updated_at
            self._since[row.id] = now
            self.rules[row.id] = rule
            for key in [k for k in self._streaks if k[0] == rule.id]:
                del self._streaks[key]
            for key in [k for k in self._breach_since if k[0] == rule.id]:
                del self._breach_since[key]
            if rule.enable and isinstance(rule.params, AgentOffline):
                grace = rule.params.grace_ms
                for agent_uuid, at in self.presence.offline_since.items():
                    if rule.covers(agent_uuid):
                        due = max(at, now) + grace
                        heapq.heappush(self._heap, (due, rule.id, agent_uuid, "offline"))
            for (rule_id, agent_uuid), event in self.firing.items():
                if rule_id == rule.id:
                    self._schedule_reminder(rule_id, agent_uuid, event)
        for rule_id in [r for r in self.rules if r not in seen]:
            del self.rules[rule_id]
            self._versions.pop(rule_id, None)
        # events of rules deleted, disabled or no longer covering the agent end silently
        stale = [
            EventChange(event.event_id, now, ())
            for (rule_id, agent_uuid), event in self.firing.items()
            if rule_id not in self.rules
            or not self.rules[rule_id].enable
            or not self.rules[rule_id].covers(agent_uuid)
        ]
        if stale:
            await self._resolve(stale, now)

    def _schedule_reminder(self, rule_id: int, agent_uuid: str, event: Firing) -> None:
        rule = self.rules.get(rule_id)
        if rule is not None and rule.remind_ms:
            due = event.notified_at + rule.remind_ms
            heapq.heappush(self._heap, (due, rule_id, agent_uuid, "remind"))

    # ------------------------------------------------------------------ events

    async def _start(self, starts: list[tuple[Rule, str, int, str]], now: int) -> None:
        """Start events: (rule, agent, when the condition started, message) each."""
        if not starts:
            return
        ids = await self.store.start_alert_events(
            [EventStart(r.id, r.name, u, at, message, r.channels) for r, u, at, message in starts]
        )
        taken = False
        for (rule, agent_uuid, at, _), event_id in zip(starts, ids, strict=True):
            if event_id is None:
                taken = True  # started meanwhile by an earlier leader: it is loaded below
                continue
            event = Firing(event_id, at, now)
            self.firing[(rule.id, agent_uuid)] = event
            self._schedule_reminder(rule.id, agent_uuid, event)
        if taken:
            await self._load_firing(now)
        started = sum(i is not None for i in ids)
        if started:
            logger.info("alerts: %d event(s) started", started)
            self._count("started", started)
            self.notifier.poke()

    async def _resolve(self, changes: list[EventChange], now: int) -> None:
        if not changes:
            return
        done = set(await self.store.resolve_alert_events(changes))
        ended = {c.event_id for c in changes}
        for key in [k for k, e in self.firing.items() if e.event_id in ended]:
            del self.firing[key]
        told = sum(1 for c in changes if c.event_id in done and c.channels)
        if done:
            logger.info("alerts: %d event(s) resolved", len(done))
            self._count("resolved", len(done))
        if told:
            self.notifier.poke()

    def _resolution(self, key: tuple[int, str], now: int) -> EventChange | None:
        event = self.firing.get(key)
        rule = self.rules.get(key[0])
        if event is None or rule is None:
            return None
        return EventChange(event.event_id, now, rule.channels)

    def _count(self, what: str, count: int) -> None:
        if self.metrics is not None:
            self.metrics.alert_events.labels(what).inc(count)

    # ------------------------------------------------------------------ agent_offline

    async def _back_online(self, now: int) -> None:
        back, self._came_online = self._came_online, set()
        changes = []
        for rule_id, agent_uuid in list(self.firing):
            rule = self.rules.get(rule_id)
            if agent_uuid in back and rule is not None and isinstance(rule.params, AgentOffline):
                change = self._resolution((rule_id, agent_uuid), now)
                if change is not None:
                    changes.append(change)
        await self._resolve(changes, now)

    async def _due(self, now: int) -> None:
        offline: dict[tuple[int, str], Rule] = {}
        reminders: list[EventChange] = []
        while self._heap and self._heap[0][0] <= now:
            _, rule_id, agent_uuid, what = heapq.heappop(self._heap)
            rule = self.rules.get(rule_id)
            if rule is None or not rule.enable or not rule.covers(agent_uuid):
                continue
            key = (rule_id, agent_uuid)
            if what == "remind":
                event = self.firing.get(key)
                if event is None or not rule.remind_ms:
                    continue
                due = event.notified_at + rule.remind_ms
                if due > now:
                    heapq.heappush(self._heap, (due, rule_id, agent_uuid, what))
                    continue
                event.notified_at = now
                reminders.append(EventChange(event.event_id, now, rule.channels))
                self._schedule_reminder(rule_id, agent_uuid, event)
                continue
            since = self.presence.offline_since.get(agent_uuid)
            if since is None or key in self.firing or not isinstance(rule.params, AgentOffline):
                continue
            due = max(since, self._since[rule_id]) + rule.params.grace_ms
            if due > now:
                heapq.heappush(self._heap, (due, rule_id, agent_uuid, what))
                continue
            offline[key] = rule
        if reminders:
            await self.store.remind_alert_events(reminders)
            self._count("reminded", len(reminders))
            self.notifier.poke()
        if offline:
            await self._fire_offline(offline, now)

    async def _fire_offline(self, due: dict[tuple[int, str], Rule], now: int) -> None:
        heard = await self.presence.confirm(sorted({agent_uuid for _, agent_uuid in due}))
        starts: list[tuple[Rule, str, int, str]] = []
        for (rule_id, agent_uuid), rule in due.items():
            assert isinstance(rule.params, AgentOffline)
            if agent_uuid not in heard:
                self.presence.forget(agent_uuid)  # soft-deleted
                continue
            last = heard[agent_uuid]
            if last is None:
                self.presence.set_online(agent_uuid)  # a subscription this node missed
                continue
            since = self.presence.offline_since.get(agent_uuid)
            if since is None:
                continue
            if last > since:  # it reported since: offline from then on at the most
                self.presence.offline_since[agent_uuid] = last
                heapq.heappush(
                    self._heap, (last + rule.params.grace_ms, rule_id, agent_uuid, "offline")
                )
                continue
            message = (
                f"Agent {agent_uuid} is offline: no connection or report since {_when(since)} "
                f"(rule {rule.name!r}, grace {duration(rule.params.grace_ms)})"
            )
            starts.append((rule, agent_uuid, since, message))
        await self._start(starts, now)

    # ------------------------------------------------------------------ probes

    async def _probes(self, now: int) -> None:
        by_cron: dict[str, list[Rule]] = {}
        for rule in self.rules.values():
            if rule.enable and isinstance(rule.params, ProbeFailed | ProbeLatency):
                by_cron.setdefault(rule.params.cron, []).append(rule)
        starts: list[tuple[Rule, str, int, str]] = []
        resolves: dict[tuple[int, str], EventChange] = {}
        for cron, rules in by_cron.items():
            rows = await self.store.cron_task_outcomes(
                cron, from_id=self._cursors.get(cron), since=now - PROBE_LOOKBACK_MS
            )
            unanswered = [row.id for row in rows if row.state < TaskState.DONE]
            if rows:
                self._cursors[cron] = min(unanswered) if unanswered else rows[-1].id + 1
            for row in rows:
                if row.state < TaskState.DONE or row.id <= self._last_task.get((cron, row.uuid), 0):
                    continue
                self._last_task[(cron, row.uuid)] = row.id
                for rule in rules:
                    if rule.covers(row.uuid):
                        self._probe_outcome(rule, row, now, starts, resolves)
        await self._start(starts, now)
        await self._resolve(list(resolves.values()), now)

    def _probe_outcome(
        self,
        rule: Rule,
        row: Any,
        now: int,
        starts: list[tuple[Rule, str, int, str]],
        resolves: dict[tuple[int, str], EventChange],
    ) -> None:
        params = rule.params
        assert isinstance(params, ProbeFailed | ProbeLatency)
        key = (rule.id, row.uuid)
        if isinstance(params, ProbeFailed):
            bad = not row.success
            detail = row.error_message or "no error message"
            what = "failed"
        else:
            latency = _latency(row.task_event_result) if row.success else None
            if latency is None:
                return  # a failure or a result without a time says nothing of latency
            bad = latency > params.above_ms
            detail = f"{latency:g} ms > {params.above_ms:g} ms"
            what = "was slow"
        streak = self._streaks[key] = self._streaks.get(key, 0) + 1 if bad else 0
        if bad and streak >= params.consecutive and key not in self.firing:
            if any(s[0].id == rule.id and s[1] == row.uuid for s in starts):
                return
            message = (
                f"Probe {params.cron!r} {what} on agent {row.uuid} {streak} time(s) in a row "
                f"(rule {rule.name!r}): {detail}"
            )
            starts.append((rule, row.uuid, now, message))
            resolves.pop(key, None)
        elif not bad and key in self.firing:
            change = self._resolution(key, now)
            if change is not None:
                resolves[key] = change

    # ------------------------------------------------------------------ metrics

    async def _metrics(self, now: int) -> None:
        rules = [r for r in self.rules.values() if r.enable and isinstance(r.params, Metric)]
        watched: set[str] = set()
        for rule in rules:
            watched |= set(rule.targets) if rule.targets is not None else self.presence.known
        if not watched:
            return
        newest = {
            row["uuid"]: row for row in await self.store.monitoring_last("summary", sorted(watched))
        }
        starts: list[tuple[Rule, str, int, str]] = []
        resolves: list[EventChange] = []
        for rule in rules:
            params = rule.params
            assert isinstance(params, Metric)
            read = METRIC_FIELDS[params.field]
            for agent_uuid, row in newest.items():
                if not rule.covers(agent_uuid):
                    continue
                value = read(row)
                if value is None:
                    continue
                key = (rule.id, agent_uuid)
                if params.breached(value):
                    since = self._breach_since.setdefault(key, now)
                    if now - since >= params.for_ms and key not in self.firing:
                        message = (
                            f"{params.describe()} on agent {agent_uuid}: {value:g} for "
                            f"{duration(now - since)} (rule {rule.name!r})"
                        )
                        starts.append((rule, agent_uuid, since, message))
                else:
                    self._breach_since.pop(key, None)
                    change = self._resolution(key, now)
                    if change is not None:
                        resolves.append(change)
        await self._start(starts, now)
        await self._resolve(resolves, now)
