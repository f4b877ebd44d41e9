"""Admission of agents: an overloaded server tells agents to come back later, and lets
their traffic take turns.

After a restart every agent of a fleet reconnects within a few seconds. Each
connection costs a handshake, a subscription and its writes, then a static report
and the summaries buffered while the server was away, all on the one event loop
that also answers callers. ``Admission`` keeps that work bounded:

- an agent's handshake is admitted while fewer than ``max_in_progress`` agent
  connections are between their handshake and their subscription; otherwise it is
  refused with HTTP 503 and a ``Retry-After`` hint that gives each refused agent a
  turn of its own, so the crowd comes back spread over the time the server needs.
  Agents honour the hint instead of their own backoff;
- the turn is also a ticket (the ``Taskd-Turn`` header) that the agent brings back
  with its next handshake: an agent whose turn has come is admitted ahead of those
  without one (only ``max_in_progress`` still holds it back, and then it keeps its
  place). A crowd is taken in at the pace its turns were given, and an agent refused
  again is never sent to the back of a line that grows with every refusal;
- handshakes wait in the kernel's accept queue before the server sees them, and
  beyond it the kernel drops them unseen, leaving their agents to time out. While
  the queue is over ``QUEUE_FRACTION`` full, agents without a turn that has come are
  refused ("queue"): a refusal is cheap, so the server drains the queue faster than
  it could by taking them in, and every agent it reaches gets a turn;
- a subscribed agent's calls (reports, results) take turns in a ``Lane`` of
  ``lane_size`` while agents are being refused, or while the event loop lags
  (``LagMonitor``: how late a timer fires) by more than ``max_lag_ms``; a connection
  whose call waits for its turn is not read further, so an overloaded server reads
  only as much as it handles and the rest waits in the kernel's buffers (reading
  every connection on every turn of the loop made each turn seconds long, with
  almost nothing stored).

- while a fleet is coming in (refused agents still to come in, or agents admitted
  lately while the loop lags), a summary from an agent's buffer
  (older than ``BUFFERED_AGE_MS``) is not stored but answered "server busy" (-32000)
  with a ``retry_after_ms`` past the last turn given to a refused agent (at least
  ``retry_after_min_s``), spread over ``BACKLOG_SPREAD_S``:
  the agent keeps it and sends it again then. Handshakes and live reports come
  first; backlogs flow when the server has room.
- an agent's connection has at most ``REPORT_WINDOW`` calls in progress before its
  reports are answered "server busy" (-32000, ``retry_after_ms``) as they are read,
  stored nothing (``shed``): a fleet sending more than the server stores (NodeGet's
  agent sends every second, whatever the answers) never queues without bound, and
  the connections are still read, so their keepalive pongs arrive and they are not
  dropped for silence. The real agent has one live call in progress and keeps what
  is refused for later;
- a WebSocket handshake whose client closed while it waited in the accept queue
  (its agent gave up) is dropped unanswered (``peer_closed``): a slow spell must not
  make the server spend its time on handshakes nobody waits for, and so fall further
  behind.
Only connections that say they are agents (``User-Agent: taskd-agent...``) are
subject to admission and the lane; callers are always admitted and never wait in the
lane (and send no reports).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import socket
import struct
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from prometheus_client import Counter

    from taskd.metrics import Metrics

AGENT_USER_AGENT = "taskd-agent"
"""The User-Agent prefix of connections subject to admission."""
LAG_INTERVAL_S = 0.02
LAG_DECAY_S = 0.5
"""How long a late timer keeps counting as the loop's lag (the lag is a recent maximum)."""
REASONS = ("busy", "rate", "queue")
"""Why a handshake is refused: too many agent connections in progress, more handshakes
than ``rate_per_s`` a second, or the kernel's accept queue filling up."""
TURN_HEADER = "taskd-turn"
"""The header of a refusal that gives the agent its turn, brought back by its next handshake."""
TURN_EARLY_S = 0.5
"""How early an agent may come for its turn and still have it."""
TURN_KEPT_S = 60.0
"""How long after its time an unused turn is forgotten."""
QUEUE_FRACTION = 0.125
"""Agents without a turn are refused while the accept queue is fuller than this."""
BUFFERED_AGE_MS = 10_000
"""A summary older than this (by its own time) is from an agent's buffer, and can wait."""
MIN_TURN_RATE = 100.0
"""The slowest pace turns are given at without a rate bound (agents a second)."""
BACKLOG_SPREAD_S = 10
"""Deferred backlogs are asked to come back spread over this many seconds."""
BACKLOG_WAIT_MAX_S = 60
"""The longest a deferred backlog is asked to wait."""
REPORT_WINDOW = 64
"""Calls in progress on one connection beyond which its reports are answered "busy"
(rather than left unread: a connection that is not read misses its keepalive pongs)."""
SHED_SPREAD_S = 5
"""Reports answered "busy" as they are read are asked to come back spread over this long."""
WINDOW_S = 2.0
"""The span over which admissions and refusals are counted to size the retry window."""


def is_agent(user_agent: str | None) -> bool:
    """Whether a handshake's User-Agent header says it comes from an agent."""
    return user_agent is not None and user_agent.startswith(AGENT_USER_AGENT)


def parse_retry_after(value: str | None) -> float | None:
    """The seconds of a ``Retry-After`` header (delay-seconds form); None if absent or bad."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def parse_turn(value: str | bytes | None) -> int | None:
    """The ticket of a ``Taskd-Turn`` header; None if absent or not a ticket."""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if value is None or not value.isdigit() or len(value) > 20:
        return None
    return int(value)


class Refusal(NamedTuple):
    """What a refused handshake is told: the seconds to wait, and its turn's ticket."""

    retry_after: int
    turn: int


class AcceptQueue:
    """How full the accept queues of listening sockets are, as the kernel tells (Linux:
    TCP_INFO of a listening socket gives the queue's length as ``tcpi_unacked`` and its
    bound as ``tcpi_sacked``). Elsewhere it reads 0 (nothing is refused for it)."""

    def __init__(self, listeners: Iterable[Any]) -> None:
        self._sockets: list[socket.socket] = []
        if not hasattr(socket, "TCP_INFO"):
            return
        for listener in listeners:
            if listener.family in (socket.AF_INET, socket.AF_INET6):
                # a socket object of our own on the same socket (event loops hand out proxies)
                self._sockets.append(socket.socket(fileno=os.dup(listener.fileno())))

    def __call__(self) -> float:
        """The fullest queue's length over its bound (0..1)."""
        fill = 0.0
        for sock in self._sockets:
            try:
                info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_BYTES)
            except OSError:
                continue
            length, bound = struct.unpack_from("=II", info, _TCP_INFO_UNACKED)
            if bound:
                fill = max(fill, length / bound)
        return fill

    def close(self) -> None:
        """Let go of the sockets (the listeners themselves stay open)."""
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()


def peer_closed(sock: Any) -> bool:
    """Whether the peer of the connected socket ``sock`` has closed its side (TCP_INFO's
    ``tcpi_state`` is CLOSE_WAIT or CLOSE, on Linux; elsewhere False). A WebSocket client
    that closed before its handshake was answered has given up on it."""
    if sock is None or not hasattr(socket, "TCP_INFO"):
        return False
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)
    except (OSError, AttributeError):
        return False
    return bool(info) and info[0] in _PEER_CLOSED_STATES


_PEER_CLOSED_STATES = (7, 8)
"""Linux's TCP_CLOSE and TCP_CLOSE_WAIT (include/net/tcp_states.h)."""
_TCP_INFO_UNACKED = 24
"""Offset of ``tcpi_unacked`` in ``struct tcp_info`` (8 one-byte fields, then rto, ato,
snd_mss and rcv_mss), followed by ``tcpi_sacked``."""
_TCP_INFO_BYTES = 32


class LagMonitor:
    """How late the event loop runs a timer: a measure of the work queued in front of it."""

    def __init__(self, interval_s: float = LAG_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self._recent: deque[tuple[float, float]] = deque()
        """(when measured, lag) of the last ``LAG_DECAY_S``; decreasing lags only."""
        self.max_lag_s = 0.0
        """The largest lag measured since start."""

    @property
    def lag_s(self) -> float:
        """The largest lag of the last ``LAG_DECAY_S`` seconds."""
        now = time.monotonic()
        while self._recent and now - self._recent[0][0] > LAG_DECAY_S:
            self._recent.popleft()
        return self._recent[0][1] if self._recent else 0.0

    def note(self, lag: float) -> None:
        """Record one measurement (kept as a monotonic queue of recent maxima)."""
        now = time.monotonic()
        while self._recent and self._recent[-1][1] <= lag:
            self._recent.pop()
        self._recent.append((now, lag))
        self.max_lag_s = max(self.max_lag_s, lag)

    async def run(self) -> None:
        """Measure until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.interval_s
            await asyncio.sleep(self.interval_s)
            self.note(max(0.0, loop.time() - due))

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[LagMonitor]:
        """Measure while the block runs."""
        task = asyncio.create_task(self.run(), name="taskd-loop-lag")
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class Lane:
    """A first-come, first-served bound on calls in progress (subscribed agents' calls),
    enforced while the event loop lags.

    While ``engaged()`` (the loop runs timers late), agents' reports and results wait
    their turn here, so that however many agents send at once (a fleet flushing its
    buffered summaries after a restart), only ``size`` of their calls are handled at a
    time: the event loop's turns stay short for callers and subscriptions, and agents,
    which wait for each acknowledgement, slow down to what the server takes. A
    connection waits here before its call is handled and before it is read again, so
    at most one call per connection waits, and agents that do not wait (NodeGet's
    sends every second) are held back by TCP instead of piling up in memory. While the
    loop keeps up, calls go straight through (and still count), so a server that can
    take its fleet's steady traffic is never held back by the bound.
    """

    def __init__(self, size: int, engaged: Callable[[], bool] = lambda: True) -> None:
        self.size = size
        self.engaged = engaged
        self.used = 0
        self._waiting: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        """Calls waiting for their turn."""
        return len(self._waiting)

    async def acquire(self) -> None:
        """Wait for a turn (in arrival order)."""
        if not self._waiting and (self.used < self.size or not self.engaged()):
            self.used += 1
            return
        future = asyncio.get_running_loop().create_future()
        self._waiting.append(future)
        try:
            await future  # the turn is handed over by release()
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release()  # handed over just as it was cancelled: pass it on
            else:
                with contextlib.suppress(ValueError):
                    self._waiting.remove(future)
            raise

    def release(self) -> None:
        """End a turn: hand it to the longest waiting call, if there is room (turns taken
        while the lane was not engaged may have overfilled it). While the loop keeps up,
        one more waiting call gets a turn too, so a queue left from a busy spell drains
        at a growing pace."""
        if self.used > self.size and self.engaged():
            self.used -= 1
            return
        if not self._hand_over():
            self.used -= 1
            return
        if not self.engaged() and self._hand_over():
            self.used += 1

    def _hand_over(self) -> bool:
        while self._waiting:
            future = self._waiting.popleft()
            if not future.done():
                future.set_result(None)
                return True
        return False


@dataclass(frozen=True)
class Limits:
    """When the server refuses agent handshakes, and what it tells them."""

    max_in_progress: int = 128
    """Agent connections admitted but not subscribed yet; 0 turns admission control off."""
    rate_per_s: int = 800
    """Agent handshakes admitted a second (in bursts of a tenth of that); 0: no bound.

    Handshakes queue in the kernel before the server sees them; a server that takes
    more than it can handle lets them wait there until their agents give up, then
    spends its time on handshakes nobody waits for. A bound on the rate keeps that
    queue short: the rest are refused at the door, which is cheap."""
    max_lag_ms: int = 30
    """The agents' lane is enforced while the loop runs timers later than this (0: always)."""
    retry_after_min_s: int = 1
    retry_after_max_s: int = 30
    hold_s: float = 5.0
    """A connection that has not subscribed after this long stops counting as in progress."""
    lane_size: int = 2
    """Subscribed agents' calls handled at once (see ``Lane``)."""


class Admission:
    """Decides, per agent handshake, to admit it now or to refuse it with a retry hint."""

    def __init__(self, limits: Limits, metrics: Metrics | None = None) -> None:
        self.limits = limits
        self.lag = LagMonitor()
        self.lane = Lane(limits.lane_size, self.lagging)
        self.in_progress = 0
        self.rate = float(limits.rate_per_s)
        """Agent handshakes admitted a second at most (0: no bound)."""
        self._tokens = float(self._burst)
        self._next_turn = 0.0
        """When the next refused agent's turn comes (``_line_up``)."""
        self.turns: dict[int, float] = {}
        """When each ticket's turn comes (monotonic seconds)."""
        self._turns_pruned = time.monotonic()
        self.accept_queue: Callable[[], float] | None = None
        """How full the kernel's accept queue is (0..1), where the server can tell."""
        self._filled = time.monotonic()
        self._admitted: deque[float] = deque()
        self._refused: deque[float] = deque()
        self.admitted_total = 0
        self.refused_total = dict.fromkeys(REASONS, 0)
        self.gone_total = 0
        self._admitted_counter: Counter | None = None
        self._deferred_counter: Counter | None = None
        self._abandoned_counter: Counter | None = None
        self._gone_counter: Counter | None = None
        self._shed_counter: Counter | None = None
        self._refused_counters: dict[str, Counter] = {}
        if metrics is not None:
            self._export(metrics)

    def _export(self, metrics: Metrics) -> None:
        self._admitted_counter = metrics.admission_admitted
        self._deferred_counter = metrics.admission_deferred
        self._abandoned_counter = metrics.admission_abandoned
        self._gone_counter = metrics.admission_gone
        self._shed_counter = metrics.reports_shed
        self._refused_counters = {r: metrics.admission_refused.labels(r) for r in REASONS}
        metrics.gauge(
            "taskd_admission_in_progress",
            "Agent connections admitted and not subscribed yet",
            lambda: self.in_progress,
        )
        metrics.gauge(
            "taskd_agent_calls_waiting",
            "Subscribed agents' calls waiting for their turn in the agents' lane",
            lambda: self.lane.waiting,
        )
        metrics.gauge(
            "taskd_event_loop_lag_seconds",
            "How late the event loop ran a timer (largest of the last half second)",
            lambda: self.lag.lag_s,
        )

    def lagging(self) -> bool:
        """Whether agents' calls should take turns: the event loop runs timers later than
        ``max_lag_ms``, or agents were refused lately (a fleet is trying to get in, and
        its handshakes come before the reports of those already in)."""
        return self.crowding() or self._late()

    def _late(self) -> bool:
        """Whether the event loop runs timers later than ``max_lag_ms``."""
        return self.lag.lag_s * 1000 > self.limits.max_lag_ms

    @property
    def enabled(self) -> bool:
        """Whether agent handshakes can be refused at all."""
        return self.limits.max_in_progress > 0

    def verdict(self, turn: int | None = None) -> str | None:
        """Why an agent handshake (bringing the ticket ``turn``, if any) would be refused
        now (see ``REASONS``); None to admit it."""
        if not self.enabled:
            return None
        if self.in_progress >= self.limits.max_in_progress:
            return "busy"
        now = time.monotonic()
        if self.limits.rate_per_s:
            self._tokens = min(self._burst, self._tokens + (now - self._filled) * self.rate)
            self._filled = now
        if self._due(turn, now):
            return None  # its turn has come: ahead of those without one
        if self.accept_queue is not None and self.accept_queue() > QUEUE_FRACTION:
            return "queue"
        if self.limits.rate_per_s and self._tokens < 1:
            return "rate"
        return None

    def _due(self, turn: int | None, now: float) -> bool:
        """Whether ``turn`` is a ticket whose time has come."""
        when = None if turn is None else self.turns.get(turn)
        return when is not None and now >= when - TURN_EARLY_S

    @property
    def _burst(self) -> float:
        return max(1.0, self.rate / 10)

    def crowding(self) -> bool:
        """Whether refused agents are still to come in: one was refused lately, or a turn
        given to one is still ahead."""
        now = time.monotonic()
        if self._refused and now - self._refused[-1] <= WINDOW_S:
            return True
        return self._next_turn > now

    def storming(self) -> bool:
        """Whether a fleet is coming in and the loop feels it: refused agents are still to
        come in, or agents were admitted lately while the loop lags."""
        if self.crowding():
            return True
        recent = self._admitted and time.monotonic() - self._admitted[-1] <= WINDOW_S
        return bool(recent) and self._late()

    def defer_backlog(self) -> int | None:
        """While a fleet is coming in (see ``storming``): how long, in ms, an agent's
        buffered reports should wait before they are sent again (until the crowd had its
        turns, spread over ``BACKLOG_SPREAD_S``); None to take them now (in the agents'
        lane). Handshakes first, then backlogs. Once the fleet is in, a loop that lags
        defers nothing: every deferral is sent again, and the lane paces the agents."""
        if not self.enabled or not self.storming():
            return None
        if self._deferred_counter is not None:
            self._deferred_counter.inc()
        crowd_s = max(0.0, self._next_turn - time.monotonic())
        low_ms = int(1000 * max(self.limits.retry_after_min_s, crowd_s))
        high_ms = min(low_ms + BACKLOG_SPREAD_S * 1000, BACKLOG_WAIT_MAX_S * 1000)
        return random.randint(min(low_ms, high_ms), high_ms)

    def abandoned(self) -> None:
        """An admitted connection closed before it subscribed: its agent had given up."""
        if self._abandoned_counter is not None:
            self._abandoned_counter.inc()

    def shed_wait_ms(self) -> int:
        """How long, in ms, a report answered "busy" as it was read (its connection had
        ``REPORT_WINDOW`` calls in progress) should wait before it comes again: at least
        ``retry_after_min_s``, spread over ``SHED_SPREAD_S``."""
        low_ms = 1000 * self.limits.retry_after_min_s
        return random.randint(low_ms, low_ms + SHED_SPREAD_S * 1000)

    def shed(self, reports: int) -> None:
        """Count ``reports`` answered "busy" as they were read."""
        if self._shed_counter is not None:
            self._shed_counter.inc(reports)

    def gone(self) -> None:
        """A handshake was dropped unanswered: its client closed while it waited."""
        self.gone_total += 1
        if self._gone_counter is not None:
            self._gone_counter.inc()

    def admit(self, turn: int | None = None) -> Refusal | None:
        """Admit one agent handshake that brings the ticket ``turn`` (if any): None, and
        call ``release`` once it subscribed or left; or refuse it (see ``refuse``)."""
        reason = self.verdict(turn)
        if reason is not None:
            return self.refuse(reason, turn)
        if self.enabled:
            now = time.monotonic()
            self._forget(now)
            if turn is not None:
                self.turns.pop(turn, None)
            self.in_progress += 1
            # turns taken ahead of the rate leave a debt (of at most a second's worth)
            self._tokens = max(-self.rate, self._tokens - 1)
            self.admitted_total += 1
            self._admitted.append(now)
            if self._admitted_counter is not None:
                self._admitted_counter.inc()
        return None

    def refuse(self, reason: str, turn: int | None = None) -> Refusal:
        """Count a refusal for ``reason`` of a handshake bringing the ticket ``turn`` (if
        any); what to tell it. A known ticket keeps its turn, or, if its turn had come (and
        the server was busy), comes back after ``retry_after_min_s``; otherwise the agent
        gets a new turn at the end of the line."""
        now = time.monotonic()
        self._forget(now)
        self.refused_total[reason] += 1
        self._refused.append(now)
        if reason in self._refused_counters:
            self._refused_counters[reason].inc()
        when = None if turn is None else self.turns.get(turn)
        if turn is None or when is None:
            self._prune_turns(now)
            turn = random.getrandbits(62)
            self.turns[turn] = when = self._line_up(now)
            return Refusal(self._hint(when - now), turn)
        if when - TURN_EARLY_S <= now:
            when = now + self.limits.retry_after_min_s
            self.turns[turn] = when
        return Refusal(self._hint(when - now, jitter=False), turn)

    def _prune_turns(self, now: float) -> None:
        """Forget turns long past (a few times a minute, or when there are very many)."""
        if now - self._turns_pruned < TURN_KEPT_S / 4 and len(self.turns) < 1_000_000:
            return
        self._turns_pruned = now
        self.turns = {t: when for t, when in self.turns.items() if when > now - TURN_KEPT_S}

    def release(self) -> None:
        """An admitted connection subscribed, left, or held its place long enough."""
        self.in_progress = max(0, self.in_progress - 1)

    def _line_up(self, now: float) -> float:
        """The next turn in line (monotonic seconds) for a newly refused agent.

        Turns are lined up at the rate agents are admitted at (``rate``; without a rate
        bound, what was admitted over the last ``WINDOW_S``), the first
        ``retry_after_min_s`` from now, so a refused crowd comes back spread over the time
        the server needs to take it in, not all at the end of one window.
        """
        rate = self.rate or max(len(self._admitted) / WINDOW_S, MIN_TURN_RATE)
        self._next_turn = max(self._next_turn, now + self.limits.retry_after_min_s)
        when = self._next_turn
        self._next_turn += 1 / rate
        return when

    def _hint(self, wait_s: float, *, jitter: bool = True) -> int:
        """The ``Retry-After`` for a turn ``wait_s`` ahead: rounded up, plus up to a second
        of jitter (for a new turn), within ``retry_after_min_s`` .. ``retry_after_max_s``
        (an agent told less than its wait keeps its turn when it comes early)."""
        hint = math.ceil(wait_s) + (random.randint(0, 1) if jitter else 0)
        return max(self.limits.retry_after_min_s, min(self.limits.retry_after_max_s, hint))

    def _forget(self, now: float) -> None:
        for times in (self._admitted, self._refused):
            while times and now - times[0] > WINDOW_S:
                times.popleft()
