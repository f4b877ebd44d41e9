"""P7, P8, P9: host monitoring at fleet scale.

- P7: load agents report a dynamic summary every second (as NodeGet's agent does)
  to one ``taskd serve`` on SQLite: every report stored, ingest lag (report time to
  the acknowledgement, which comes after the commit), server CPU per report, RSS.
  When the fleet is more than the node holds, smaller fleets are measured down to
  the largest that holds (lag p99 ≤ 2 s, every report stored), and the same on one
  and on two nodes sharing PostgreSQL.
- P8: a 30-day ``auto`` summary query for one agent and the multi-last query for the
  whole fleet, on SQLite and PostgreSQL, over rows seeded straight into the database.
- P9: bytes per agent at the default retention, from one agent-day reported at 1 s
  through the store's own writer, pruned by the server's pruner, measured per table.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import math
import os
import random
import signal
import sqlite3
import time
import uuid
from collections.abc import Awaitable, Callable, Generator
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import orjson
import websockets

from benchmarks import seed
from benchmarks.harness import Run
from benchmarks.procs import PYTHON, BenchError, Child, flags, wait_until
from benchmarks.report import ROOT, Row, ms, number
from benchmarks.rpc import Rpc
from benchmarks.services import TaskdServer
from benchmarks.stats import latency_report, percentile
from taskd.agent.monitor import Monitor
from taskd.config import ServerSettings

LAG_TARGET_MS = 2_000
RSS_TARGET_MB = 1024
SUMMARY_TABLE = "dynamic_monitoring_summary"


# --------------------------------------------------------------------------- helpers


def _dsn(server: TaskdServer) -> str:
    assert server.database_url is not None
    return server.database_url.replace("postgresql+asyncpg://", "postgresql://", 1)


def count_rows(server: TaskdServer, table: str = SUMMARY_TABLE) -> int:
    """Rows of ``table``, read straight from the database (not through the server)."""
    query = f"SELECT count(*) FROM {table}"
    if server.database_url is None:
        return int(server.sql(query)[0][0])

    async def fetch() -> int:
        conn = await asyncpg.connect(_dsn(server), timeout=10)
        try:
            return int(await conn.fetchval(query))
        finally:
            await conn.close()

    return asyncio.run(fetch())


class Reporters:
    """Load-agent processes whose agents report every second over their WebSockets."""

    def __init__(self, run: Run, server: TaskdServer, count: int, processes: int) -> None:
        self.run = run
        self.children: list[Child] = []
        self.stats: list[Path] = []
        shares = [count // processes + (i < count % processes) for i in range(processes)]
        for index, share in enumerate(shares):
            stats = server.directory / f"reports-{index}-{time.monotonic_ns()}.json"
            options = flags(
                url=server.ws_url,
                token=server.token,
                count=share,
                reconnect=True,
                report_every_ms=1000,
                report_stats=stats,
                report_wait=True,
                # NodeGet's agent sends every second and reads no answers: a summary the
                # server answers "busy" is gone (taskd's agent would keep it for later)
                report_drop_busy=True,
            )
            argv = [PYTHON, "-m", "benchmarks.loadagent", *options]
            self.children.append(
                run.children.start(f"{server.name}-reporter", argv, pipe_stdout=True, cwd=ROOT)
            )
            self.stats.append(stats)
        self.shares = shares

    def wait_ready(self) -> None:
        """Until every agent is subscribed (and reporting)."""
        for child, share in zip(self.children, self.shares, strict=True):
            line = child.wait_line("ready", timeout=120 + share / 20)
            if line.split()[1:] != [str(share)]:
                raise BenchError(f"{child.name}: {line!r}, wanted {share} subscriptions")

    def signal(self, signum: int) -> None:
        """Send ``signum`` to every load-agent process."""
        for child in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signum)

    def read(self) -> list[dict[str, Any]]:
        """Each process's report stats, written on request."""
        for path in self.stats:
            path.unlink(missing_ok=True)
        self.signal(signal.SIGUSR1)
        wait_until(lambda: all(p.exists() for p in self.stats), "report stats", 60)
        return [orjson.loads(p.read_bytes()) for p in self.stats]

    def stop(self) -> None:
        """Stop the load-agent processes."""
        for child in self.children:
            self.run.children.stop(child)


def ingest(
    run: Run, servers: list[TaskdServer], agents: int, seconds: float, label: str
) -> dict[str, Any]:
    """``agents`` report every second, spread over ``servers``, measured for ``seconds``
    once all report; then reports stop, the last ones are acknowledged, rows are counted."""
    scale = run.scale
    processes = max(1, math.ceil(scale.p7_processes * agents / scale.p7_agents))
    per_server = [agents // len(servers) + (i < agents % len(servers)) for i in range(len(servers))]
    rows_before = count_rows(servers[0])
    groups = [
        Reporters(run, server, share, max(1, processes // len(servers)))
        for server, share in zip(servers, per_server, strict=True)
    ]
    try:
        started = time.monotonic()
        for group in groups:
            group.wait_ready()
        connect_s = time.monotonic() - started

        def statics_answered() -> bool:  # each agent's first report, made at subscription
            stats = [s for group in groups for s in group.read()]
            return int(sum(s["acked"] + s["refused"] for s in stats)) >= agents

        wait_until(statics_answered, "every static report answered", 300, interval=1)
        statics_s = time.monotonic() - started - connect_s
        for group in groups:
            group.signal(signal.SIGCONT)  # the whole fleet subscribed: summaries flow
        time.sleep(3)  # every agent past its first period
        window_start_ms = time.time_ns() // 1_000_000
        rows_start = count_rows(servers[0])
        cpu_start = [s.child.cpu_seconds() for s in servers]
        began = time.monotonic()
        with run.profiled(servers[0], f"p7-{agents}-{len(servers)}n"):
            time.sleep(seconds)
        cpu = sum(s.child.cpu_seconds() - c for s, c in zip(servers, cpu_start, strict=True))
        wall = time.monotonic() - began
        rows_window = count_rows(servers[0]) - rows_start
        window_end_ms = time.time_ns() // 1_000_000
        memory = [s.child.memory() for s in servers]
        for group in groups:
            group.signal(signal.SIGUSR2)  # no new reports; the last ones are answered

        def settled() -> list[dict[str, Any]] | None:
            stats = [s for group in groups for s in group.read()]
            answered = ("acked", "refused", "deferred", "busy_dropped")
            pending = sum(s["sent"] - sum(s[key] for key in answered) for s in stats)
            return stats if pending == 0 else None

        try:
            stats = wait_until(settled, "every report answered", 60, interval=1)
        except BenchError:
            stats = [s for group in groups for s in group.read()]
        rows_total = count_rows(servers[0]) - rows_before
        agent_cpu = [c.cpu_seconds() for group in groups for c in group.children]
    finally:
        for group in groups:
            group.stop()
    lags = [lag for s in stats for t, lag in s["lag_ms"] if window_start_ms <= t <= window_end_ms]
    acks = [
        lat for s in stats for t, lat in s["latency_ms"] if window_start_ms <= t <= window_end_ms
    ]
    summaries = sum(s["summaries"] for s in stats)
    result = {
        "label": label,
        "nodes": len(servers),
        "database": "sqlite" if servers[0].database_url is None else "postgresql",
        "agents": agents,
        "load_agent_processes": sum(len(g.children) for g in groups),
        "connect_s": connect_s,
        "static_reports_s": statics_s,
        "window_s": wall,
        "summaries_sent": summaries,
        "summaries_acked": sum(s["summaries_acked"] for s in stats),
        "reports_sent": sum(s["sent"] for s in stats),
        "reports_acked": sum(s["acked"] for s in stats),
        "reports_refused": sum(s["refused"] for s in stats),
        "summaries_answered_busy": sum(s["busy_dropped"] for s in stats),
        "errors": [e for s in stats for e in s["errors"]][:5],
        "rows_stored": rows_total,
        "rows_in_window": rows_window,
        "stored_per_s": rows_window / wall,
        "lag_p50_ms": percentile(lags, 50),
        "lag_p99_ms": percentile(lags, 99),
        "lag_max_ms": max(lags, default=math.nan),
        "ack_p50_ms": percentile(acks, 50),
        "ack_p99_ms": percentile(acks, 99),
        "server_cpu_s": cpu,
        "server_cpu_share": cpu / wall / len(servers),
        "server_cpu_us_per_report": 1e6 * cpu / rows_window if rows_window else math.nan,
        "server_memory": memory,
        "server_vmhwm_mb": max(m.get("vmhwm_mb", math.nan) for m in memory),
        "load_agent_cpu_s": agent_cpu,
    }
    result["every_report_stored"] = (
        rows_total == summaries and result["summaries_acked"] == summaries
    )
    result["holds"] = bool(
        result["every_report_stored"]
        and result["lag_p99_ms"] <= LAG_TARGET_MS
        and result["server_vmhwm_mb"] <= RSS_TARGET_MB
    )
    print(
        f"[bench] P7 {label}: {agents} agents, {result['stored_per_s']:.0f} stored/s, "
        f"lag p99 {result['lag_p99_ms']:.0f} ms, "
        f"{result['server_cpu_us_per_report']:.0f} us CPU/report, holds={result['holds']}",
        flush=True,
    )
    return result


def _fleet_below(result: dict[str, Any], step: int) -> int:
    """The next fleet to try after ``result`` did not hold: what the server kept up with
    (rows stored a second, or one core over its CPU per report), 10% under, rounded down
    to two significant figures (and to a multiple of ``step``)."""
    kept_up: float = result["stored_per_s"]
    agents: int = result["agents"]
    if kept_up < 0.3 * agents:  # it fell far behind: halve
        guess = agents / 2
    else:
        per_core = 1e6 / result["server_cpu_us_per_report"] * result["nodes"]
        guess = 0.9 * min(kept_up, per_core, 0.85 * agents)
    grain = max(step, int(10 ** max(0, len(str(int(guess))) - 2)))
    return max(step, int(guess // grain) * grain)


def largest_fleet(
    run: Run, start: dict[str, Any], servers: Generator[list[TaskdServer], None, None], label: str
) -> dict[str, Any] | None:
    """Smaller fleets after ``start`` did not hold, until one holds; that one (or None)."""
    scale = run.scale
    step = 100 if scale.p7_agents >= 5_000 else 50
    result = start
    for _ in range(scale.p7_steps):
        fleet = _fleet_below(result, step)
        if fleet >= result["agents"]:
            fleet = result["agents"] - step
        if fleet <= 0:
            return None
        result = ingest(run, next(servers), fleet, scale.p7_step_seconds, label)
        run.data.setdefault("P7", {}).setdefault("runs", []).append(result)
        if result["holds"]:
            return result
    return None


def _sqlite_node(run: Run, name: str) -> Generator[list[TaskdServer], None, None]:
    for attempt in itertools.count(1):
        with run.taskd(f"{name}-{attempt}") as server:
            yield [server]


def _pg_nodes(run: Run, name: str, nodes: int) -> Generator[list[TaskdServer], None, None]:
    for attempt in itertools.count(1):
        with run.taskd(f"{name}-{attempt}a", "postgresql") as first:
            if nodes == 1:
                yield [first]
                continue
            with run.node(first, f"{name}-{attempt}b") as second:
                yield [first, second]


def _figure(result: dict[str, Any]) -> str:
    return (
        f"{number(result['agents'])} agents: {number(result['stored_per_s'])} reports/s stored, "
        f"lag p99 {number(result['lag_p99_ms'])} ms (p50 {number(result['lag_p50_ms'])} ms), "
        f"server {number(result['server_cpu_us_per_report'])} µs CPU per report "
        f"({100 * result['server_cpu_share']:.0f}% of a core"
        + (" each" if result["nodes"] > 1 else "")
        + f"), peak RSS {number(result['server_vmhwm_mb'])} MB"
    )


def _stored(result: dict[str, Any]) -> str:
    busy = result.get("summaries_answered_busy", 0)
    return (
        f"{number(result['rows_stored'])} rows for {number(result['summaries_sent'])} "
        f"summaries sent ({number(result['summaries_acked'])} acknowledged"
        + (f', {number(busy)} answered "server busy" and not stored' if busy else "")
        + ")"
    )


def p7(run: Run) -> None:
    """The full fleet on one SQLite node; if it does not hold, the largest fleet that does,
    on one node and on one and two nodes sharing PostgreSQL."""
    scale = run.scale
    data = run.data.setdefault("P7", {"runs": []})
    target = (
        f"every report stored; lag p99 ≤ {LAG_TARGET_MS // 1000} s; RSS ≤ 1 GB; "
        "CPU per report stated"
    )
    sqlite_node = _sqlite_node(run, "p7")
    try:
        full = ingest(run, next(sqlite_node), scale.p7_agents, scale.p7_seconds, "one node SQLite")
        data["runs"].append(full)
        run.rows.append(
            Row(
                "P7",
                f"{number(scale.p7_agents)} load agents ({scale.p7_processes} processes) each "
                f"reporting a dynamic summary every second over its WebSocket to one "
                f"`taskd serve` (SQLite), {scale.p7_seconds:.0f} s measured",
                _figure(full),
                _stored(full) + f"; one core ÷ CPU per report = "
                f"{number(1e6 / full['server_cpu_us_per_report'])} reports/s",
                target,
                full["holds"],
                {k: full[k] for k in ("lag_p99_ms", "server_cpu_us_per_report", "stored_per_s")},
            )
        )
        if full["holds"]:
            return
        best = largest_fleet(run, full, sqlite_node, "one node SQLite")
    finally:
        sqlite_node.close()
    data["largest_one_node_sqlite"] = best
    if best is not None:
        run.rows.append(
            Row(
                "P7-1n",
                f"the largest fleet at 1 s that one node (SQLite) holds, stepped down from "
                f"{number(scale.p7_agents)} ({scale.p7_step_seconds:.0f} s each)",
                _figure(best),
                _stored(best),
                target,
                None,
                {"agents": best["agents"]},
            )
        )
    start = best["agents"] if best is not None else scale.p7_agents // 2
    for nodes in (1, 2):
        label = f"{'one node' if nodes == 1 else 'two nodes'} PostgreSQL"
        pg = _pg_nodes(run, f"p7-pg{nodes}", nodes)
        try:
            first = ingest(run, next(pg), start * nodes, scale.p7_step_seconds, label)
            data["runs"].append(first)
            held = first if first["holds"] else largest_fleet(run, first, pg, label)
        finally:
            pg.close()
        data[f"largest_{nodes}n_postgresql"] = held
        if held is None:
            smallest = min(
                (r for r in data["runs"] if r["label"] == label), key=lambda r: r["agents"]
            )
            run.rows.append(
                Row(
                    f"P7-pg{'-2n' if nodes == 2 else ''}",
                    f"{label}: no fleet tried held ({scale.p7_step_seconds:.0f} s each; "
                    "agents split over the nodes); the smallest tried",
                    _figure(smallest),
                    _stored(smallest),
                    target,
                    False,
                    {"agents": smallest["agents"]},
                )
            )
            continue
        comparison = _stored(held)
        if nodes == 2 and data.get("largest_1n_postgresql"):
            single = data["largest_1n_postgresql"]["agents"]
            comparison += (
                f"; one node on PostgreSQL held {number(single)} → {held['agents'] / single:.2f}x"
            )
        run.rows.append(
            Row(
                f"P7-pg{'-2n' if nodes == 2 else ''}",
                f"the largest fleet at 1 s that {label} hold"
                + ("s" if nodes == 1 else "")
                + f", stepped down ({scale.p7_step_seconds:.0f} s each; agents split over nodes)",
                _figure(held),
                comparison,
                target,
                None,
                {"agents": held["agents"]},
            )
        )


OLD_LAST = {
    "sqlite": (
        "SELECT s.* FROM dynamic_monitoring_summary AS s JOIN (SELECT wanted.value AS uuid, "
        "(SELECT max(n.time) FROM dynamic_monitoring_summary AS n WHERE n.uuid = wanted.value) "
        "AS time FROM json_each(?) AS wanted) AS last ON s.uuid = last.uuid AND s.time = last.time"
    ),
    "postgresql": (
        "SELECT s.* FROM dynamic_monitoring_summary AS s JOIN (SELECT wanted.uuid AS uuid, "
        "(SELECT max(n.time) FROM dynamic_monitoring_summary AS n WHERE n.uuid = wanted.uuid) "
        "AS time FROM unnest($1::varchar[]) AS wanted(uuid)) AS last "
        "ON s.uuid = last.uuid AND s.time = last.time"
    ),
}
"""The multi-last query before the latest-summary table: the newest time of each agent,
joined back to its row (PostgreSQL plans that join as a hash join over the whole table)."""
NEW_LAST = {
    "sqlite": (
        "SELECT l.uuid, l.point FROM dynamic_monitoring_summary_latest AS l "
        "JOIN json_each(?) AS wanted ON l.uuid = wanted.value"
    ),
    "postgresql": (
        "SELECT l.uuid, l.point FROM dynamic_monitoring_summary_latest AS l "
        "JOIN unnest($1::varchar[]) AS wanted(uuid) ON l.uuid = wanted.uuid"
    ),
}
"""The same from the table of each agent's newest summary, whose rows keep their point's
JSON (what the server runs now for every field)."""
SQL_ROUNDS = 5


def _sql_times(server: TaskdServer, agents: list[str]) -> dict[str, Any]:
    """Median milliseconds of the multi-last SQL before and after, run straight on the
    database (interleaved rounds), and the rows each returned."""
    database = "sqlite" if server.database_url is None else "postgresql"
    times: dict[str, list[float]] = {"before": [], "after": []}
    rows: dict[str, int] = {}
    if database == "sqlite":
        assert server.db_file is not None
        db = sqlite3.connect(f"file:{server.db_file}?mode=ro", uri=True)
        try:
            arg = orjson.dumps(agents).decode()
            for _ in range(SQL_ROUNDS):
                for label, sql in (("before", OLD_LAST), ("after", NEW_LAST)):
                    started = time.perf_counter()
                    rows[label] = len(db.execute(sql[database], (arg,)).fetchall())
                    times[label].append(1000 * (time.perf_counter() - started))
        finally:
            db.close()
    else:

        async def measure() -> None:
            conn = await asyncpg.connect(_dsn(server), timeout=10)
            try:
                for _ in range(SQL_ROUNDS):
                    for label, sql in (("before", OLD_LAST), ("after", NEW_LAST)):
                        started = time.perf_counter()
                        rows[label] = len(await conn.fetch(sql[database], agents))
                        times[label].append(1000 * (time.perf_counter() - started))
            finally:
                await conn.close()

        asyncio.run(measure())
    return {
        "before_ms": percentile(times["before"], 50),
        "after_ms": percentile(times["after"], 50),
        "rows": rows,
    }


Between = Callable[[Rpc, int], Awaitable[None]]
"""What happens before each timed call (its index given), not timed."""


def _timed_calls(
    server: TaskdServer,
    calls: int,
    method: str,
    *params: Any,
    between: Between | None = None,
    reply_file: Path | None = None,
) -> dict[str, Any]:
    """``calls`` sequential calls over HTTP keep-alive, after a first one timed apart (the
    server has kept nothing of the query yet): latencies and the last answer; with
    ``reply_file``, the last reply's bytes are written there."""

    reply = b""

    async def measure() -> dict[str, Any]:
        nonlocal reply
        async with Rpc(server.url, server.token, timeout=120) as rpc:
            started = time.perf_counter()
            answer = await rpc.su(method, *params)
            first = time.perf_counter() - started
            seconds = []
            for index in range(calls):
                if between is not None:
                    await between(rpc, index)
                started = time.perf_counter()
                answer = await rpc.su(method, *params)
                seconds.append(time.perf_counter() - started)
            if reply_file is not None:
                body = {"jsonrpc": "2.0", "method": method, "params": [rpc.token, *params]}
                reply = (await rpc.http.post("/", content=orjson.dumps(body | {"id": 1}))).content
        return latency_report(seconds) | {"first_ms": 1000 * first, "answer": answer}

    measured = asyncio.run(measure())
    if reply_file is not None:
        reply_file.write_bytes(reply)
    return measured


def _floor_calls(run: Run, reply_file: Path, calls: int) -> dict[str, Any]:
    """The same reply from the bare Starlette floor (``benchmarks.floor``'s ``/file``),
    read and decoded by the same client: what moving and decoding it costs alone."""
    path = str(reply_file).encode()

    async def measure(url: str) -> dict[str, Any]:
        async with Rpc(url, timeout=120) as rpc:
            seconds = []
            for _ in range(calls + 1):
                started = time.perf_counter()
                orjson.loads((await rpc.http.post("/file", content=path)).content)
                seconds.append(time.perf_counter() - started)
        return latency_report(seconds[1:])

    with run.floor("p8-floor") as url:
        return asyncio.run(measure(url)) | {"bytes": reply_file.stat().st_size}


def _seed(
    seeded: dict[str, Any], agents: list[str], recent: int, now: int, server: TaskdServer
) -> None:
    """Seed the monitoring rows of P8 into ``server``'s database before it starts."""
    if server.database_url is None:
        assert server.db_file is not None
        seeded.update(seed.seed_monitoring(server.db_file, agents, recent, now))
    else:
        seeded.update(seed.run_seed_monitoring_pg(_dsn(server), agents, recent, now))


async def _report_into_window(agent: str, end_ms: int, rpc: Rpc, index: int) -> None:
    """One more summary of ``agent`` just before ``end_ms`` (a time none was seeded at), as
    its agent reports while a dashboard refreshes its chart: the newest bucket changes."""
    row = seed._summary(random.Random(index), agent, end_ms - 1000 * index - 500)
    del row["storage_time"]
    await rpc.su("agent_report_dynamic_summary", row)


def p8(run: Run) -> None:
    """A 30-day ``auto`` summary query for one agent (while it reports) and the multi-last
    query for the fleet, on SQLite and PostgreSQL over seeded rows at the default
    retention; and the same reply from the bare floor."""
    scale = run.scale
    agents = seed.agent_uuids(scale.p8_agents)
    now = time.time_ns() // 1_000_000
    data = run.data.setdefault("P8", {})
    for database in ("sqlite", "postgresql"):
        seeded: dict[str, Any] = {}
        prepare = functools.partial(_seed, seeded, agents, scale.p8_rows_per_agent, now)
        reply_file = run.workdir / f"p8-{database}-reply.json"
        with run.taskd(f"p8-{database}", database, prepare=prepare) as server:
            window = {"timestamp_from_to": [now - 30 * 86_400_000, now]}
            query = {"fields": [], "condition": [{"uuid": agents[0]}, window], "resolution": "auto"}
            auto = _timed_calls(
                server,
                scale.p8_calls,
                "agent_query_dynamic_summary",
                query,
                between=functools.partial(_report_into_window, agents[0], now),
                reply_file=reply_file,
            )
            points = auto.pop("answer")
            last = _timed_calls(
                server,
                max(3, scale.p8_calls // 5),
                "agent_dynamic_summary_multi_last_query",
                agents,
                [],
            )
            answered = last.pop("answer")
            sql = _sql_times(server, agents)
        floor = _floor_calls(run, reply_file, scale.p8_calls)
        resolutions = sorted({p.get("resolution", "raw") for p in points})
        data[database] = {
            "seeded": seeded,
            "auto": auto,
            "auto_floor": floor,
            "multi_last": last,
            "sql": sql,
        }
        data[database]["auto"]["points"] = len(points)
        data[database]["auto"]["resolutions"] = resolutions
        data[database]["multi_last"]["rows"] = len(answered)
        if len(answered) != len(agents):
            raise BenchError(f"multi-last answered {len(answered)} of {len(agents)} agents")
        name = "SQLite" if database == "sqlite" else "PostgreSQL"
        run.rows.append(
            Row(
                f"P8-auto{'-pg' if database == 'postgresql' else ''}",
                f"`agent_query_dynamic_summary` over 30 days, `resolution: auto`, one agent "
                f"seeded at the default retention, reporting a summary before each call "
                f"({name}, HTTP keep-alive)",
                f"p50 {ms(auto['p50_ms'])}, p99 {ms(auto['p99_ms'])}; "
                f"first call {ms(auto['first_ms'])}",
                f"{len(points)} points at {'/'.join(resolutions)} "
                f"({number(seeded.get('summaries', 0))} summaries, "
                f"{number(seeded.get('rollups', 0))} rollup rows "
                f"seeded); the same {floor['bytes'] / 1e6:.1f} MB reply from the bare "
                f"Starlette floor: p50 {ms(floor['p50_ms'])}",
                "p50 ≤ 20 ms",
                auto["p50_ms"] <= 20,
                {"p50_ms": auto["p50_ms"], "floor_p50_ms": floor["p50_ms"]},
            )
        )
        run.rows.append(
            Row(
                f"P8-last{'-pg' if database == 'postgresql' else ''}",
                f"`agent_dynamic_summary_multi_last_query` for {number(len(agents))} agents, "
                f"every field ({name}, HTTP keep-alive)",
                f"p50 {ms(last['p50_ms'])}, p99 {ms(last['p99_ms'])}",
                f"the SQL alone, same run: before (newest time per agent joined back to its "
                f"row) {ms(sql['before_ms'])} → after (latest-summary table, points kept "
                f"encoded) "
                f"{ms(sql['after_ms'])}",
                "p50 ≤ 200 ms",
                last["p50_ms"] <= 200,
                {"p50_ms": last["p50_ms"], "sql_before_ms": sql["before_ms"]},
            )
        )


P9_TABLES = (
    "dynamic_monitoring_summary",
    "dynamic_monitoring_summary_rollup",
    "dynamic_monitoring_summary_latest",
    "dynamic_monitoring",
    "static_monitoring",
)
DAY_S = 86_400
YEAR_DAYS = 365
P9_TARGET_GB = 20


async def _report_day(url: str, token: str, agent: str, now_ms: int, seconds: int) -> int:
    """One agent's day as the agent reports it: a static report, a summary a second for
    ``seconds`` up to now, and a dynamic report a second for the last hour, over one
    WebSocket in JSON-RPC batches (each sent once the previous was answered)."""
    monitor = Monitor(agent)
    static = monitor.static()
    dynamic = monitor.dynamic()
    rng = random.Random(9)
    calls: list[dict[str, Any]] = [{"method": "agent_report_static", "report": static}]
    for i in range(seconds, 0, -1):
        row = seed._summary(rng, agent, now_ms - i * 1000)
        del row["storage_time"]
        calls.append({"method": "agent_report_dynamic_summary", "report": row})
    for i in range(3600, 0, -1):
        calls.append(
            {"method": "agent_report_dynamic", "report": {**dynamic, "time": now_ms - i * 1000}}
        )
    stored = 0
    async with websockets.connect(url, max_size=None, compression=None, proxy=None) as ws:
        for start in range(0, len(calls), 500):
            batch = [
                {"jsonrpc": "2.0", "method": c["method"], "params": [token, c["report"]], "id": n}
                for n, c in enumerate(calls[start : start + 500], start)
            ]
            await ws.send(orjson.dumps(batch).decode())
            replies = orjson.loads(await ws.recv())
            errors = [r["error"] for r in replies if "error" in r]
            if errors:
                raise BenchError(f"reports refused: {errors[:3]}")
            stored += len(replies)
    return stored


def _table_bytes(server: TaskdServer) -> dict[str, dict[str, int]]:
    """Bytes (table and its indexes) and rows of each monitoring table, compacted first
    (SQLite: VACUUM, then dbstat; PostgreSQL: VACUUM FULL, then pg_total_relation_size)."""
    found: dict[str, dict[str, int]] = {}
    if server.database_url is None:
        assert server.db_file is not None
        db = sqlite3.connect(server.db_file)
        try:
            db.execute("VACUUM")
            for table in P9_TABLES:
                pages = db.execute(
                    "SELECT coalesce(sum(pgsize), 0) FROM dbstat WHERE name = ? OR name IN "
                    "(SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = ?)",
                    (table, table),
                ).fetchone()[0]
                rows = db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                found[table] = {"bytes": int(pages), "rows": int(rows)}
        finally:
            db.close()
        return found

    async def measure() -> None:
        conn = await asyncpg.connect(_dsn(server), timeout=10)
        try:
            for table in P9_TABLES:
                await conn.execute(f"VACUUM FULL {table}")
                size = await conn.fetchval("SELECT pg_total_relation_size($1::regclass)", table)
                rows = await conn.fetchval(f"SELECT count(*) FROM {table}")
                found[table] = {"bytes": int(size), "rows": int(rows)}
        finally:
            await conn.close()

    asyncio.run(measure())
    return found


def _pruned(server: TaskdServer, summaries: int, dynamic: int) -> bool:
    """Whether no more than the retention's summaries and dynamic reports are left."""
    return (
        count_rows(server, SUMMARY_TABLE) <= summaries + 5
        and count_rows(server, "dynamic_monitoring") <= dynamic + 5
    )


def _prune_settings(server: TaskdServer) -> None:
    server.env["TASKD_MONITORING_PRUNE_INTERVAL_S"] = "1"


def p9(run: Run) -> None:
    """Bytes per agent at the default retention: one agent-day reported at 1 s through the
    server, pruned by its pruner, measured per table; a year of 1,000 agents projected."""
    kept = ServerSettings  # the defaults
    seconds = DAY_S if run.scale.name == "full" else 4 * 3600
    data = run.data.setdefault("P9", {})
    for database in ("sqlite", "postgresql"):
        agent = str(uuid.uuid4())
        now = time.time_ns() // 1_000_000
        with run.taskd(f"p9-{database}", database, prepare=_prune_settings) as server:
            started = time.monotonic()
            reports = asyncio.run(_report_day(server.ws_url, server.token, agent, now, seconds))
            report_s = time.monotonic() - started
            raw_kept = min(seconds, kept.monitoring_summary_retention_s)
            pruned = functools.partial(
                _pruned, server, raw_kept, kept.monitoring_dynamic_retention_s
            )
            wait_until(pruned, "the pruner to reach the default retention", 300, interval=1)
            sizes = _table_bytes(server)
        per_row = {t: v["bytes"] / v["rows"] if v["rows"] else 0.0 for t, v in sizes.items()}
        minute_rows = kept.monitoring_rollup_1m_retention_s // 60
        hour_rows = min(kept.monitoring_rollup_1h_retention_s, YEAR_DAYS * DAY_S) // 3600
        year = {  # one agent after a year at 1 s, at the default retention
            "dynamic_monitoring_summary": kept.monitoring_summary_retention_s
            * per_row["dynamic_monitoring_summary"],
            "dynamic_monitoring_summary_rollup": (minute_rows + hour_rows)
            * per_row["dynamic_monitoring_summary_rollup"],
            "dynamic_monitoring_summary_latest": sizes["dynamic_monitoring_summary_latest"][
                "bytes"
            ],
            "dynamic_monitoring": kept.monitoring_dynamic_retention_s
            * per_row["dynamic_monitoring"],
            "static_monitoring": sizes["static_monitoring"]["bytes"],
        }
        agent_year = sum(year.values())
        fleet_gb = 1000 * agent_year / 1e9
        day_bytes = sum(v["bytes"] for v in sizes.values())
        data[database] = {
            "reports": reports,
            "report_s": report_s,
            "seconds_reported": seconds,
            "tables": sizes,
            "bytes_per_row": per_row,
            "agent_year_bytes": year,
            "fleet_1000_year_gb": fleet_gb,
        }
        name = "SQLite" if database == "sqlite" else "PostgreSQL"
        rollup_row = per_row["dynamic_monitoring_summary_rollup"]
        run.rows.append(
            Row(
                f"P9{'-pg' if database == 'postgresql' else ''}",
                f"storage at the default retention ({name}): one agent's "
                f"{seconds / 3600:.0f} h at 1 s (summaries, dynamic reports for the last hour, "
                f"a static report) through the server, then its pruner",
                f"{number(day_bytes / 1e6, 1)} MB for those {seconds / 3600:.0f} h after pruning; "
                f"{number(agent_year / 1e6, 1)} MB per agent after a year; "
                f"1,000 agents x 1 year = {fleet_gb:.1f} GB",
                f"a year per agent = {kept.monitoring_summary_retention_s:,} raw summaries x "
                f"{per_row['dynamic_monitoring_summary']:.0f} B + "
                f"{kept.monitoring_dynamic_retention_s:,} dynamic reports x "
                f"{per_row['dynamic_monitoring']:.0f} B + ({minute_rows:,} 1-min + "
                f"{hour_rows:,} 1-h rollups) x {rollup_row:.0f} B + latest and static rows "
                f"(bytes per row measured, tables and indexes, compacted); after the first "
                f"{kept.monitoring_rollup_1m_retention_s // DAY_S} days an agent grows by 24 "
                f"rollup rows = {24 * rollup_row / 1e3:.1f} kB a day",
                f"1,000 agents x 1 year ≤ {P9_TARGET_GB} GB",
                fleet_gb <= P9_TARGET_GB,
                {"fleet_1000_year_gb": fleet_gb, "agent_year_mb": agent_year / 1e6},
            )
        )
