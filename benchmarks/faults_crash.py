"""Process and connection faults: R1 (SIGKILL the server), R2 (cut an agent's connection).

Both run real ``taskd serve`` and real ``taskd agent`` processes. What the
server acknowledged is taken from the wire (``WsRecorder`` for uploads, the
caller's own replies for creates) and compared with the rows in the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from benchmarks.faults_common import (
    Outcome,
    check_stored,
    metric,
    ms,
    scenario,
    scenario_database,
    wait_for,
)
from benchmarks.faults_relay import Recorded, TcpProxy, WsRecorder
from benchmarks.rpc import Rpc, RpcFailure
from benchmarks.scale import Scale
from benchmarks.services import AgentProcess, TaskdServer

EXECUTE_TRUE = {"execute": {"cmd": "true", "args": []}}
EXECUTE_SLEEP = {"execute": {"cmd": "sleep", "args": ["0.5"]}}
"""Every tenth task sleeps, so a kill always finds tasks running on the agents."""
CALLERS = 8


class Creator:
    """Callers creating tasks over HTTP, at most ``window`` unanswered at a time.

    Every create that got a reply is recorded; a create whose connection died
    with the server got none and counts as not acknowledged (it may still exist).
    """

    def __init__(self, server: TaskdServer, agents: list[str], total: int, window: int) -> None:
        self.server = server
        self.agents = agents
        self.total = total
        self.window = window
        self.acked: dict[int, str] = {}
        self.unanswered = 0
        self.refused: Counter[int] = Counter()
        self.issued = 0
        self.running = 0
        self._since_poll = 0

    def _next(self) -> Any:
        self.issued += 1
        return {0: EXECUTE_TRUE, 5: EXECUTE_SLEEP}.get(self.issued % 10, "version")

    async def run(self) -> None:
        """Create ``total`` acknowledged tasks, riding out server restarts."""
        poller = asyncio.create_task(self._poll())
        try:
            await asyncio.gather(*(self._caller(i) for i in range(CALLERS)))
        finally:
            poller.cancel()

    async def _poll(self) -> None:
        query = {"condition": ["is_running", {"limit": self.window}]}
        async with self.server.rpc(timeout=5) as rpc:
            while True:
                with contextlib.suppress(httpx.HTTPError, RpcFailure, ValueError):
                    running = len(await rpc.su("task_query_task", query))
                    self.running, self._since_poll = running, 0
                await asyncio.sleep(0.1)

    async def _caller(self, index: int) -> None:
        async with self.server.rpc(timeout=10) as rpc:
            while len(self.acked) < self.total:
                if self.running + self._since_poll >= self.window:
                    await asyncio.sleep(0.01)
                    continue
                if self.issued - self.unanswered - sum(self.refused.values()) >= self.total:
                    await asyncio.sleep(0.05)  # the last ones are on their way
                    continue
                agent_uuid = self.agents[self.issued % len(self.agents)]
                task = self._next()
                self._since_poll += 1
                try:
                    created = await rpc.su("task_create_task", agent_uuid, task)
                except RpcFailure as exc:
                    self.refused[int(exc.code or 0)] += 1
                    await asyncio.sleep(0.05)
                    continue
                except (httpx.HTTPError, ValueError):
                    self.unanswered += 1  # no reply: the server went away
                    await asyncio.sleep(0.1)
                    continue
                self.acked[int(created["id"])] = agent_uuid


async def connected(server: TaskdServer) -> int:
    """Agents subscribed to the server right now."""
    value = await metric(server.url, "taskd_agents_connected")
    return int(value or 0)


async def start_agents(
    children: Any,
    server: TaskdServer,
    workdir: Path,
    count: int,
    via: str,
    allow: str,
) -> list[AgentProcess]:
    """Start ``count`` real agents connecting through ``via``; wait until all subscribed."""
    agents = []
    for index in range(count):
        agent_uuid = str(uuid.uuid4())
        token = await server.agent_token(agent_uuid)
        agent = AgentProcess(children, workdir / f"agent{index}", via, token, agent_uuid, allow)
        agent.start()
        agents.append(agent)

    async def all_in() -> bool:
        return await connected(server) >= count

    if not await wait_for(all_in, 60):
        raise TimeoutError(f"{count} agents did not subscribe within 60 s")
    return agents


# --------------------------------------------------------------------------- R1


async def r1_server_kill(scale: Scale, workdir: Path, database: str = "sqlite") -> Outcome:
    """R1: SIGKILL ``taskd serve`` while real agents work through tasks; restart; nothing lost."""
    name = "R1" if database == "sqlite" else "R1-pg"
    outcome = Outcome(
        name,
        f"SIGKILL the server mid-load and restart it ({database})",
        scale.enforce_targets,
        load=f"{scale.r1_tasks:,} tasks (version; every 10th execute true, every 10th "
        "execute sleep 0.5) to "
        f"{scale.r1_agents} real taskd agents, {CALLERS} HTTP callers, "
        f"≤ {scale.r1_window} running",
        faults=f"{scale.r1_kills} SIGKILLs of taskd serve, restarted at once on the same "
        f"port and database; task deadline {scale.r1_deadline_ms / 1000:g} s",
    )
    async with scenario(outcome, workdir) as children, contextlib.AsyncExitStack() as stack:
        server = TaskdServer(
            children,
            workdir / "server",
            database_url=await scenario_database(stack, database),
            env={
                "TASKD_TASK_DEADLINE_MS": str(scale.r1_deadline_ms),
                "TASKD_REAPER_INTERVAL_MS": "500",
            },
        )
        await server.launch()
        recorder = await stack.enter_async_context(WsRecorder(server.ws_url))
        agents = await start_agents(
            children, server, workdir, scale.r1_agents, recorder.url, "version,execute"
        )
        creator = Creator(server, [a.agent_uuid for a in agents], scale.r1_tasks, scale.r1_window)
        started = time.monotonic()
        creating = asyncio.create_task(creator.run())
        kills: list[dict[str, Any]] = []
        for k in range(1, scale.r1_kills + 1):
            threshold = scale.r1_tasks * k // (scale.r1_kills + 1)

            async def reached(threshold: int = threshold) -> bool:
                return len(creator.acked) >= threshold or creating.done()

            await wait_for(reached, 600, interval=0.01)
            if creating.done():
                break
            acked_before = len(recorder.record.acked)
            pushed_open = len(set(recorder.record.pushed) - set(recorder.record.acked))
            killed_at = time.monotonic()
            server.kill()
            server.start()
            ready = await server.wait_ready()
            kills.append(
                {
                    "after_creates": len(creator.acked),
                    "results_acked_before": acked_before,
                    "pushed_unanswered_at_kill": pushed_open,
                    "killed_at_s": round(killed_at - started, 2),
                    **ready,
                }
            )

            async def resubscribed() -> bool:
                return await connected(server) >= len(agents)

            resub = await wait_for(resubscribed, 120, interval=0.05)
            kills[-1]["agents_back_s"] = round(time.monotonic() - killed_at, 2) if resub else None
        await asyncio.wait_for(creating, 1200)
        created_s = time.monotonic() - started

        async def settled() -> bool:
            async with server.rpc(timeout=10) as rpc:
                running = await rpc.su("task_query_task", {"condition": ["is_running", "last"]})
            return not running and all(a.spooled()[0] == 0 for a in agents)

        # in-flight tasks end by an agent's (re-)upload or the reaper after the deadline
        settled_in_time = await wait_for(settled, scale.r1_deadline_ms / 1000 + 90, interval=0.5)
        total_s = time.monotonic() - started
        for agent in agents:
            agent.stop()
        rows = await server.task_rows()
        outcome.figures.update(
            _r1_checks(outcome, creator, recorder.record, rows, agents, kills, settled_in_time)
        )
        outcome.check("the server process is alive at the end", server.alive(), server.log_tail())
        worst = max((k["rpc_s"] for k in kills), default=None)
        outcome.check(
            "the restarted server answered /healthz and JSON-RPC within 2 s",
            bool(kills) and worst is not None and worst <= 2.0,
            f"slowest restart: {worst} s to a JSON-RPC answer (healthz "
            f"{max((k['healthz_s'] for k in kills), default=None)} s)",
            target=True,
        )
        outcome.figures.update(
            {
                "kills": kills,
                "create_phase_s": round(created_s, 1),
                "settled_s": round(total_s, 1),
                "tasks_per_s": round(len(creator.acked) / created_s, 1),
            }
        )
        server.stop()
    return outcome


def _r1_checks(
    outcome: Outcome,
    creator: Creator,
    record: Recorded,
    rows: dict[int, dict[str, Any]],
    agents: list[AgentProcess],
    kills: list[dict[str, Any]],
    settled: bool,
) -> dict[str, Any]:
    lost = check_stored(outcome, creator.acked, record.acked, rows, settled)
    outcome.check(
        "no result was accepted twice",
        not record.double_acks,
        f"accepted twice: {record.double_acks[:5]}",
    )
    reasonless = [i for i, r in rows.items() if r["success"] is False and not r["error_message"]]
    outcome.check(
        "every failed task carries a reason", not reasonless, f"without a reason: {reasonless[:5]}"
    )
    spooled = [a.spooled() for a in agents]
    outcome.check(
        "every agent's spool drained (nothing left undelivered, nothing unreadable)",
        all(s == (0, 0) for s in spooled),
        f"(waiting, unreadable) per agent: {spooled}",
    )
    reasons = Counter(r["error_message"] for r in rows.values() if r["success"] is False)
    first_kill = min((k["killed_at_s"] for k in kills), default=None)
    reuploaded = [t for t, n in record.uploads.items() if n > 1]
    return {
        "creates_acknowledged": len(creator.acked),
        "creates_without_reply": creator.unanswered,
        "creates_refused": dict(creator.refused),
        "task_rows": len(rows),
        "completed_by_agents": sum(1 for r in rows.values() if r["state"] == 2),
        "failed_by_server": sum(1 for r in rows.values() if r["state"] == 3),
        "failure_reasons": dict(reasons.most_common(5)),
        "uploads_acknowledged": len(record.acked),
        "uploads_answered_already_stored": len(record.already),
        "uploads_sent_more_than_once": len(reuploaded),
        "uploads_without_reply": record.unanswered,
        "upload_error_codes": dict(Counter(record.upload_errors.values())),
        "agent_connections": record.connections,
        "agent_connections_refused_while_down": record.refused,
        "first_kill_after_s": first_kill,
        "lost": lost,
    }


# --------------------------------------------------------------------------- R2

MARKER_COMMAND = "sleep {sleep}; echo ran >> {marker}; printf done"


async def r2_connection_cut(scale: Scale, workdir: Path) -> Outcome:
    """R2: cut a real agent's connection mid-task through a proxy; the result arrives once."""
    outcome = Outcome(
        "R2",
        "Cut an agent's connection mid-task (TCP proxy)",
        scale.enforce_targets,
        load="1 real taskd agent through a local TCP proxy; per variant one "
        "`execute sh -c 'sleep 2; echo ran >> marker'`",
        faults=", ".join(scale.r2_variants)
        + " (reset both sides and refuse for 2 s / drop the upload's reply and cut / "
        "stop relaying without closing)",
    )
    async with scenario(outcome, workdir) as children, contextlib.AsyncExitStack() as stack:
        server = TaskdServer(children, workdir / "server", env={"TASKD_WS_PING_INTERVAL_S": "5"})
        await server.launch()
        proxy = await stack.enter_async_context(TcpProxy(server.port))
        [agent] = await start_agents(children, server, workdir, 1, proxy.url, "execute")
        rpc = await stack.enter_async_context(server.rpc())
        variants: dict[str, Any] = {}
        for variant in scale.r2_variants:
            variants[variant] = await _r2_variant(outcome, variant, server, rpc, proxy, agent)
        outcome.figures["variants"] = variants
        results = await metric(server.url, 'taskd_results_stored_total{success="true"}')
        outcome.check(
            "the server stored exactly one result per task (results_stored counter)",
            results == len(scale.r2_variants),
            f"taskd_results_stored_total = {results} for {len(scale.r2_variants)} tasks",
        )
        outcome.check("the server process is alive at the end", server.alive(), server.log_tail())
    return outcome


async def _r2_variant(
    outcome: Outcome,
    variant: str,
    server: TaskdServer,
    rpc: Rpc,
    proxy: TcpProxy,
    agent: AgentProcess,
) -> dict[str, Any]:
    marker = agent.directory / f"marker-{variant}"
    command = MARKER_COMMAND.format(sleep=2, marker=marker)
    task = {"execute": {"cmd": "sh", "args": ["-c", command]}}
    connections_before = proxy.accepted
    created = await rpc.su("task_create_task", agent.agent_uuid, task)
    task_id = int(created["id"])

    async def stored() -> dict[str, Any] | None:
        [row] = await rpc.su("task_query_task", {"condition": [{"task_id": task_id}]})
        return row if row["timestamp"] is not None else None

    figures: dict[str, Any] = {"task_id": task_id}
    if variant == "cut-mid-task":
        await asyncio.sleep(0.5)
        proxy.refuse()
        figures["connections_cut"] = proxy.cut()
        await asyncio.sleep(2.5)  # the task finishes while the agent is cut off
        figures["stored_before_restore"] = await stored() is not None
        proxy.refuse(False)
        restored = time.monotonic()
    elif variant == "reply-lost":
        hit = proxy.cut_when_server_sends(b'"result":{"id":%d}' % task_id)
        await asyncio.wait_for(hit.wait(), 30)
        # the result was stored but its reply never reached the agent
        figures["stored_before_restore"] = await stored() is not None
        await asyncio.sleep(1.0)
        proxy.refuse(False)
        restored = time.monotonic()
    else:  # blackhole: the connection looks open, nothing passes; pings expose it
        await asyncio.sleep(0.5)
        figures["connections_blackholed"] = proxy.blackhole()
        accepted = proxy.accepted

        async def came_back() -> bool:
            return proxy.accepted > accepted

        await wait_for(came_back, 120, interval=0.1)
        figures["stored_before_restore"] = False
        restored = time.monotonic()

    arrived = await wait_for(stored, 90, interval=0.1)
    row = await stored()
    figures["result_after_restore_ms"] = ms(time.monotonic() - restored) if arrived else None

    async def drained() -> bool:
        return agent.spooled() == (0, 0) and proxy.accepted > connections_before

    # a result whose reply was lost stays spooled until the agent is back and re-uploads it
    outcome.check(
        f"{variant}: the agent reconnected and its spool is empty afterwards",
        await wait_for(drained, 60),
        f"spool (waiting, unreadable): {agent.spooled()}, "
        f"reconnects: {proxy.accepted - connections_before}",
    )
    figures["agent_reconnects"] = proxy.accepted - connections_before
    runs = marker.read_text().count("ran") if marker.exists() else 0
    figures["command_runs"] = runs
    if variant != "reply-lost":
        outcome.check(
            f"{variant}: no result stored while the agent was cut off",
            not figures["stored_before_restore"],
            "the result was stored before the connection was restored",
        )
    else:
        outcome.check(
            "reply-lost: the result was stored before its reply was dropped",
            figures["stored_before_restore"],
            "no result stored when its reply passed the proxy",
        )
    outcome.check(
        f"{variant}: the result reached the server after the connection came back",
        arrived and row is not None and row["success"] is True,
        f"stored row: {row}",
    )
    outcome.check(
        f"{variant}: the command ran exactly once",
        runs == 1,
        f"the marker file has {runs} line(s)",
    )
    output = (row or {}).get("task_event_result") or {}
    outcome.check(
        f"{variant}: the stored result is the command's output",
        output == {"execute": "done"},
        f"stored {output}",
    )
    rows = await rpc.su("task_query_task", {"condition": [{"uuid": agent.agent_uuid}]})
    outcome.check(
        f"{variant}: one task row, with one result",
        sum(1 for r in rows if r["task_id"] == task_id) == 1,
        f"rows for the agent: {[r['task_id'] for r in rows]}",
    )
    figures["reconnected"] = await connected(server) == 1
    return figures
