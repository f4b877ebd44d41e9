"""Host reports from a real agent to a real JSON-RPC endpoint: live, buffered, over HTTP."""

from __future__ import annotations

import asyncio
import itertools
import os
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import psutil
import pytest

from taskd.agent.monitor_report import REPORT_DYNAMIC, REPORT_STATIC, REPORT_SUMMARY
from taskd.agent.spool import ReportBuffer, Spool, link_id
from taskd.config import AgentSettings, parse_agent_config
from taskd.errors import InvalidInput
from tests.agent.endpoint import Endpoint, no_upgrade_proxy, running_endpoint
from tests.agent.test_client import running_agent
from tests.helpers import scaled

TOKEN = "KEY:SECRET"
FAST = """
dynamic_summary_report_interval_ms = 100
dynamic_report_interval_ms = 200
report_backlog_jitter_ms = 0
report_backlog_per_second = 1000
"""


def settings_for(url: str, agent_uuid: str, extra: str = FAST) -> AgentSettings:
    """An agent config reporting to ``url`` quickly."""
    return parse_agent_config(
        f'agent_uuid = "{agent_uuid}"\n{extra}\n'
        f'[[server]]\nname = "s"\nws_url = "{url}"\ntoken = "{TOKEN}"\n'
    )


def _gaps(times: list[int]) -> list[int]:
    ordered = sorted(times)
    return [b - a for a, b in itertools.pairwise(ordered)]


async def test_reports_flow_with_the_token_and_nodeget_shapes(tmp_path: Path) -> None:
    """The agent sends its static report once and summaries and dynamic reports on schedule."""
    agent_uuid = str(uuid.uuid4())
    async with (
        running_endpoint() as endpoint,
        running_agent(settings_for(endpoint.ws_url, agent_uuid), tmp_path),
    ):
        await endpoint.wait_for(lambda: len(endpoint.of(REPORT_SUMMARY)) >= 10, what="summaries")
        await asyncio.sleep(0.5)
        statics = endpoint.of(REPORT_STATIC)
        assert len(statics) == 1  # unchanged: not sent again
        for call in endpoint.calls:
            if call.method.startswith("agent_report_"):
                assert call.params[0] == TOKEN and call.params[1]["uuid"] == agent_uuid
        static = statics[0].params[1]
        assert set(static) == {"uuid", "time", "data_hash", "cpu", "system", "gpu"}
        summaries = endpoint.reports(REPORT_SUMMARY)
        dynamics = endpoint.reports(REPORT_DYNAMIC)
        assert "cpu_usage" in summaries[0] and "per_core" in dynamics[0]["cpu"]
        # one dynamic report every second summary tick, each the sample of that tick
        assert len(summaries) / 2 - 2 <= len(dynamics) <= len(summaries) / 2 + 2
        assert {d["time"] for d in dynamics} <= {s["time"] for s in summaries}
        assert max(_gaps([s["time"] for s in summaries])) < 100 * 3


async def test_summaries_made_while_disconnected_arrive_after_reconnect(
    tmp_path: Path, held_ports: Callable[[], int]
) -> None:
    """A server outage leaves no gap: the buffered summaries are sent once it is back."""
    port = held_ports()
    endpoint = Endpoint()
    await endpoint.start(port)
    async with running_agent(settings_for(endpoint.ws_url, str(uuid.uuid4())), tmp_path):
        try:
            await endpoint.wait_for(lambda: len(endpoint.of(REPORT_SUMMARY)) >= 3)
            await endpoint.stop()  # the socket closes; nothing listens for a while
            down = time.time() * 1000
            await asyncio.sleep(scaled(2))
            up = time.time() * 1000
            await endpoint.start(port)
            await endpoint.wait_for(
                lambda: len(endpoint.of("task_register_task")) >= 2, what="resubscribe"
            )
            reconnected = time.time() * 1000

            def covered() -> bool:
                times = [s["time"] for s in endpoint.reports(REPORT_SUMMARY)]
                return sum(1 for t in times if down + 100 < t < up - 100) >= 10

            await endpoint.wait_for(covered, what="the summaries of the outage")
            times = [s["time"] for s in endpoint.reports(REPORT_SUMMARY)]
            assert max(_gaps([t for t in times if t < reconnected])) < 100 * 3
            assert len(times) == len(set(times))  # each sent once
            # the static report is sent again on the new connection
            assert len(endpoint.of(REPORT_STATIC)) == 2
        finally:
            await endpoint.stop()


def buffered(endpoint: Endpoint, tmp_path: Path, agent_uuid: str, count: int) -> list[int]:
    """Leave ``count`` summaries a second apart, from 10 min ago, in the agent's buffer on
    disk (as an earlier run would); their times."""
    link = link_id(endpoint.ws_url, agent_uuid)
    buffer = ReportBuffer(tmp_path / "spool" / link / "reports.journal", 3600, 3_600_000)
    start_ms = time.time_ns() // 1_000_000 - 600_000
    times = [start_ms + i * 1000 for i in range(count)]
    for time_ms in times:
        buffer.put(time_ms, orjson.dumps({"uuid": agent_uuid, "time": time_ms, "cpu_usage": 5}))
    buffer.close()
    return times


async def test_buffer_left_by_an_earlier_run_is_sent_paced(tmp_path: Path) -> None:
    """Summaries buffered on disk by a previous run go out at report_backlog_per_second."""
    agent_uuid = str(uuid.uuid4())
    async with running_endpoint() as endpoint:
        link = link_id(endpoint.ws_url, agent_uuid)
        start_ms = buffered(endpoint, tmp_path, agent_uuid, 60)[0]
        slow = FAST.replace("report_backlog_per_second = 1000", "report_backlog_per_second = 20")
        async with running_agent(settings_for(endpoint.ws_url, agent_uuid, slow), tmp_path):

            def old() -> list[Any]:
                return [
                    c
                    for c in endpoint.of(REPORT_SUMMARY)
                    if c.params[1]["time"] < start_ms + 60_000
                ]

            await endpoint.wait_for(lambda: len(old()) == 60, timeout=15, what="the old summaries")
            arrivals = [c.at for c in old()]
            # 60 at 20 a second: three batches, a second apart
            assert arrivals[-1] - arrivals[0] >= 1.8
            assert [c.params[1]["time"] for c in old()] == [start_ms + i * 1000 for i in range(60)]
            journal = tmp_path / "spool" / link / "reports.journal"
            await endpoint.wait_for(lambda: not journal.exists(), what="the journal to go")


async def test_summaries_a_busy_server_defers_are_kept_and_sent_after_its_hint(
    tmp_path: Path,
) -> None:
    """A server answering "server busy" (-32000, retry_after_ms) to buffered and live
    summaries: the agent keeps each one and sends it again no sooner than the hint; in
    the end every summary is taken and the journal is gone."""
    agent_uuid = str(uuid.uuid4())
    async with running_endpoint() as endpoint:
        link = link_id(endpoint.ws_url, agent_uuid)
        old_times = buffered(endpoint, tmp_path, agent_uuid, 40)
        endpoint.busy_summaries, endpoint.busy_ms = 25, 700
        slow = FAST.replace("report_backlog_per_second = 1000", "report_backlog_per_second = 10")
        async with running_agent(settings_for(endpoint.ws_url, agent_uuid, slow), tmp_path):

            def taken(times: list[int]) -> bool:
                got = {c.params[1]["time"] for c in endpoint.of(REPORT_SUMMARY) if not c.busy}
                return set(times) <= got

            def deferred_times() -> list[int]:
                return [c.params[1]["time"] for c in endpoint.of(REPORT_SUMMARY) if c.busy]

            await endpoint.wait_for(
                lambda: len(deferred_times()) == 25 and taken(old_times + deferred_times()),
                timeout=20,
                what="every old and every deferred summary to be taken",
            )
            calls = endpoint.of(REPORT_SUMMARY)
            deferred = [c for c in calls if c.busy]
            assert len(deferred) == 25
            for refused in deferred:  # each sent again, and not before the hint
                when = refused.params[1]["time"]
                again = [c for c in calls if c.params[1]["time"] == when and c.at > refused.at]
                assert again, f"the summary of {when} was not sent again"
                assert again[0].at - refused.at >= 0.7 * 0.95
            journal = tmp_path / "spool" / link / "reports.journal"
            await endpoint.wait_for(lambda: not journal.exists(), what="the journal to go")


async def test_a_dynamic_report_a_busy_server_defers_is_dropped(tmp_path: Path) -> None:
    """A busy answer to a dynamic report drops it (the next one is due soon): it is never
    sent again, and never sent as a summary, even behind summaries the server deferred
    too (those are kept and sent again)."""
    agent_uuid = str(uuid.uuid4())
    async with running_endpoint() as endpoint:
        endpoint.busy_summaries, endpoint.busy_dynamic, endpoint.busy_ms = 6, 3, 300
        async with running_agent(settings_for(endpoint.ws_url, agent_uuid), tmp_path):

            def settled() -> bool:
                summaries = endpoint.of(REPORT_SUMMARY)
                taken = {c.params[1]["time"] for c in summaries if not c.busy}
                deferred = [c.params[1]["time"] for c in summaries if c.busy]
                dynamic_taken = [c for c in endpoint.of(REPORT_DYNAMIC) if not c.busy]
                return len(deferred) == 6 and set(deferred) <= taken and len(dynamic_taken) >= 3

            await endpoint.wait_for(settled, what="the deferred summaries to be taken")
            await asyncio.sleep(0.5)  # time for anything else the buffer held to go out
        dynamic = endpoint.of(REPORT_DYNAMIC)
        busy_times = [c.params[1]["time"] for c in dynamic if c.busy]
        assert len(busy_times) == 3
        assert all(not c.busy for c in dynamic[3:])
        assert not set(busy_times) & {c.params[1]["time"] for c in dynamic[3:]}  # not again
        summaries = endpoint.of(REPORT_SUMMARY)
        assert summaries and all("cpu_usage" in c.params[1] for c in summaries)
        assert not any("cpu" in c.params[1] for c in summaries)


async def test_after_a_busy_answer_the_backlog_goes_one_summary_first(tmp_path: Path) -> None:
    """A busy server's answer defers one buffered summary, not a batch: the first summary
    of the backlog goes alone, and alone again after each busy answer; once one is taken,
    the rest go in batches of report_backlog_per_second."""
    agent_uuid = str(uuid.uuid4())
    async with running_endpoint() as endpoint:
        old_times = buffered(endpoint, tmp_path, agent_uuid, 30)
        endpoint.busy_summaries, endpoint.busy_ms = 3, 200
        quiet = (
            FAST.replace("_summary_report_interval_ms = 100", "_summary_report_interval_ms = 60000")
            .replace("dynamic_report_interval_ms = 200", "dynamic_report_interval_ms = 60000")
            .replace("report_backlog_per_second = 1000", "report_backlog_per_second = 10")
        )
        async with running_agent(settings_for(endpoint.ws_url, agent_uuid, quiet), tmp_path):

            def old() -> list[Any]:
                return [c for c in endpoint.of(REPORT_SUMMARY) if c.params[1]["time"] in old_times]

            await endpoint.wait_for(
                lambda: {c.params[1]["time"] for c in old() if not c.busy} == set(old_times),
                timeout=20,
                what="every buffered summary to be taken",
            )
            calls = old()
            # three busy answers, each to the oldest summary sent alone
            assert [c.params[1]["time"] for c in calls if c.busy] == [old_times[0]] * 3
            assert [c.busy for c in calls[:4]] == [True, True, True, False]
            assert len(calls) == 3 + 30, "a summary was sent again after it was taken"
            # then the oldest alone, and the rest in batches of ten a second apart
            rest = calls[4:]
            assert rest[0].at - calls[3].at < 0.5, "the first batch waited after the probe"
            assert rest[9].at - rest[0].at < 0.2 and rest[10].at - rest[0].at >= 0.9


async def test_a_task_runs_promptly_while_reports_flow(tmp_path: Path) -> None:
    """With summaries every 100 ms and a backlog draining, a pushed task is answered at once."""
    agent_uuid = str(uuid.uuid4())
    async with running_endpoint() as endpoint:
        link = link_id(endpoint.ws_url, agent_uuid)
        buffer = ReportBuffer(tmp_path / "spool" / link / "reports.journal", 3600, 3_600_000)
        now_ms = time.time_ns() // 1_000_000
        for i in range(3000):
            summary = {"uuid": agent_uuid, "time": now_ms - 3_000_000 + i * 1000}
            buffer.put(summary["time"], orjson.dumps(summary))
        buffer.close()
        async with running_agent(settings_for(endpoint.ws_url, agent_uuid), tmp_path):
            await endpoint.wait_for(lambda: len(endpoint.of(REPORT_SUMMARY)) >= 500)
            pushed = time.monotonic()
            await endpoint.push({"task_id": 7, "task_token": "t", "task_event_type": "version"})
            upload = await endpoint.wait_for(lambda: endpoint.of("task_upload_task_result"))
            assert upload[0].params[1]["task_id"] == 7 and upload[0].params[1]["success"]
            assert upload[0].at - pushed < scaled(1.0)
            assert len(endpoint.of(REPORT_SUMMARY)) < 3000  # the backlog was still draining


async def test_server_without_report_methods_is_not_asked_again(tmp_path: Path) -> None:
    """A server answering -32601 gets each report method once per connection, and no more."""
    async with running_endpoint() as endpoint:
        endpoint.missing = {REPORT_STATIC, REPORT_DYNAMIC, REPORT_SUMMARY}
        settings = settings_for(endpoint.ws_url, str(uuid.uuid4()))
        async with running_agent(settings, tmp_path) as agent:
            await endpoint.wait_for(
                lambda: endpoint.of(REPORT_SUMMARY) and endpoint.of(REPORT_DYNAMIC)
            )
            await asyncio.sleep(1.0)
            assert len(endpoint.of(REPORT_STATIC)) == 1
            assert len(endpoint.of(REPORT_SUMMARY)) == 1
            assert len(endpoint.of(REPORT_DYNAMIC)) == 1
            outbox = agent.links[0].outbox
            assert outbox is not None and len(outbox.buffer) == 0


async def test_report_metrics_false_sends_nothing(tmp_path: Path) -> None:
    """With report_metrics = false the agent subscribes but reports nothing."""
    async with running_endpoint() as endpoint:
        settings = settings_for(endpoint.ws_url, str(uuid.uuid4()), FAST + "report_metrics = false")
        async with running_agent(settings, tmp_path) as agent:
            await endpoint.wait_for(lambda: endpoint.of("task_register_task"))
            await asyncio.sleep(0.5)
            assert not [c for c in endpoint.calls if c.method.startswith("agent_report_")]
            assert agent.links[0].outbox is None


async def test_http_fallback_reports_and_uploads_then_returns_to_websocket(
    tmp_path: Path,
) -> None:
    """Behind a proxy refusing upgrades the agent reports and uploads over HTTP POST, and takes
    the WebSocket again once the proxy lets it through."""
    agent_uuid = str(uuid.uuid4())
    async with running_endpoint() as endpoint, no_upgrade_proxy(endpoint.port) as proxy:
        link = link_id(proxy.ws_url, agent_uuid)
        spooled = {
            "task_id": 41,
            "agent_uuid": agent_uuid,
            "task_token": "t",
            "timestamp": time.time_ns() // 1_000_000,
            "success": True,
            "task_event_result": {"version": {}},
        }
        spool = Spool(tmp_path / "spool" / link, link, proxy.ws_url)
        spool.put(spooled)
        settings = settings_for(proxy.ws_url, agent_uuid, FAST + "http_fallback_retry_ms = 1000")
        async with running_agent(settings, tmp_path):
            await endpoint.wait_for(
                lambda: len(endpoint.of(REPORT_SUMMARY, "http")) >= 5, what="reports over HTTP"
            )
            uploads = await endpoint.wait_for(
                lambda: endpoint.of("task_upload_task_result", "http")
            )
            assert uploads[0].params[1] == spooled
            assert len(spool) == 0
            assert endpoint.of(REPORT_STATIC, "http")
            assert not endpoint.of("task_register_task")  # no WebSocket got through
            assert proxy.refused >= 1
            proxy.refuse_upgrades = False
            await endpoint.wait_for(
                lambda: endpoint.of("task_register_task", "ws"), what="the WebSocket again"
            )
            switched = len(endpoint.calls)
            await endpoint.wait_for(
                lambda: [c for c in endpoint.calls[switched:] if c.method == REPORT_SUMMARY]
            )
            await asyncio.sleep(0.3)
            later = [c for c in endpoint.calls[switched:] if c.method.startswith("agent_report")]
            assert later and all(c.transport == "ws" for c in later)
            times = [s["time"] for s in endpoint.reports(REPORT_SUMMARY)]
            assert max(_gaps(times)) < 100 * 3  # no gap across the switches


async def test_http_fallback_is_not_taken_when_http_fails_too(tmp_path: Path) -> None:
    """An upgrade refused by a proxy whose backend is down leaves the agent retrying, no more."""
    async with running_endpoint() as endpoint:
        port = endpoint.port
    async with no_upgrade_proxy(port) as proxy:  # nothing behind it: every POST gets a 502
        settings = settings_for(
            proxy.ws_url, str(uuid.uuid4()), FAST + "http_fallback_retry_ms = 1000"
        )
        async with running_agent(settings, tmp_path) as agent:
            await asyncio.sleep(scaled(1.5))
            assert proxy.refused >= 1
            assert agent.links[0].rpc is None
            outbox = agent.links[0].outbox
            assert outbox is not None and len(outbox.buffer) >= 5  # buffered, not lost


@pytest.mark.parametrize(
    ("document", "reason"),
    [
        ("dynamic_report_interval_ms = 1500", "must be a multiple of"),
        ("dynamic_summary_report_interval_ms = 10", "outside 100.."),
        ("static_report_interval_ms = 0", "outside 1000.."),
        ('report_metrics = "sometimes"', "expected a boolean"),
        ("report_buffer_max_count = -1", "outside 0.."),
    ],
)
def test_report_settings_are_checked(document: str, reason: str) -> None:
    """Report settings out of range are refused naming the key."""
    with pytest.raises(InvalidInput, match=reason):
        settings_for("ws://127.0.0.1:1/", str(uuid.uuid4()), document)


async def test_agent_cpu_while_reporting_every_second(tmp_path: Path) -> None:
    """A real `taskd agent` process reporting every second uses at most 1% of one core.

    TASKD_AGENT_CPU_SECONDS sets how long it is measured (the README figure: 60 s).
    """
    seconds = float(os.environ.get("TASKD_AGENT_CPU_SECONDS", "10"))
    async with running_endpoint() as endpoint:
        config = tmp_path / "agent.toml"
        config.write_text(
            f'agent_uuid = "{uuid.uuid4()}"\n'
            f'[[server]]\nname = "s"\nws_url = "{endpoint.ws_url}"\ntoken = "{TOKEN}"\n'
        )
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "taskd", "agent", "--config", str(config)
        )
        try:
            await endpoint.wait_for(lambda: len(endpoint.of(REPORT_SUMMARY)) >= 3, timeout=30)
            agent = psutil.Process(process.pid)
            before, started = agent.cpu_times(), time.monotonic()
            count = len(endpoint.of(REPORT_SUMMARY))
            await asyncio.sleep(seconds)
            after, elapsed = agent.cpu_times(), time.monotonic() - started
            rss = agent.memory_info().rss
            count = len(endpoint.of(REPORT_SUMMARY)) - count
        finally:
            process.terminate()
            await process.wait()
        used = (after.user + after.system) - (before.user + before.system)
        share = used / elapsed
        print(
            f"\nagent CPU: {used:.3f} s in {elapsed:.1f} s = {share:.2%} of one core, "
            f"{count} summaries, {used / max(count, 1) * 1000:.2f} ms each, RSS {rss >> 20} MiB"
        )
        assert count >= seconds - 2
        assert share <= 0.01
