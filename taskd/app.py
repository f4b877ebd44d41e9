"""The running service: settings, store, hub, authentication and background loops.

``App`` is an async context manager entered once in the Starlette lifespan;
methods reach every component through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any

from taskd.auth import Authenticator, Principal, RateLimiter
from taskd.clock import now_ms
from taskd.cluster import Cluster
from taskd.config import ServerSettings
from taskd.errors import NotFound, PermissionDenied
from taskd.hub import Hub, Subscription
from taskd.metrics import Metrics
from taskd.scheduler import Scheduler
from taskd.store import Store
from taskd.writer import CRONS_CHANNEL, TOKENS_CHANNEL

logger = logging.getLogger(__name__)


class App:
    """Everything one server process runs."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.node_id = settings.node_id or str(uuid.uuid4())
        self.store = Store(settings.database_url, pool_size=settings.db_pool_size)
        self.cluster = Cluster(
            self.store,
            node_id=self.node_id,
            address=settings.node_address or _default_address(settings),
            grace_ms=settings.node_grace_ms,
        )
        self.hub = Hub(
            self.store,
            node_id=self.node_id,
            task_deadline_ms=settings.task_deadline_ms,
            cluster=self.cluster,
        )
        self.cluster.on_token = self._token_changed_elsewhere
        self.scheduler = Scheduler(
            self.store, self.hub, timezone=settings.timezone, node_id=self.node_id
        )
        self.metrics = Metrics()
        self.store.batch_observer = self.metrics.write_batch.observe
        self.hub.metrics = self.metrics
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
        self.limiter = RateLimiter(settings.auth_burst, settings.auth_rate_per_s)
        self.auth = Authenticator(self.store, self.limiter)
        self.on_revoke: list[Callable[[str], None]] = []
        """Called with a token key revoked here or on another node (the terminal relay)."""
        self.started_at = now_ms()
        self._stack = AsyncExitStack()
        self._loops: list[asyncio.Task[None]] = []
        self._leading = False

    async def __aenter__(self) -> App:
        await self._stack.enter_async_context(self.store)
        try:
            await self.store.migrate()
            # the cluster first: it refuses a node_id that another live node runs with,
            # before anything is written under that id
            await self._stack.enter_async_context(self.cluster)
            await self.store.reset_node_agents(self.node_id)
            if self.cluster.enabled:
                # several nodes: only the leader fires crons (see cluster.py)
                self.cluster.on_leadership = self._leadership
                self.cluster.on_crons = self._crons_changed_elsewhere
                self._stack.push_async_callback(self._leadership, False)
                self.cluster.start_leader_election()
            else:
                # closed before the store on exit: running fires still write their results
                await self._stack.enter_async_context(self.scheduler)
        except BaseException:
            await self._stack.aclose()
            raise
        self._loops = [
            asyncio.create_task(
                self._every(self.settings.reaper_interval_ms / 1000, self.reap), name="taskd-reaper"
            ),
            asyncio.create_task(self._every(15.0, self.hub.flush_seen), name="taskd-seen"),
            asyncio.create_task(self._every(1.0, self.store.checkpoint), name="taskd-checkpoint"),
        ]
        logger.info(
            "taskd node %s started on %s", self.node_id, _safe_url(self.settings.database_url)
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for loop in self._loops:
            loop.cancel()
        for loop in self._loops:
            with contextlib.suppress(asyncio.CancelledError):
                await loop
        await self.hub.drain()
        with contextlib.suppress(Exception):
            await self.hub.flush_seen()  # the calls of the last seconds
        seen = {u: now_ms() for u in self.hub.connected_agents()}
        with contextlib.suppress(Exception):
            await self.store.agents_disconnected(seen, self.node_id)
        await self._stack.aclose()

    def revoke_locally(self, key: str, revoke: bool) -> list[Subscription]:
        """Drop token ``key`` from the cache here; with ``revoke`` also end what it opened."""
        self.auth.invalidate(key)
        if not revoke:
            return []
        ended = [s for s in self.hub.connected_agents().values() if s.token_key == key]
        for sub in ended:
            self.hub.unsubscribe(sub.id, sub.peer)
            logger.info("agent %s unsubscribed: its token %s changed", sub.agent_uuid, key)
        for listener in self.on_revoke:
            listener(key)
        return ended

    async def token_changed(self, key: str, *, revoke: bool) -> list[Subscription]:
        """A token change was committed: every node forgets it, and ends its subscriptions."""
        ended = self.revoke_locally(key, revoke)
        if self.cluster.enabled:
            await self.store.announce(TOKENS_CHANNEL, f"{key} {int(revoke)}")
        return ended

    def _token_changed_elsewhere(self, key: str, revoke: bool) -> None:
        for sub in self.revoke_locally(key, revoke):
            close_soon = getattr(sub.peer, "close_soon", None)
            if close_soon is not None:
                close_soon(1008)

    async def cron_changed(self, cron_id: int) -> None:
        """A cron change was committed: the scheduler that fires it (here or the leader) follows."""
        if self.fires_crons:
            await self._reschedule(cron_id)
        if self.cluster.enabled:
            await self.store.announce(CRONS_CHANNEL, str(cron_id))

    @property
    def fires_crons(self) -> bool:
        """Whether this node's scheduler runs (the only node, or the cluster's leader)."""
        return not self.cluster.enabled or self._leading

    async def _reschedule(self, cron_id: int) -> None:
        row = await self.store.cron_by_id(cron_id)
        if row is None:
            self.scheduler.unschedule(cron_id)
        else:
            self.scheduler.schedule(row)

    def _crons_changed_elsewhere(self, cron_ids: list[int]) -> None:
        if self.fires_crons:
            for cron_id in cron_ids:
                self.hub.spawn(self._reschedule(cron_id))

    async def _leadership(self, leader: bool) -> None:
        if leader and not self._leading:
            self._leading = True
            await self.scheduler.__aenter__()
        elif not leader and self._leading:
            self._leading = False
            await self.scheduler.__aexit__(None, None, None)

    async def _every(self, seconds: float, job: Any) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await job()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("%s failed: %s", getattr(job, "__name__", job), exc)

    async def reap(self) -> None:
        """Fail tasks that passed their deadline without a result."""
        reaped = await self.store.reap(now_ms())
        for result in reaped:
            self.hub.in_flight.pop(result.task_id, None)
        self.metrics.tasks_reaped.inc(len(reaped))
        if reaped:
            logger.info("reaped %d task(s) without a result", len(reaped))

    async def authenticate(self, token: Any, remote: str) -> Principal:
        """Check a token param (see auth.Authenticator)."""
        try:
            return await self.auth.authenticate(token, remote)
        except PermissionDenied:
            self.metrics.auth_failures.inc()
            raise

    async def task_type_of(self, task_id: int, agent_uuid: str, task_token: str) -> str:
        """The type of the task an upload answers; 105 unless id, agent and token match."""
        known = self.hub.in_flight.get(task_id)
        if known is None:
            row = await self.store.task_identity(task_id)
            known = (row.uuid, row.task_token, row.type) if row is not None else None
        if known is None or known[0] != agent_uuid or known[1] != task_token:
            raise NotFound(f"No task {task_id} for agent {agent_uuid} with that task_token")
        return known[2]


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
