"""R6: PostgreSQL goes away under load and comes back.

The scenario runs its own PostgreSQL (``initdb`` into a temporary directory,
``pg_ctl`` on a free loopback port), never the shared one: stopping that would
break everyone else's tests. Callers keep creating tasks, waiting on blocking
round trips and querying while the database is stopped and started again;
every call is timed and every acknowledgement recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import pwd
import random
import shutil
import subprocess
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import httpx

from benchmarks.faults_common import Outcome, check_stored, metric, ms, scenario, wait_for
from benchmarks.faults_relay import WsRecorder
from benchmarks.procs import Children, free_port
from benchmarks.rpc import RpcFailure
from benchmarks.scale import Scale
from benchmarks.services import AgentProcess, TaskdServer, start_load_agents
from benchmarks.shutdown import completed
from benchmarks.stats import percentile

CALLERS = 6
BLOCKING_TIMEOUT_MS = 3_000
CONNECT_TIMEOUT_S = 5.0
"""The store's database connect timeout: no plain call may take longer than this (+1 s)."""
FAIL_FAST_TARGET_S = 1.0
RECOVERY_LIMIT_S = 60.0
RECOVERY_TARGET_S = 10.0


class PrivatePostgres:
    """A throwaway PostgreSQL cluster of this scenario's own."""

    def __init__(self) -> None:
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        if not bins:
            raise RuntimeError("no PostgreSQL server binaries under /usr/lib/postgresql")
        self.bindir = Path(bins[-1]).parent
        self.root = Path(tempfile.mkdtemp(prefix="taskd-faults-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.as_postgres = os.geteuid() == 0  # initdb refuses to run as root

    @property
    def url(self) -> str:
        """The taskd database on this cluster."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/taskd"

    def _run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        prefix = ["runuser", "-u", "postgres", "--"] if self.as_postgres else []
        return subprocess.run(
            [*prefix, *argv], capture_output=True, text=True, timeout=120, check=check
        )

    async def _command(self, *argv: str) -> None:
        """A cluster command in a thread, always to its end: a cluster started after its
        cleanup ran would outlive the run."""
        await completed(asyncio.to_thread(self._run, *argv))

    async def create(self) -> None:
        """initdb, start, and create the taskd database."""
        if self.as_postgres:
            account = pwd.getpwnam("postgres")
            os.chown(self.root, account.pw_uid, account.pw_gid)
        await self._command(
            str(self.bindir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-sync",
        )
        await self.start()
        admin = await asyncpg.connect(
            f"postgresql://postgres@127.0.0.1:{self.port}/postgres", timeout=10
        )
        try:
            await admin.execute("CREATE DATABASE taskd")
        finally:
            await admin.close()

    async def start(self) -> None:
        """Start the cluster and wait until it accepts connections."""
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root}"
        await self._command(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.root / "postgres.log"),
            "-o",
            options,
            "-w",
            "-t",
            "60",
            "start",
        )

    async def stop(self, mode: str = "fast") -> None:
        """Stop the cluster (``fast``: roll back and disconnect; ``immediate``: crash)."""
        await self._command(
            str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"
        )

    def destroy(self) -> None:
        """Stop whatever still runs and delete the cluster."""
        if self.data.exists():
            self._run(
                str(self.bindir / "pg_ctl"),
                "-D",
                str(self.data),
                "-m",
                "immediate",
                "stop",
                check=False,
            )
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class Call:
    """One timed call."""

    method: str
    started: float
    took: float
    outcome: str
    """"ok", "error <code>", or the client exception's name."""


@dataclass
class Load:
    """Callers creating, waiting and querying, recording every call and acknowledgement."""

    server: TaskdServer
    agents: list[str]
    calls: list[Call] = field(default_factory=list)
    acked: dict[int, str] = field(default_factory=dict)
    blocking_results: dict[int, dict[str, Any]] = field(default_factory=dict)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        """Call until stopped."""
        await asyncio.gather(*(self._caller(i) for i in range(CALLERS)))

    async def _caller(self, index: int) -> None:
        rng = random.Random(index)
        async with self.server.rpc(timeout=30) as rpc:
            while not self.stop.is_set():
                agent_uuid = rng.choice(self.agents)
                kind = ("create", "create", "blocking", "query")[index % 4]
                started = time.monotonic()
                outcome = "ok"
                try:
                    if kind == "create":
                        method = "task_create_task"
                        created = await rpc.su(method, agent_uuid, "version")
                        self.acked[int(created["id"])] = agent_uuid
                    elif kind == "blocking":
                        method = "task_create_task_blocking"
                        result = await rpc.su(method, agent_uuid, "version", BLOCKING_TIMEOUT_MS)
                        self.blocking_results[int(result["task_id"])] = result
                    else:
                        method = "task_query_task"
                        await rpc.su(method, {"condition": [{"limit": 5}]})
                except RpcFailure as exc:
                    outcome = f"error {exc.code}"
                except (httpx.HTTPError, ValueError) as exc:
                    outcome = type(exc).__name__
                self.calls.append(Call(method, started, time.monotonic() - started, outcome))
                await asyncio.sleep(0.01)


def _limit(call: Call) -> float:
    """How long a call may take: its own timeout, or the database connect timeout."""
    if call.method == "task_create_task_blocking":
        return BLOCKING_TIMEOUT_MS / 1000 + 1.0
    return CONNECT_TIMEOUT_S + 1.0


async def r6_database_restart(scale: Scale, workdir: Path) -> Outcome:
    """R6: PostgreSQL stops and starts under load: fast 103s, self-recovery, nothing lost."""
    modes = ["fast", "immediate"] if scale.enforce_targets else ["fast"]
    outcome = Outcome(
        "R6",
        "Restart PostgreSQL under load",
        scale.enforce_targets,
        load=f"{CALLERS} callers (task_create_task, blocking round trips with a "
        f"{BLOCKING_TIMEOUT_MS} ms timeout, task_query_task) to {scale.r6_agents} agents "
        "(reconnecting load agents"
        + (" and a real taskd agent" if scale.enforce_targets else "")
        + "), on a private PostgreSQL",
        faults=", then ".join(
            f"pg_ctl stop -m {m}, {scale.r6_outage_s:g} s down, start" for m in modes
        ),
    )
    pg = PrivatePostgres()
    try:
        async with scenario(outcome, workdir) as children, contextlib.AsyncExitStack() as stack:
            await pg.create()
            server = TaskdServer(
                children,
                workdir / "server",
                database_url=pg.url,
                env={"TASKD_TASK_DEADLINE_MS": "10000", "TASKD_REAPER_INTERVAL_MS": "500"},
            )
            await server.launch()
            pid = server.pid
            recorder = await stack.enter_async_context(WsRecorder(server.ws_url))
            agents, real = await _agents(children, server, recorder.url, workdir, scale)
            load = Load(server, agents)
            running = asyncio.create_task(load.run())
            outages = []
            for mode in modes:
                await asyncio.sleep(3.0)
                outages.append(await _outage(pg, mode, scale.r6_outage_s, load))
            load.stop.set()
            await running

            async def settled() -> bool:
                async with server.rpc(timeout=10) as rpc:
                    query = {"condition": ["is_running", "last"]}
                    idle = not await rpc.su("task_query_task", query)
                return idle and (real is None or real.spooled() == (0, 0))

            settled_in_time = await wait_for(settled, 90, interval=0.5)
            rows = await server.task_rows()
            subscribed = await metric(server.url, "taskd_agents_connected")
            _r6_checks(outcome, load, recorder.record, rows, outages, settled_in_time)
            outcome.check(
                "the server kept running (same process throughout)",
                server.alive() and server.pid == pid,
                server.log_tail(),
            )
            outcome.check(
                "every agent is subscribed again at the end",
                subscribed == len(agents),
                f"{subscribed} of {len(agents)} subscribed",
            )
            if real is not None:
                outcome.check(
                    "the real agent's spool drained (results of the outage delivered after it)",
                    real.spooled() == (0, 0),
                    f"spool (waiting, unreadable): {real.spooled()}",
                )
            server.stop()
    finally:
        pg.destroy()
    return outcome


async def _agents(
    children: Children, server: TaskdServer, url: str, workdir: Path, scale: Scale
) -> tuple[list[str], AgentProcess | None]:
    (loadagent,) = await asyncio.to_thread(
        start_load_agents, children, url, server.token, scale.r6_agents, workdir, reconnect=True
    )
    agents = loadagent.uuids()
    real = None
    if scale.enforce_targets:
        real_uuid = str(uuid.uuid4())
        token = await server.agent_token(real_uuid)
        real = AgentProcess(children, workdir / "agent", url, token, real_uuid, "version")
        real.start()
        agents.append(real_uuid)

    async def all_in() -> bool:
        return (await metric(server.url, "taskd_agents_connected") or 0) >= len(agents)

    if not await wait_for(all_in, 60):
        raise TimeoutError("the agents did not subscribe")
    return agents, real


async def _outage(pg: PrivatePostgres, mode: str, down_s: float, load: Load) -> dict[str, Any]:
    stopping = time.monotonic()
    await pg.stop(mode)
    down = time.monotonic()
    await asyncio.sleep(down_s)
    starting = time.monotonic()
    await pg.start()
    up = time.monotonic()

    def recovered() -> Call | None:
        return next(
            (
                c
                for c in load.calls
                if c.method == "task_create_task" and c.started >= up and c.outcome == "ok"
            ),
            None,
        )

    async def back() -> bool:
        return recovered() is not None

    await wait_for(back, RECOVERY_LIMIT_S, interval=0.05)
    first = recovered()
    return {
        "mode": mode,
        "stopping_s": round(down - stopping, 2),
        "down_from": down,
        "down_to": starting,
        "up_at": up,
        "recovered_after_s": None if first is None else round(first.started + first.took - up, 2),
    }


def _r6_checks(
    outcome: Outcome,
    load: Load,
    record: Any,
    rows: dict[int, dict[str, Any]],
    outages: list[dict[str, Any]],
    settled: bool,
) -> None:
    during = [
        c for c in load.calls if any(o["down_from"] <= c.started <= o["down_to"] for o in outages)
    ]
    outcomes = Counter(c.outcome for c in during)
    slow = [c for c in during if c.took > _limit(c)]
    plain = [c.took for c in during if c.method != "task_create_task_blocking"]
    outcome.check(
        "calls were made while the database was down",
        len(during) > 0,
        "no call fell inside an outage",
    )
    outcome.check(
        "every call during the outage failed with 103",
        set(outcomes) == {"error 103"},
        f"outcomes: {dict(outcomes)}",
    )
    outcome.check(
        "no call hung past its timeout",
        not slow,
        f"{len(slow)} too slow, e.g. {[(c.method, round(c.took, 2)) for c in slow[:5]]}",
    )
    slowest = max(plain, default=None)
    outcome.check(
        f"calls failed fast (slowest non-blocking call ≤ {FAIL_FAST_TARGET_S:g} s)",
        slowest is not None and slowest <= FAIL_FAST_TARGET_S,
        f"slowest {ms(slowest)} ms, p99 {ms(percentile(plain, 99))} ms",
        target=True,
    )
    recoveries = [o["recovered_after_s"] for o in outages]
    outcome.check(
        "the server recovered by itself once the database was back",
        all(r is not None for r in recoveries),
        f"recovered after {recoveries} s",
    )
    outcome.check(
        f"recovery within {RECOVERY_TARGET_S:g} s",
        all(r is not None and r <= RECOVERY_TARGET_S for r in recoveries),
        f"recovered after {recoveries} s",
        target=True,
    )
    lost = check_stored(outcome, load.acked, record.acked, rows, settled)
    lost_blocking = [
        task_id
        for task_id, result in load.blocking_results.items()
        if rows.get(task_id, {}).get("result") != result["task_event_result"]
    ]
    outcome.check(
        "every result a blocking caller received is stored",
        not lost_blocking,
        f"{len(lost_blocking)} not stored, e.g. {lost_blocking[:5]}",
    )
    all_calls = Counter(c.outcome for c in load.calls)
    outcome.figures.update(
        {
            "calls": len(load.calls),
            "call_outcomes": dict(all_calls),
            "outage_calls": len(during),
            "outage_outcomes": dict(outcomes),
            "slowest_outage_call_ms": ms(slowest),
            "outage_call_p99_ms": ms(percentile(plain, 99)),
            "outages": [
                {k: v for k, v in o.items() if k not in ("down_from", "down_to", "up_at")}
                for o in outages
            ],
            "recovered_after_s": max((r for r in recoveries if r is not None), default=None),
            "creates_acknowledged": len(load.acked),
            "uploads_acknowledged": len(record.acked),
            "blocking_results": len(load.blocking_results),
            "task_rows": len(rows),
            "lost": lost + len(lost_blocking),
        }
    )
