"""R7: alerts at fleet scale, an ``agent_offline`` rule on every agent.

Load-agent processes hold the subscriptions (10,000 in a full run). While nothing
changes, py-spy samples the server's running threads: the samples with alert code on
the stack are what evaluation costs (target: at most 2 % of a core). The server's
whole CPU over the same window is reported beside it (on a busy machine it varies far
more than evaluation could cost, so a with/without comparison would measure noise).
Then the load-agent process holding 1,000 of the agents is SIGKILLed: every
one of their events must be recorded within grace + 5 s (target), none for the
others, and a local webhook receiver counts the messages that carry them: batched
per channel, not one per agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from benchmarks.faults_common import Outcome, scenario, wait_for
from benchmarks.faults_crash import connected
from benchmarks.procs import PYTHON, Children
from benchmarks.scale import Scale
from benchmarks.services import TaskdServer, start_load_agents

EVALUATION_CPU_TARGET = 0.02
RECORDED_SLACK_S = 5.0
PROFILE_RATE = 200
"""py-spy samples per second while the idle cost is measured."""
MAX_MESSAGES = 5
"""Messages one channel may get for one mass drop (the batching window may split it)."""


@dataclass(frozen=True)
class Size:
    """How big a run is."""

    agents: int
    drop: int
    processes: int
    grace_ms: int
    window_s: float
    """How long the idle cost is sampled."""
    settle_s: float


SIZES = {
    "full": Size(10_000, 1_000, 4, grace_ms=10_000, window_s=60.0, settle_s=20.0),
    "quick": Size(300, 100, 1, grace_ms=3_000, window_s=5.0, settle_s=2.0),
}


@dataclass
class Webhook:
    """A local HTTP receiver for Apprise's json:// posts."""

    port: int = 0
    titles: list[str] = field(default_factory=list)
    first_at: float | None = None

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Take one POST, answer 200."""
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"(?i)content-length:\s*(\d+)", head)
            body = await reader.readexactly(int(length.group(1)) if length else 0)
            self.titles.append(str(orjson.loads(body or b"{}").get("title", "")))
            self.first_at = self.first_at or time.monotonic()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            await writer.drain()
        writer.close()

    def notified(self) -> int:
        """How many events the messages so far carried ("[taskd] 1000 alerts: ...")."""
        total = 0
        for title in self.titles:
            many = re.search(r"\] (\d+) alerts", title)
            total += int(many.group(1)) if many else 1
        return total


@contextlib.asynccontextmanager
async def webhook() -> AsyncIterator[Webhook]:
    """A receiver on a port-0 loopback socket."""
    hook = Webhook()
    server = await asyncio.start_server(hook.serve, "127.0.0.1", 0)
    hook.port = server.sockets[0].getsockname()[1]
    try:
        yield hook
    finally:
        server.close()


async def cpu_share(server: TaskdServer, seconds: float) -> float:
    """The server's CPU over ``seconds``, as a share of one core."""
    before, started = server.child.cpu_seconds(), time.monotonic()
    await asyncio.sleep(seconds)
    return (server.child.cpu_seconds() - before) / (time.monotonic() - started)


@dataclass(frozen=True)
class Profile:
    """What py-spy saw of the server: samples of running code, and the share of one core
    spent in alert code (a frame of ``taskd/alerts/`` or ``taskd/store/alerts.py`` on the
    stack)."""

    samples: int
    alerts: float


def sampled(children: Children, server: TaskdServer, seconds: float, raw: Path) -> Profile:
    """Sample the server's running threads with py-spy for ``seconds``."""
    spy = shutil.which("py-spy") or str(Path(PYTHON).parent / "py-spy")
    argv = [spy, "record", "--nonblocking", "--rate", str(PROFILE_RATE), "--format", "raw"]
    argv += ["--duration", str(round(seconds)), "-o", str(raw), "--pid", str(server.pid)]
    children.run_text("py-spy-idle", argv, timeout=seconds + 60)
    total = in_alerts = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        total += int(count)
        if any(part in stack for part in ("taskd/alerts/", "taskd/store/alerts.py")):
            in_alerts += int(count)
    return Profile(total, in_alerts / (round(seconds) * PROFILE_RATE))


async def firing(server: TaskdServer, limit: int) -> list[dict[str, Any]]:
    """The firing events (at most ``limit``)."""
    async with server.rpc(timeout=60) as rpc:
        found: list[dict[str, Any]] = await rpc.su(
            "alert_event_query", {"condition": ["is_firing", {"limit": limit}]}
        )
    return found


async def r7_alerts(scale: Scale, workdir: Path) -> Outcome:
    """R7: idle evaluation cost, and a mass drop recorded in time and notified in batches."""
    size = SIZES["full" if scale.enforce_targets else "quick"]
    outcome = Outcome("R7", "alerts at fleet scale", enforce_targets=scale.enforce_targets)
    outcome.load = (
        f"{size.agents:,} agents, an agent_offline rule on all (grace {size.grace_ms} ms)"
    )
    outcome.faults = f"{size.drop:,} agents killed at once"
    figures = outcome.figures
    async with scenario(outcome, workdir) as children, webhook() as hook:
        server = TaskdServer(children, workdir / "server")
        await server.launch()
        rule = {
            "name": "down",
            "kind": "agent_offline",
            "targets": "all",
            "params": {"grace_ms": size.grace_ms},
            "channels": ["hook"],
            "enable": False,
        }
        async with server.rpc() as rpc:
            await rpc.su("alert_channel_create", "hook", f"json://127.0.0.1:{hook.port}/hook")
            await rpc.su("alert_rule_create", rule)
        await asyncio.to_thread(
            start_load_agents,
            children,
            server.ws_url,
            server.token,
            size.agents - size.drop,
            workdir,
            processes=size.processes,
            reconnect=True,  # waits as a busy server asks (admission control), as agents do
        )
        [dropping] = await asyncio.to_thread(
            start_load_agents,
            children,
            server.ws_url,
            server.token,
            size.drop,
            workdir,
            reconnect=True,
            name="loadagent-drop",
        )

        async def all_in() -> bool:
            return await connected(server) >= size.agents

        outcome.check("every agent subscribed", await wait_for(all_in, 300))
        await asyncio.sleep(size.settle_s)  # the subscriptions' writes and announcements settle
        async with server.rpc() as rpc:
            await rpc.su("alert_rule_edit", "down", {**rule, "enable": True})
        await asyncio.sleep(2)
        before = server.child.cpu_seconds()
        profile = await asyncio.to_thread(
            sampled, children, server, size.window_s, workdir / "py-spy-idle.txt"
        )
        server_share = (server.child.cpu_seconds() - before) / size.window_s
        figures["idle_server_cpu_pct"] = round(server_share * 100, 2)
        figures["evaluation_cpu_pct"] = round(profile.alerts * 100, 3)
        figures["profile_samples"] = profile.samples
        outcome.check(
            f"evaluation costs at most {EVALUATION_CPU_TARGET:.0%} of a core when nothing changes",
            profile.samples > 0 and profile.alerts <= EVALUATION_CPU_TARGET,
            f"{profile.alerts:.3%} of a core in alert code ({profile.samples} samples of a "
            f"server busy {server_share:.2%} over {size.window_s:.0f} s)",
            target=True,
        )
        outcome.check("nothing fired while every agent was connected", not hook.titles)

        dropped = set(dropping.uuids())
        killed = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(dropping.child.pid, signal.SIGKILL)
        children.stop(dropping.child)  # reaps it and closes its pipe

        async def recorded() -> bool:
            return len(await firing(server, size.agents)) >= size.drop

        in_time = await wait_for(recorded, size.grace_ms / 1000 + 60, interval=0.5)
        took = time.monotonic() - killed
        figures["events_recorded_after_s"] = round(took, 2)
        events = await firing(server, size.agents)
        uuids = [event["uuid"] for event in events]
        outcome.check(
            f"all {size.drop:,} events recorded, one per dropped agent and none for the others",
            in_time and len(uuids) == len(set(uuids)) and set(uuids) == dropped,
            f"{len(uuids)} firing, {len(set(uuids) & dropped)} of the dropped agents",
        )
        limit = size.grace_ms / 1000 + RECORDED_SLACK_S
        outcome.check(
            f"recorded within grace + {RECORDED_SLACK_S:.0f} s ({limit:.0f} s)",
            took <= limit,
            f"{took:.1f} s",
            target=True,
        )

        async def notified() -> bool:
            return hook.notified() >= size.drop

        await wait_for(notified, 30)
        figures["messages"] = len(hook.titles)
        figures["events_notified"] = hook.notified()
        if hook.first_at is not None:
            figures["first_message_after_s"] = round(hook.first_at - killed, 2)
        outcome.check(
            f"notifications batched: at most {MAX_MESSAGES} messages for {size.drop:,} events",
            hook.notified() >= size.drop and len(hook.titles) <= MAX_MESSAGES,
            f"{len(hook.titles)} message(s) carrying {hook.notified()} event(s)",
        )
        server.stop()
    return outcome
