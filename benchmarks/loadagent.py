"""A load agent: many agent subscriptions over real WebSockets in one process.

Each subscription answers every pushed task at once with a valid result of
its type. Uploads from one connection are sent as they are produced; with
``--batch`` the answers that arrive together go out as one JSON-RPC batch.

    python -m benchmarks.loadagent --url ws://127.0.0.1:2211/ --token K:S --count 100 \
        --uuid-file agents.txt [--batch]

Prints "ready N" on stdout once every subscription is registered.

With ``--reconnect`` each subscription reconnects like the real agent (the
agent's own backoff: 1 s doubling to 60 s, ±20% jitter) instead of ending the
process, and with ``--stats FILE`` a SIGUSR1 writes every agent's connection
attempts and subscriptions (wall-clock seconds) and the process's CPU time there.

With ``--report-every-ms MS`` each agent also reports its host like the real
agent: a static report right after subscribing, then a dynamic summary every MS
(each agent at its own phase of the period, so a fleet does not fire at once);
``--backlog N`` makes it send N older summaries (one per second of the past N
seconds) after each (re)connect (with ``--reconnect``: each reconnect, not an
agent's first connection), paced like the real agent's buffer. With
``--report-stats FILE`` a SIGUSR1 writes the reports sent, acknowledged and
refused, each acknowledgement's latency (send to reply) and lag (the report's
``time`` to the reply) there; SIGUSR2 stops new reports (the last ones are
still acknowledged), so the rows stored can be counted against what was sent.
With ``--report-wait`` the summaries (and the backlog) wait for a SIGCONT, so
that a whole fleet can subscribe before it reports.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import itertools
import os
import random
import resource
import signal
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import websockets
from websockets.http11 import USER_AGENT

from benchmarks import wsclient
from taskd.admission import AGENT_USER_AGENT, TURN_HEADER, parse_turn
from taskd.agent.client import backoff_delays, busy_hint, hinted_delay
from taskd.agent.monitor import Monitor, summarize
from taskd.agent.monitor_report import retry_after_ms
from taskd.config import AgentSettings

RESULTS: dict[str, Any] = {
    "ping": {"ping": 0.5},
    "tcp_ping": {"tcp_ping": 0.5},
    "http_ping": {"http_ping": 0.5},
    "http_request": {"http_request": {"status": 200, "headers": [], "body": ""}},
    "dns": {"dns": [{"record_type": "a", "time": 0.5, "data": "127.0.0.1"}]},
    "web_shell": {"web_shell": True},
    "execute": {"execute": "(No Output)"},
    "read_config": {"read_config": ""},
    "edit_config": {"edit_config": True},
    "ip": {"ip": ["127.0.0.1", None]},
    "version": {"version": {"taskd": "load"}},
    "self_update": {"self_update": False},
}


def _kind(task_event_type: Any) -> str:
    return task_event_type if isinstance(task_event_type, str) else next(iter(task_event_type))


class SubscribeRefused(SystemExit):
    """The server refused a subscription: the process ends, unless the agent reconnects."""


@dataclass
class Connections:
    """One agent's connection attempts and subscriptions, wall-clock seconds."""

    attempts: list[float] = field(default_factory=list)
    subscribed: list[float] = field(default_factory=list)
    hints: list[tuple[float, float]] = field(default_factory=list)
    """(attempt, seconds) of each handshake the server refused with a retry hint."""
    timeouts: list[tuple[float, bool]] = field(default_factory=list)
    """(attempt, whether the WebSocket was open) of each attempt that ran out of time."""
    opened: float = 0.0
    """When the last attempt's WebSocket opened."""


async def agent(
    url: str,
    token: str,
    agent_uuid: str,
    batch: bool,
    ready: asyncio.Event,
    counter: list[int],
    on_subscribed: Callable[[], None] | None = None,
    reports: Reports | None = None,
    user_agent: str | None = USER_AGENT,
    backlog: bool = True,
    connection: int = 0,
    on_open: Callable[[], None] | None = None,
    turn: int | None = None,
) -> None:
    """One subscription answering its tasks until cancelled (or the connection ends);
    ``connection`` counts the agent's earlier subscriptions; ``turn`` is the ticket a busy
    server gave the last handshake."""
    ids = itertools.count(2)
    headers = {TURN_HEADER: str(turn)} if turn else None
    async with wsclient.connect(url, user_agent, headers) as ws:
        if on_open is not None:
            on_open()
        await ws.send(
            orjson.dumps(
                {
                    "jsonrpc": "2.0",
                    "method": "task_register_task",
                    "params": [token, agent_uuid],
                    "id": 1,
                }
            ).decode()
        )
        reply = orjson.loads(await ws.recv())
        if "error" in reply:
            raise SubscribeRefused(f"subscribe failed: {reply['error']}")
        counter[0] += 1
        ready.set()
        if on_subscribed is not None:
            on_subscribed()
        pending: list[bytes] = []
        in_flight: set[asyncio.Future[None]] = set()
        reporter = (
            Reporter(ws, token, agent_uuid, reports, backlog, connection) if reports else None
        )
        if reporter is not None:
            in_flight.add(start_reporting(reporter))
        async for message in ws:
            data = orjson.loads(message)
            if reporter is not None and reporter.answer(data):
                continue
            # replies to our uploads (a list when they went as a batch) need no answer
            if isinstance(data, list) or data.get("method") != "task_register_task":
                continue
            task = data["params"]["result"]
            upload = {
                "jsonrpc": "2.0",
                "method": "task_upload_task_result",
                "params": [
                    token,
                    {
                        "task_id": task["task_id"],
                        "agent_uuid": agent_uuid,
                        "task_token": task["task_token"],
                        "timestamp": time.time_ns() // 1_000_000,
                        "success": True,
                        "task_event_result": RESULTS[_kind(task["task_event_type"])],
                    },
                ],
                "id": next(ids),
            }
            if not batch:
                await ws.send(orjson.dumps(upload).decode())
                continue
            pending.append(orjson.dumps(upload))
            if len(pending) == 1:

                async def flush() -> None:
                    await asyncio.sleep(0)
                    body = b"[" + b",".join(pending) + b"]"
                    pending.clear()
                    await ws.send(body.decode())

                flushing = asyncio.ensure_future(flush())
                in_flight.add(flushing)
                flushing.add_done_callback(in_flight.discard)


async def reconnecting(
    url: str,
    token: str,
    agent_uuid: str,
    batch: bool,
    ready: asyncio.Event,
    counter: list[int],
    record: Connections,
    open_timeout: float,
    reports: Reports | None = None,
) -> None:
    """One subscription that reconnects like the real agent until cancelled: its backoff,
    or the wait a busy server asks for (503 with Retry-After; it says it is an agent)."""
    delays = backoff_delays()
    turn: int | None = None
    while True:
        record.attempts.append(time.time())
        before = len(record.subscribed)
        hint = None
        opened = record.opened
        try:
            async with asyncio.timeout(open_timeout) as limit:
                await agent(
                    url,
                    token,
                    agent_uuid,
                    batch,
                    ready,
                    counter,
                    _standing(record, limit),
                    reports,
                    user_agent=f"{AGENT_USER_AGENT} (load)",
                    # nothing was buffered before an agent's first connection
                    backlog=bool(record.subscribed),
                    connection=len(record.subscribed),
                    on_open=functools.partial(_note_open, record),
                    turn=turn,
                )
        except websockets.InvalidStatus as exc:
            hint = busy_hint(exc)
            turn = parse_turn(exc.response.headers.get(TURN_HEADER))
        except TimeoutError:
            record.timeouts.append((record.attempts[-1], record.opened >= record.attempts[-1]))
        except (OSError, websockets.WebSocketException, SubscribeRefused):
            pass
        if record.opened != opened:
            turn = None  # in: the turn was used, as the agent does
        if len(record.subscribed) > before:
            delays = backoff_delays()  # it worked: start the backoff afresh, as the agent does
        if hint is not None:
            record.hints.append((record.attempts[-1], hint))
            await asyncio.sleep(hinted_delay(hint))
        else:
            await asyncio.sleep(next(delays))


def _note_open(record: Connections) -> None:
    record.opened = time.time()


def _standing(record: Connections, limit: asyncio.Timeout) -> Callable[[], None]:
    """Note a subscription; from then on the connection is served without a time limit."""

    def subscribed() -> None:
        record.subscribed.append(time.time())
        limit.reschedule(None)

    return subscribed


BACKLOG_PER_SECOND = AgentSettings.report_backlog_per_second
BACKLOG_JITTER_S = AgentSettings.report_backlog_jitter_ms / 1000


@dataclass
class Reports:
    """The host reports of every agent in this process, and their acknowledgements."""

    every_ms: int
    backlog: int
    static: dict[str, Any]
    variants: list[bytes]
    """Summaries' figures (JSON members, no uuid or time) the agents take turns at."""
    sent: int = 0
    acked: int = 0
    refused: int = 0
    summaries: int = 0
    summaries_acked: int = 0
    backlog_sent: int = 0
    backlog_acked: int = 0
    deferred: int = 0
    """Summaries a busy server answered -32000, kept and sent again after its hint."""
    keep_busy: bool = True
    """Whether a live summary answered -32000 is sent again after the hint, as taskd's
    agent keeps it; if not, it is gone, as with NodeGet's agent (which reads no answers)."""
    busy_dropped: int = 0
    """Live summaries answered -32000 and not sent again (``keep_busy`` off)."""
    latency_ms: list[tuple[int, float]] = field(default_factory=list)
    """(sent at, ms; acknowledged after, ms) of each acknowledged report."""
    lag_ms: list[tuple[int, float]] = field(default_factory=list)
    """(report time, ms; acknowledged after, ms) of each acknowledged live summary."""
    errors: list[Any] = field(default_factory=list)
    stopped: bool = False
    started: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when summaries may flow (at once, unless ``--report-wait``)."""


def host_reports(every_ms: int, backlog: int) -> Reports:
    """Reports shaped on this host's own static report and summary, as the agent makes them."""
    monitor = Monitor(str(uuid.uuid4()))
    return Reports(every_ms, backlog, monitor.static(), variants(summarize(monitor.dynamic())))


VARIANTS = 256
"""Different summaries a load-agent process makes (serialised once: 10,000 agents flushing
a minute of buffer each would otherwise spend more of the machine than the server)."""


def variants(template: dict[str, Any], count: int = VARIANTS) -> list[bytes]:
    """``count`` summaries of the host of ``template``, moving a little, as JSON members
    without their uuid and time."""
    rnd = random.Random(0)
    total = template["total_memory"] or 8 << 30
    made = []
    for _ in range(count):
        figures = {k: v for k, v in template.items() if k not in ("uuid", "time")} | {
            "cpu_usage": rnd.randint(0, 1000),
            "used_memory": int(total * rnd.uniform(0.2, 0.8)),
            "load_one": rnd.randint(0, 400),
            "read_speed": rnd.randint(0, 50 << 20),
            "write_speed": rnd.randint(0, 50 << 20),
            "receive_speed": rnd.randint(0, 10 << 20),
            "transmit_speed": rnd.randint(0, 10 << 20),
            "tcp_connections": rnd.randint(10, 2000),
            "process_count": rnd.randint(80, 400),
        }
        made.append(orjson.dumps(figures)[1:-1])
    return made


Summary = tuple[int, bytes]
"""A summary's time (ms) and its JSON."""


class Reporter:
    """One agent's reports over its connection: static, then summaries, and the backlog."""

    def __init__(
        self,
        ws: Any,
        token: str,
        agent_uuid: str,
        reports: Reports,
        backlog: bool = True,
        connection: int = 0,
    ) -> None:
        self.ws = ws
        self.token = orjson.dumps(token)
        self.agent_uuid = agent_uuid
        self.reports = reports
        self.backlog = backlog
        """Whether this connection sends the backlog (a reconnecting agent's first does not)."""
        self.connection = connection
        """The agent's earlier subscriptions: its backlog's times are its own (see ``drain``)."""
        self._ids = itertools.count(1)
        # id: (sent at, s; live summary's time, ms; in the backlog; future of a batch's last)
        self._waiting: dict[str, tuple[float, int, bool, asyncio.Future[None] | None]] = {}
        self._summaries_sent: dict[str, Summary] = {}
        """id: a summary awaiting its answer (a busy server's answer sends it again)."""
        self._again: list[Summary] = []
        self._again_after_ms = 0
        self._random = random.Random(agent_uuid)
        self._variant = self._random.randrange(len(reports.variants))
        self.phase = self._random.random()  # where in each period this agent reports

    def summary(self, time_ms: int) -> Summary:
        """A summary of this agent at ``time_ms``: the host's figures, moving a little."""
        variants = self.reports.variants
        self._variant = (self._variant + 1) % len(variants)
        json = b'{"uuid":"%b","time":%d,%b}' % (
            self.agent_uuid.encode(),
            time_ms,
            variants[self._variant],
        )
        return time_ms, json

    def answer(self, data: Any) -> bool:
        """Take the replies to this agent's reports; False for anything else."""
        replies = data if isinstance(data, list) else [data]
        if not replies or not isinstance(replies[0], dict):
            return False
        first = replies[0].get("id")
        if not isinstance(first, str) or first not in self._waiting:
            return False
        now = time.time()
        for reply in replies:
            unknown = (0.0, 0, False, None)
            sent_at, time_ms, backlog, done = self._waiting.pop(reply.get("id"), unknown)
            if done is None and not sent_at:
                continue
            summary = self._summaries_sent.pop(reply.get("id"), None)
            wait_ms = retry_after_ms(reply)
            if summary is not None and wait_ms is not None and (self.reports.keep_busy or backlog):
                self.reports.deferred += 1  # kept, as the agent does
                if backlog:
                    self._again.append(summary)
                    self._again_after_ms = max(self._again_after_ms, wait_ms)
                else:
                    wait_s = wait_ms / 1000 * self._random.uniform(1.0, 1.25)
                    asyncio.get_running_loop().call_later(wait_s, self._send_again, summary)
            elif summary is not None and wait_ms is not None:
                self.reports.busy_dropped += 1  # gone, as with NodeGet's agent
            elif "error" in reply:
                self.reports.refused += 1
                if len(self.reports.errors) < 20:
                    self.reports.errors.append(reply["error"])
            else:
                self.reports.acked += 1
                self.reports.backlog_acked += backlog
                self.reports.latency_ms.append((int(sent_at * 1000), (now - sent_at) * 1000))
                if time_ms:
                    self.reports.lag_ms.append((time_ms, now * 1000 - time_ms))
                if time_ms or backlog:
                    self.reports.summaries_acked += 1
            if done is not None and not done.done():
                done.set_result(None)
        return True

    def _call(
        self,
        method: str,
        report: bytes,
        backlog: bool = False,
        done: asyncio.Future[None] | None = None,
        summary: Summary | None = None,
    ) -> bytes:
        """The request of ``method`` with ``report`` (JSON), noted as awaiting its answer."""
        ident = f"r{next(self._ids)}"
        time_ms = summary[0] if summary is not None and not backlog else 0
        self._waiting[ident] = (time.time(), time_ms, backlog, done)
        if summary is not None:
            self._summaries_sent[ident] = summary
        self.reports.sent += 1
        self.reports.backlog_sent += backlog
        self.reports.summaries += summary is not None
        return b'{"jsonrpc":"2.0","method":"%b","params":[%b,%b],"id":"%b"}' % (
            method.encode(),
            self.token,
            report,
            ident.encode(),
        )

    def _summary_call(
        self,
        summary: Summary,
        backlog: bool = False,
        done: asyncio.Future[None] | None = None,
    ) -> bytes:
        return self._call("agent_report_dynamic_summary", summary[1], backlog, done, summary)

    async def run(self) -> None:
        """Report until cancelled or stopped: static now, the backlog and a summary every period."""
        static = {
            **self.reports.static,
            "uuid": self.agent_uuid,
            "time": time.time_ns() // 1_000_000,
        }
        await self.ws.send(self._call("agent_report_static", orjson.dumps(static)).decode())
        await self.reports.started.wait()
        drain = asyncio.create_task(self.drain()) if self.reports.backlog and self.backlog else None
        try:
            loop = asyncio.get_running_loop()
            period = self.reports.every_ms / 1000
            start = loop.time() + self.phase * period
            tick = 0
            while not self.reports.stopped:
                now = loop.time()
                if start + tick * period < now - period:  # a stalled loop skips ahead, as the agent
                    tick = int((now - start) / period)
                await asyncio.sleep(max(0.0, start + tick * period - now))
                tick += 1
                if self.reports.stopped:
                    break
                summary = self.summary(time.time_ns() // 1_000_000 & ~1)  # even ms: see drain
                await self.ws.send(self._summary_call(summary).decode())
        finally:
            if drain is not None:
                drain.cancel()

    def _send_again(self, summary: Summary) -> None:
        """A live summary a busy server deferred, sent again after its wait."""
        if self.reports.stopped:
            return
        task = asyncio.ensure_future(self.ws.send(self._summary_call(summary).decode()))
        task.add_done_callback(_ignore_closed)

    async def drain(self) -> None:
        """The backlog after a (re)connect, paced like the agent's ``ReportBuffer`` drain:
        a random delay, then at most ``report_backlog_per_second`` summaries a second in one
        batch, each batch sent once the previous one was acknowledged; the first, and the
        first after a busy answer, is a single summary."""
        # a real agent never sends a summary again once acknowledged; these made-up times
        # must not repeat one either (the server takes a repeat as a resend, not a new row):
        # whole seconds plus an odd ms of this connection's own, never a live summary's even
        now_ms = time.time_ns() // 1_000_000
        now_ms += (2 * self.connection + 1) % 1000 - now_ms % 1000
        backlog = [
            self.summary(now_ms - seconds * 1000) for seconds in range(self.reports.backlog, 0, -1)
        ]
        await asyncio.sleep(self._random.uniform(0, BACKLOG_JITTER_S))
        loop = asyncio.get_running_loop()
        size = 1
        while backlog and not self.reports.stopped:
            started = loop.time()
            batch, backlog = backlog[:size], backlog[size:]
            done: asyncio.Future[None] = loop.create_future()
            # the answer to the batch's last call ends the batch
            calls = [self._summary_call(summary, True) for summary in batch[:-1]]
            calls.append(self._summary_call(batch[-1], True, done))
            await self.ws.send((b"[" + b",".join(calls) + b"]").decode())
            await done
            if self._again:  # a busy server: those again, after its hint (+ up to 25%)
                backlog = self._again + backlog
                wait_s = self._again_after_ms / 1000 * self._random.uniform(1.0, 1.25)
                self._again, self._again_after_ms = [], 0
                size = 1
                await asyncio.sleep(wait_s)
                continue
            if size == BACKLOG_PER_SECOND:
                await asyncio.sleep(max(0.0, 1.0 - (loop.time() - started)))
            size = BACKLOG_PER_SECOND


def _ignore_closed(task: asyncio.Future[None]) -> None:
    if not task.cancelled():
        task.exception()  # a closed connection: the summary is gone with it, as a live one


def start_reporting(reporter: Reporter) -> asyncio.Task[None]:
    """Run an agent's reports; they end with its connection."""
    task = asyncio.create_task(reporter.run())
    task.add_done_callback(_reporting_ended)
    return task


def _reporting_ended(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        with contextlib.suppress(websockets.WebSocketException, OSError):
            task.result()


def stop_reports(reports: Reports | None) -> None:
    """No new reports from now on; the ones in flight are still acknowledged."""
    if reports is not None:
        reports.stopped = True


def write_report_stats(path: str, reports: Reports) -> None:
    """Write the reports sent, acknowledged and refused, with every latency and lag."""
    data = {
        "sent": reports.sent,
        "acked": reports.acked,
        "refused": reports.refused,
        "summaries": reports.summaries,
        "summaries_acked": reports.summaries_acked,
        "backlog_sent": reports.backlog_sent,
        "backlog_acked": reports.backlog_acked,
        "deferred": reports.deferred,
        "busy_dropped": reports.busy_dropped,
        "latency_ms": reports.latency_ms,
        "lag_ms": reports.lag_ms,
        "errors": reports.errors,
        "stopped": reports.stopped,
    }
    temp = f"{path}.tmp"
    Path(temp).write_bytes(orjson.dumps(data))
    os.replace(temp, path)


def write_stats(path: str, records: dict[str, Connections]) -> None:
    """Write every agent's attempts and subscriptions and this process's CPU seconds."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    data = {
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "agents": {
            u: {
                "attempts": r.attempts,
                "subscribed": r.subscribed,
                "hints": r.hints,
                "timeouts": r.timeouts,
            }
            for u, r in records.items()
        },
    }
    temp = f"{path}.tmp"
    Path(temp).write_bytes(orjson.dumps(data))
    os.replace(temp, path)


def options() -> tuple[argparse.Namespace, list[str]]:
    """The command line, and the agent UUIDs (read, or generated and written)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--uuid-file", help="write the agent UUIDs here, one per line")
    parser.add_argument("--uuids", help="read agent UUIDs from this file instead of generating")
    parser.add_argument("--batch", action="store_true")
    parser.add_argument("--connect-concurrency", type=int, default=200)
    parser.add_argument("--reconnect", action="store_true", help="reconnect like the real agent")
    parser.add_argument("--open-timeout", type=float, default=10.0, help="--reconnect: seconds")
    parser.add_argument("--stats", help="--reconnect: on SIGUSR1 write connection stats here")
    parser.add_argument("--report-every-ms", type=int, default=0, help="report a summary every MS")
    parser.add_argument("--backlog", type=int, default=0, help="older summaries per (re)connect")
    parser.add_argument("--report-stats", help="on SIGUSR1 write report stats here")
    parser.add_argument("--report-wait", action="store_true", help="summaries wait for SIGCONT")
    parser.add_argument(
        "--report-drop-busy",
        action="store_true",
        help="a live summary answered 'server busy' is not sent again (as NodeGet's agent)",
    )
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.uuids:
        uuids = Path(args.uuids).read_text().split()[: args.count]
    else:
        uuids = [str(uuid.uuid4()) for _ in range(args.count)]
    if args.uuid_file:
        Path(args.uuid_file).write_text("\n".join(uuids) + "\n")
    return args, uuids


async def main(args: argparse.Namespace, uuids: list[str]) -> None:
    """Hold every subscription; say "ready N" once all are registered."""
    counter = [0]
    gate = asyncio.Semaphore(args.connect_concurrency)
    tasks = []
    records = {u: Connections() for u in uuids} if args.reconnect else {}
    reports = host_reports(args.report_every_ms, args.backlog) if args.report_every_ms else None
    if reports is not None:
        reports.keep_busy = not args.report_drop_busy
    if reports is not None and args.report_wait:
        asyncio.get_running_loop().add_signal_handler(signal.SIGCONT, reports.started.set)
    elif reports is not None:
        reports.started.set()

    def on_usr1() -> None:
        if args.stats:
            write_stats(args.stats, records)
        if args.report_stats and reports is not None:
            write_report_stats(args.report_stats, reports)

    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, on_usr1)
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR2, stop_reports, reports)

    async def start(agent_uuid: str) -> None:
        ready = asyncio.Event()
        async with gate:
            if args.reconnect:
                session = reconnecting(
                    args.url,
                    args.token,
                    agent_uuid,
                    args.batch,
                    ready,
                    counter,
                    records[agent_uuid],
                    args.open_timeout,
                    reports,
                )
            else:
                session = agent(
                    args.url, args.token, agent_uuid, args.batch, ready, counter, None, reports
                )
            task = asyncio.create_task(session)
            tasks.append(task)
            waiter = asyncio.create_task(ready.wait())
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                task.result()

    await asyncio.gather(*(start(u) for u in uuids))
    print(f"ready {counter[0]}", flush=True)
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.gather(*tasks)


if __name__ == "__main__":
    arguments, agent_uuids = options()
    with contextlib.suppress(KeyboardInterrupt):
        try:
            import uvloop

            uvloop.run(main(arguments, agent_uuids))
        except ImportError:
            asyncio.run(main(arguments, agent_uuids))
    sys.exit(0)
