"""Host monitoring on two `taskd serve` nodes sharing one PostgreSQL database.

Reports land on the node holding the agent's connection; every query, multi-last
query and the agent list answer the same on either node.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from taskd.agent.monitor import Monitor, summarize
from tests.helpers import ScriptedAgent, agent_token_limits
from tests.test_cluster import Cluster, node_id_of, running_cluster, wait_until


@pytest.fixture
async def two_nodes(tmp_path: Path, held_ports: Callable[[], int]) -> AsyncIterator[Cluster]:
    """Two nodes sharing one fresh PostgreSQL database (see ``running_cluster``)."""
    async with running_cluster(tmp_path, held_ports, 2) as nodes:
        yield nodes


async def agent_token(cluster: Cluster, agent_uuid: str) -> str:
    """An agent-role token for ``agent_uuid`` (it may report that agent's host)."""
    created = await cluster.su(0, "token_create", {"token_limit": agent_token_limits(agent_uuid)})
    return f"{created['key']}:{created['secret']}"


def host_reports(agent_uuid: str, at_ms: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """This host's static report and summary as the agent makes them, at ``at_ms``."""
    monitor = Monitor(agent_uuid, clock=lambda: at_ms / 1000)
    return monitor.static(), summarize(monitor.dynamic())


async def listed(cluster: Cluster, index: int, agent_uuid: str) -> dict[str, Any]:
    """The agent's entry in ``agent_list`` on node ``index``."""
    agents = await cluster.su(index, "agent_list")
    return next(a for a in agents if a["uuid"] == agent_uuid)


async def test_reports_through_one_node_are_read_on_the_other(two_nodes: Cluster) -> None:
    """An agent held by node A reports there; node B answers its summaries at every
    resolution and its static report; multi-last and the agent list agree on both nodes."""
    cluster = two_nodes
    node_a, node_b = cluster.nodes
    now = time.time_ns() // 1_000_000 - 10_000
    first = ScriptedAgent(node_a.ws_url, "")
    first.token = await agent_token(cluster, first.uuid)
    second = ScriptedAgent(node_b.ws_url, "")
    second.token = await agent_token(cluster, second.uuid)
    async with first, second:
        sent: dict[str, list[dict[str, Any]]] = {first.uuid: [], second.uuid: []}
        for agent in (first, second):
            static, _ = host_reports(agent.uuid, now)
            assert await agent.call("agent_report_static", agent.token, static) == {
                "status": "stored"
            }
            for offset in range(0, 5000, 1000):
                _, summary = host_reports(agent.uuid, now + offset)
                summary["cpu_usage"] = 100 + offset // 100  # 10.0 % .. 14.0 %
                assert await agent.call("agent_report_dynamic_summary", agent.token, summary) == {
                    "status": "stored"
                }
                sent[agent.uuid].append(summary)

        # node B reads what node A stored, at every resolution
        window = [{"uuid": first.uuid}, {"timestamp_from_to": [now - 1000, now + 5000]}]
        raw = await cluster.su(
            1, "agent_query_dynamic_summary", {"fields": ["cpu_usage"], "condition": window}
        )
        assert [row["timestamp"] for row in raw] == [s["time"] for s in sent[first.uuid]]
        assert [row["cpu_usage"] for row in raw] == [10.0, 11.0, 12.0, 13.0, 14.0]
        for resolution, width in (("1m", 60_000), ("1h", 3_600_000)):
            buckets = await cluster.su(
                1,
                "agent_query_dynamic_summary",
                {"fields": ["cpu_usage"], "condition": window, "resolution": resolution},
            )
            # the five seconds may straddle a bucket boundary: each bucket has its own share
            shares: dict[int, list[float]] = {}
            for summary in sent[first.uuid]:
                start = summary["time"] - summary["time"] % width
                shares.setdefault(start, []).append(summary["cpu_usage"] / 10)
            assert {b["timestamp"]: b["cpu_usage"] for b in buckets} == {
                start: pytest.approx(sum(values) / len(values)) for start, values in shares.items()
            }
            assert {b["timestamp"]: (b["cpu_usage_min"], b["cpu_usage_max"]) for b in buckets} == {
                start: (min(values), max(values)) for start, values in shares.items()
            }
        # node B keeps the points of the charts it answered; a summary stored through
        # node A (over HTTP) changes its bucket there, and node B's next answer shows it
        _, late = host_reports(first.uuid, now - 500)  # late: older than the newest
        late["cpu_usage"] = 900
        assert await node_a.call("agent_report_dynamic_summary", first.token, late) == {
            "status": "stored"
        }
        sent[first.uuid].append(late)
        hours = await cluster.su(
            1,
            "agent_query_dynamic_summary",
            {"fields": ["cpu_usage"], "condition": window, "resolution": "1h"},
        )
        start = late["time"] - late["time"] % 3_600_000
        in_bucket = [
            s["cpu_usage"] / 10
            for s in sent[first.uuid]
            if s["time"] - s["time"] % 3_600_000 == start
        ]
        bucket = next(b for b in hours if b["timestamp"] == start)
        assert (bucket["cpu_usage"], bucket["cpu_usage_max"]) == (
            pytest.approx(sum(in_bucket) / len(in_bucket)),
            90.0,
        )
        statics = await cluster.su(
            1, "agent_query_static", {"fields": ["system"], "condition": [{"uuid": first.uuid}]}
        )
        assert len(statics) == 1 and statics[0]["system"]["system_host_name"]

        # multi-last: the same newest row of each agent on both nodes, in the order asked
        asked = [second.uuid, first.uuid]
        answers = [
            await cluster.su(i, "agent_dynamic_summary_multi_last_query", asked, ["cpu_usage"])
            for i in (0, 1)
        ]
        assert answers[0] == answers[1]
        assert [(r["uuid"], r["timestamp"], r["cpu_usage"]) for r in answers[0]] == [
            (second.uuid, now + 4000, 14.0),
            (first.uuid, now + 4000, 14.0),
        ]

        # the agent list: online on both nodes, each agent held by its own node
        ids = [await node_id_of(node_a), await node_id_of(node_b)]
        for index in (0, 1):
            for agent, node_id in ((first, ids[0]), (second, ids[1])):
                entry = await listed(cluster, index, agent.uuid)
                assert entry["online"] and entry["node_id"] == node_id, entry

    async def offline() -> bool:
        entries = [await listed(cluster, i, a.uuid) for i in (0, 1) for a in (first, second)]
        return not any(e["online"] for e in entries)

    await wait_until(offline, "both agents offline on both nodes")
    # what they reported stays readable on both nodes once they are gone
    for index in (0, 1):
        rows = await cluster.su(index, "agent_dynamic_summary_multi_last_query", asked, [])
        assert [r["uuid"] for r in rows] == asked
