"""The scenarios of the performance table (P1..P6) and the Celery peer, one function each.

Each one starts what it needs on a fresh server, measures, and appends its
rows (figure, comparison, target, pass/fail) and raw figures to the run.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime
import importlib.util
import math
import os
import resource
import socket
import time
import urllib.parse
import uuid
from collections.abc import Callable
from typing import Any

from benchmarks import seed
from benchmarks.harness import Run
from benchmarks.procs import PYTHON, BenchError, check_alive, flags, wait_until
from benchmarks.report import ROOT, Row, ms, number
from benchmarks.scale import QUICK
from benchmarks.services import AgentProcess, TaskdServer, now_ms
from benchmarks.stats import percentile

REDIS_URL = os.environ.get("TASKD_BENCH_REDIS", "redis://127.0.0.1:6379/9")
CELERY_POOLS = (("prefork", 2), ("prefork", 4), ("threads", 4), ("solo", 1), ("gevent", 64))
"""Celery's worker pools tried in every run; on 2 cores which one wins changes with the load."""
EVERY_SECOND = "* * * * * *"


# --------------------------------------------------------------------------- P1


def p1(run: Run) -> None:
    """server_hello over HTTP keep-alive vs the Starlette echo floor (and over WebSocket)."""
    scale = run.scale
    with run.floor("floor") as floor:
        floor_url = f"{floor}/"
        with run.taskd("p1") as server:
            floor_runs, taskd_runs = [], []
            server_cpu = 0.0
            # interleaved rounds, best of each: a burst of other load on the machine hits
            # both sides alike
            for index in range(scale.http_rounds):
                floor_runs.append(run.http_rate(floor_url, f"p1-floor-{index}"))
                before = server.child.cpu_seconds()
                taskd_runs.append(run.http_rate(server.url, f"p1-taskd-{index}"))
                server_cpu += server.child.cpu_seconds() - before
            seconds = scale.ws_seconds
            ws_floor = run.caller(
                "p1-ws-floor", "ws", url=floor_url.replace("http", "ws", 1), seconds=seconds
            )
            ws_taskd = run.caller("p1-ws-taskd", "ws", url=server.ws_url, seconds=seconds)
            memory = server.child.memory()
    best_floor = max(floor_runs, key=lambda r: r["requests_per_s"])
    best = max(taskd_runs, key=lambda r: r["requests_per_s"])
    ratio = best["requests_per_s"] / best_floor["requests_per_s"]
    ws_ratio = ws_taskd["messages_per_s"] / ws_floor["messages_per_s"]
    errors = sum(r["errors"] for r in floor_runs + taskd_runs)
    run.data["P1"] = {
        "floor_http": floor_runs,
        "taskd_http": taskd_runs,
        "ratio": ratio,
        "taskd_server_cpu_s": server_cpu,
        "floor_ws": ws_floor,
        "taskd_ws": ws_taskd,
        "ws_ratio": ws_ratio,
        "taskd_memory": memory,
    }
    run.rows.append(
        Row(
            "P1",
            f"`server_hello` over HTTP, {scale.http_connections} keep-alive connections "
            f"({best['generator']}, best of {scale.http_rounds})",
            f"{number(best['requests_per_s'])} req/s "
            f"(p50 {ms(best['p50_ms'])}, p99 {ms(best['p99_ms'])})",
            f"echo floor {number(best_floor['requests_per_s'])} req/s → {ratio:.0%}",
            "≥ 50% of the floor",
            ratio >= 0.5 and errors == 0,
            {"requests_per_s": best["requests_per_s"], "ratio": ratio, "errors": errors},
        )
    )
    run.rows.append(
        Row(
            "P1-ws",
            f"`server_hello` over WebSocket, {ws_taskd['connections']} connections pipelining "
            f"{ws_taskd['window']} each",
            f"{number(ws_taskd['messages_per_s'])} msg/s",
            f"WS echo floor {number(ws_floor['messages_per_s'])} msg/s → {ws_ratio:.0%}",
            "— (context)",
            None,
            {"messages_per_s": ws_taskd["messages_per_s"], "ratio": ws_ratio},
        )
    )


# --------------------------------------------------------------------------- Celery


QUICK_CELERY_POOLS = (("prefork", 2), ("solo", 1))
"""A quick run checks the comparison works, not which pool wins: two pools."""


def celery_pools(quick: bool = False) -> list[tuple[str, int]]:
    """The worker pools tried in this run: gevent's only where gevent is installed."""
    return [
        (pool, concurrency)
        for pool, concurrency in (QUICK_CELERY_POOLS if quick else CELERY_POOLS)
        if pool != "gevent" or importlib.util.find_spec("gevent") is not None
    ]


def celery_pool_run(
    run: Run, pool: str, concurrency: int, call: Callable[..., dict[str, Any]]
) -> dict[str, Any]:
    """Celery's throughput and latency with one worker pool (a fresh worker, an empty Redis db)."""
    worker_argv = ["-m", "celery", "-A", "benchmarks.celery_app", "worker", "-Q", "host-1"]
    worker_argv += flags(pool=pool, concurrency=concurrency, loglevel="warning")
    worker_argv += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
    call("celery-flush", "flush")
    worker = run.children.start(
        f"celery-worker-{pool}-{concurrency}",
        [PYTHON, *worker_argv],
        env={"TASKD_BENCH_REDIS": REDIS_URL},
        cwd=ROOT,
    )
    with run.children.running(worker):
        call("celery-wait", "wait", "--timeout", "60", timeout=90)
        before = worker.cpu_seconds()
        throughput = call(
            "celery-throughput",
            "throughput",
            *flags(tasks=run.scale.celery_tasks, producers=run.scale.p2_callers),
            timeout=900,
        )
        throughput["worker_cpu_s"] = worker.cpu_seconds() - before
        latency = call("celery-latency", "latency", "--calls", str(run.scale.celery_calls))
        throughput["worker_memory"] = worker.memory()
    return {"throughput": throughput, "latency": latency}


def celery_peer(run: Run) -> dict[str, Any]:
    """Celery at its best here: every worker pool in this run, its best throughput and latency.

    Its producers are as many processes as P2 has callers; the same Redis
    serves every pool, on the same machine, each result fetched.
    """
    if importlib.util.find_spec("celery") is None:
        raise BenchError("celery is not installed (pip install -e '.[bench]')")
    redis = urllib.parse.urlsplit(REDIS_URL)
    address = (redis.hostname or "127.0.0.1", redis.port or 6379)
    try:
        with socket.create_connection(address, timeout=2) as sock:
            sock.sendall(b"PING\r\n")
            if not sock.recv(16).startswith(b"+PONG"):
                raise OSError("no PONG")
    except OSError as exc:
        raise BenchError(f"Redis not reachable at {REDIS_URL}: {exc}") from None
    client = [PYTHON, "-m", "benchmarks.celery_app"]
    env = {"TASKD_BENCH_REDIS": REDIS_URL}

    def call(name: str, *argv: str, timeout: float = 600) -> dict[str, Any]:
        return run.children.run_json(name, [*client, *argv], timeout=timeout, env=env, cwd=ROOT)

    pools: dict[str, dict[str, Any]] = {}
    try:
        for pool, concurrency in celery_pools(run.scale == QUICK):
            label = f"-P {pool} -c {concurrency}"
            try:
                pools[label] = celery_pool_run(run, pool, concurrency, call)
            except BenchError as exc:
                pools[label] = {"error": str(exc).strip().splitlines()[0]}
    finally:
        with contextlib.suppress(BenchError):
            call("celery-flush", "flush")
    measured = {label: found for label, found in pools.items() if "error" not in found}
    if not measured:
        raise BenchError(f"no Celery worker pool could be measured: {pools}")
    fastest = max(measured, key=lambda label: measured[label]["throughput"]["tasks_per_s"])
    quickest = min(measured, key=lambda label: measured[label]["latency"]["p50_ms"])
    throughput = measured[fastest]["throughput"] | {"pool": fastest}
    latency = measured[quickest]["latency"] | {"pool": quickest}
    peer = {"broker": REDIS_URL, "pools": pools, "throughput": throughput, "latency": latency}
    tried = ", ".join(f"`{label}`" for label in pools)
    producers = throughput["producers"]
    run.rows.append(
        Row(
            "C-tput",
            f"Celery no-op throughput (Redis broker + backend, worker `{fastest}`; "
            f"{throughput['tasks']:,} sent by {producers} producer processes, then all "
            "results fetched)",
            f"{number(throughput['tasks_per_s'])} tasks/s",
            f"the peer of P2, at its best here: {producers} producers as P2 has callers, "
            f"the fastest of the worker pools {tried} in this run",
            "— (peer)",
            None,
            {"tasks_per_s": throughput["tasks_per_s"], "pool": fastest},
        )
    )
    run.rows.append(
        Row(
            "C-lat",
            f"Celery `apply_async().get()`, sequential (Redis broker + backend, worker "
            f"`{quickest}`)",
            f"p50 {ms(latency['p50_ms'])}, p99 {ms(latency['p99_ms'])}",
            f"the peer of P3, at its best here: the lowest p50 of the worker pools {tried} "
            "in this run",
            "— (peer)",
            None,
            {"p50_ms": latency["p50_ms"], "p99_ms": latency["p99_ms"], "pool": quickest},
        )
    )
    return peer


# --------------------------------------------------------------------------- P2


def p2_once(run: Run, name: str, database: str, batch: bool) -> dict[str, Any]:
    """One P2 run on a fresh server: pipelined creates to the load agents until all are stored."""
    scale = run.scale
    with run.taskd(name, database) as server:
        agents, _, agent_file = run.load_agents(server, scale.p2_agents, batch=batch)
        server_before = server.child.cpu_seconds()
        agents_before = sum(a.child.cpu_seconds() for a in agents)
        caller_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        with run.profiled(server, name):
            report: dict[str, Any] = run.caller(
                f"{name}-caller",
                "p2",
                url=server.ws_url,
                token=server.token,
                agents=agent_file,
                tasks=scale.p2_tasks,
                connections=scale.p2_callers,
            )
        caller_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        server_cpu = server.child.cpu_seconds() - server_before
        report.update(
            database=database,
            batch=batch,
            server_cpu_s=server_cpu,
            server_cpu_us_per_task=1e6 * server_cpu / report["tasks"],
            server_cpu_percent=100 * server_cpu / report["seconds"],
            load_agent_cpu_s=sum(a.child.cpu_seconds() for a in agents) - agents_before,
            # the caller is the only child reaped meanwhile (start-up included)
            caller_cpu_s=caller_after.ru_utime
            + caller_after.ru_stime
            - caller_before.ru_utime
            - caller_before.ru_stime,
            server_memory=server.child.memory(),
        )
        left = server.call("task_query_task", {"condition": ["is_running", "last"]})
        done = server.call("task_query_task", {"condition": ["is_success", "last"]})
        if left or not done:
            raise BenchError(f"{name}: tasks still running after the caller finished: {left}")
    return report


def p2(run: Run, peer: dict[str, Any] | None, peer_error: str | None) -> None:
    """P2 on SQLite and PostgreSQL, one upload per message and batched, vs Celery."""
    run.data["P2"] = {}
    for database in ("sqlite", "postgresql"):
        for batch in (False, True):
            row_id = (
                "P2" + ("-pg" if database == "postgresql" else "") + ("-batch" if batch else "")
            )
            store = "SQLite" if database == "sqlite" else "PostgreSQL"
            uploads = "uploads batched per arrival" if batch else "one upload per message"
            scenario = (
                f"end-to-end tasks/s: {run.scale.p2_callers} WS callers pipelining "
                f"`task_create_task` to {run.scale.p2_agents} load agents until all stored; "
                f"{store}, {uploads}"
            )
            target = "≥ 5,000 tasks/s and ≥ 3x Celery"
            try:
                report = p2_once(run, row_id.lower(), database, batch)
            except BenchError as exc:
                error = str(exc).strip().splitlines()[0]
                run.rows.append(Row(row_id, scenario, "", "", target, False, {}, error=error))
                run.data.setdefault("errors", {})[row_id] = str(exc)
                continue
            run.data["P2"][row_id] = report
            rate = report["tasks_per_s"]
            passed: bool | None = None
            times = float("nan")
            comparison = f"Celery not measured ({peer_error})"
            if peer is not None:
                celery_rate = peer["throughput"]["tasks_per_s"]
                times = rate / celery_rate
                comparison = f"Celery {number(celery_rate)} tasks/s → {times:.1f}x"
                passed = rate >= 5000 and times >= 3
            run.rows.append(
                Row(
                    row_id,
                    scenario,
                    f"{number(rate)} tasks/s ({report['tasks']:,} tasks; server "
                    f"{report['server_cpu_us_per_task']:.0f} µs CPU per task, "
                    f"{report['server_cpu_percent']:.0f}% of a core)",
                    comparison,
                    target,
                    passed,
                    {
                        "tasks_per_s": rate,
                        "times_celery": times,
                        "server_cpu_us_per_task": report["server_cpu_us_per_task"],
                    },
                )
            )


def p2_cluster(run: Run) -> None:
    """P2 on two nodes sharing one PostgreSQL vs one node (P2-pg of the same run).

    Half of the load agents subscribe to each node and one caller process talks
    to each node, creating tasks for all agents: half of the tasks cross nodes.
    """
    scale = run.scale
    row_id = "P2-2n"
    scenario = (
        f"P2 on two `taskd serve` nodes sharing one PostgreSQL: {scale.p2_agents} load agents "
        "split over the nodes, one caller process per node, tasks to every agent (half cross nodes)"
    )
    target = "≥ 1.6x one node"
    try:
        with run.taskd("p2-2n-a", "postgresql") as first, run.node(first, "p2-2n-b") as second:
            half = scale.p2_agents // 2
            _, first_uuids, _ = run.load_agents(first, half)
            _, second_uuids, _ = run.load_agents(second, scale.p2_agents - half)
            everyone = first.directory / "agents-cluster.txt"
            everyone.write_text("\n".join(first_uuids + second_uuids) + "\n")
            cpu_before = first.child.cpu_seconds() + second.child.cpu_seconds()
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                jobs = [
                    pool.submit(
                        run.caller,
                        f"p2-2n-caller-{node.name}",
                        "p2",
                        url=node.ws_url,
                        token=node.token,
                        agents=everyone,
                        tasks=scale.p2_tasks // 2,
                    )
                    for node in (first, second)
                ]
                reports = [job.result() for job in jobs]
            server_cpu = first.child.cpu_seconds() + second.child.cpu_seconds() - cpu_before
    except BenchError as exc:
        error = str(exc).strip().splitlines()[0]
        run.rows.append(Row(row_id, scenario, "", "", target, False, {}, error=error))
        run.data.setdefault("errors", {})[row_id] = str(exc)
        return
    tasks = sum(r["tasks"] for r in reports)
    seconds = max(r["seconds"] for r in reports)
    rate = tasks / seconds
    single = run.data.get("P2", {}).get("P2-pg")
    report = {
        "tasks": tasks,
        "seconds": seconds,
        "tasks_per_s": rate,
        "callers": reports,
        "server_cpu_s": server_cpu,
        "server_cpu_us_per_task": 1e6 * server_cpu / tasks,
    }
    run.data.setdefault("P2", {})[row_id] = report
    passed: bool | None = None
    comparison = "one node not measured in this run"
    if single is not None:
        times = rate / single["tasks_per_s"]
        comparison = f"one node {number(single['tasks_per_s'])} tasks/s → {times:.2f}x"
        passed = times >= 1.6
    run.rows.append(
        Row(
            row_id,
            scenario,
            f"{number(rate)} tasks/s ({tasks:,} tasks; both servers "
            f"{report['server_cpu_us_per_task']:.0f} µs CPU per task)",
            comparison,
            target,
            passed,
            {"tasks_per_s": rate},
        )
    )


# --------------------------------------------------------------------------- P3


def p3(run: Run, peer: dict[str, Any] | None, peer_error: str | None) -> None:
    """Sequential blocking round trips with 1 caller and 1 load agent; then the real agent."""
    scale = run.scale
    agent_uuid = str(uuid.uuid4())
    with run.taskd("p3") as server:
        agents, uuids, _ = run.load_agents(server, 1)
        cpu_before = server.child.cpu_seconds()
        with run.profiled(server, "p3"):
            report = run.caller(
                "p3-caller",
                "p3",
                url=server.ws_url,
                token=server.token,
                agent=uuids[0],
                calls=scale.p3_calls,
            )
        # CPU per round trip far below the latency: the time goes to waiting, not computing
        server_cpu = server.child.cpu_seconds() - cpu_before
        report["server_cpu_us_per_call"] = 1e6 * server_cpu / (report["calls"] + 100)
        for agent in agents:
            run.children.stop(agent.child)
        real = AgentProcess(
            run.children,
            server.directory / "agent-state",
            server.ws_url,
            asyncio.run(server.agent_token(agent_uuid)),
            agent_uuid,
            allow="version,execute",
            log_level="warning",
        ).start()
        wait_until(
            lambda: (
                check_alive(real)
                and server.call("task_create_task_blocking", agent_uuid, "version", 2000)["success"]
            ),
            "the real agent online",
            60,
            interval=0.2,
        )
        realism: dict[str, Any] = {}
        for label, task in (
            ("version", '"version"'),
            ("execute true", '{"execute": {"cmd": "true", "args": []}}'),
        ):
            try:
                realism[label] = run.caller(
                    f"p3-agent-{label.split()[0]}",
                    "p3",
                    url=server.ws_url,
                    token=server.token,
                    agent=agent_uuid,
                    calls=scale.agent_calls,
                    warmup=10,
                    task=task,
                )
            except BenchError as exc:
                realism[label] = {"error": str(exc).strip().splitlines()[0]}
    run.data["P3"] = report
    run.data["P3-agent"] = realism
    passed: bool | None = None
    ratio = float("nan")
    comparison = f"Celery not measured ({peer_error})"
    if peer is not None:
        celery_p50 = peer["latency"]["p50_ms"]
        ratio = report["p50_ms"] / celery_p50
        comparison = f"Celery p50 {ms(celery_p50)} → {ratio:.2f}x"
        passed = report["p50_ms"] <= 1 and report["p99_ms"] <= 5 and ratio <= 0.5
    run.rows.append(
        Row(
            "P3",
            "`task_create_task_blocking` round trip, 1 caller, 1 load agent, sequential "
            f"({report['calls']:,} calls)",
            f"p50 {ms(report['p50_ms'])}, p99 {ms(report['p99_ms'])} (server "
            f"{report['server_cpu_us_per_call']:.0f} µs CPU per round trip)",
            comparison,
            "p50 ≤ 1 ms, p99 ≤ 5 ms, ≤ 0.5x Celery p50",
            passed,
            {"p50_ms": report["p50_ms"], "p99_ms": report["p99_ms"], "times_celery": ratio},
        )
    )
    for label, measured in realism.items():
        scenario = f"the real `taskd agent` answering `{label}`, sequential blocking round trips"
        if "error" in measured:
            error = measured["error"]
            run.rows.append(Row("P3-agent", scenario, "", "", "— (realism)", None, {}, error))
            continue
        run.rows.append(
            Row(
                "P3-agent",
                f"{scenario} ({measured['calls']:,} calls)",
                f"p50 {ms(measured['p50_ms'])}, p99 {ms(measured['p99_ms'])}",
                f"load agent p50 {ms(report['p50_ms'])}",
                "— (realism)",
                None,
                {"task": label, "p50_ms": measured["p50_ms"], "p99_ms": measured["p99_ms"]},
            )
        )


# --------------------------------------------------------------------------- P4


def single_slot(lead_s: float) -> tuple[str, int]:
    """A 6-field expression matching one second ``lead_s`` from now (UTC), and that slot in ms."""
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    slot = now + datetime.timedelta(seconds=math.ceil(lead_s) + 1)
    expression = f"{slot.second} {slot.minute} {slot.hour} {slot.day} {slot.month} *"
    return expression, int(slot.timestamp() * 1000)


def p4(run: Run) -> None:
    """Many subscriptions on one server process (RSS), then one cron fire to all of them."""
    scale = run.scale
    count = scale.p4_agents
    name = "p4-fan-out"
    with run.taskd("p4") as server:
        idle_memory = server.child.memory()
        started = time.monotonic()
        connect_cpu = server.child.cpu_seconds()
        with run.profiled(server, "p4-connect"):
            agents, uuids, _ = run.load_agents(server, count, processes=scale.p4_processes)
        connect_s = time.monotonic() - started
        connect_cpu = server.child.cpu_seconds() - connect_cpu
        time.sleep(1)
        memory = server.child.memory()
        # a slot a few seconds ahead that matches once: a per-second cron would fire again
        # while the first fire is still dispatching thousands of tasks
        expression, slot = single_slot(3)
        cron = server.call(
            "crontab_create", name, expression, {"agent": [uuids, {"task": "version"}]}
        )
        if now_ms() >= slot:
            raise BenchError(f"crontab_create returned {now_ms() - slot} ms after the slot")
        cpu_before = server.child.cpu_seconds()
        with run.profiled(server, "p4-fire"):
            fire = wait_until(
                lambda: server.sql(
                    "SELECT slot, fired_at FROM cron_fire WHERE cron_id = ?", cron["id"]
                ),
                "the cron fire",
                (slot - now_ms()) / 1000 + 30,
                interval=0.01,
            )[0]
            # watched in the database file, so the watching costs the server nothing
            wait_until(
                lambda: (
                    server.sql("SELECT count(timestamp) FROM task WHERE cron_source = ?", name)
                    == [(count,)]
                ),
                "every result stored",
                300,
                interval=0.01,
            )
            done = now_ms()
        fire_cpu = server.child.cpu_seconds() - cpu_before
        running = server.call(
            "task_query_task", {"condition": [{"cron_source": name}, "is_running", "last"]}
        )
        if running:
            raise BenchError(f"the database shows every result, task_query_task not: {running}")
        total, succeeded, last_answer = server.sql(
            "SELECT count(*), sum(success), max(timestamp) FROM task WHERE cron_source = ?", name
        )[0]
        after = server.child.memory()
        agent_memory = [a.child.memory() for a in agents]
    fired_at = fire[1]
    stored_s = (done - fired_at) / 1000
    run.data["P4"] = {
        "agents": count,
        "load_agent_processes": scale.p4_processes,
        "connect_s": connect_s,
        "server_cpu_s_connecting": connect_cpu,
        "server_memory_idle": idle_memory,
        "server_memory_subscribed": memory,
        "server_memory_after_fire": after,
        "load_agent_memory": agent_memory,
        "slot_ms": slot,
        "fired_at_ms": fired_at,
        "fire_delay_ms": fired_at - slot,
        "all_stored_at_ms": done,
        "stored_s_after_fire": stored_s,
        "server_cpu_s_until_stored": fire_cpu,
        "last_agent_answer_s_after_fire": (last_answer - fired_at) / 1000 if last_answer else None,
        "tasks": total,
        "succeeded": succeeded,
    }
    if total != count or succeeded != count:
        raise BenchError(f"the fire stored {succeeded} successes of {total} tasks, not {count}")
    rss = memory["vmrss_mb"]
    peak = after["vmhwm_mb"]
    per_agent_kib = (rss - idle_memory["vmrss_mb"]) * 1024 / count
    run.rows.append(
        Row(
            "P4-rss",
            f"{count:,} agent subscriptions on one server process "
            f"({scale.p4_processes} load-agent processes), then the fire",
            f"server RSS {number(rss)} MB subscribed, peak {number(peak)} MB through the fire "
            f"({number(idle_memory['vmrss_mb'])} MB idle)",
            f"{per_agent_kib:.1f} KiB per subscription; all connected in {connect_s:.0f} s "
            f"(server {1e3 * connect_cpu / count:.1f} ms CPU per subscription)",
            "RSS ≤ 500 MB (the peak counts)",
            peak <= 500,
            {"vmrss_mb": rss, "vmhwm_mb": peak},
        )
    )
    run.rows.append(
        Row(
            "P4-fire",
            f"one cron fire targeting all {count:,} agents",
            f"all {count:,} results stored {stored_s:.2f} s after the fire",
            f"fired {fired_at - slot} ms after its slot; server {fire_cpu:.1f} s CPU meanwhile",
            "≤ 3 s",
            stored_s <= 3,
            {"stored_s": stored_s},
        )
    )


# --------------------------------------------------------------------------- P5


def p5(run: Run) -> None:
    """The newest 100 of one agent and type from a big table, over HTTP keep-alive."""
    scale = run.scale
    agents = max(1, scale.p5_rows // 2000)
    seeded: dict[str, Any] = {}

    def prepare(server: TaskdServer) -> None:
        assert server.db_file is not None
        seeded.update(seed.seed(server.db_file, scale.p5_rows, agents))

    with run.taskd("p5", prepare=prepare) as server:
        report = run.caller(
            "p5-caller",
            "p5",
            url=server.url,
            token=server.token,
            agent=seeded["agent"],
            type=seeded["type"],
            calls=scale.p5_calls,
        )
        report["server_memory"] = server.child.memory()
    run.data["P5"] = {"seed": seeded, "query": report}
    run.rows.append(
        Row(
            "P5",
            f"`task_query_task` newest 100 for one agent + type, {seeded['rows']:,} rows "
            f"({agents} agents, 12 types), HTTP keep-alive",
            f"p50 {ms(report['p50_ms'])}, p99 {ms(report['p99_ms'])}",
            f"table seeded in {seeded['insert_s'] + seeded['index_s']:.0f} s",
            "p50 ≤ 10 ms",
            report["p50_ms"] <= 10,
            {"p50_ms": report["p50_ms"], "p99_ms": report["p99_ms"], "rows": seeded["rows"]},
        )
    )


# --------------------------------------------------------------------------- P6


def fire_delays(
    server: TaskdServer, cron_id: int, since: int = 0, until: int = 1 << 62
) -> list[int]:
    """fired_at - slot (ms) of a cron's fires whose slot lies in [since, until]."""
    rows = server.sql(
        "SELECT slot, fired_at FROM cron_fire WHERE cron_id = ? AND slot BETWEEN ? AND ?"
        " ORDER BY slot",
        cron_id,
        since,
        until,
    )
    return [fired - slot for slot, fired in rows]


def precision_row(row_id: str, scenario: str, delays: list[int], limit: float) -> Row:
    """The row of one fire-precision measurement."""
    values = [float(d) for d in delays]
    p50, p99 = percentile(values, 50), percentile(values, 99)
    return Row(
        row_id,
        scenario,
        f"p99 {p99:.0f} ms (p50 {p50:.0f} ms, max {max(delays, default=0)} ms, "
        f"{len(delays)} fires)",
        "fired_at - slot, from `cron_fire`",
        f"p99 ≤ {limit:.0f} ms",
        bool(delays) and p99 <= limit,
        {"p50_ms": p50, "p99_ms": p99, "fires": len(delays), "delays_ms": delays},
    )


def p6(run: Run) -> None:
    """A per-second cron's fire delay on an idle server, then during P2 load."""
    scale = run.scale
    with run.taskd("p6-idle") as server:
        _, uuids, _ = run.load_agents(server, 1)
        target = {"agent": [uuids, {"task": "ip"}]}
        cron = server.call("crontab_create", "p6", EVERY_SECOND, target)
        wait_until(
            lambda: len(fire_delays(server, cron["id"])) > scale.p6_idle_fires,
            "the idle fires",
            scale.p6_idle_fires + 30,
            interval=0.2,
        )
        server.call("crontab_set_enable", "p6", False)
        # the first fire follows the cron's creation, not a steady state
        idle = fire_delays(server, cron["id"])[1:]
    run.rows.append(
        precision_row("P6-idle", "cron fire precision, per-second cron, idle server", idle, 10)
    )
    rate = run.data.get("P2", {}).get("P2", {}).get("tasks_per_s", 2500)
    tasks = max(1000, int(rate * scale.p6_load_seconds))
    with run.taskd("p6-load") as server:
        _, uuids, agent_file = run.load_agents(server, scale.p2_agents)
        target = {"agent": [uuids[:1], {"task": "ip"}]}
        cron = server.call("crontab_create", "p6", EVERY_SECOND, target)
        wait_until(lambda: fire_delays(server, cron["id"]), "the first fire", 30, interval=0.1)
        started = now_ms()
        report = run.caller(
            "p6-load-caller",
            "p2",
            url=server.ws_url,
            token=server.token,
            agents=agent_file,
            tasks=tasks,
        )
        finished = now_ms()
        server.call("crontab_set_enable", "p6", False)
        loaded = fire_delays(server, cron["id"], started + 1, finished)
    run.data["P6"] = {"idle_delays_ms": idle, "load_delays_ms": loaded, "load": report}
    run.rows.append(
        precision_row(
            "P6-load",
            f"cron fire precision during P2 load ({number(report['tasks_per_s'])} tasks/s "
            f"for {report['seconds']:.0f} s)",
            loaded,
            50,
        )
    )
