"""Several taskd nodes on one PostgreSQL database, coordinated by PostgreSQL alone.

- Each node heartbeats in the ``node`` table; a node whose heartbeat is older
  than the grace counts as dead, and so do the agents it held.
- Each node LISTENs on its own channel. A node that creates a task for an
  agent held elsewhere commits it as queued and, in the same transaction,
  NOTIFYs the holder with the agent's UUID; the holder pushes it (the same path
  as an offline agent's queue, so a lost notification is healed by a sweep).
  A blocking caller's node is notified when the result is committed elsewhere.
- Subscriptions are announced on a shared channel, so every node knows where
  each agent is, and a node whose agent reconnected elsewhere drops it at once.
- One node leads (a session-level advisory lock) and runs the cron scheduler;
  when it dies its lock is released with its session and another takes over.

On SQLite there is one node: every method here is a cheap no-op.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy.engine import make_url

from taskd.clock import now_ms
from taskd.store import Store
from taskd.writer import (
    AGENTS_CHANNEL,
    CRONS_CHANNEL,
    TERMINALS_CHANNEL,
    TOKENS_CHANNEL,
    node_channel,
)

logger = logging.getLogger(__name__)

LEADER_LOCK = 7_205_759_403_792_793  # any fixed 64-bit key; the same on every node
HEARTBEAT_S = 2.0
LEADER_POLL_S = 1.0
SWEEP_S = 10.0


class Cluster:
    """This node's view of the cluster: peers, agent locations, leadership."""

    def __init__(self, store: Store, *, node_id: str, address: str, grace_ms: int) -> None:
        self.store = store
        self.node_id = node_id
        self.address = address
        self.grace_ms = grace_ms
        # a beat is read by the others up to one interval late: four beats per grace
        # keep a live node from ever looking dead
        self.heartbeat_s = min(HEARTBEAT_S, grace_ms / 4000)
        self.enabled = not store.is_sqlite
        self.is_leader = not self.enabled
        self.agents: dict[str, str] = {}
        self.terminals: dict[tuple[str, str], str] = {}
        self.nodes: dict[str, tuple[str, int]] = {}
        self.on_queued: Callable[[list[str]], None] = lambda uuids: None
        self.on_results: Callable[[list[int]], None] = lambda ids: None
        self.on_moved: Callable[[str], None] = lambda agent_uuid: None
        self.on_crons: Callable[[list[int]], None] = lambda cron_ids: None
        self.on_token: Callable[[str, bool], None] = lambda key, revoke: None
        self.on_leadership: Callable[[bool], Awaitable[None]] | None = None
        self._dsn = ""
        self._listener: asyncpg.Connection | None = None
        self._lock_conn: asyncpg.Connection | None = None
        self._loops: list[asyncio.Task[None]] = []
        self._listening = asyncio.Event()

    async def __aenter__(self) -> Cluster:
        if not self.enabled:
            return self
        url = make_url(self.store.url).set(drivername="postgresql")
        self._dsn = url.render_as_string(hide_password=False)
        await self.store.node_heartbeat(self.node_id, self.address, started=True)
        await self._refresh_nodes()
        self._loops = [
            asyncio.create_task(self._listen_loop(), name="taskd-cluster-listen"),
            asyncio.create_task(self._heartbeat_loop(), name="taskd-cluster-heartbeat"),
        ]
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._listening.wait(), 10)
        logger.info(
            "node %s joined the cluster (%d live node(s))", self.node_id, len(self.live_nodes())
        )
        return self

    def start_leader_election(self) -> None:
        """Begin competing for leadership (after the scheduler exists)."""
        if self.enabled:
            self._loops.append(
                asyncio.create_task(self._leader_loop(), name="taskd-cluster-leader")
            )

    async def __aexit__(self, *exc_info: object) -> None:
        for loop in self._loops:
            loop.cancel()
        for loop in self._loops:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await loop
        if self.is_leader and self.enabled:
            await self._set_leader(False)
        for conn in (self._listener, self._lock_conn):
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()
        if self.enabled:
            with contextlib.suppress(Exception):
                await self.store.node_left(self.node_id)

    # ------------------------------------------------------------------ queries

    def live_nodes(self) -> dict[str, str]:
        """Live node ids and their addresses (this node included)."""
        cutoff = now_ms() - self.grace_ms
        live = {n: addr for n, (addr, beat) in self.nodes.items() if beat >= cutoff}
        live[self.node_id] = self.address
        return live

    def node_alive(self, node_id: str | None) -> bool:
        """Whether ``node_id`` is this node or heartbeat within the grace."""
        if node_id is None:
            return False
        if node_id == self.node_id or not self.enabled:
            return True
        entry = self.nodes.get(node_id)
        return entry is not None and entry[1] >= now_ms() - self.grace_ms

    def locate(self, agent_uuid: str) -> str | None:
        """The live node (other than this one) holding the agent, if any."""
        node = self.agents.get(agent_uuid)
        if node is None or node == self.node_id or not self.node_alive(node):
            return None
        return node

    def terminal_node(self, agent_uuid: str, terminal_id: str) -> str | None:
        """The live node (other than this one) holding a terminal slot, if any."""
        node = self.terminals.get((agent_uuid, terminal_id))
        if node is None or node == self.node_id or not self.node_alive(node):
            return None
        return node

    async def announce_terminal(self, agent_uuid: str, terminal_id: str, opened: bool) -> None:
        """Tell the other nodes that a terminal slot opened or closed here."""
        if self.enabled:
            state = "open" if opened else "close"
            await self.store.announce(
                TERMINALS_CHANNEL, f"{state} {agent_uuid} {terminal_id} {self.node_id}"
            )

    async def address_of(self, node_id: str) -> str | None:
        """The published internal address of a node (read again if not known yet)."""
        entry = self.nodes.get(node_id)
        if not entry or not entry[0]:
            # known only from an agent notification so far: its row has the address
            await self._refresh_nodes()
            entry = self.nodes.get(node_id)
        return entry[0] if entry else None

    # ------------------------------------------------------------------ loops

    async def _refresh_nodes(self) -> None:
        rows = await self.store.list_nodes()
        self.nodes = {row.id: (row.address, row.heartbeat) for row in rows}

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            try:
                await self.store.node_heartbeat(self.node_id, self.address)
                await self._refresh_nodes()
            except Exception as exc:
                logger.warning("cluster heartbeat failed: %s", exc)

    def _notified(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        if channel == TOKENS_CHANNEL:
            key, _, revoke = payload.partition(" ")
            self.on_token(key, revoke == "1")
        elif channel == CRONS_CHANNEL:
            self.on_crons([int(i) for i in payload.split(",") if i.isdigit()])
        elif channel == TERMINALS_CHANNEL:
            state, agent_uuid, terminal_id, node = [*payload.split(" "), "", "", "", ""][:4]
            if state == "open":
                self.terminals[(agent_uuid, terminal_id)] = node
            else:
                self.terminals.pop((agent_uuid, terminal_id), None)
        elif channel == AGENTS_CHANNEL:
            for item in payload.split(","):
                agent_uuid, _, node = item.partition(" ")
                if node == "-":
                    if self.agents.get(agent_uuid) not in (None, self.node_id):
                        self.agents.pop(agent_uuid, None)
                    continue
                self.agents[agent_uuid] = node
                if node not in self.nodes:
                    # a node that just subscribed an agent is alive; its address comes
                    # with the next heartbeat refresh
                    self.nodes[node] = ("", now_ms())
                if node != self.node_id:
                    self.on_moved(agent_uuid)
        elif payload.startswith("q:"):
            self.on_queued(payload[2:].split(","))
        elif payload.startswith("r:"):
            self.on_results([int(i) for i in payload[2:].split(",") if i.isdigit()])

    async def _listen_loop(self) -> None:
        delay = 0.5
        while True:
            try:
                conn = await asyncpg.connect(self._dsn, timeout=5)
                self._listener = conn
                await conn.add_listener(AGENTS_CHANNEL, self._notified)
                await conn.add_listener(TERMINALS_CHANNEL, self._notified)
                await conn.add_listener(CRONS_CHANNEL, self._notified)
                await conn.add_listener(TOKENS_CHANNEL, self._notified)
                await conn.add_listener(node_channel(self.node_id), self._notified)
                rows = await self.store.connected_agents()
                self.agents = {row.uuid: row.node_id for row in rows if row.node_id}
                self._listening.set()
                # whatever was routed here while nobody listened is delivered now
                self.on_queued(list(self.agents))
                delay = 0.5
                while not conn.is_closed():
                    await asyncio.sleep(SWEEP_S)
                    await conn.execute("SELECT 1")
                    self.on_queued([u for u, n in self.agents.items() if n == self.node_id])
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("cluster listener lost (%s); reconnecting in %.1f s", exc, delay)
            self._listening.clear()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    async def _set_leader(self, leader: bool) -> None:
        if leader == self.is_leader:
            return
        self.is_leader = leader
        logger.info(
            "node %s %s the cron leader", self.node_id, "is now" if leader else "is no longer"
        )
        if self.on_leadership is not None:
            await self.on_leadership(leader)

    async def _leader_loop(self) -> None:
        while True:
            try:
                if self._lock_conn is None or self._lock_conn.is_closed():
                    await self._set_leader(False)
                    self._lock_conn = await asyncpg.connect(self._dsn, timeout=5)
                if not self.is_leader:
                    got = await self._lock_conn.fetchval(
                        "SELECT pg_try_advisory_lock($1)", LEADER_LOCK
                    )
                    if got:
                        await self._set_leader(True)
                else:
                    await asyncio.wait_for(self._lock_conn.execute("SELECT 1"), LEADER_POLL_S * 2)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("leadership check failed: %s", exc)
                await self._set_leader(False)
                if self._lock_conn is not None:
                    with contextlib.suppress(Exception):
                        self._lock_conn.terminate()
                self._lock_conn = None
            await asyncio.sleep(LEADER_POLL_S)
