"""The live fleet feed behind ``WS /ui/live``: every agent's latest figures, once a second.

One loop serves every dashboard: each second it reads the newest summary of every
agent (one statement, an index seek per agent) and the online state, keeps the rows
that changed since the last second, and hands each subscriber the part its token may
see. A subscriber that sees every agent gets the same serialised frame as all the
others; a narrower one gets its rows filtered from the shared ones.

Each row also carries the host name and OS from the agent's newest static report, read
once for each agent that appears and again every ``FACTS_EVERY`` ticks (they rarely
change), so one frame is all a page needs to show the fleet.

Frames (JSON text): ``{"type": "full"|"delta", "now": ms, "fields": [...], "rows":
[[uuid, online, name, os, cpu, used_memory, total_memory, used_space, total_space,
receive_speed, transmit_speed, time], ...], "gone": [uuid, ...]}``. A new
subscriber's first frame is ``full``; what its token may not read is null.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson

from taskd.auth import Need, Principal, allows
from taskd.cluster import Cluster
from taskd.hub import Hub
from taskd.store import Store

logger = logging.getLogger(__name__)

TICK_S = 1.0
AGENTS_EVERY = 5
"""Ticks between two reads of the agent list (online state in between comes from the hub)."""
LINGER_S = 30.0
"""How long the loop runs on after the last page left: a reload, or the next page of
the same user, gets the fleet at once instead of after a first read."""
FACTS_EVERY = 60
"""Ticks between two reads of every agent's host facts (new agents' at once)."""
REPORTING_MS = 15_000
"""An agent whose last summary arrived this recently counts as online even with no
subscription (NodeGet agents may only report)..."""
SKEW_MS = 5 * 60 * 1000
"""...unless the summary itself is older than this (a backlog sent after an outage); agents'
clocks may be off by up to this much."""
FIELDS = (
    "uuid",
    "online",
    "name",
    "os",
    "cpu",
    "used_memory",
    "total_memory",
    "used_space",
    "total_space",
    "receive_speed",
    "transmit_speed",
    "time",
)
SUMMARY_READS = (
    "cpu_usage",
    "used_memory",
    "total_memory",
    "total_space",
    "available_space",
    "receive_speed",
    "transmit_speed",
)
"""The summary figures a fleet row shows: a token needs read on each of them."""
FIGURES = 4
"""Where the figures start in a row (after uuid, online, name, os)."""

Row = tuple[Any, ...]
T = TypeVar("T")
NO_FACTS: tuple[str | None, str | None] = (None, None)


@dataclass(frozen=True)
class View:
    """What one token sees of the fleet: the agents it may list, those whose figures and
    those whose host facts it may read (None: every agent)."""

    listed: frozenset[str] | None
    readable: frozenset[str] | None
    described: frozenset[str] | None

    @classmethod
    def of(cls, principal: Principal, uuids: Iterable[str]) -> View:
        """The view of ``principal`` over the agents ``uuids``."""
        agents = list(uuids)

        def holding(needs: list[Need]) -> frozenset[str] | None:
            if all(allows(principal, need, None) for need in needs):
                return None
            return frozenset(u for u in agents if all(allows(principal, n, u) for n in needs))

        return cls(
            holding([Need("agent", "list")]),
            holding([Need("dynamic_monitoring_summary", "read", n) for n in SUMMARY_READS]),
            holding([Need("static_monitoring", "read", "system")]),
        )

    @property
    def everything(self) -> bool:
        """Whether this view is the whole fleet with every figure and fact."""
        return self.listed is None and self.readable is None and self.described is None

    def shows(self, uuid: str) -> bool:
        """Whether the agent is listed."""
        return self.listed is None or uuid in self.listed

    def row(self, row: Row) -> Row:
        """``row`` with what may not be read blanked."""
        uuid = row[0]
        facts = row[2:FIGURES] if self.described is None or uuid in self.described else (None,) * 2
        figures = (
            row[FIGURES:]
            if self.readable is None or uuid in self.readable
            else (None,) * (len(row) - FIGURES)
        )
        return (uuid, row[1], *facts, *figures)


@dataclass(eq=False)
class Subscriber:
    """One ``/ui/live`` connection: its view, and frames not yet sent (the newest wins)."""

    principal: Principal
    view: View | None = None
    view_version: int = -1
    fresh: bool = True
    frames: asyncio.Queue[bytes] = field(default_factory=lambda: asyncio.Queue(maxsize=4))

    def offer(self, frame: bytes) -> None:
        """Queue a frame; a subscriber that fell behind starts over with a full frame."""
        try:
            self.frames.put_nowait(frame)
        except asyncio.QueueFull:
            while not self.frames.empty():
                self.frames.get_nowait()
            self.fresh = True


class Fleet:
    """The feed: one loop while anyone listens, the rows of the last second, the subscribers."""

    def __init__(self, store: Store, hub: Hub, cluster: Cluster, clock: Callable[[], int]) -> None:
        self.store = store
        self.hub = hub
        self.cluster = cluster
        self.now_ms = clock
        self.subscribers: set[Subscriber] = set()
        self.rows: dict[str, Row] = {}
        self.facts: dict[str, tuple[str | None, str | None]] = {}
        self._facts_version = -1
        self._figures: dict[str, tuple[Any, ...]] = {}
        self._agents: list[tuple[str, str | None, int | None]] = []
        """(uuid, node_id, connected_since) of every listed agent."""
        self._uuids: list[str] = []
        self._agents_version = 0
        self._ticks = 0
        self._loop: asyncio.Task[None] | None = None
        self.busy_seconds = 0.0
        """Time the feed has worked: its CPU on the event loop and its every-second read's
        CPU, plus the wall time of its rarer reads (agents, host facts); ``/metrics``
        shows it."""
        self._mark = 0.0

    @contextlib.asynccontextmanager
    async def subscribe(self, principal: Principal) -> AsyncIterator[Subscriber]:
        """A subscriber for the block's duration; the loop runs while there is one."""
        subscriber = Subscriber(principal)
        self.subscribers.add(subscriber)
        if self._loop is None or self._loop.done():
            self._loop = asyncio.create_task(self._run(), name="taskd-ui-live")
        else:
            self._serve(subscriber, [], [])
        try:
            yield subscriber
        finally:
            self.subscribers.discard(subscriber)

    async def __aenter__(self) -> Fleet:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """Stop the loop (at shutdown)."""
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop

    async def _run(self) -> None:
        left = time.monotonic()
        while self.subscribers or time.monotonic() - left < LINGER_S:
            if self.subscribers:
                left = time.monotonic()
            started = time.monotonic()
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("the live fleet feed failed a tick: %s", exc)
            await asyncio.sleep(max(0.0, TICK_S - (time.monotonic() - started)))
        self._ticks = 0

    async def tick(self) -> None:
        """Read the fleet once and send each subscriber what changed that it may see."""
        self._mark = time.thread_time()
        if self._ticks % AGENTS_EVERY == 0:
            rows = await self._timed(self.store.list_agents())
            listed = [
                (row.uuid, row.node_id, row.connected_since)
                for row in rows
                if row.deleted_at is None
            ]
            uuids = [agent[0] for agent in listed]
            if uuids != self._uuids:
                self._agents_version += 1
            self._agents, self._uuids = listed, uuids
        uuids = self._uuids
        if self._ticks % FACTS_EVERY == 0:
            await self._read_facts(uuids)
        elif len(self.facts) < len(uuids) or self._facts_version != self._agents_version:
            await self._read_facts([u for u in uuids if u not in self.facts])
        self._facts_version = self._agents_version
        self._ticks += 1
        self.busy_seconds += time.thread_time() - self._mark
        newest, read_cpu = await self.store.newest_figures(uuids, SUMMARY_READS)
        self._mark = time.thread_time()
        self.busy_seconds += read_cpu
        figures = {row[0]: row for row in newest}
        now = self.now_ms()
        local = self.hub.connected_agents()
        here = self.cluster.node_id
        previous = self.rows
        before = self._figures
        facts = self.facts
        current: dict[str, Row] = {}
        for uuid, node_id, connected_since in self._agents:
            if uuid in local:
                online = True
            elif node_id == here:
                online = False
            else:
                online = connected_since is not None and self.cluster.node_alive(node_id)
            found = figures.get(uuid)
            if (
                not online
                and found is not None
                and now - (found[2] or 0) <= REPORTING_MS
                and abs(now - found[1]) <= SKEW_MS
            ):
                online = True
            old = previous.get(uuid)
            fact = facts.get(uuid, NO_FACTS)
            if (
                old is not None
                and old[1] == online
                and before.get(uuid) == found
                and old[2] == fact[0]
                and old[3] == fact[1]
            ):
                current[uuid] = old  # nothing new: the same row (and no delta)
            else:
                current[uuid] = _row(uuid, online, fact, found)
        self._figures = figures
        changed = [row for uuid, row in current.items() if previous.get(uuid) is not row]
        gone = [uuid for uuid in previous if uuid not in current]
        self.rows = current
        if changed or gone or any(s.fresh for s in self.subscribers):
            self._send(changed, gone)
        self.busy_seconds += time.thread_time() - self._mark

    async def _timed(self, read: Awaitable[T]) -> T:
        """Await a database read, counting its wall time as the feed's work (and not the
        event loop's other work meanwhile)."""
        self.busy_seconds += time.thread_time() - self._mark
        started = time.perf_counter()
        try:
            return await read
        finally:
            self.busy_seconds += time.perf_counter() - started
            self._mark = time.thread_time()

    async def _read_facts(self, uuids: list[str]) -> None:
        """Each agent's host name and OS from its newest static report."""
        if not uuids:
            return
        for row in await self._timed(self.store.monitoring_last("static", uuids)):
            found = row.get("system")
            system: dict[str, Any] = found if isinstance(found, dict) else {}
            self.facts[row["uuid"]] = (_text(system.get("system_host_name")), _os(system))
        for uuid in uuids:
            self.facts.setdefault(uuid, NO_FACTS)

    def _send(self, changed: list[Row], gone: list[str]) -> None:
        shared: dict[bool, bytes] = {}
        for subscriber in list(self.subscribers):
            if subscriber.view is None or subscriber.view_version != self._agents_version:
                subscriber.view = View.of(subscriber.principal, self.rows)
                subscriber.view_version = self._agents_version
            if subscriber.view.everything:
                fresh = subscriber.fresh
                if fresh not in shared:
                    rows = list(self.rows.values()) if fresh else changed
                    shared[fresh] = self._frame(fresh, rows, [] if fresh else gone)
                if fresh or changed or gone:
                    subscriber.offer(shared[fresh])
                subscriber.fresh = False
            else:
                self._serve(subscriber, changed, gone)

    def _serve(self, subscriber: Subscriber, changed: list[Row], gone: list[str]) -> None:
        """Send one subscriber its own frame (a narrower view, or a full one to start)."""
        if subscriber.view is None:
            subscriber.view = View.of(subscriber.principal, self.rows)
            subscriber.view_version = self._agents_version
        view = subscriber.view
        if subscriber.fresh:
            rows = [view.row(row) for row in self.rows.values() if view.shows(row[0])]
            subscriber.offer(self._frame(True, rows, []))
            subscriber.fresh = False
            return
        rows = [view.row(row) for row in changed if view.shows(row[0])]
        hidden = [uuid for uuid in gone if view.shows(uuid)]
        if rows or hidden:
            subscriber.offer(self._frame(False, rows, hidden))

    def _frame(self, full: bool, rows: list[Row], gone: list[str]) -> bytes:
        return orjson.dumps(
            {
                "type": "full" if full else "delta",
                "now": self.now_ms(),
                "fields": FIELDS,
                "rows": rows,
                "gone": gone,
            }
        )


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _os(system: dict[str, Any]) -> str | None:
    """The OS as people name it: the long version, else name and version."""
    long = _text(system.get("system_os_long_version"))
    if long:
        return long
    parts = [_text(system.get("system_name")), _text(system.get("system_os_version"))]
    return " ".join(p for p in parts if p) or None


def _row(
    uuid: str,
    online: bool,
    facts: tuple[str | None, str | None],
    figures: tuple[Any, ...] | None,
) -> Row:
    """One agent's fleet row: its facts and its newest figures (``(uuid, time,
    storage_time, *SUMMARY_READS)``), cpu as a percentage."""
    if figures is None:
        return (uuid, online, *facts, None, None, None, None, None, None, None, None)
    _, time_ms, _, cpu, used_memory, total_memory, total_space, available, rx, tx = figures
    used_space = (
        total_space - available if total_space is not None and available is not None else None
    )
    return (
        uuid,
        online,
        *facts,
        None if cpu is None else cpu / 10,
        used_memory,
        total_memory,
        used_space,
        total_space,
        rx,
        tx,
        time_ms,
    )
