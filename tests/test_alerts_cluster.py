"""Alerts with several nodes on one PostgreSQL database (one node evaluates and sends, each
notification goes out once, another takes over when that node stops or is killed), and
the R7 fault scenario at quick scale."""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from pathlib import Path

import httpx

from benchmarks.faults_alerts import r7_alerts
from benchmarks.scale import QUICK
from tests.helpers import ScriptedAgent, Server, postgres_database, running_server, scaled, wait_for
from tests.test_alerts import Receiver, alert_settings, events, offline_rule, receiver
from tests.test_cluster import Cluster, Node
from tests.test_cluster import cluster as cluster


async def _delivered(hook: Receiver, count: int) -> bool:
    return len(hook.delivered) >= count


def _titles(hook: Receiver) -> list[str]:
    return [str(call.body["title"]) for call in hook.calls]


async def test_two_nodes_send_each_notification_once_and_hand_over() -> None:
    """An agent held by the node that does not lead drops and returns: one start and one
    resolution go out. The leader stops while another event fires: the other node takes
    over, starts nothing twice and sends the resolution once."""
    async with postgres_database() as url, receiver() as hook:
        first = alert_settings(url, node_id=str(uuid.uuid4()), node_grace_ms=2000)
        second = alert_settings(url, node_id=str(uuid.uuid4()), node_grace_ms=2000)
        async with (
            contextlib.AsyncExitStack() as stack_a,
            contextlib.AsyncExitStack() as stack_b,
            contextlib.AsyncExitStack() as held,
        ):
            a = await stack_a.enter_async_context(running_server(first))
            b = await stack_b.enter_async_context(running_server(second, super_token=a.super_token))
            nodes = {"a": (a, stack_a), "b": (b, stack_b)}

            async def one_leader() -> bool:
                leaders = [n for n, (s, _) in nodes.items() if s.service.cluster.is_leader]
                return len(leaders) == 1

            await wait_for(one_leader, 10)
            [leader_name] = [n for n, (s, _) in nodes.items() if s.service.cluster.is_leader]
            leader, leader_stack = nodes[leader_name]
            other: Server = nodes["b" if leader_name == "a" else "a"][0]
            assert leader.service.alerts.running and not other.service.alerts.running

            await other.su("alert_channel_create", "hook", hook.url())
            await other.su("alert_rule_create", offline_rule("down", "all", ["hook"], 1000))
            token = a.super_token
            first_agent, second_agent = str(uuid.uuid4()), str(uuid.uuid4())
            async with ScriptedAgent(other.ws_url, token, second_agent):
                async with ScriptedAgent(other.ws_url, token, first_agent):
                    await asyncio.sleep(scaled(0.5))
                await wait_for(lambda: _delivered(hook, 1), 6)
                # back for good
                await held.enter_async_context(ScriptedAgent(other.ws_url, token, first_agent))
                await wait_for(lambda: _delivered(hook, 2), 6)
                await asyncio.sleep(scaled(1.5))
                assert len(hook.calls) == 2, _titles(hook)
                assert "firing" in _titles(hook)[0] and "resolved" in _titles(hook)[1]
            # the second agent left too: its event fires (sent by the leader) ...
            await wait_for(lambda: _delivered(hook, 3), 6)
            assert second_agent in hook.calls[2].text and first_agent not in hook.calls[2].text
            # ... and the leader stops while it fires
            await leader_stack.aclose()
            await wait_for(lambda: _leads(other), 10)
            await asyncio.sleep(scaled(2))
            assert len(hook.calls) == 3, _titles(hook)
            async with ScriptedAgent(other.ws_url, token, second_agent):
                await wait_for(lambda: _delivered(hook, 4), 6)
                await asyncio.sleep(scaled(1.5))
            assert len(hook.calls) == 4, _titles(hook)
            assert "resolved" in hook.calls[3].body["title"] and second_agent in hook.calls[3].text
            found = await events(other)
            assert len(found) == 2 and all(e["state"] == "resolved" for e in found), [
                (e["uuid"], e["state"], e["message"], e["deliveries"]) for e in found
            ]
            assert all(d["attempts"] == 1 for e in found for d in e["deliveries"])


async def _leads(server: Server) -> bool:
    return bool(server.service.cluster.is_leader and server.service.alerts.running)


async def test_r7_a_mass_drop_is_recorded_and_notified_in_batches(tmp_path: Path) -> None:
    """The R7 fault scenario at quick scale: every dropped agent fires once, no other does,
    and one channel gets a handful of messages, not one per agent."""
    outcome = await r7_alerts(QUICK, tmp_path)
    assert outcome.error is None, f"{outcome.error}\n{outcome.figures.get('traceback', '')}"
    assert outcome.checks and not outcome.broken, outcome.explain()
    assert outcome.figures["messages"] <= 5


async def _leader(nodes: list[Node]) -> Node | None:
    for node in nodes:
        if node.process is None or node.process.poll() is not None:
            continue
        async with httpx.AsyncClient(timeout=5) as client:
            text = (await client.get(node.url + "metrics")).text
        if re.search(r"^taskd_cron_leader 1\.0$", text, re.MULTILINE):
            return node
    return None


def _lines(hook: Receiver, word: str, agent_uuid: str) -> int:
    return sum(
        1
        for call in hook.delivered
        for line in str(call.body.get("message", "")).splitlines()
        if line.startswith(word) and agent_uuid in line
    )


async def test_a_killed_leader_is_taken_over_without_duplicates(cluster: Cluster) -> None:
    """`taskd serve` processes: the node that sends is SIGKILLed while an event fires (its
    start recorded as sent); another node takes over, sends the resolution once, fires a new
    event once, and nothing is sent twice."""
    async with receiver() as hook:
        await cluster.su(0, "alert_channel_create", "hook", hook.url())
        rule = offline_rule("down", "all", ["hook"], 2000)
        await cluster.su(0, "alert_rule_create", rule)
        leader = await wait_for(lambda: _leader(cluster.nodes), 20)
        holder = next(node for node in cluster.nodes if node is not leader)
        first, second = str(uuid.uuid4()), str(uuid.uuid4())
        async with ScriptedAgent(holder.ws_url, cluster.token, second):
            async with ScriptedAgent(holder.ws_url, cluster.token, first):
                await asyncio.sleep(scaled(0.5))
            await wait_for(lambda: _delivered(hook, 1), 10)
            assert _lines(hook, "FIRING", first) == 1
            # recorded as sent (a sender killed between a channel's answer and that record
            # leaves it to the next sender, which sends it again rather than lose it)
            await wait_for(lambda: _recorded_sent(cluster, first), 10)
            leader.kill()
            successor = await wait_for(lambda: _leader(cluster.nodes), 30)
            assert successor is not leader
        # the second agent left after the kill: the successor fires it
        async with ScriptedAgent(holder.ws_url, cluster.token, first):
            await wait_for(lambda: _has(hook, "RESOLVED", first), 20)
            await wait_for(lambda: _has(hook, "FIRING", second), 20)
            await asyncio.sleep(scaled(3))
        said = [c.body.get("message") for c in hook.calls]
        assert _lines(hook, "FIRING", first) == 1, said
        assert _lines(hook, "RESOLVED", first) == 1
        assert _lines(hook, "FIRING", second) == 1
        found = await successor.call(
            "alert_event_query", cluster.token, {"condition": [{"uuid": first}]}
        )
        assert [e["state"] for e in found] == ["resolved"]


async def _recorded_sent(cluster: Cluster, agent_uuid: str) -> bool:
    found = await cluster.su(0, "alert_event_query", {"condition": [{"uuid": agent_uuid}]})
    return bool(found) and all(d["state"] == "sent" for d in found[0]["deliveries"])


async def _has(hook: Receiver, word: str, agent_uuid: str) -> bool:
    return _lines(hook, word, agent_uuid) >= 1
