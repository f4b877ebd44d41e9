"""R3: thousands of agents reconnect at once after a server restart.

Load-agent processes (``benchmarks.loadagent --reconnect``) hold the
subscriptions and reconnect with the real agent's backoff; they record every
connection attempt. The server is SIGKILLed and restarted; the driver counts
subscriptions from ``/metrics`` while a caller keeps querying and timing
``task_query_task``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import statistics
import time
from pathlib import Path
from typing import Any

import httpx
import orjson

from benchmarks.faults_common import Background, Outcome, histogram, ms, scenario, wait_for
from benchmarks.faults_crash import connected
from benchmarks.rpc import RpcFailure
from benchmarks.scale import Scale
from benchmarks.services import LoadAgent, TaskdServer, start_load_agents
from benchmarks.stats import percentile

RESUBSCRIBE_TARGET_S = 30.0
QUERY_P99_TARGET_MS = 200.0
PROBE_INTERVAL_S = 0.02
BACKOFF_MIN = (0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 48.0, 48.0, 48.0)
"""The real agent's shortest possible waits (1 s doubling, -20% jitter, 60 s cap)."""


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


def max_attempts(window_s: float) -> int:
    """The most connection attempts the real agent's backoff allows in ``window_s``."""
    attempts, elapsed = 1, 0.0
    for wait in BACKOFF_MIN:
        elapsed += wait
        if elapsed > window_s:
            break
        attempts += 1
    return attempts


async def read_stats(agents: list[LoadAgent]) -> dict[str, Any]:
    """Ask every load agent for its connection stats (SIGUSR1) and merge them."""
    paths = [agent.stats_file for agent in agents if agent.stats_file is not None]
    before = {path: path.stat().st_mtime_ns if path.exists() else 0 for path in paths}
    for agent in agents:
        os.kill(agent.child.pid, signal.SIGUSR1)

    async def written() -> bool:
        return all(p.exists() and p.stat().st_mtime_ns != before[p] for p in paths)

    if not await wait_for(written, 30, interval=0.05):
        raise TimeoutError("the load agents did not write their stats")
    merged: dict[str, Any] = {"cpu_s": 0.0, "agents": {}}
    for path in paths:
        data = orjson.loads(path.read_bytes())
        merged["cpu_s"] += data["cpu_s"]
        merged["agents"].update(data["agents"])
    return merged


async def r3_reconnect_storm(scale: Scale, workdir: Path) -> Outcome:
    """R3: every agent reconnects at once after a restart; callers stay served; no flooding."""
    outcome = Outcome(
        "R3",
        "Reconnect storm after a server restart",
        scale.enforce_targets,
        load=f"{scale.r3_agents:,} simulated agents in {scale.r3_processes} load-agent processes "
        "(the real agent's backoff: 1 s doubling to 60 s, ±20% jitter); one caller running "
        "task_query_task back to back",
        faults="SIGKILL of taskd serve, restarted at once on the same port and database",
    )
    async with scenario(outcome, workdir) as children:
        server = TaskdServer(children, workdir / "server")
        await server.launch()
        agents = await asyncio.to_thread(
            start_load_agents,
            children,
            server.ws_url,
            server.token,
            scale.r3_agents,
            workdir,
            processes=scale.r3_processes,
            reconnect=True,
            stats=True,
        )
        uuids = [u for agent in agents for u in agent.uuids()]
        async with server.rpc() as rpc:
            for agent_uuid in uuids[:200]:
                await rpc.su("task_create_task", agent_uuid, "version")
        calm = await read_stats(agents)
        with QueryProbe(server) as probe:
            await asyncio.sleep(1.0)
            killed_wall, killed = time.time(), time.monotonic()
            server.kill()
            server.start()
            ready = await server.wait_ready()
            ready_at = server.started_at + ready["rpc_s"]

            async def everyone() -> bool:
                return await connected(server) >= scale.r3_agents

            complete = await wait_for(everyone, 180, interval=0.1)
            all_at = time.monotonic()
            await asyncio.sleep(1.0)
            figures = await _storm_figures(
                agents, calm, probe, killed_wall, killed, ready_at, all_at if complete else None
            )
        outcome.figures.update(figures)
        outcome.figures["restart"] = ready
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
            f"at most {figures['max_attempts_per_agent']} attempts per agent in {window} s "
            f"(backoff allows {bound}); shortest gap between attempts "
            f"{figures['shortest_retry_gap_s']} s",
        )
        outcome.check(
            "backoff jitter is visible: first retries spread over ≥ 0.2 s, none before 0.8 s",
            figures["first_retry_spread_s"] >= 0.2 and figures["first_retry_min_s"] >= 0.8,
            f"first retries between {figures['first_retry_min_s']} and "
            f"{figures['first_retry_max_s']} s after the kill",
        )
        outcome.check("the server process is alive at the end", server.alive(), server.log_tail())
    return outcome


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
    for record in stats["agents"].values():
        after = [t for t in record["attempts"] if t >= killed_wall]
        attempts.append(len(after))
        if after:
            first_retry.append(after[0] - killed_wall)
        gaps += [b - a for a, b in itertools.pairwise(after)]
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
        "load_agent_cpu_s_during_storm": round(stats["cpu_s"] - calm["cpu_s"], 2),
    }
