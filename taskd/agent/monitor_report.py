"""Host reports to the servers: sampled on NodeGet's schedule, sent live, buffered while offline.

One ``Collector`` per agent samples the host (``Monitor``, in a worker thread of
its own: psutil reads /proc and stats file systems) and hands every report to
the ``Outbox`` of each server link. An outbox sends over whatever transport its
link has at the moment (the WebSocket, or HTTP POST in fallback mode), from a
task of its own: a report never waits for a task, and never holds a task slot.

- static (``agent_report_static``): at start, again after every (re)connect, and
  whenever it changed (it is sampled every ``static_report_interval_ms``);
- summary (``agent_report_dynamic_summary``): every
  ``dynamic_summary_report_interval_ms``; dynamic (``agent_report_dynamic``):
  every ``dynamic_report_interval_ms``;
- while a link is down its outbox keeps the latest static report, puts the
  summaries in its ``ReportBuffer`` (bounded by count and age) and drops the
  dynamic reports (only the newest one matters; charts are drawn from summaries);
- after a reconnect the buffer drains oldest first: after a random delay of up
  to ``report_backlog_jitter_ms``, at most ``report_backlog_per_second``
  summaries a second in one batch, each batch sent only once the previous one
  was acknowledged. A fleet reconnecting at once does not flush at once, and a
  slow server slows the drain down.

A server that has no such method (-32601, e.g. a taskd before monitoring) is
not sent it again on that connection, and what it cannot take stays buffered. A
server busy with a crowd of agents may answer a summary with -32000 and a
``retry_after_ms``: that summary stays (or goes) in the buffer, and the drain waits
that long (plus up to a quarter more) before it sends again; a dynamic report so
answered is dropped (the next one is due soon).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

import orjson
import websockets

from taskd.agent.monitor import Monitor, summarize
from taskd.agent.spool import ReportBuffer
from taskd.config import AgentSettings

logger = logging.getLogger(__name__)

REPORT_STATIC = "agent_report_static"
REPORT_DYNAMIC = "agent_report_dynamic"
REPORT_SUMMARY = "agent_report_dynamic_summary"
METHOD_NOT_FOUND = -32601
SERVER_BUSY = -32000
MAX_RETRY_AFTER_MS = 60_000
"""The longest wait a busy server's answer is taken for."""
LIVE_MAX = 5
"""Summaries that may wait for a busy connection before they go to the buffer."""

TRANSPORT_ERRORS = (ConnectionError, TimeoutError, OSError, websockets.WebSocketException)
T = TypeVar("T")


class Caller(Protocol):
    """A link's transport as reports use it."""

    async def call_many(self, calls: Sequence[tuple[str, list[Any]]]) -> list[dict[str, Any]]:
        """Send the calls together; their reply objects in the same order."""


class Outbox:
    """One server link's reports: the latest static, the live ones, the buffered summaries."""

    def __init__(
        self,
        name: str,
        token: str,
        settings: AgentSettings,
        buffer: ReportBuffer,
        caller: Callable[[], Caller | None],
    ) -> None:
        self.name = name
        self.token = token
        self.settings = settings
        self.buffer = buffer
        self._caller = caller
        self._static: bytes | None = None
        self._static_due = False
        self._live: deque[tuple[int, bytes]] = deque()
        self._dynamic: bytes | None = None
        self._wake = asyncio.Event()
        self._refused: set[str] = set()
        self._noted: set[tuple[str, Any]] = set()
        self._drainer: asyncio.Task[None] | None = None

    def offer_static(self, data: bytes) -> None:
        """A new static report (JSON): sent now, or kept until the link is back."""
        self._static, self._static_due = data, True
        self._wake.set()

    def offer(self, time_ms: int, summary: bytes, dynamic: bytes | None) -> None:
        """A summary (and on its ticks a dynamic report): sent now, or the summary buffered."""
        if self._caller() is None:
            self.buffer.put(time_ms, summary)
            return
        self._live.append((time_ms, summary))
        while len(self._live) > LIVE_MAX:
            self.buffer.put(*self._live.popleft())
        if dynamic is not None:
            self._dynamic = dynamic
        self._wake.set()

    def connected(self) -> None:
        """The link has a new connection: send the static report again, then the buffer."""
        self._refused.clear()
        self._noted.clear()
        self._static_due = self._static is not None
        self._wake.set()

    def disconnected(self) -> None:
        """The link lost its connection: what waited to be sent goes to the buffer."""
        if self._drainer is not None:
            self._drainer.cancel()
            self._drainer = None
        self._spill()

    def _spill(self) -> None:
        if REPORT_SUMMARY not in self._refused:
            while self._live:
                self.buffer.put(*self._live.popleft())
        self._live.clear()
        self._dynamic = None

    async def run(self) -> None:
        """Send reports as they come, until cancelled."""
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                caller = self._caller()
                if caller is None:
                    self._spill()
                    continue
                try:
                    await self._send_live(caller)
                except Exception:  # a bug here must not end the reports for good
                    logger.exception("[%s] sending reports failed", self.name)
                if (
                    len(self.buffer)
                    and REPORT_SUMMARY not in self._refused
                    and (self._drainer is None or self._drainer.done())
                ):
                    self._drainer = asyncio.create_task(self._drain_logged(caller))
        finally:
            if self._drainer is not None:
                self._drainer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._drainer

    def _params(self, data: bytes) -> list[Any]:
        return [self.token, orjson.Fragment(data)]

    async def _send_live(self, caller: Caller) -> None:
        calls: list[tuple[str, bytes]] = []
        static = self._static if self._static_due else None
        if static is not None and REPORT_STATIC not in self._refused:
            calls.append((REPORT_STATIC, static))
        summaries = list(self._live)
        self._live.clear()
        if REPORT_SUMMARY not in self._refused:
            calls += [(REPORT_SUMMARY, data) for _, data in summaries]
        dynamic, self._dynamic = self._dynamic, None
        if dynamic is not None and REPORT_DYNAMIC not in self._refused:
            calls.append((REPORT_DYNAMIC, dynamic))
        if not calls:
            return
        try:
            replies = await caller.call_many([(m, self._params(d)) for m, d in calls])
        except TRANSPORT_ERRORS:
            # the link notices the broken connection itself and reconnects
            if REPORT_SUMMARY not in self._refused:
                for time_ms, data in summaries:
                    self.buffer.put(time_ms, data)
            return
        times = iter(time_ms for time_ms, _ in summaries)
        for (method, data), reply in zip(calls, replies, strict=True):
            time_ms = next(times) if method == REPORT_SUMMARY else 0
            if retry_after_ms(reply) is not None:
                # a busy server takes a summary later; a dynamic report is dropped (only
                # the newest matters, and the next is due soon)
                if method == REPORT_SUMMARY:
                    self.buffer.put(time_ms, data)
            elif "error" in reply:
                self._note_refusal(method, reply["error"])
        if static is not None and self._static is static:
            self._static_due = False  # answered: refused or not, sending it again changes nothing

    async def _drain_logged(self, caller: Caller) -> None:
        try:
            await self._drain(caller)
        except Exception:
            logger.exception("[%s] sending buffered reports failed", self.name)

    async def _drain(self, caller: Caller) -> None:
        """Send the buffered summaries, paced, while this connection lasts: a batch of at most
        ``report_backlog_per_second`` a second, but a single summary first, and first again
        after a busy answer (a server taking a crowd in defers one report, not a batch)."""
        await asyncio.sleep(random.uniform(0, self.settings.report_backlog_jitter_ms / 1000))
        loop = asyncio.get_running_loop()
        sent = 0
        full = self.settings.report_backlog_per_second
        size = 1
        while self._caller() is caller and REPORT_SUMMARY not in self._refused:
            started = loop.time()
            batch = self.buffer.oldest(size)
            if not batch:
                break
            try:
                replies = await caller.call_many(
                    [(REPORT_SUMMARY, self._params(report.data)) for report in batch]
                )
            except TRANSPORT_ERRORS:
                return
            waits = list(map(retry_after_ms, replies))
            # a busy server's answer keeps its report and those after it for later (any
            # of those it stored meanwhile are taken as resends)
            kept = next((i for i, wait in enumerate(waits) if wait is not None), None)
            answered = replies[:kept]
            for reply in answered:
                if "error" in reply:
                    self._note_refusal(REPORT_SUMMARY, reply["error"])
            if REPORT_SUMMARY in self._refused:
                return  # kept for a server that takes them
            if answered:
                self.buffer.done(batch[len(answered) - 1].seq)
            sent += sum(1 for reply in answered if "error" not in reply)
            if kept is not None:
                longest = max(wait for wait in waits if wait is not None)
                size = 1
                await asyncio.sleep(longest / 1000 * random.uniform(1.0, 1.25))
                continue
            if size == full:
                await asyncio.sleep(max(0.0, 1.0 - (loop.time() - started)))
            size = full
        if sent:
            logger.info("[%s] sent %d buffered summary report(s)", self.name, sent)

    def _note_refusal(self, method: str, error: Any) -> None:
        code = error.get("code") if isinstance(error, dict) else None
        message = error.get("message") if isinstance(error, dict) else error
        if code == METHOD_NOT_FOUND:
            self._refused.add(method)
        if (method, code) in self._noted:
            return
        self._noted.add((method, code))
        if code == METHOD_NOT_FOUND:
            logger.info(
                "[%s] the server does not take %s; not sent again on this connection",
                self.name,
                method,
            )
        else:
            logger.warning("[%s] the server refused %s: %s %s", self.name, method, code, message)


def retry_after_ms(reply: Any) -> int | None:
    """The wait a busy server asked for in ``reply`` (-32000), or None."""
    error = reply.get("error") if isinstance(reply, dict) else None
    if not isinstance(error, dict) or error.get("code") != SERVER_BUSY:
        return None
    data = error.get("data")
    wait = data.get("retry_after_ms") if isinstance(data, dict) else None
    return min(wait, MAX_RETRY_AFTER_MS) if isinstance(wait, int) and wait > 0 else 1000


class Collector:
    """Samples the host on the report schedule and hands each report to every outbox."""

    def __init__(self, settings: AgentSettings, outboxes: Sequence[Outbox]) -> None:
        self.settings = settings
        self.outboxes = outboxes
        self._static_hash: list[int] | None = None

    async def run(self) -> None:
        """Sample and hand out reports until cancelled."""
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="taskd-monitor")
        loop = asyncio.get_running_loop()

        async def sample(function: Callable[[], T]) -> T:
            return await loop.run_in_executor(executor, function)

        settings = self.settings
        period = settings.dynamic_summary_report_interval_ms / 1000
        dynamic_every = (
            settings.dynamic_report_interval_ms // settings.dynamic_summary_report_interval_ms
        )
        try:
            monitor = await sample(lambda: Monitor(settings.agent_uuid))
            self._static(await sample(monitor.static))
            start = next_static = loop.time()
            tick, failing = 0, False
            while True:
                tick += 1
                now = loop.time()
                if start + tick * period < now:  # a slow sample or a suspended host: skip ahead
                    tick = int((now - start) / period) + 1
                await asyncio.sleep(start + tick * period - now)
                try:
                    dynamic = await sample(monitor.dynamic)
                    summary = summarize(
                        dynamic,
                        settings.dynamic_summary_select_disk,
                        settings.dynamic_summary_select_network_interface,
                    )
                    summary_json = orjson.dumps(summary)
                    dynamic_json = orjson.dumps(dynamic) if tick % dynamic_every == 0 else None
                    for outbox in self.outboxes:
                        outbox.offer(summary["time"], summary_json, dynamic_json)
                    if loop.time() - next_static >= settings.static_report_interval_ms / 1000:
                        next_static = loop.time()
                        self._static(await sample(monitor.static))
                    failing = False
                except Exception:
                    if not failing:  # once per run of failures, not every second
                        logger.exception("sampling the host failed; trying again every tick")
                    failing = True
        finally:
            executor.shutdown(wait=False, cancel_futures=True)

    def _static(self, static: dict[str, Any]) -> None:
        """Hand out a static report if it differs from the last one."""
        if static["data_hash"] == self._static_hash:
            return
        self._static_hash = static["data_hash"]
        data = orjson.dumps(static)
        for outbox in self.outboxes:
            outbox.offer_static(data)
