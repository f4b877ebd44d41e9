"""Which agents are connected, and since when the others are not: what ``agent_offline``
rules watch.

Changes arrive as events: the hub's connect and disconnect hook on this node and,
with several nodes on PostgreSQL, the subscription announcements every node makes
(``cluster.AGENTS_CHANNEL``: ``uuid node`` when an agent subscribed somewhere,
``uuid -`` when a subscription ended). A start reads the whole agent table; then a
periodic resync reads only the agents the table shows without a live node, which heals
anything missed (a lost notification, a node that died with its agents) at the cost of
a scan the database does, not taskd. Before an offline condition fires the evaluator
confirms it against the table (``confirm``): a subscription missed here cancels it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy.engine import make_url

from taskd.cluster import AGENTS_CHANNEL

if TYPE_CHECKING:
    from taskd.cluster import Cluster
    from taskd.hub import Hub
    from taskd.store import Store

logger = logging.getLogger(__name__)

Changed = Callable[[str, bool, int], None]
"""Told ``(agent_uuid, online, at_ms)`` on every change."""


class Presence:
    """Connected agents and the time each other known agent went offline (ms)."""

    def __init__(
        self,
        store: Store,
        hub: Hub,
        cluster: Cluster | None,
        now: Callable[[], int],
        changed: Changed,
    ) -> None:
        self.store = store
        self.hub = hub
        self.cluster = cluster
        self.now = now
        self.changed = changed
        self.online: set[str] = set()
        self.offline_since: dict[str, int] = {}
        self._listener: asyncio.Task[None] | None = None

    @property
    def known(self) -> set[str]:
        """Every agent known here, connected or not."""
        return self.online | set(self.offline_since)

    async def start(self, since: int) -> None:
        """Load every agent from the table (one offline counts from ``since`` at the
        earliest: agents get a grace after a start) and follow the announcements."""
        await self.resync(since)
        if self.cluster is not None and self.cluster.enabled and self._listener is None:
            self._listener = asyncio.create_task(self._listen(), name="taskd-alert-presence")

    async def stop(self) -> None:
        """Stop following announcements."""
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._listener
            self._listener = None

    async def resync(self, since: int, *, whole: bool = True) -> None:
        """Bring the view in line with the agent table: every agent, or (not ``whole``) the
        agents the table shows without a live node (new agents that only report, agents
        of a node that died, changes missed)."""
        held_by = None
        if not whole and self.cluster is not None:
            enabled = self.cluster.enabled
            held_by = list(self.cluster.live_nodes()) if enabled else [self.cluster.node_id]
        for row in await self.store.agent_presence(held_by=held_by):
            if row.connected_since is not None and self._connected(row):
                self.set_online(row.uuid)
            elif row.uuid in self.online or row.uuid not in self.offline_since:
                self.set_offline(row.uuid, max(int(row.last_seen or 0), since))

    def _connected(self, row: Any) -> bool:
        """Whether a row recorded as connected is held by a live node (this node's rows by
        the hub itself: its disconnections are written in the background)."""
        cluster = self.cluster
        if cluster is None or not cluster.enabled or row.node_id == cluster.node_id:
            return self.hub.is_connected(row.uuid)
        return cluster.node_alive(row.node_id)

    async def confirm(self, uuids: list[str]) -> dict[str, int | None]:
        """For agents thought offline: None where the table shows them connected, else the
        last time they were heard of (a report counts)."""
        found: dict[str, int | None] = {}
        for row in await self.store.agent_presence(uuids):
            if row.connected_since is not None and self._connected(row):
                found[row.uuid] = None
            else:
                local = self.hub.last_seen(row.uuid) or 0
                found[row.uuid] = max(int(row.last_seen or 0), local)
        return found

    def set_online(self, agent_uuid: str) -> None:
        """The agent is connected."""
        if agent_uuid in self.online:
            return
        self.online.add(agent_uuid)
        self.offline_since.pop(agent_uuid, None)
        self.changed(agent_uuid, True, self.now())

    def set_offline(self, agent_uuid: str, since: int | None = None) -> None:
        """The agent is not connected (since ``since``, by default now)."""
        if agent_uuid in self.offline_since and agent_uuid not in self.online:
            return
        self.online.discard(agent_uuid)
        at = self.now() if since is None else since
        self.offline_since[agent_uuid] = at
        self.changed(agent_uuid, False, at)

    def forget(self, agent_uuid: str) -> None:
        """The agent was soft-deleted or is unknown: no longer watched."""
        self.online.discard(agent_uuid)
        self.offline_since.pop(agent_uuid, None)

    # ------------------------------------------------------------------ hub hook

    def hub_changed(self, agent_uuid: str, online: bool) -> None:
        """The hub's hook: an agent subscribed here, or its subscription here ended."""
        if online:
            self.set_online(agent_uuid)
        else:
            self.set_offline(agent_uuid)

    # ------------------------------------------------------------------ announcements

    def _announced(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        own = self.cluster.node_id if self.cluster is not None else ""
        for item in payload.split(","):
            agent_uuid, _, node = item.partition(" ")
            if not agent_uuid or node == own:
                continue  # this node's own changes come through the hub hook
            if node == "-":
                if not self.hub.is_connected(agent_uuid):
                    self.set_offline(agent_uuid)
            else:
                self.set_online(agent_uuid)

    async def _listen(self) -> None:
        assert self.cluster is not None
        url = make_url(self.store.url).set(drivername="postgresql")
        dsn = url.render_as_string(hide_password=False)
        delay = 0.5
        while True:
            conn = None
            try:
                conn = await asyncpg.connect(dsn, timeout=5)
                await conn.add_listener(AGENTS_CHANNEL, self._announced)
                # what changed while nobody listened
                await self.resync(self.now(), whole=False)
                delay = 0.5
                while not conn.is_closed():
                    await asyncio.sleep(10)
                    await conn.execute("SELECT 1")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning(
                    "alert presence listener lost (%s); reconnecting in %.1f s", exc, delay
                )
            finally:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
