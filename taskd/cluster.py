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
- A node holds its ``node_id`` the same way, for as long as it runs: two
  processes given one id (one config file, or a copy with the generated id in
  it) would split its agents and routing between them, so the second is
  refused. A heartbeat cannot tell that apart from a restart, a lock can: the
  session of a stopped or killed process ends with it, so a restart (even
  within the grace, its old heartbeat still fresh) finds the id free.

On SQLite there is one node: every method here is a cheap no-op.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from datetime import UTC, datetime
from typing import Any, Protocol

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy.engine import make_url

from taskd.clock import now_ms
from taskd.errors import InvalidInput
from taskd.store import Channels, Store

logger = logging.getLogger(__name__)

AGENTS_CHANNEL = "taskd_agents"
TERMINALS_CHANNEL = "taskd_terminals"
CRONS_CHANNEL = "taskd_crons"
TOKENS_CHANNEL = "taskd_tokens"


def node_channel(node_id: str) -> str:
    """The LISTEN channel of a cluster node (a valid unquoted identifier)."""
    return "taskd_n_" + "".join(c for c in node_id.lower() if c.isalnum())[:48]


CHANNELS = Channels(agents=AGENTS_CHANNEL, node=node_channel)
"""The channels the store announces its commits on (give it to ``Store``)."""

LEADER_LOCK = 7_205_759_403_792_793  # any fixed 64-bit key; the same on every node
HEARTBEAT_S = 2.0
LEADER_POLL_S = 1.0
SWEEP_S = 10.0
CLAIM_PATIENCE_S = 3.0
"""How long a starting node waits for a live node's lock on its id before refusing (the session
of a just-killed predecessor ends within a round trip)."""
STALE_HOLDER_WAIT_S = 30.0
"""How long it waits for the lock of a session whose node stopped beating: PostgreSQL ends the
session of a vanished host within about 25 s, by the keepalives below."""
KEEPALIVES = {
    "tcp_keepalives_idle": "10",
    "tcp_keepalives_interval": "5",
    "tcp_keepalives_count": "3",
}
"""For the sessions that hold locks: a host that vanished must not keep them for hours."""


class NodeIdInUse(InvalidInput):
    """Another live process runs with this node's ``node_id``."""


def node_lock_key(node_id: str) -> int:
    """The advisory lock key a node holds for as long as it runs with ``node_id``."""
    digest = hashlib.sha256(b"taskd node " + node_id.encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds")


_LOCK_HOLDER = """
SELECT a.pid, host(a.client_addr) AS client_addr, a.backend_start
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
  AND l.classid::bigint = ($1::bigint >> 32) & 4294967295
  AND l.objid::bigint = $1::bigint & 4294967295
"""


class ClusterEvents(Protocol):
    """What this node does when the cluster tells it something."""

    def agents_queued(self, agent_uuids: list[str]) -> None:
        """Tasks were queued for agents that may be subscribed here."""

    def results_stored(self, task_ids: list[int]) -> None:
        """Results of these tasks were committed on another node."""

    def agent_moved(self, agent_uuid: str) -> None:
        """The agent subscribed on another node."""

    def crons_changed(self, cron_ids: list[int]) -> None:
        """These crons were changed through another node."""

    def token_changed(self, key: str, revoke: bool) -> None:
        """A token was changed through another node (``revoke``: what it opened must end)."""

    async def leadership_changed(self, leader: bool) -> None:
        """This node became the cron leader, or stopped being it."""


class Cluster:
    """This node's view of the cluster: peers, agent locations, leadership."""

    def __init__(
        self, store: Store, events: ClusterEvents, *, node_id: str, address: str, grace_ms: int
    ) -> None:
        self.store = store
        self.events = events
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
        self._dsn = ""
        self._listener: asyncpg.Connection | None = None
        self._lock_conn: asyncpg.Connection | None = None
        self._identity: asyncpg.Connection | None = None
        self._id_contested = False
        self._loops: list[asyncio.Task[None]] = []
        self._listening = asyncio.Event()

    async def __aenter__(self) -> Cluster:
        if not self.enabled:
            return self
        url = make_url(self.store.url).set(drivername="postgresql")
        self._dsn = url.render_as_string(hide_password=False)
        # before anything is written under this id: a duplicate must change nothing
        self._identity = await self._claim_node_id()
        try:
            await self.store.node_heartbeat(self.node_id, self.address, started=True)
            await self._refresh_nodes()
        except BaseException:
            await self._identity.close()
            raise
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
        """Begin competing for leadership (once this node is ready to fire crons)."""
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
        if self._identity is not None:  # last: the id is free once this node is gone
            with contextlib.suppress(Exception):
                await self._identity.close()

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

    async def announce_crons(self, cron_ids: list[int]) -> None:
        """Tell the other nodes that these crons changed (their leader reloads them)."""
        if self.enabled:
            await self.store.announce(CRONS_CHANNEL, ",".join(map(str, cron_ids)))

    async def announce_token(self, key: str, revoke: bool) -> None:
        """Tell the other nodes that token ``key`` changed (``revoke``: end what it opened)."""
        if self.enabled:
            await self.store.announce(TOKENS_CHANNEL, f"{key} {int(revoke)}")

    async def address_of(self, node_id: str) -> str | None:
        """The published internal address of a node (read again if not known yet)."""
        entry = self.nodes.get(node_id)
        if not entry or not entry[0]:
            # known only from an agent notification so far: its row has the address
            await self._refresh_nodes()
            entry = self.nodes.get(node_id)
        return entry[0] if entry else None

    # ------------------------------------------------------------------ node id

    async def _connect(self) -> asyncpg.Connection:
        return await asyncpg.connect(self._dsn, timeout=5, server_settings=KEEPALIVES)

    async def _claim_node_id(self) -> asyncpg.Connection:
        """Take this node's id lock on a session of its own; NodeIdInUse if a live node holds it."""
        key = node_lock_key(self.node_id)
        conn = await self._connect()
        began = time.monotonic()
        waiting = False
        try:
            while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", key):
                waited = time.monotonic() - began
                if waited >= CLAIM_PATIENCE_S:
                    problem = await self._id_holder(conn, key, waited)
                    if problem is not None:
                        logger.error("%s", problem)
                        raise NodeIdInUse(problem)
                if not waiting:
                    logger.warning("node id %s is locked by another session; waiting", self.node_id)
                    waiting = True
                await asyncio.sleep(0.2)
        except BaseException:
            with contextlib.suppress(Exception):
                await conn.close()
            raise
        return conn

    async def _id_holder(self, conn: asyncpg.Connection, key: int, waited: float) -> str | None:
        """Why this node may not start (another process holds its id); None to wait on."""
        row = await self.store.node(self.node_id)
        session = await conn.fetchrow(_LOCK_HOLDER, key)
        fix = (
            "Every `taskd serve` process needs its own node_id: give this one its own config "
            "file without a node_id line (a new id is generated and written into it on start), "
            "or set TASKD_NODE_ID to a new UUID for it."
        )
        origin = ""
        if session is not None:
            origin = (
                f" (PostgreSQL session {session['pid']} from "
                f"{session['client_addr'] or 'a local socket'}, since "
                f"{session['backend_start'].isoformat(timespec='seconds')})"
            )
        since_beat = now_ms() - row.heartbeat if row is not None else None
        if row is not None and since_beat is not None and since_beat <= self.grace_ms:
            return (
                f"node_id {self.node_id} is in use by a running node at "
                f"{row.address or 'an unpublished address'}, started "
                f"{_when(row.started_at)}, last heartbeat {since_beat} ms ago{origin}. {fix}"
            )
        if waited < CLAIM_PATIENCE_S + STALE_HOLDER_WAIT_S:
            return None  # a session whose node stopped beating: PostgreSQL ends it soon
        end = (
            f"If that process is gone, end its session (SELECT pg_terminate_backend"
            f"({session['pid']})) and start again; if it is another taskd serve: "
            if session is not None
            else "If it is another taskd serve: "
        )
        return (
            f"node_id {self.node_id} is locked by another process{origin} although no node "
            f"with this id has sent a heartbeat for over {STALE_HOLDER_WAIT_S:.0f} s. {end}{fix}"
        )

    async def _keep_node_id(self) -> None:
        """Take the id lock again if its session ended (a database restart)."""
        if self._identity is not None and not self._identity.is_closed():
            return
        self._identity = None
        try:
            conn = await self._connect()
        except Exception as exc:
            logger.warning("node id lock not taken again yet: %s", exc)
            return
        if await conn.fetchval("SELECT pg_try_advisory_lock($1)", node_lock_key(self.node_id)):
            self._identity = conn
            self._id_contested = False
            logger.info("node %s holds its node id lock again", self.node_id)
            return
        await conn.close()
        if not self._id_contested:
            self._id_contested = True
            logger.error(
                "node_id %s is locked by another session: this node's lost one (until "
                "PostgreSQL ends it) or another process with the same id, which breaks routing "
                "between them; retrying",
                self.node_id,
            )

    # ------------------------------------------------------------------ loops

    async def _refresh_nodes(self) -> None:
        rows = await self.store.list_nodes()
        self.nodes = {row.id: (row.address, row.heartbeat) for row in rows}

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            try:
                await self._keep_node_id()
                await self.store.node_heartbeat(self.node_id, self.address)
                await self._refresh_nodes()
            except Exception as exc:
                logger.warning("cluster heartbeat failed: %s", exc)

    def _notified(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        if channel == TOKENS_CHANNEL:
            key, _, revoke = payload.partition(" ")
            self.events.token_changed(key, revoke == "1")
        elif channel == CRONS_CHANNEL:
            self.events.crons_changed([int(i) for i in payload.split(",") if i.isdigit()])
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
                    self.events.agent_moved(agent_uuid)
        elif payload.startswith("q:"):
            self.events.agents_queued(payload[2:].split(","))
        elif payload.startswith("r:"):
            self.events.results_stored([int(i) for i in payload[2:].split(",") if i.isdigit()])

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
                self.events.agents_queued(list(self.agents))
                delay = 0.5
                while not conn.is_closed():
                    await asyncio.sleep(SWEEP_S)
                    await conn.execute("SELECT 1")
                    self.events.agents_queued(
                        [u for u, n in self.agents.items() if n == self.node_id]
                    )
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
        await self.events.leadership_changed(leader)

    async def _leader_loop(self) -> None:
        while True:
            try:
                if self._lock_conn is None or self._lock_conn.is_closed():
                    await self._set_leader(False)
                    self._lock_conn = await self._connect()
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
