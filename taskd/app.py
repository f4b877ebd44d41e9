"""The running service: builds every component of one server process and runs them.

``App`` is an async context manager entered once in the Starlette lifespan; it
enters each long-lived component on one ``AsyncExitStack`` (left in reverse
order) and relays what other nodes announce to the component it concerns.
Methods reach every component through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

from taskd.alerts.evaluator import Evaluator, EvaluatorSettings
from taskd.alerts.notifier import Notifier, NotifierSettings
from taskd.auth import Authenticator, Principal, RateLimiter
from taskd.clock import Clock
from taskd.cluster import CHANNELS, Cluster
from taskd.config import ServerSettings
from taskd.hub import Hub
from taskd.metrics import Metrics
from taskd.retention import Pruner
from taskd.revocation import Revocation
from taskd.scheduler import Scheduler
from taskd.store import Store
from taskd.terminal import TerminalRelay
from taskd.ui.live import Fleet

logger = logging.getLogger(__name__)

SEEN_FLUSH_S = 15.0
CHECKPOINT_S = 1.0


class App:
    """Everything one server process runs."""

    def __init__(self, settings: ServerSettings, clock: Clock | None = None) -> None:
        self.settings = settings
        self.node_id = settings.node_id or str(uuid.uuid4())
        self.clock = clock or Clock()
        self.metrics = Metrics()
        self.store = Store(
            settings.database_url,
            pool_size=settings.db_pool_size,
            point_cache_bytes=settings.monitoring_point_cache_bytes,
            channels=CHANNELS,
            batch_observer=self.metrics.write_batch.observe,
        )
        self.cluster = Cluster(
            self.store,
            self,
            node_id=self.node_id,
            address=settings.node_address or _default_address(settings),
            grace_ms=settings.node_grace_ms,
        )
        self.hub = Hub(
            self.store,
            node_id=self.node_id,
            task_deadline_ms=settings.task_deadline_ms,
            cluster=self.cluster,
            metrics=self.metrics,
        )
        self.scheduler = Scheduler(
            self.store,
            self.hub,
            clock=self.clock,
            timezone=settings.timezone,
            node_id=self.node_id,
            cluster=self.cluster,
        )
        self.auth = Authenticator(
            self.store,
            RateLimiter(settings.auth_burst, settings.auth_rate_per_s),
            on_failure=self.metrics.auth_failures.inc,
        )
        self.authenticate: Callable[[Any, str], Awaitable[Principal]] = self.auth.authenticate
        """Check a token param (see ``Authenticator.authenticate``)."""
        self.terminals = TerminalRelay(
            settings, self.store, self.hub, self.cluster, self.authenticate
        )
        self.revocation = Revocation(self.auth, self.hub, self.terminals, self.cluster)
        # one node of a cluster evaluates alerts and sends them: the cron leader
        self.alerts = Evaluator(
            self.store,
            self.hub,
            self.cluster,
            self.clock,
            Notifier(
                self.store,
                self.node_id,
                NotifierSettings(
                    window_ms=settings.alert_batch_window_ms,
                    retry_base_ms=settings.alert_retry_base_ms,
                    retry_max_ms=settings.alert_retry_max_ms,
                    retry_max=settings.alert_retry_max,
                    send_timeout_ms=settings.alert_send_timeout_ms,
                ),
                self.clock.now_ms,
                self.metrics,
            ),
            EvaluatorSettings(
                sweep_ms=settings.alert_sweep_ms,
                probe_interval_ms=settings.alert_probe_interval_ms,
                metric_interval_ms=settings.alert_metric_interval_ms,
            ),
            self.metrics,
        )
        self.hub.presence_hook = self.alerts.hub_changed
        # one node of a cluster prunes: the cron leader (always the node itself on SQLite)
        self.pruner = Pruner(self.store, settings, self.clock, lambda: self.cluster.is_leader)
        self.fleet = Fleet(self.store, self.hub, self.cluster, self.clock.now_ms)
        """The dashboard's live fleet feed (runs while a page listens)."""
        self.metrics.gauge(
            "taskd_agents_connected",
            "Agents subscribed to this node",
            lambda: len(self.hub.connected_agents()),
        )
        self.metrics.gauge(
            "taskd_tasks_in_flight",
            "Tasks pushed from this node awaiting a result",
            lambda: len(self.hub.in_flight),
        )
        self.metrics.gauge(
            "taskd_cron_leader", "1 if this node fires crons", lambda: float(self.cluster.is_leader)
        )
        self._stack = AsyncExitStack()

    async def __aenter__(self) -> App:
        stack = self._stack
        try:
            stack.enter_context(self.metrics.watching_gc())
            await stack.enter_async_context(self.store)
            await self.store.migrate()
            # the cluster first: it refuses a node_id that another live node runs with,
            # before anything is written under that id
            await stack.enter_async_context(self.cluster)
            await stack.enter_async_context(self.hub)
            await stack.enter_async_context(self.fleet)
            # left before the hub and the store: running fires still write their results
            await stack.enter_async_context(self.scheduler)
            # left before the hub: its last disconnections are not alerts
            await stack.enter_async_context(self.alerts)
            if self.cluster.enabled:
                # several nodes: only the leader fires crons (see cluster.py)
                self.cluster.start_leader_election()
            else:
                await self.scheduler.start()
                await self.alerts.start()
            reaper_s = self.settings.reaper_interval_ms / 1000
            await stack.enter_async_context(_every(reaper_s, self.hub.reap, "taskd-reaper"))
            await stack.enter_async_context(_every(SEEN_FLUSH_S, self.hub.flush_seen, "taskd-seen"))
            await stack.enter_async_context(
                _every(CHECKPOINT_S, self.store.checkpoint, "taskd-checkpoint")
            )
            await stack.enter_async_context(
                _every(
                    self.settings.monitoring_prune_interval_s,
                    self.pruner.prune,
                    "taskd-prune",
                )
            )
        except BaseException:
            await stack.aclose()
            raise
        logger.info(
            "taskd node %s started on %s", self.node_id, _safe_url(self.settings.database_url)
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._stack.aclose()

    # ------------------------------------------------------------------ ClusterEvents

    def agents_queued(self, agent_uuids: list[str]) -> None:
        """Tasks were queued for agents that may be subscribed here."""
        self.hub.tasks_queued(agent_uuids)

    def results_stored(self, task_ids: list[int]) -> None:
        """Results of these tasks were committed on another node."""
        self.hub.results_stored(task_ids)

    def agent_moved(self, agent_uuid: str) -> None:
        """The agent subscribed on another node."""
        self.hub.agent_moved(agent_uuid)

    def crons_changed(self, cron_ids: list[int]) -> None:
        """These crons were changed through another node."""
        self.scheduler.crons_changed_elsewhere(cron_ids)

    def token_changed(self, key: str, revoke: bool) -> None:
        """A token was changed through another node."""
        self.revocation.token_changed_elsewhere(key, revoke)

    async def leadership_changed(self, leader: bool) -> None:
        """This node became the cron leader (scheduler and alerts start), or stopped being it."""
        await (self.scheduler.start() if leader else self.scheduler.stop())
        await (self.alerts.start() if leader else self.alerts.stop())


@contextlib.asynccontextmanager
async def _every(
    seconds: float, job: Callable[[], Awaitable[object]], name: str
) -> AsyncIterator[None]:
    """Run ``job`` every ``seconds`` in the background while the context lasts."""

    async def repeat() -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await job()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("%s failed: %s", name, exc)

    task = asyncio.create_task(repeat(), name=name)
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _default_address(settings: ServerSettings) -> str:
    """How other nodes reach this one when node_address is not configured."""
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    return f"http://{host}:{settings.port}"


def _safe_url(url: str) -> str:
    """A database URL without its password."""
    head, sep, tail = url.partition("@")
    if not sep:
        return url
    scheme, _, credentials = head.partition("://")
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}@{tail}"
