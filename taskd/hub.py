"""Live agent subscriptions, task creation and pushes, blocking waiters, the offline queue.

The hub owns the one code path that creates tasks (``task_create_task``,
blocking calls and cron fires all use ``create``): validate the target, insert
the row (committed), then push it. A task is pushed only after its row is
committed, so an agent can never answer a task the store does not know.

It is an async context manager entered once: entering forgets the agents an
earlier run of this node held; leaving waits for its background writes and
records its agents' last calls and disconnection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from taskd.auth import random_string
from taskd.clock import now_ms
from taskd.errors import AgentNotConnected, NotFound
from taskd.models import TaskState
from taskd.protocol import TaskEventResponse, TaskPush, TaskVariant, variant_tag
from taskd.store import NewTask, Store

if TYPE_CHECKING:
    from taskd.cluster import Cluster
    from taskd.metrics import Metrics

logger = logging.getLogger(__name__)

TASK_TOKEN_LENGTH = 10
SESSION_DEADLINE_MS = 24 * 3600 * 1000
"""A web_shell task lasts as long as its terminal session, up to a day."""


class Peer(Protocol):
    """A live WebSocket connection as the hub sees it."""

    remote: str | None

    @property
    def closed(self) -> bool:
        """Whether the connection has ended."""

    def send(self, frame: bytes) -> bool:
        """Queue a text frame; False if the connection is closed."""

    def close_soon(self, code: int) -> None:
        """Send what is queued, then close with ``code``."""


@dataclass(eq=False)
class Subscription:
    """One agent's task subscription on one connection."""

    id: int
    agent_uuid: str
    peer: Peer
    token_key: str | None
    since: int = field(default_factory=now_ms)
    expires_at: int | None = None
    """When the token it was made with stops being valid (ms); None if never."""
    timer: asyncio.TimerHandle | None = field(default=None, repr=False)
    renewed: bool = False
    """Made on the connection that already held the agent's subscription (a refresh)."""

    def expired(self) -> bool:
        """Whether the token it was made with is past its validity window."""
        return self.expires_at is not None and now_ms() > self.expires_at


@dataclass(frozen=True)
class Created:
    """Outcome of creating a task for one target agent."""

    agent_uuid: str
    task_id: int | None
    queued: bool = False
    error: AgentNotConnected | None = None


def _not_connected(agent_uuid: str) -> Created:
    return Created(
        agent_uuid, None, error=AgentNotConnected(f"Agent {agent_uuid} is not connected")
    )


class Hub:
    """Maps agent UUIDs to live subscriptions and moves tasks and results between them."""

    def __init__(
        self,
        store: Store,
        *,
        node_id: str,
        task_deadline_ms: int,
        cluster: Cluster | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.node_id = node_id
        self.cluster = cluster
        self.metrics = metrics
        self.task_deadline_ms = task_deadline_ms
        self._by_agent: dict[str, Subscription] = {}
        self._by_id: dict[int, Subscription] = {}
        self._by_peer: dict[int, set[int]] = {}
        self._waiters: dict[int, list[asyncio.Future[TaskEventResponse]]] = {}
        self._seen: dict[str, int] = {}
        self._known: set[str] = set()
        """Agents whose row this node has written since it started (or their soft delete)."""
        self._active: dict[str, int] = {}
        """Agents that called since the last flush, and when (see agent_called)."""
        # tasks pushed from here and not answered yet: id -> (agent, task_token, type)
        self.in_flight: dict[int, tuple[str, str, str]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self.presence_hook: Callable[[str, bool], None] | None = None
        """Told ``(agent_uuid, connected)`` when an agent subscribes here or its subscription
        here ends (alerts watch it)."""

    async def __aenter__(self) -> Hub:
        # none of the agents an earlier run of this node held is subscribed now
        await self.store.reset_node_agents(self.node_id)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.drain()
        with contextlib.suppress(Exception):
            await self.flush_seen()  # the calls of the last seconds
        seen = dict.fromkeys(self._by_agent, now_ms())
        with contextlib.suppress(Exception):
            await self.store.agents_disconnected(seen, self.node_id)

    # ------------------------------------------------------------------ subscriptions

    @property
    def _clustered(self) -> bool:
        return self.cluster is not None and self.cluster.enabled

    def is_connected(self, agent_uuid: str) -> bool:
        """Whether the agent holds a live subscription here."""
        sub = self._by_agent.get(agent_uuid)
        if sub is not None and sub.expired():  # the timer that ends it has not run yet
            self._expire(sub)
            return False
        return sub is not None and not sub.peer.closed

    def subscribed_on(self, peer: Peer) -> bool:
        """Whether the connection holds a subscription."""
        return bool(self._by_peer.get(id(peer)))

    def connected_agents(self) -> dict[str, Subscription]:
        """Live subscriptions by agent UUID."""
        return dict(self._by_agent)

    async def subscribe(
        self, agent_uuid: str, peer: Peer, token_key: str | None, expires_at: int | None = None
    ) -> Subscription:
        """Register ``peer`` as the agent's subscription; the newest subscription wins.

        A subscription is authorised once, when it is made: it ends at ``expires_at``
        (ms), when the token it was made with stops being valid.

        NodeGet agents subscribe again every minute on the same connection. That is
        a renewal, not a new connection: the new id replaces the old one (pushes carry
        the new id; the old one stops receiving), but the agent stays connected since
        its first subscription, nothing is logged at INFO, and nothing is written
        unless the token changed.
        """
        sub_id = secrets.randbits(52) or 1
        while sub_id in self._by_id:
            sub_id = secrets.randbits(52) or 1
        old = self._by_agent.get(agent_uuid)
        renewed = old is not None and old.peer is peer and not peer.closed
        sub = Subscription(
            sub_id,
            agent_uuid,
            peer,
            token_key,
            since=old.since if old is not None and renewed else now_ms(),
            expires_at=expires_at,
            renewed=renewed,
        )
        if expires_at is not None:
            delay = max(0.0, (expires_at + 1 - now_ms()) / 1000)
            sub.timer = asyncio.get_running_loop().call_later(delay, self._expire, sub)
        if old is not None:
            self._drop(old)
            if not renewed:
                logger.info(
                    "agent %s subscribed again; older subscription %d replaced", agent_uuid, old.id
                )
        self._by_agent[agent_uuid] = sub
        self._by_id[sub_id] = sub
        self._by_peer.setdefault(id(peer), set()).add(sub_id)
        self._seen[agent_uuid] = now_ms()
        if old is not None and renewed:
            logger.debug("agent %s renewed its subscription (%d -> %d)", agent_uuid, old.id, sub_id)
            if old.token_key == token_key:
                return sub
        await self.store.agent_connected(
            agent_uuid, peer.remote, self.node_id, token_key, since=sub.since
        )
        self._known.add(agent_uuid)
        if not renewed:
            logger.info("agent %s subscribed from %s", agent_uuid, peer.remote or "?")
            if self.presence_hook is not None:
                self.presence_hook(agent_uuid, True)
        return sub

    def unsubscribe(self, subscription_id: int, peer: Peer) -> bool:
        """Drop a subscription held by ``peer``; False if it has no such subscription."""
        sub = self._by_id.get(subscription_id)
        if sub is None or sub.peer is not peer:
            return False
        self._drop(sub)
        self._record_gone([sub])
        return True

    def peer_closed(self, peer: Peer) -> None:
        """A connection ended: drop its subscriptions at once."""
        gone = [self._by_id[i] for i in self._by_peer.pop(id(peer), set()) if i in self._by_id]
        for sub in gone:
            self._drop(sub)
            logger.info("agent %s disconnected", sub.agent_uuid)
        self._record_gone(gone)

    def _expire(self, sub: Subscription) -> None:
        if self._by_id.get(sub.id) is not sub:
            return
        self._drop(sub)
        self._record_gone([sub])
        logger.info("agent %s unsubscribed: its token %s expired", sub.agent_uuid, sub.token_key)
        sub.peer.close_soon(1008)

    def end_subscriptions_of(self, token_key: str) -> list[Subscription]:
        """Drop the subscriptions made with a token that was revoked; their peers stay open."""
        ended = [s for s in self._by_agent.values() if s.token_key == token_key]
        for sub in ended:
            self.unsubscribe(sub.id, sub.peer)
            logger.info("agent %s unsubscribed: its token %s changed", sub.agent_uuid, token_key)
        return ended

    def _drop(self, sub: Subscription) -> None:
        if sub.timer is not None:
            sub.timer.cancel()
        self._by_id.pop(sub.id, None)
        if self._by_agent.get(sub.agent_uuid) is sub:
            del self._by_agent[sub.agent_uuid]
        ids = self._by_peer.get(id(sub.peer))
        if ids is not None:
            ids.discard(sub.id)

    def _record_gone(self, gone: Sequence[Subscription]) -> None:
        seen = {
            s.agent_uuid: self._seen.pop(s.agent_uuid, now_ms())
            for s in gone
            if s.agent_uuid not in self._by_agent
        }
        if seen:
            self.spawn(self.store.agents_disconnected(seen, self.node_id))
            if self.presence_hook is not None:
                for agent_uuid in seen:
                    self.presence_hook(agent_uuid, False)

    def tasks_queued(self, agent_uuids: list[str]) -> None:
        """Tasks were queued for these agents (by another node): push those connected here."""
        for agent_uuid in agent_uuids:
            if self.is_connected(agent_uuid):
                self.spawn(self.deliver_queued(agent_uuid))

    def results_stored(self, task_ids: list[int]) -> None:
        """Results were committed on another node: wake their waiters here."""

        async def fetch(task_id: int) -> None:
            result = await self.store.get_result(task_id)
            if result is not None:
                self.resolve([result])
            elif await self.store.task_identity(task_id) is None:
                self.forget([task_id])  # deleted through another node

        for task_id in task_ids:
            if task_id in self._waiters:
                self.spawn(fetch(task_id))

    def agent_moved(self, agent_uuid: str) -> None:
        """The agent subscribed on another node: drop its subscription here."""
        sub = self._by_agent.get(agent_uuid)
        if sub is not None:
            self._drop(sub)
            logger.info("agent %s subscribed on another node; dropped here", agent_uuid)

    async def agent_called(self, agent_uuid: str) -> None:
        """Record an authenticated call made as the agent (a result upload, a metrics report).

        The agent is known (listed) from its first call on, even if it never subscribes,
        and one soft-deleted before the call is listed again. Only its first call to this
        node waits for a write; later ones are written together by ``flush_seen``.
        """
        now = now_ms()
        self._seen[agent_uuid] = now
        self._active[agent_uuid] = now
        if agent_uuid not in self._known:
            await self.store.agents_seen({agent_uuid: now})
            self._known.add(agent_uuid)

    def agent_deleted(self, agent_uuid: str) -> None:
        """The agent was soft-deleted: its next call here records it again at once."""
        self._known.discard(agent_uuid)

    def last_seen(self, agent_uuid: str) -> int | None:
        """When this node last heard from the agent, if it did."""
        return self._seen.get(agent_uuid)

    async def flush_seen(self) -> None:
        """Write agents' last-seen times, and record the calls made since the last flush."""
        seen = {u: t for u, t in self._seen.items() if u in self._by_agent}
        await self.store.touch_agents(seen)
        active, self._active = self._active, {}
        try:
            await self.store.agents_seen(active)
        except BaseException:
            for agent_uuid, at in active.items():  # tried again at the next flush
                self._active.setdefault(agent_uuid, at)
            raise

    def spawn(self, coro: Any) -> None:
        """Run a coroutine in the background, logging its failure."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("hub background write failed: %s", task.exception())

    async def drain(self) -> None:
        """Wait for background writes (shutdown)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    # ------------------------------------------------------------------ tasks

    def _push(self, agent_uuid: str, task_id: int, task_token: str, wire: Any) -> bool:
        sub = self._by_agent.get(agent_uuid)
        if sub is None or sub.peer.closed:
            return False
        if sub.expired():
            self._expire(sub)
            return False
        if not sub.peer.send(TaskPush(task_id, task_token, wire).serialize(sub.id)):
            return False
        self.in_flight[task_id] = (agent_uuid, task_token, str(variant_tag(wire)))
        return True

    async def create(
        self,
        targets: Sequence[str],
        task: TaskVariant,
        *,
        queue_ttl_ms: int | None = None,
        deadline_ms: int | None = None,
        cron_source: str | None = None,
        created_by: str | None = None,
        wait: bool = False,
    ) -> tuple[list[Created], dict[int, asyncio.Future[TaskEventResponse]]]:
        """Create ``task`` for each target: insert, then push (or queue when offline with a TTL).

        Targets that are offline without a TTL get ``AgentNotConnected`` and no row.
        With ``wait``, a future per pushed task is registered before the push.
        """
        wire = task.to_wire()
        if task.kind == "web_shell" and deadline_ms is None:
            deadline_ms = SESSION_DEADLINE_MS
        outcomes: dict[str, Created] = {}
        rows = self._new_rows(
            targets,
            task.kind,
            wire,
            outcomes,
            queue_ttl_ms=queue_ttl_ms,
            deadline_ms=deadline_ms or self.task_deadline_ms,
            cron_source=cron_source,
            created_by=created_by,
            wait=wait,
        )
        waiters: dict[int, asyncio.Future[TaskEventResponse]] = {}
        if rows:
            await self.store.insert_tasks(rows)
            undelivered, requeue, late = self._hand_over(
                rows, wire, outcomes, waiters if wait else None, queue=queue_ttl_ms is not None
            )
            for row in undelivered:
                self.remove_waiter(row.id, waiters.pop(row.id, None))
            if undelivered:
                await self.store.delete_task_ids([r.id for r in undelivered])
            if requeue:
                await self.store.requeue([r.id for r in requeue])
                late.update(r.uuid for r in requeue if self.is_connected(r.uuid))
            for agent_uuid in late:
                self.spawn(self.deliver_queued(agent_uuid))
        if self.metrics is not None:
            metrics = self.metrics
            for created in outcomes.values():
                if created.task_id is not None:
                    (metrics.tasks_queued if created.queued else metrics.tasks_pushed).inc()
        return [outcomes[u] for u in targets if u in outcomes], waiters

    def _new_rows(
        self,
        targets: Sequence[str],
        kind: str,
        wire: Any,
        outcomes: dict[str, Created],
        *,
        queue_ttl_ms: int | None,
        deadline_ms: int,
        cron_source: str | None,
        created_by: str | None,
        wait: bool,
    ) -> list[NewTask]:
        """The rows to insert: a running task per online target, a queued one per target held
        by another node or offline with a TTL; the others get their outcome now, and no row."""
        now = now_ms()
        rows: list[NewTask] = []
        for agent_uuid in targets:
            online = self.is_connected(agent_uuid)
            # held by another live node: queued here, pushed there (see cluster.py)
            elsewhere = None if online or self.cluster is None else self.cluster.locate(agent_uuid)
            if not online and elsewhere is None and queue_ttl_ms is None:
                outcomes[agent_uuid] = _not_connected(agent_uuid)
                continue
            queued = not online
            offline = queued and elsewhere is None
            rows.append(
                NewTask(
                    uuid=agent_uuid,
                    task_token=random_string(TASK_TOKEN_LENGTH),
                    type=kind,
                    task_event_type=wire,
                    created_at=now,
                    deadline=now
                    + (queue_ttl_ms if offline and queue_ttl_ms is not None else deadline_ms),
                    state=TaskState.QUEUED if queued else TaskState.RUNNING,
                    queue_ttl_ms=queue_ttl_ms,
                    cron_source=cron_source,
                    created_by=created_by,
                    route_to=elsewhere,
                    # the agent may move to another node before it answers: that node
                    # must then tell this one that the result is in
                    waiter_node=self.node_id if wait and self._clustered else None,
                )
            )
        return rows

    def _hand_over(
        self,
        rows: list[NewTask],
        wire: Any,
        outcomes: dict[str, Created],
        waiters: dict[int, asyncio.Future[TaskEventResponse]] | None,
        *,
        queue: bool,
    ) -> tuple[list[NewTask], list[NewTask], set[str]]:
        """Push the committed rows; record each outcome and (with ``waiters``) each waiter.

        Returns the rows no agent took (to delete), those to queue again (the agent left
        meanwhile, with a TTL) and the agents to deliver queued rows to (they subscribed
        while the rows were being written).
        """
        undelivered: list[NewTask] = []
        requeue: list[NewTask] = []
        late: set[str] = set()
        for row in rows:
            if row.route_to is not None:
                outcomes[row.uuid] = Created(row.uuid, row.id)
                if waiters is not None:
                    waiters[row.id] = self.add_waiter(row.id)
                    # the result may have been committed before the waiter existed
                    self.results_stored([row.id])
                continue
            if row.state == TaskState.QUEUED:
                outcomes[row.uuid] = Created(row.uuid, row.id, queued=True)
                if self.is_connected(row.uuid):
                    late.add(row.uuid)
                continue
            if waiters is not None:
                waiters[row.id] = self.add_waiter(row.id)
            if self._push(row.uuid, row.id, row.task_token, wire):
                outcomes[row.uuid] = Created(row.uuid, row.id)
            elif queue:
                requeue.append(row)
                outcomes[row.uuid] = Created(row.uuid, row.id, queued=True)
            else:
                undelivered.append(row)
                outcomes[row.uuid] = _not_connected(row.uuid)
        return undelivered, requeue, late

    async def deliver_queued(self, agent_uuid: str) -> int:
        """Push every queued task of an agent that is connected here; return how many."""
        if not self.is_connected(agent_uuid):
            return 0
        rows = await self.store.take_queued(agent_uuid, self.task_deadline_ms)
        failed = [
            r.id for r in rows if not self._push(agent_uuid, r.id, r.task_token, r.task_event_type)
        ]
        if failed:
            await self.store.requeue(failed)
        if rows:
            logger.info(
                "delivered %d queued task(s) to agent %s", len(rows) - len(failed), agent_uuid
            )
        return len(rows) - len(failed)

    async def reap(self) -> None:
        """Fail the tasks that passed their deadline without a result."""
        reaped = await self.store.reap(now_ms())
        for result in reaped:
            self.in_flight.pop(result.task_id, None)
        if self.metrics is not None:
            self.metrics.tasks_reaped.inc(len(reaped))
        if reaped:
            logger.info("reaped %d task(s) without a result", len(reaped))

    # ------------------------------------------------------------------ results

    async def task_type_of(self, task_id: int, agent_uuid: str, task_token: str) -> str:
        """The type of the task an upload answers; 105 unless id, agent and token match."""
        known = self.in_flight.get(task_id)
        if known is None:
            row = await self.store.task_identity(task_id)
            known = (row.uuid, row.task_token, row.type) if row is not None else None
        if known is None or known[0] != agent_uuid or known[1] != task_token:
            raise NotFound(f"No task {task_id} for agent {agent_uuid} with that task_token")
        return known[2]

    def add_waiter(self, task_id: int) -> asyncio.Future[TaskEventResponse]:
        """A future resolved when the task's result is committed."""
        future: asyncio.Future[TaskEventResponse] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(task_id, []).append(future)
        return future

    def remove_waiter(self, task_id: int, future: asyncio.Future[TaskEventResponse] | None) -> None:
        """Forget a waiter (its caller gave up)."""
        futures = self._waiters.get(task_id)
        if futures is None or future is None:
            return
        if future in futures:
            futures.remove(future)
        if not futures:
            del self._waiters[task_id]

    def forget(self, task_ids: Iterable[int]) -> None:
        """Tasks were deleted: their blocking callers get 105 now instead of a timeout."""
        for task_id in task_ids:
            self.in_flight.pop(task_id, None)
            for future in self._waiters.pop(task_id, ()):
                if not future.done():
                    future.set_exception(
                        NotFound(f"Task {task_id} was deleted before its result arrived")
                    )

    def resolve(self, results: Iterable[TaskEventResponse]) -> None:
        """Wake the waiters of committed results."""
        for result in results:
            self.in_flight.pop(result.task_id, None)
            for future in self._waiters.pop(result.task_id, ()):
                if not future.done():
                    future.set_result(result)
