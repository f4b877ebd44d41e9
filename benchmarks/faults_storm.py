"""R3: thousands of agents reconnect at once after a server restart, with metrics on.

Load-agent processes (``benchmarks.loadagent --reconnect``) hold the
subscriptions and reconnect with the real agent's backoff (or the wait a busy
server asks for); they record every connection attempt. Each agent reports like
the real agent: a static report after every (re)connect, then ``BACKLOG_S`` seconds
of buffered summaries, paced like the agent's buffer, and a live summary every
``REPORT_EVERY_MS``. The server is SIGKILLed and restarted; the driver counts
subscriptions from ``/metrics`` while a caller keeps querying and timing
``task_query_task``, until every agent is back, then for ``FLUSH_WINDOW_S`` more
while the backlogs flush (600,000 summaries take minutes to store on a small
machine; each agent keeps what is not sent yet). Then the agents stop reporting and
the summary rows in the database are counted against the reports acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import sqlite3
import statistics
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson

from benchmarks.faults_common import Background, Outcome, histogram, ms, scenario, wait_for
from benchmarks.faults_crash import connected
from benchmarks.procs import PYTHON, BenchError, Children, flags
from benchmarks.rpc import RpcFailure
from benchmarks.scale import Scale
from benchmarks.services import ROOT, LoadAgent, TaskdServer
from benchmarks.stats import percentile

RESUBSCRIBE_TARGET_S = 30.0
QUERY_P99_TARGET_MS = 200.0
PROBE_INTERVAL_S = 0.02
BACKOFF_MIN = (0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 48.0, 48.0, 48.0)
"""The real agent's shortest possible waits (1 s doubling, -20% jitter, 60 s cap)."""
BACKLOG_S = 60
"""Seconds of buffered summaries each agent sends after every (re)connect."""
REPORT_EVERY_MS = 60_000
"""Live summaries: one a minute per agent (10,000 agents at the agent's default of one a
second would be 10,000 reports a second for the server before any storm)."""
FLUSH_WINDOW_S = 60.0
TIMEOUT_BINS_S = [2.0, 4.0, 8.0, 12.0, 16.0, 20.0, 25.0, 30.0]
QUICK_FLUSH_S = 10.0


@dataclass
class ReportingAgents:
    """Load-agent processes that also report, with their report stats files."""

    agents: list[LoadAgent]
    report_files: list[Path]


def start_reporting_agents(
    children: Children, url: str, token: str, count: int, directory: Path, processes: int
) -> ReportingAgents:
    """``count`` reconnecting, reporting subscriptions over ``processes`` load agents."""
    shares = [count // processes + (i < count % processes) for i in range(processes)]
    started: list[tuple[LoadAgent, Path]] = []
    for share in shares:
        tag = uuid.uuid4().hex[:8]
        uuid_file = directory / f"agents-{tag}.txt"
        stats_file = directory / f"loadagent-{tag}.json"
        report_file = directory / f"reports-{tag}.json"
        options = flags(
            url=url,
            token=token,
            count=share,
            uuid_file=uuid_file,
            reconnect=True,
            stats=stats_file,
            report_every_ms=REPORT_EVERY_MS,
            backlog=BACKLOG_S,
            report_stats=report_file,
        )
        argv = [PYTHON, "-m", "benchmarks.loadagent", *options]
        child = children.start("loadagent", argv, pipe_stdout=True, cwd=ROOT)
        started.append((LoadAgent(child, share, uuid_file, stats_file), report_file))
    for agent, _ in started:
        line = agent.child.wait_line("ready", timeout=120 + agent.count / 20)
        if line.split()[1:] != [str(agent.count)]:
            raise BenchError(f"{agent.child.name}: {line!r}, wanted {agent.count} subscriptions")
    return ReportingAgents([a for a, _ in started], [f for _, f in started])


class QueryProbe(Background):
    """A caller timing ``task_query_task`` back to back, server down or up."""

    def __init__(self, server: TaskdServer) -> None:
        self.server = server
        self.samples: list[tuple[float, float, bool]] = []
        """(sent at, seconds taken, answered with a result) per call."""

    async def _run(self) -> None:
        query = {"condition": [{"limit": 10}]}
        async with self.server.rpc(timeout=10) as rpc:
            while True:
                sent = time.monotonic()
                ok = False
                with contextlib.suppress(httpx.HTTPError, RpcFailure, ValueError):
                    ok = len(await rpc.su("task_query_task", query)) > 0
                self.samples.append((sent, time.monotonic() - sent, ok))
                await asyncio.sleep(PROBE_INTERVAL_S)

    def between(self, start: float, end: float) -> list[tuple[float, float, bool]]:
        """Calls sent in [start, end]."""
        return [s for s in self.samples if start <= s[0] <= end]


WATCHED = (
    "taskd_agents_connected",
    "taskd_admission_abandoned_total",
    "taskd_admission_admitted_total",
    "taskd_event_loop_lag_seconds",
    "taskd_admission_deferred_reports_total",
    'taskd_gc_pause_seconds_sum{generation="2"}',
    "taskd_admission_in_progress",
    'taskd_admission_refused_total{reason="busy"}',
    'taskd_admission_refused_total{reason="rate"}',
    'taskd_admission_refused_total{reason="queue"}',
    "taskd_admission_gone_total",
)
"""What the storm's timeline follows from ``/metrics`` (the first is the agents subscribed)."""


async def watched(http: httpx.AsyncClient, server: TaskdServer) -> list[float]:
    """The ``WATCHED`` values right now."""
    text = (await http.get(server.url + "metrics")).text
    values = dict.fromkeys(WATCHED, 0.0)
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in values:
            values[name] = float(value)
    return [round(v, 3) for v in values.values()]


def max_attempts(window_s: float) -> int:
    """The most connection attempts the real agent's backoff allows in ``window_s``."""
    attempts, elapsed = 1, 0.0
    for wait in BACKOFF_MIN:
        elapsed += wait
        if elapsed > window_s:
            break
        attempts += 1
    return attempts


REPORT_COUNTS = ("sent", "acked", "refused", "backlog_sent", "backlog_acked", "deferred")


async def read_stats(agents: list[LoadAgent], report_files: Sequence[Path] = ()) -> dict[str, Any]:
    """Ask every load agent for its connection (and report) stats (SIGUSR1) and merge them."""
    paths = [agent.stats_file for agent in agents if agent.stats_file is not None]
    paths += report_files
    before = {path: path.stat().st_mtime_ns if path.exists() else 0 for path in paths}
    for agent in agents:
        os.kill(agent.child.pid, signal.SIGUSR1)

    async def written() -> bool:
        return all(p.exists() and p.stat().st_mtime_ns != before[p] for p in paths)

    if not await wait_for(written, 180, interval=0.05):
        raise TimeoutError("the load agents did not write their stats")
    merged: dict[str, Any] = {"cpu_s": 0.0, "agents": {}}
    for agent in agents:
        if agent.stats_file is not None:
            data = orjson.loads(agent.stats_file.read_bytes())
            merged["cpu_s"] += data["cpu_s"]
            merged["agents"].update(data["agents"])
    if report_files:
        reports: dict[str, Any] = dict.fromkeys(REPORT_COUNTS, 0) | {"live_acked": 0, "errors": []}
        for path in report_files:
            data = orjson.loads(path.read_bytes())
            for key in REPORT_COUNTS:
                reports[key] += data[key]
            reports["live_acked"] += len(data["lag_ms"])  # one lag per live summary acked
            reports["errors"] += data["errors"][:5]
        merged["reports"] = reports
    return merged


async def r3_reconnect_storm(scale: Scale, workdir: Path) -> Outcome:
    """R3: every agent reconnects at once after a restart; callers stay served; no flooding."""
    outcome = Outcome(
        "R3",
        "Reconnect storm after a server restart",
        scale.enforce_targets,
        load=f"{scale.r3_agents:,} simulated agents in {scale.r3_processes} load-agent processes "
        "(the real agent's backoff: 1 s doubling to 60 s, ±20% jitter, or the server's retry "
        f"hint), each sending a static report and {BACKLOG_S} s of buffered summaries after "
        "every (re)connect (paced like the agent's buffer) and a live summary a minute; "
        "one caller running task_query_task back to back",
        faults="SIGKILL of taskd serve, restarted at once on the same port and database",
    )
    async with scenario(outcome, workdir) as children:
        server = TaskdServer(children, workdir / "server")
        await server.launch()
        fleet = await asyncio.to_thread(
            start_reporting_agents,
            children,
            server.ws_url,
            server.token,
            scale.r3_agents,
            workdir,
            scale.r3_processes,
        )
        agents, report_files = fleet.agents, fleet.report_files
        uuids = [u for agent in agents for u in agent.uuids()]
        async with server.rpc() as rpc:
            for agent_uuid in uuids[:200]:
                await rpc.su("task_create_task", agent_uuid, "version")
        calm = await read_stats(agents, report_files)
        with QueryProbe(server) as probe:
            await asyncio.sleep(1.0)
            killed_wall, killed = time.time(), time.monotonic()
            server.kill()
            server.start()
            ready = await server.wait_ready()
            ready_at = server.started_at + ready["rpc_s"]
            server_cpu_s = server.child.cpu_seconds()

            # one kept-alive connection: a new one per poll would wait in the same queue
            # of connections as the storm (see admission.py), and the count would lag
            timeline: dict[int, list[float]] = {}
            async with httpx.AsyncClient(timeout=5.0) as metrics:

                async def everyone() -> bool:
                    values = await watched(metrics, server)
                    timeline.setdefault(int(time.monotonic() - ready_at), values)
                    return values[0] >= scale.r3_agents

                complete = await wait_for(everyone, 180, interval=0.1)
            all_at = time.monotonic()
            server_cpu_s = server.child.cpu_seconds() - server_cpu_s
            await asyncio.sleep(FLUSH_WINDOW_S if scale.enforce_targets else QUICK_FLUSH_S)
            flushed_at = time.monotonic()
            figures = await _storm_figures(
                agents, calm, probe, killed_wall, killed, ready_at, all_at if complete else None
            )
            after = await read_stats(agents, report_files)
            figures |= _flush_figures(probe, ready_at, flushed_at, calm, after)
        for agent in agents:  # no new reports; the last ones are still acknowledged
            os.kill(agent.child.pid, signal.SIGUSR2)
        await asyncio.sleep(5.0)
        final = await read_stats(agents, report_files)
        figures |= _stored_figures(server, final)
        outcome.figures.update(figures)
        outcome.figures["restart"] = ready
        outcome.figures["server_cpu_s_from_ready_to_all_back"] = round(server_cpu_s, 2)
        outcome.figures["timeline_columns"] = list(WATCHED)
        outcome.figures["timeline_by_second_after_ready"] = timeline
        after_ready = figures["all_resubscribed_after_ready_s"]
        outcome.check(
            "every agent resubscribed by itself",
            complete,
            f"{await connected(server)} of {scale.r3_agents} subscribed after 180 s",
        )
        outcome.check(
            f"all resubscribed within {RESUBSCRIBE_TARGET_S:g} s of the restart",
            complete and after_ready is not None and after_ready <= RESUBSCRIBE_TARGET_S,
            f"{after_ready} s after the server answered again "
            f"({figures['all_resubscribed_after_kill_s']} s after the kill)",
            target=True,
        )
        p99 = figures["query_p99_ms"]
        outcome.check(
            f"task_query_task p99 ≤ {QUERY_P99_TARGET_MS:g} ms during the storm",
            p99 is not None and p99 <= QUERY_P99_TARGET_MS,
            f"p99 {p99} ms over {figures['storm_queries']} calls "
            f"(max {figures['query_max_ms']} ms, {figures['storm_query_failures']} failed)",
            target=True,
        )
        outcome.check(
            f"task_query_task p99 ≤ {QUERY_P99_TARGET_MS:g} ms while the backlogs flush",
            figures["flush_query_p99_ms"] is not None
            and figures["flush_query_p99_ms"] <= QUERY_P99_TARGET_MS,
            f"p99 {figures['flush_query_p99_ms']} ms over {figures['flush_queries']} calls "
            f"from the restart to {figures['flush_window_s']} s after it "
            f"(max {figures['flush_query_max_ms']} ms; "
            f"{figures['backlog_summaries_acked_after_restart']:,} buffered summaries stored "
            "meanwhile)",
            target=True,
        )
        timed_out = {
            when: sum(figures[f"timeouts_{when}_the_websocket_opened"].values())
            for when in ("before", "after")
        }
        outcome.check(
            "no connection attempt ran out of the agent's connect time: every handshake "
            "reached the server and was answered",
            not any(timed_out.values()),
            f"{timed_out['before']} timed out before the WebSocket opened, "
            f"{timed_out['after']} after",
            target=True,
        )
        outcome.check(
            "the backlogs flushed: buffered summaries were stored after the restart",
            figures["backlog_summaries_acked_after_restart"] > 0,
            f"{figures['backlog_summaries_acked_after_restart']:,} acknowledged",
        )
        outcome.check(
            "nothing reported is lost: every acknowledged summary is a row (and no row comes "
            "from nowhere: the surplus is at most what was in flight unacknowledged)",
            figures["summaries_acked"]
            <= figures["summary_rows"]
            <= figures["summaries_acked"] + figures["reports_sent"] - figures["reports_acked"]
            and figures["reports_refused"] == 0,
            f"{figures['summary_rows']:,} summary rows for {figures['summaries_acked']:,} "
            f"acknowledged ({figures['summary_rows'] - figures['summaries_acked']:,} stored "
            "whose reply the kill cut off); "
            f"{figures['reports_refused']} reports refused {figures['report_errors'][:2]}",
        )
        outcome.check(
            "every query sent after the restart was answered",
            figures["storm_query_failures"] == 0,
            f"{figures['storm_query_failures']} failed",
        )
        window = figures["storm_window_s"]
        bound = max_attempts(window)
        outcome.check(
            "no agent spins: attempts per agent within what the backoff allows",
            figures["max_attempts_per_agent"] <= bound
            and figures["shortest_retry_gap_s"] >= BACKOFF_MIN[0] * 0.95,
            f"at most {figures['max_attempts_per_agent']} backoff attempts per agent in {window} s "
            f"(backoff allows {bound}); shortest gap between attempts "
            f"{figures['shortest_retry_gap_s']} s",
        )
        outcome.check(
            "agents refused with a retry hint came back no sooner than the hint",
            figures["retries_before_the_hint"] == 0,
            f"{figures['refused_with_retry_hint']:,} handshakes refused with a hint, "
            f"{figures['retries_before_the_hint']} retried early "
            f"(by up to {figures['earliest_by_s']} s)",
        )
        outcome.check(
            "backoff jitter is visible: first retries spread over ≥ 0.2 s, none before 0.8 s",
            figures["first_retry_spread_s"] >= 0.2 and figures["first_retry_min_s"] >= 0.8,
            f"first retries between {figures['first_retry_min_s']} and "
            f"{figures['first_retry_max_s']} s after the kill",
        )
        outcome.check("the server process is alive at the end", server.alive(), server.log_tail())
    return outcome


def _flush_figures(
    probe: QueryProbe,
    ready_at: float,
    flushed_at: float,
    calm: dict[str, Any],
    after: dict[str, Any],
) -> dict[str, Any]:
    calls = probe.between(ready_at, flushed_at)
    latencies = [c[1] for c in calls]
    acked = after["reports"]["backlog_acked"] - calm["reports"]["backlog_acked"]
    return {
        "flush_window_s": round(flushed_at - ready_at, 1),
        "flush_queries": len(calls),
        "flush_query_p99_ms": ms(percentile(latencies, 99)),
        "flush_query_max_ms": ms(max(latencies, default=None)),
        "backlog_summaries_acked_after_restart": acked,
        "backlog_summaries_per_s_after_restart": round(acked / (flushed_at - ready_at)),
    }


def _stored_figures(server: TaskdServer, final: dict[str, Any]) -> dict[str, Any]:
    """Summary rows per agent in the server's database against what was acknowledged."""
    assert server.db_file is not None
    with contextlib.closing(sqlite3.connect(server.db_file, timeout=30)) as db:
        rows = dict(
            db.execute("SELECT uuid, count(*) FROM dynamic_monitoring_summary GROUP BY uuid")
        )
    reports = final["reports"]
    return {
        "summary_rows": sum(rows.values()),
        "summaries_acked": reports["backlog_acked"] + reports["live_acked"],
        "reports_sent": reports["sent"],
        "reports_acked": reports["acked"],
        "reports_refused": reports["refused"],
        "report_errors": reports["errors"][:5],
        "agents_with_rows": sum(1 for u in final["agents"] if rows.get(u)),
    }


async def _storm_figures(
    agents: list[LoadAgent],
    calm: dict[str, Any],
    probe: QueryProbe,
    killed_wall: float,
    killed: float,
    ready_at: float,
    all_at: float | None,
) -> dict[str, Any]:
    stats = await read_stats(agents)
    end = all_at if all_at is not None else time.monotonic()
    storm = probe.between(ready_at, end)
    latencies = [s[1] for s in storm]
    attempts: list[int] = []
    first_retry: list[float] = []
    gaps: list[float] = []
    hinted = 0
    early: list[float] = []
    timeouts: dict[str, list[float]] = {"before": [], "after": []}
    for record in stats["agents"].values():
        for attempt, opened in record.get("timeouts", ()):
            if attempt >= killed_wall:
                timeouts["after" if opened else "before"].append(attempt - killed_wall)
        after = [t for t in record["attempts"] if t >= killed_wall]
        hints = {t: h for t, h in record.get("hints", ()) if t >= killed_wall}
        hinted += len(hints)
        # a retry the server asked for is not the backoff's: it counts against the hint
        attempts.append(len(after) - sum(1 for a in after[:-1] if a in hints))
        if after:
            first_retry.append(after[0] - killed_wall)
        for a, b in itertools.pairwise(after):
            gaps.append(b - a)
            if a in hints and b - a < hints[a]:
                early.append(round(hints[a] - (b - a), 3))
    ordered = sorted(first_retry)
    spread = (percentile(ordered, 95) or 0.0) - (percentile(ordered, 5) or 0.0) if ordered else 0.0
    attempts_histogram: dict[str, int] = {}
    for count in attempts:
        attempts_histogram[str(count)] = attempts_histogram.get(str(count), 0) + 1
    return {
        "all_resubscribed_after_kill_s": None if all_at is None else round(all_at - killed, 2),
        "all_resubscribed_after_ready_s": None if all_at is None else round(all_at - ready_at, 2),
        "storm_window_s": round(end - killed, 1),
        "storm_queries": len(storm),
        "storm_query_failures": sum(1 for s in storm if not s[2]),
        "query_p50_ms": ms(percentile(latencies, 50)),
        "query_p99_ms": ms(percentile(latencies, 99)),
        "query_max_ms": ms(max(latencies, default=None)),
        "attempts_per_agent": dict(sorted(attempts_histogram.items(), key=lambda i: int(i[0]))),
        "max_attempts_per_agent": max(attempts, default=0),
        "mean_attempts_per_agent": round(statistics.fmean(attempts), 2) if attempts else None,
        "first_retry_min_s": round(min(first_retry, default=0.0), 3),
        "first_retry_max_s": round(max(first_retry, default=0.0), 3),
        "first_retry_spread_s": round(spread, 3),
        "first_retry_histogram_s": histogram(
            first_retry, [0.6, 0.8, 0.9, 1.0, 1.1, 1.2, 1.4, 2.0, 4.0]
        ),
        "retry_gap_histogram_s": histogram(gaps, [0.8, 1.2, 1.6, 2.4, 3.2, 4.8, 6.4, 9.6, 12.8]),
        "shortest_retry_gap_s": round(min(gaps, default=BACKOFF_MIN[0]), 3),
        "refused_with_retry_hint": hinted,
        "retries_before_the_hint": len(early),
        "earliest_by_s": max(early, default=0.0),
        "load_agent_cpu_s_during_storm": round(stats["cpu_s"] - calm["cpu_s"], 2),
        # attempts that ran out of the agent's connect time, by when they started
        "timeouts_before_the_websocket_opened": histogram(timeouts["before"], TIMEOUT_BINS_S),
        "timeouts_after_the_websocket_opened": histogram(timeouts["after"], TIMEOUT_BINS_S),
    }
