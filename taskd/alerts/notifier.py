"""Sending alert notifications, off the hot path: the outbox, a worker per channel, retries.

The evaluator never sends: it commits an event change together with one
``alert_delivery`` row per channel (the outbox) and pokes the notifier. The
notifier (on the node that evaluates) starts a worker for each channel with
something due. A worker waits one short batching window, claims everything of
its channel that is due (a claim is a lease, so no other node sends it too) and
sends it as one message, or one summary when several are due at once: 1,000
agents dropping together are one message per channel, not 1,000. A failed send
is retried with exponential backoff up to ``retry_max`` attempts; its attempts and
last error are recorded on the rows (shown with the event), counted in
``/metrics`` and logged without secrets. Sends run on a thread pool of their own,
so a channel that hangs holds only its own worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from taskd.alerts.channels import REDACTOR, ChannelUrl, inspect, send
from taskd.alerts.events import Due, compose
from taskd.errors import TaskdError

if TYPE_CHECKING:
    from taskd.metrics import Metrics
    from taskd.store import Store

logger = logging.getLogger(__name__)

POLL_S = 2.0
"""How often the notifier looks for due deliveries it was not told about (retries, takeover)."""
BATCH_MAX = 5_000
"""Deliveries one message carries at most."""
SEND_THREADS = 16


@dataclass(frozen=True)
class NotifierSettings:
    """How the notifier batches and retries."""

    window_ms: int = 1_000
    retry_base_ms: int = 2_000
    retry_max_ms: int = 300_000
    retry_max: int = 8
    send_timeout_ms: int = 30_000


class Notifier:
    """Sends what the outbox holds; runs only while this node evaluates (``start`` / ``stop``)."""

    def __init__(
        self,
        store: Store,
        node_id: str,
        settings: NotifierSettings,
        now: Callable[[], int],
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.node_id = node_id
        self.settings = settings
        self.now = now
        self.metrics = metrics
        self._wake = asyncio.Event()
        self._supervisor: asyncio.Task[None] | None = None
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._executor: ThreadPoolExecutor | None = None

    @property
    def running(self) -> bool:
        """Whether this node sends."""
        return self._supervisor is not None

    async def start(self) -> None:
        """Begin sending (this node leads): claims left by an earlier sender (an earlier run
        of this node, a leader that died mid-send) are given up first, so that what they held
        is sent now rather than when their lease ends."""
        if self._supervisor is not None:
            return
        await self.store.release_alert_claims()
        self._executor = ThreadPoolExecutor(SEND_THREADS, thread_name_prefix="taskd-alert-send")
        self._supervisor = asyncio.create_task(self._supervise(), name="taskd-alert-notifier")

    async def stop(self) -> None:
        """Stop sending; unsent claims are given up for the next sender."""
        tasks = [t for t in (self._supervisor, *self._workers.values()) if t is not None]
        self._supervisor = None
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._workers.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        with contextlib.suppress(Exception):
            await self.store.release_alert_claims(self.node_id)

    def poke(self) -> None:
        """Deliveries were queued: look now."""
        self._wake.set()

    async def _supervise(self) -> None:
        while True:
            self._wake.clear()
            wait = POLL_S
            try:
                now = self.now()
                for channel, due_at in (await self.store.due_alert_channels(now)).items():
                    if channel in self._workers:
                        continue
                    if due_at <= now:
                        self._workers[channel] = asyncio.create_task(
                            self._work(channel), name=f"taskd-alert-{channel}"
                        )
                    else:
                        wait = min(wait, (due_at - now) / 1000)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("alert notifier could not read the outbox: %s", exc)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(wait, 0.05))

    async def _work(self, channel: str) -> None:
        """Send everything due for one channel, one message per batch, until nothing is due."""
        try:
            await asyncio.sleep(self.settings.window_ms / 1000)
            while await self._send_batch(channel):
                pass
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.warning(
                "alert channel %s: worker failed: %s", channel, REDACTOR.redact(str(exc))
            )
        finally:
            self._workers.pop(channel, None)
            self._wake.set()  # whatever came in meanwhile gets a new worker

    async def _send_batch(self, channel: str) -> bool:
        """Claim, send and settle one batch; whether to go on with the next one."""
        s = self.settings
        now = self.now()
        lease_ms = s.send_timeout_ms * 2 + 10_000
        rows = await self.store.claim_alert_deliveries(
            channel, self.node_id, now, lease_ms, BATCH_MAX
        )
        if not rows:
            return False
        ids = [row.id for row in rows]
        try:
            target = inspect((await self.store.alert_channel(channel)).url)
        except TaskdError as exc:
            await self.store.settle_alert_deliveries(ids, sent_at=None, error=exc.message)
            self._count("failed", len(ids))
            return True
        due = [
            Due(r.id, r.kind, r.rule, r.uuid, r.started_at, r.resolved_at, r.message) for r in rows
        ]
        title, body = compose(due, now)
        error = await self._send(target, title, body)
        attempt = max(row.attempts for row in rows) + 1
        if error is None:
            await self.store.settle_alert_deliveries(ids, sent_at=self.now())
            self._count("sent", len(ids))
            if self.metrics is not None:
                self.metrics.alert_messages.labels("sent").inc()
            return True
        if self.metrics is not None:
            self.metrics.alert_messages.labels("failed").inc()
        if attempt >= s.retry_max:
            await self.store.settle_alert_deliveries(ids, sent_at=None, error=error)
            self._count("failed", len(ids))
            logger.error(
                "alert channel %s: %d notification(s) given up after %d attempts: %s",
                channel,
                len(ids),
                attempt,
                error,
            )
            return True
        delay = min(s.retry_base_ms * 2 ** (attempt - 1), s.retry_max_ms)
        await self.store.settle_alert_deliveries(
            ids, sent_at=None, error=error, retry_at=self.now() + delay
        )
        self._count("retried", len(ids))
        logger.warning(
            "alert channel %s: sending %d notification(s) failed "
            "(attempt %d of %d, next in %d ms): %s",
            channel,
            len(ids),
            attempt,
            s.retry_max,
            delay,
            error,
        )
        self._wake.set()
        return False

    async def _send(self, target: ChannelUrl, title: str, body: str) -> str | None:
        """Send on the notifier's threads, within the send timeout; None if sent."""
        assert self._executor is not None
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor, send, target, title, body)
        try:
            return await asyncio.wait_for(future, self.settings.send_timeout_ms / 1000)
        except TimeoutError:
            return f"no answer within {self.settings.send_timeout_ms} ms"

    def _count(self, outcome: str, count: int) -> None:
        if self.metrics is not None:
            self.metrics.alert_notifications.labels(outcome).inc(count)


_test_threads: ThreadPoolExecutor | None = None


async def send_test(url: str, name: str, timeout_ms: int) -> str | None:
    """Send a test message to a channel now (``alert_channel_test``); None if sent, else why.

    Tests run on threads of their own: a channel that hangs holds none of the threads
    other work runs on.
    """
    global _test_threads
    if _test_threads is None:
        _test_threads = ThreadPoolExecutor(4, thread_name_prefix="taskd-alert-test")
    target = inspect(url)
    loop = asyncio.get_running_loop()
    future = loop.run_in_executor(
        _test_threads,
        send,
        target,
        f"[taskd] test of alert channel {name}",
        f"This is a test message from taskd to alert channel {name}.",
    )
    try:
        return await asyncio.wait_for(future, timeout_ms / 1000)
    except TimeoutError:
        return f"no answer within {timeout_ms} ms"
