"""Several `taskd serve` processes on one PostgreSQL database behave as one service."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import asyncpg
import httpx
import orjson
import pytest
import websockets

import taskd.methods  # noqa: F401 - registers the methods in REGISTRY
from taskd.agent.monitor import Monitor, summarize
from taskd.agent.tasks import TaskContext
from taskd.agent.tasks.web_shell import run as run_web_shell
from taskd.cluster import node_lock_key
from taskd.config import parse_agent_config
from taskd.protocol import WebShell, parse_task_event_type
from taskd.rpc import REGISTRY
from tests.helpers import (
    RpcError,
    ScriptedAgent,
    WsClient,
    make_settings,
    postgres_database,
    running_server,
    scaled,
    unwrap,
)

GRACE_MS = 2000


@dataclass
class Node:
    """One `taskd serve` process of the cluster."""

    name: str
    port: int
    config: Path
    process: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)
    log_name: str = "serve.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    def start(self) -> None:
        log = (self.config.parent / self.log_name).open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "taskd", "serve", "--config", str(self.config)],
            env={
                **os.environ,
                "TASKD_NODE_GRACE_MS": str(GRACE_MS),
                "TASKD_LOG_LEVEL": "info",
                **self.env,
            },
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

    async def wait_ready(self) -> None:
        deadline = time.monotonic() + scaled(30)
        async with httpx.AsyncClient() as client:
            while time.monotonic() < deadline:
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(self.url + "healthz", timeout=1)).status_code == 200:
                        return
                assert self.process is not None and self.process.poll() is None, self.log()
                await asyncio.sleep(0.1)
        raise TimeoutError(f"node {self.name} did not start: {self.log()}")

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=scaled(15))
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log(self) -> str:
        return (self.config.parent / self.log_name).read_text(errors="replace")[-3000:]

    async def call(self, method: str, *params: Any, **named: Any) -> Any:
        body = {"jsonrpc": "2.0", "method": method, "params": named or list(params), "id": 1}
        async with httpx.AsyncClient(timeout=scaled(30)) as client:
            reply = (await client.post(self.url, content=orjson.dumps(body))).json()
        return unwrap(reply)


@dataclass
class Cluster:
    """Three nodes and the super token."""

    nodes: list[Node]
    token: str
    database_url: str

    async def su(self, index: int, method: str, *params: Any) -> Any:
        return await self.nodes[index].call(method, self.token, *params)


def taskd_init(config: Path, plain_url: str) -> dict[str, Any]:
    """`taskd init` against PostgreSQL: the schema, the super token and the server UUID."""
    init = subprocess.run(
        [
            sys.executable,
            "-m",
            "taskd",
            "init",
            "--config",
            str(config),
            "--database",
            plain_url,
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=scaled(60),
    )
    assert init.returncode == 0, init.stderr
    data: dict[str, Any] = json.loads(init.stdout)
    return data


def node_config(directory: Path, server_uuid: str, plain_url: str, port: int) -> Node:
    """A node's config file in ``directory`` (listening on ``port``); the node not started."""
    directory.mkdir(exist_ok=True)
    config = directory / "taskd.toml"
    config.write_text(
        "[server]\n"
        f'server_uuid = "{server_uuid}"\n'
        f'listen = "127.0.0.1:{port}"\n'
        f'database_url = "{plain_url}"\n'
        "reaper_interval_ms = 200\n"
    )
    return Node(directory.name, port, config)


@contextlib.asynccontextmanager
async def running_cluster(
    tmp_path: Path, held_ports: Callable[[], int], count: int
) -> AsyncIterator[Cluster]:
    """``count`` `taskd serve` processes on held ports sharing one fresh PostgreSQL database."""
    async with postgres_database() as url:
        plain_url = url.replace("postgresql+asyncpg://", "postgresql://")
        data = taskd_init(tmp_path / "n0" / "taskd.toml", plain_url)
        nodes = [
            node_config(tmp_path / f"n{index}", data["server_uuid"], plain_url, held_ports())
            for index in range(count)
        ]
        for node in nodes:
            node.start()
        try:
            for node in nodes:
                await node.wait_ready()
            yield Cluster(nodes, data["super_token"], url)
        finally:
            for node in nodes:
                node.stop()


@pytest.fixture
async def cluster(tmp_path: Path, held_ports: Callable[[], int]) -> AsyncIterator[Cluster]:
    """Three nodes (see ``running_cluster``)."""
    async with running_cluster(tmp_path, held_ports, 3) as nodes:
        yield nodes


async def wait_until(check: Any, what: str, timeout: float = 20) -> None:
    """Poll an async check until it is true."""
    deadline = time.monotonic() + scaled(timeout)
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def online_at(cluster: Cluster, agent_uuid: str, node: Node) -> bool:
    agents = await cluster.su(2, "agent_list")
    entry = next((a for a in agents if a["uuid"] == agent_uuid), None)
    return bool(entry and entry["online"] and entry["remote_addr"] and entry["node_id"]) and (
        entry["node_id"] == await node_id_of(node)
    )


async def node_id_of(node: Node) -> str:
    async with httpx.AsyncClient() as client:
        return str((await client.get(node.url + "healthz")).json()["node_id"])


async def test_every_node_serves_every_method(cluster: Cluster) -> None:
    """Tasks created on any node reach an agent held by another; all nodes see the same data."""
    uuids = {await n.call("server_uuid") for n in cluster.nodes}
    assert len(uuids) == 1
    node_ids = {await node_id_of(n) for n in cluster.nodes}
    assert len(node_ids) == 3, "each node has its own id"
    async with ScriptedAgent(cluster.nodes[0].ws_url, cluster.token) as agent:
        await wait_until(lambda: online_at(cluster, agent.uuid, cluster.nodes[0]), "agent online")
        for index in (1, 2, 0):
            created = await cluster.su(index, "task_create_task", agent.uuid, "version")
            task = await agent.next_task()
            assert task["task_id"] == created["id"]
            unwrap(await agent.upload(task, {"version": {"from": index}}))
        for index in range(3):
            rows = await cluster.su(index, "task_query_task", {"condition": [{"uuid": agent.uuid}]})
            assert len(rows) == 3 and all(r["success"] for r in rows)
        deleted = await cluster.su(2, "task_delete_task", [{"uuid": agent.uuid}, "last"])
        assert deleted["deleted"] == 1
        assert len(await cluster.su(1, "task_query_task", {"condition": []})) == 2


async def test_blocking_call_on_one_node_gets_a_result_uploaded_through_another(
    cluster: Cluster,
) -> None:
    """A blocking call on node 2 is woken when the result, uploaded through node 0, commits."""
    async with ScriptedAgent(cluster.nodes[0].ws_url, cluster.token) as agent:
        await wait_until(lambda: online_at(cluster, agent.uuid, cluster.nodes[0]), "agent online")
        call = asyncio.create_task(
            cluster.su(2, "task_create_task_blocking", agent.uuid, "ip", 10_000)
        )
        task = await agent.next_task()
        started = time.monotonic()
        unwrap(await agent.upload(task, {"ip": ["192.0.2.1", None]}))
        result = await call
        assert time.monotonic() - started < scaled(2)
    assert result["task_id"] == task["task_id"]
    assert result["task_event_result"] == {"ip": ["192.0.2.1", None]}


async def test_blocking_call_is_woken_when_its_agent_moved_before_answering(
    cluster: Cluster,
) -> None:
    """A blocking call on node 0 for an agent on node 0 gets the result the agent
    uploads after it reconnected to node 1."""
    agent_uuid = str(uuid.uuid4())
    first = ScriptedAgent(cluster.nodes[0].ws_url, cluster.token, agent_uuid)
    async with first:
        await wait_until(lambda: online_at(cluster, agent_uuid, cluster.nodes[0]), "on node 0")
        call = asyncio.create_task(
            cluster.su(0, "task_create_task_blocking", agent_uuid, "ip", 15_000)
        )
        task = await first.next_task()
    async with ScriptedAgent(cluster.nodes[1].ws_url, cluster.token, agent_uuid) as moved:
        await wait_until(lambda: online_at(cluster, agent_uuid, cluster.nodes[1]), "on node 1")
        started = time.monotonic()
        unwrap(await moved.upload(task, {"ip": [None, "2001:db8::1"]}))
        result = await call
        assert time.monotonic() - started < scaled(3)
    assert result["task_id"] == task["task_id"]
    assert result["task_event_result"] == {"ip": [None, "2001:db8::1"]}


async def test_agent_that_moves_is_routed_to_its_new_node(cluster: Cluster) -> None:
    """An agent reconnecting to another node gets its tasks there; the old node drops it."""
    agent_uuid = str(uuid.uuid4())
    old = ScriptedAgent(cluster.nodes[0].ws_url, cluster.token, agent_uuid)
    new = ScriptedAgent(cluster.nodes[1].ws_url, cluster.token, agent_uuid)
    async with old:
        await wait_until(lambda: online_at(cluster, agent_uuid, cluster.nodes[0]), "on node 0")
        async with new:
            await wait_until(lambda: online_at(cluster, agent_uuid, cluster.nodes[1]), "on node 1")
            for index in (0, 2):
                await cluster.su(index, "task_create_task", agent_uuid, "version")
                task = await new.next_task()
                assert task["task_event_type"] == "version"
            with pytest.raises(asyncio.TimeoutError):
                await old.next_task(timeout=0.5)


async def test_agent_list_is_cluster_wide(cluster: Cluster) -> None:
    """agent_list on any node shows agents held by every node, with their node id."""
    agents = [ScriptedAgent(n.ws_url, cluster.token) for n in cluster.nodes]
    async with agents[0], agents[1], agents[2]:
        for agent, node in zip(agents, cluster.nodes, strict=True):
            await wait_until(lambda a=agent, n=node: online_at(cluster, a.uuid, n), "online")
        for index in range(3):
            listed = {a["uuid"]: a for a in await cluster.su(index, "agent_list")}
            assert all(listed[a.uuid]["online"] for a in agents)
    await wait_until(
        lambda: _all_offline(cluster, [a.uuid for a in agents]), "agents offline after closing"
    )


async def _all_offline(cluster: Cluster, uuids: list[str]) -> bool:
    listed = {a["uuid"]: a for a in await cluster.su(1, "agent_list")}
    return not any(listed[u]["online"] for u in uuids)


@contextlib.asynccontextmanager
async def balancer(nodes: list[Node]) -> AsyncIterator[int]:
    """A TCP load balancer: each connection goes to the first node that accepts it."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def handle(
        client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        for node in nodes:
            if node.process is None or node.process.poll() is not None:
                continue
            try:
                upstream_reader, upstream_writer = await asyncio.open_connection(
                    "127.0.0.1", node.port
                )
            except OSError:
                continue
            await asyncio.gather(
                pipe(client_reader, upstream_writer), pipe(upstream_reader, client_writer)
            )
            return
        client_writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def test_killed_node_agents_reconnect_elsewhere_and_queued_tasks_arrive(
    cluster: Cluster, tmp_path: Path
) -> None:
    """SIGKILL the node holding a real agent: it reconnects through the balancer to another
    node, and tasks queued for it meanwhile are delivered."""
    async with balancer(cluster.nodes) as port:
        agent_uuid = str(uuid.uuid4())
        agent = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "taskd",
                "agent",
                "--server",
                f"ws://127.0.0.1:{port}/",
                "--token",
                cluster.token,
                "--uuid",
                agent_uuid,
                "--state-dir",
                str(tmp_path / "agent"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            await wait_until(
                lambda: online_at(cluster, agent_uuid, cluster.nodes[0]), "on node 0", 20
            )
            probe = {"tcp_ping": f"127.0.0.1:{cluster.nodes[2].port}"}
            first = await cluster.su(2, "task_create_task_blocking", agent_uuid, probe, 10_000)
            assert first["success"] is True, first
            cluster.nodes[0].kill()
            queued = await cluster.su(2, "task_create_task", agent_uuid, probe, 60_000)
            await wait_until(
                lambda: online_at(cluster, agent_uuid, cluster.nodes[1]), "moved to node 1", 30
            )

            async def delivered() -> bool:
                [row] = await cluster.su(
                    2, "task_query_task", {"condition": [{"task_id": queued["id"]}]}
                )
                return row["success"] is True

            await wait_until(delivered, "the queued task answered", 20)
            again = await cluster.su(2, "task_create_task_blocking", agent_uuid, probe, 10_000)
            assert again["success"] is True, again
        finally:
            agent.send_signal(signal.SIGTERM)
            # not a blocking wait: the balancer that forwards the agent's close runs on this loop
            await asyncio.to_thread(agent.wait, scaled(15))


async def test_dead_nodes_agents_count_as_offline_after_the_grace(cluster: Cluster) -> None:
    """When a node dies its agents are offline for everyone once the grace has passed."""
    agent = ScriptedAgent(cluster.nodes[0].ws_url, cluster.token)
    async with agent:
        await wait_until(lambda: online_at(cluster, agent.uuid, cluster.nodes[0]), "online")
        cluster.nodes[0].kill()

        async def offline() -> bool:
            listed = {a["uuid"]: a for a in await cluster.su(1, "agent_list")}
            return listed[agent.uuid]["online"] is False

        await wait_until(offline, "offline after the grace", GRACE_MS / 1000 + 8)
        with pytest.raises(RpcError) as error:
            await cluster.su(1, "task_create_task", agent.uuid, "version")
        assert error.value.code == 104


async def test_web_shell_when_user_and_agent_land_on_different_nodes(cluster: Cluster) -> None:
    """The user's /terminal on node 1 is relayed to node 0, where the agent opened the slot."""
    async with ScriptedAgent(cluster.nodes[0].ws_url, cluster.token) as agent:
        await wait_until(lambda: online_at(cluster, agent.uuid, cluster.nodes[0]), "online")
        terminal_id = str(uuid.uuid4())
        shell = {"url": f"{cluster.nodes[0].ws_url}auto_gen", "terminal_id": terminal_id}
        await cluster.su(2, "task_create_task", agent.uuid, {"web_shell": shell})
        pushed = await agent.next_task()
        settings = parse_agent_config(
            f'agent_uuid = "{agent.uuid}"\nterminal_shell = "/bin/sh"\n'
            f'[[server]]\nws_url = "{cluster.nodes[0].ws_url}"\ntoken = "{cluster.token}"\n'
        )
        task = parse_task_event_type(pushed["task_event_type"])
        assert isinstance(task, WebShell)
        context = TaskContext(
            settings, settings.servers[0], pushed["task_id"], pushed["task_token"]
        )
        runner = asyncio.create_task(run_web_shell(task, context))
        query = urlencode(
            {"agent_uuid": agent.uuid, "terminal_id": terminal_id, "token": cluster.token}
        )
        async with websockets.connect(f"{cluster.nodes[1].ws_url}terminal?{query}") as user:
            await user.send("echo hi\n")
            seen = b""
            async with asyncio.timeout(scaled(15)):
                while not re.search(rb"(?<!echo )hi\r\n", seen):
                    frame = await user.recv()
                    assert isinstance(frame, bytes)
                    seen += frame
        result = await asyncio.wait_for(runner, scaled(15))
        assert result.to_wire() == {"web_shell": True}


async def is_leader(node: Node) -> bool:
    """Whether a node reports itself as the cron leader (its /metrics gauge)."""
    async with httpx.AsyncClient() as client:
        text = (await client.get(node.url + "metrics", timeout=2)).text
    return "taskd_cron_leader 1.0" in text


async def test_killing_the_cron_leader_hands_over_without_double_fires(cluster: Cluster) -> None:
    """SIGKILL the leader of a per-second cron: another node leads within 5 s, no slot fires
    twice, and only slots inside the hand-over window are missed."""
    target = str(uuid.uuid4())
    cron = {"agent": [[target], {"task": "version"}]}
    await cluster.su(1, "crontab_create", "every-second", "* * * * * *", cron)
    leaders = [n for n in cluster.nodes if await is_leader(n)]
    assert len(leaders) == 1, "exactly one node leads"
    leader = leaders[0]
    others = [n for n in cluster.nodes if n is not leader]

    async def slots() -> list[int]:
        rows = await cluster.su(
            cluster.nodes.index(others[0]),
            "crontab-result_query",
            {"condition": [{"cron_name": "every-second"}, {"limit": 1000}]},
        )
        return sorted(r["run_time"] for r in rows)

    async def fired(count: int) -> bool:
        return len(await slots()) >= count

    await wait_until(lambda: fired(3), "three fires before the kill")
    leader.kill()
    killed_at = time.monotonic()

    async def new_leader() -> bool:
        return any([await is_leader(n) for n in others])

    await wait_until(new_leader, "a new leader", 10)
    handover = time.monotonic() - killed_at
    assert handover < 5, f"hand-over took {handover:.1f} s"
    before = len(await slots())
    await wait_until(lambda: fired(before + 3), "three fires after the hand-over")
    runs = await slots()
    assert len(runs) == len(set(runs)), "a slot fired twice"
    gaps = [(b - a) // 1000 - 1 for a, b in itertools.pairwise(runs)]
    missed = sum(gaps)
    assert all(run % 1000 == 0 for run in runs)
    print(f"cron hand-over: {handover:.2f} s, {missed} slot(s) missed, {len(runs)} fired once each")
    assert missed <= handover + 2, f"{missed} slots missed in a {handover:.1f} s hand-over"


async def test_rolling_a_token_on_one_node_revokes_it_on_every_node(cluster: Cluster) -> None:
    """A token rolled through node 1 stops working at once on node 0, and node 0 closes the
    agent connection it had opened."""
    agent_uuid = str(uuid.uuid4())
    limits = [
        {
            "scopes": [{"agent_uuid": agent_uuid}],
            "permissions": [{"task": "listen"}, {"task": {"write": "*"}}],
        }
    ]
    issued = await cluster.su(1, "token_create", {"token_limit": limits})
    issued_token = f"{issued['key']}:{issued['secret']}"
    agent = ScriptedAgent(cluster.nodes[0].ws_url, issued_token, agent_uuid)
    async with agent:
        await wait_until(lambda: online_at(cluster, agent_uuid, cluster.nodes[0]), "online")
        await cluster.su(1, "token_roll_token_secret", issued["key"])
        assert await agent.closed() == 1008
    with pytest.raises(RpcError) as error:
        await cluster.nodes[0].call("task_query_task", issued_token, {"condition": []})
    assert error.value.code == 102


async def _leader_index(cluster: Cluster) -> int:
    """The index of the one node leading the crons."""

    async def one_leader() -> bool:
        return sum([await is_leader(n) for n in cluster.nodes]) == 1

    await wait_until(one_leader, "one cron leader")
    return [await is_leader(n) for n in cluster.nodes].index(True)


async def test_every_method_answers_on_every_node(cluster: Cluster) -> None:
    """One valid call of every registered method succeeds on each node (task_register_task
    over WebSocket), and a cron edited on a node that does not lead fires with the edit."""
    called: set[str] = set()
    leader = await _leader_index(cluster)
    edited_off_leader = []
    worker = ScriptedAgent(cluster.nodes[0].ws_url, cluster.token)
    cron_target = ScriptedAgent(cluster.nodes[1].ws_url, cluster.token)
    async with worker, cron_target:
        await wait_until(lambda: online_at(cluster, worker.uuid, cluster.nodes[0]), "online")
        await wait_until(lambda: online_at(cluster, cron_target.uuid, cluster.nodes[1]), "online")
        for index, node in enumerate(cluster.nodes):
            other = cluster.nodes[(index + 1) % 3]

            async def call(method: str, *params: Any, node: Node = node, **named: Any) -> Any:
                called.add(method)
                return await node.call(method, *params, **named)

            async def su(method: str, *params: Any, call: Any = call) -> Any:
                return await call(method, cluster.token, *params)

            # server info
            assert await call("server_uuid") == await call("nodeget-server_uuid")
            assert (await call("server_hello")).startswith("hello")
            assert await call("nodeget-server_hello") == await call("server_hello")
            discovered = {m["name"] for m in (await call("rpc.discover"))["methods"]}
            assert {"task_create_task", "crontab_edit", "token_create"} <= discovered

            # tasks: created here, pushed to the worker on node 0, answered over HTTP here
            created = await su("task_create_task", worker.uuid, "version")
            pushed = await worker.next_task()
            assert pushed["task_id"] == created["id"]
            response = {
                "task_id": pushed["task_id"],
                "agent_uuid": worker.uuid,
                "task_token": pushed["task_token"],
                "timestamp": 1000 + index,
                "success": True,
                "task_event_result": {"version": {"node": index}},
            }
            assert await su("task_upload_task_result", response) == {"id": created["id"]}
            blocking = asyncio.create_task(
                su("task_create_task_blocking", worker.uuid, "ip", 10_000)
            )
            unwrap(await worker.upload(await worker.next_task(), {"ip": ["192.0.2.1", None]}))
            assert (await blocking)["task_event_result"] == {"ip": ["192.0.2.1", None]}
            by_id = {"condition": [{"task_id": created["id"]}]}
            [record] = await su("task_query_task", by_id)
            assert record["task_event_result"] == {"version": {"node": index}}
            assert await su("task_query", by_id) == [record]
            for delete in ("task_delete_task", "task_delete"):
                queued = await su("task_create_task", str(uuid.uuid4()), "ip", 60_000)
                deleted = await su(delete, [{"task_id": queued["id"]}])
                assert deleted == {"success": True, "deleted": 1, "condition_count": 1}

            # a subscription held here receives a task created on another node
            subscriber = str(uuid.uuid4())
            async with WsClient(node.ws_url) as client:
                subscription = await client.call("task_register_task", cluster.token, subscriber)
                called.add("task_register_task")
                await wait_until(lambda u=subscriber, n=node: online_at(cluster, u, n), "online")
                await other.call("task_create_task", cluster.token, subscriber, "version")
                frame = await asyncio.wait_for(client.notifications.get(), scaled(10))
                assert frame["params"]["subscription"] == subscription
                assert await client.call("task_unregister_task", subscription) is True
                called.add("task_unregister_task")

            # agents
            listed = {a["uuid"]: a for a in await su("agent_list")}
            assert listed[worker.uuid]["online"] and listed[cron_target.uuid]["online"]
            enrolled = await su("agent_enroll", str(uuid.uuid4()))
            assert set(enrolled) == {"uuid", "token"}
            assert worker.uuid in (await su("nodeget-server_list_all_agent_uuid"))["uuids"]
            assert worker.uuid in await su("agent-uuid_list_all")
            modes = await su("agent-uuid_list_all_with_agent_mode")
            assert {"uuid": enrolled["uuid"], "soft_delete": False} in modes
            deleted_agent = await su("agent-uuid_delete", enrolled["uuid"])
            assert deleted_agent["success"] is True
            assert (await call("nodeget-server_version"))["binary_type"] == "Server"
            assert await call("server_version") == await call("nodeget-server_version")

            # kv: written on this node, read back on the next
            namespace = f"ns-{index}"
            assert (await su("kv_create", namespace))["namespace"] == namespace
            assert await su("kv_set_value", namespace, "name", f"n{index}") == {"success": True}
            assert await su("kv_get_value", namespace, "name") == f"n{index}"
            assert await other.call("kv_get_value", cluster.token, namespace, "name") == f"n{index}"
            assert namespace in await su("kv_list_all_namespace")
            assert "name" in await su("kv_get_all_keys", namespace)
            multi = await su("kv_get_multi_value", [{"namespace": namespace, "key": "name"}])
            assert [item["value"] for item in multi] == [f"n{index}"]
            assert await su("kv_delete_key", namespace, "name") == {"success": True}

            # alerts: written here, read back on the next node
            channel, rule_name = f"hook-{index}", f"down-{index}"
            created_channel = await su("alert_channel_create", channel, "json://127.0.0.1:9/a")
            assert set(created_channel) == {"id"}
            edited_channel = await su("alert_channel_edit", channel, "json://127.0.0.1:9/b")
            assert edited_channel == {"success": True}
            assert channel in {c["name"] for c in await su("alert_channel_list")}
            assert channel in {
                c["name"] for c in await other.call("alert_channel_list", cluster.token)
            }
            with pytest.raises(RpcError) as untested:
                await su("alert_channel_test", channel)  # nothing listens on port 9
            assert untested.value.code == 999
            rule = {
                "name": rule_name,
                "kind": "agent_offline",
                "targets": [worker.uuid],
                "params": {"grace_ms": 3_600_000},
                "channels": [channel],
            }
            assert set(await su("alert_rule_create", rule)) == {"id"}
            assert rule_name in {
                r["name"] for r in await other.call("alert_rule_list", cluster.token)
            }
            edited_rule = await su("alert_rule_edit", rule_name, {**rule, "remind_ms": 60_000})
            assert edited_rule == {"success": True}
            assert [r["remind_ms"] for r in await su("alert_rule_list")] == [60_000]
            assert await su("alert_event_query", {"condition": [{"rule": rule_name}]}) == []
            assert await su("alert_rule_delete", rule_name) == {"success": True}
            assert await su("alert_channel_delete", channel) == {"success": True}

            # monitoring: reported here, read back on the next node
            monitor = Monitor(worker.uuid)
            dynamic = monitor.dynamic()
            assert (await su("agent_report_static", monitor.static()))["status"] in (
                "stored",
                "skipped",
            )
            assert await su("agent_report_dynamic", dynamic) == {"status": "stored"}
            assert await su("agent_report_dynamic_summary", summarize(dynamic)) == {
                "status": "stored"
            }
            mine = {"fields": [], "condition": [{"uuid": worker.uuid}, "last"]}
            assert await other.call("agent_query_dynamic_summary", cluster.token, mine)
            assert await su("agent_query_dynamic_summary", mine)
            assert await su("agent_query_static", {**mine, "fields": ["system"]})
            assert await su("agent_query_dynamic", {**mine, "fields": ["load"]})
            assert await su("agent_static_data_multi_last_query", [worker.uuid], ["system"])
            assert await su("agent_dynamic_data_multi_last_query", [worker.uuid], ["load"])
            assert await su("agent_dynamic_summary_multi_last_query", [worker.uuid], [])
            for kind in ("static", "dynamic", "dynamic_summary"):
                deleted = await su(f"agent_delete_{kind}", [{"uuid": worker.uuid}, "last"])
                assert deleted["success"] is True

            # crons: edited here (two of the three nodes do not lead), fired by the leader
            name = f"edited-on-n{index}"
            target = [[cron_target.uuid], {"task": "version"}]
            await su("crontab_create", name, "0 0 0 1 1 * 2099", {"agent": target})
            probe = {"tcp_ping": f"127.0.0.1:{node.port}"}
            edit = await su(
                "crontab_edit",
                name,
                "* * * * * *",
                {"agent": [[cron_target.uuid], {"task": probe}]},
            )
            assert edit["success"] is True
            by_name = {"condition": [{"cron_name": name}]}

            async def fired(by_name: Any = by_name, su: Any = su) -> bool:
                return any(r["relative_id"] for r in await su("crontab-result_query", by_name))

            await wait_until(fired, f"{name} firing")
            fire = next(r for r in await su("crontab-result_query", by_name) if r["relative_id"])
            [task] = await su("task_query_task", {"condition": [{"task_id": fire["relative_id"]}]})
            assert task["task_event_type"] == probe and task["cron_source"] == name
            if index != leader:
                edited_off_leader.append(name)
            [cron] = [c for c in await su("crontab_get") if c["name"] == name]
            assert cron["cron_expression"] == "* * * * * *"
            assert await su("crontab_set_enable", name, False) == {
                "success": True,
                "enabled": False,
            }
            assert (await su("crontab-result_delete", by_name))["deleted"] >= 1
            assert await su("crontab_delete", name) == {"success": True}

            # tokens
            limits = [{"scopes": ["global"], "permissions": [{"task": {"read": "*"}}]}]
            creation = {
                "token_limit": limits,
                "username": f"user{index}",
                "password": "first-password",
            }
            issued = await su("token_create", creation)
            assert (await su("token_get"))["token_key"] == cluster.token.split(":")[0]
            listed = (await su("token_list_all_tokens"))["tokens"]
            assert issued["key"] in {t["token_key"] for t in listed}
            edited = await call(
                "token_edit", token=cluster.token, target_token=issued["key"], description="edited"
            )
            assert edited["token_key"] == issued["key"]
            assert (await other.call("token_get", issued["key"], cluster.token))[
                "description"
            ] == "edited"
            await su("token_change_password", issued["key"], "second-password")
            login = f"user{index}|second-password"
            assert await other.call("task_query_task", login, {"condition": ["last"]})
            rolled = await su("token_roll_token_secret", issued["key"])
            assert rolled["key"] == issued["key"] and rolled["secret"] != issued["secret"]
            assert (await su("token_delete", issued["key"]))["rows_affected"] == 1
            with pytest.raises(RpcError) as error:
                await other.call(
                    "task_query_task", f"{rolled['key']}:{rolled['secret']}", {"condition": []}
                )
            assert error.value.code == 102
    assert called == set(REGISTRY), set(REGISTRY) - called
    assert len(edited_off_leader) == 2


def _reaped(metrics: str) -> int:
    match = re.search(r"^taskd_tasks_reaped_total (\S+)$", metrics, re.MULTILINE)
    assert match is not None
    return int(float(match.group(1)))


async def test_deadlines_and_queue_expiry_fail_each_task_once_across_nodes(
    cluster: Cluster,
) -> None:
    """Three reapers race over unanswered and expiring queued tasks: each task ends with one
    failure result, and the nodes together reap each task exactly once."""
    agent = ScriptedAgent(cluster.nodes[0].ws_url, cluster.token)
    async with agent:
        await wait_until(lambda: online_at(cluster, agent.uuid, cluster.nodes[0]), "online")
        unanswered = []
        for _ in range(3):
            with pytest.raises(RpcError) as error:
                await cluster.su(0, "task_create_task_blocking", agent.uuid, "ip", 300)
            assert error.value.code == 999
            unanswered.append((await agent.next_task())["task_id"])
        expiring = [
            (await cluster.su(index, "task_create_task", str(uuid.uuid4()), "ip", 300))["id"]
            for index in range(3)
        ]

        async def records() -> dict[int, list[dict[str, Any]]]:
            rows = await cluster.su(1, "task_query_task", {"condition": [{"type": "ip"}]})
            found: dict[int, list[dict[str, Any]]] = {}
            for row in rows:
                found.setdefault(row["task_id"], []).append(row)
            return found

        async def all_failed() -> bool:
            found = await records()
            return all(found[i][0]["success"] is False for i in unanswered + expiring)

        await wait_until(all_failed, "every task failed")
        await asyncio.sleep(scaled(1))  # several more reaper rounds on every node
        found = await records()
    assert sorted(found) == sorted(unanswered + expiring)
    for task_id in unanswered:
        [row] = found[task_id]
        assert (row["success"], row["error_message"]) == (False, "timed out: no result from agent")
    for task_id in expiring:
        [row] = found[task_id]
        assert (row["success"], row["error_message"]) == (
            False,
            "expired: agent did not connect within 300 ms",
        )
    async with httpx.AsyncClient() as client:
        reaped = [_reaped((await client.get(n.url + "metrics")).text) for n in cluster.nodes]
    assert sum(reaped) == len(unanswered + expiring), reaped


async def test_generated_node_id_is_written_to_the_config_and_kept(cluster: Cluster) -> None:
    """A node's first start writes its generated node_id into its config file (mode 0600);
    restarted, the node comes back with the same id."""
    node = cluster.nodes[2]
    node_id = await node_id_of(node)
    written = tomllib.loads(node.config.read_text())["server"]["node_id"]
    assert written == node_id and str(uuid.UUID(node_id)) == node_id
    assert node.config.stat().st_mode & 0o777 == 0o600
    node.stop()
    node.start()
    await node.wait_ready()
    assert await node_id_of(node) == node_id
    assert tomllib.loads(node.config.read_text())["server"]["node_id"] == node_id
    nodes = {n["id"] for n in await _nodes(cluster)}
    assert nodes == {await node_id_of(n) for n in cluster.nodes}


async def _nodes(cluster: Cluster) -> list[dict[str, Any]]:
    """The node table as every node sees it (the shared database)."""
    connection = await asyncpg.connect(cluster.database_url.replace("+asyncpg", ""))
    try:
        return [dict(row) for row in await connection.fetch("SELECT id FROM node")]
    finally:
        await connection.close()


async def test_a_routed_blocking_task_keeps_the_callers_deadline(cluster: Cluster) -> None:
    """A blocking call on node 1 for an agent held by node 0 that never answers is failed
    'timed out' soon after the call's timeout, not after the server's default deadline."""
    agent = ScriptedAgent(cluster.nodes[0].ws_url, cluster.token)
    async with agent:
        await wait_until(lambda: online_at(cluster, agent.uuid, cluster.nodes[0]), "online")
        with pytest.raises(RpcError) as error:
            await cluster.su(1, "task_create_task_blocking", agent.uuid, "ip", 300)
        assert error.value.code == 999
        task_id = (await agent.next_task())["task_id"]

        async def failed() -> bool:
            [row] = await cluster.su(2, "task_query_task", {"condition": [{"task_id": task_id}]})
            return row["error_message"] == "timed out: no result from agent"

        await wait_until(failed, "the routed task timed out", 5)


async def test_two_processes_never_run_with_one_node_id(
    tmp_path: Path, held_ports: Callable[[], int]
) -> None:
    """A second `taskd serve` on the same config file (so the same node_id) is refused, naming
    the live node that holds the id and the fix, and changes nothing there; the first node
    restarts at once after a SIGKILL although its heartbeat is still fresh; given its own
    TASKD_NODE_ID the second joins and routes tasks to the first node's agents."""
    async with postgres_database() as url:
        plain_url = url.replace("postgresql+asyncpg://", "postgresql://")
        data = taskd_init(tmp_path / "first" / "taskd.toml", plain_url)
        token = data["super_token"]
        first = node_config(tmp_path / "first", data["server_uuid"], plain_url, held_ports())
        twin_port = held_ports()
        twin = Node("twin", twin_port, first.config, env={"TASKD_PORT": str(twin_port)})
        twin.log_name = "twin.log"
        database = await asyncpg.connect(plain_url)

        async def started_at(node_id: str) -> int:
            value = await database.fetchval("SELECT started_at FROM node WHERE id = $1", node_id)
            return int(value)

        first.start()
        try:
            await first.wait_ready()
            node_id = await node_id_of(first)
            began = await started_at(node_id)
            async with ScriptedAgent(first.ws_url, token) as agent:
                twin.start()
                assert twin.process is not None
                code = await asyncio.to_thread(twin.process.wait, scaled(60))
                assert code != 0
                log = twin.log()
                assert (
                    f"node_id {node_id} is in use by a running node at "
                    f"http://127.0.0.1:{first.port}, started "
                ) in log, log
                assert "from 127.0.0.1" in log and "TASKD_NODE_ID" in log, log
                # the refused twin wrote nothing under the id: the agent is still held here
                assert await started_at(node_id) == began
                [listed] = await first.call("agent_list", token)
                assert listed["online"] is True and listed["node_id"] == node_id
                await first.call("task_create_task", token, agent.uuid, "version")
                assert (await agent.next_task())["task_event_type"] == "version"

            first.kill()  # its heartbeat stays fresh for the grace, its lock dies with it
            first.start()
            await first.wait_ready()
            assert await node_id_of(first) == node_id

            twin.env["TASKD_NODE_ID"] = str(uuid.uuid4())
            twin.start()
            await twin.wait_ready()
            assert await node_id_of(twin) == twin.env["TASKD_NODE_ID"]
            assert tomllib.loads(first.config.read_text())["server"]["node_id"] == node_id
            async with ScriptedAgent(first.ws_url, token) as agent:
                await twin.call("task_create_task", token, agent.uuid, "ip")
                assert (await agent.next_task())["task_event_type"] == "ip"
        finally:
            await database.close()
            twin.stop()
            first.stop()


async def test_a_node_id_locked_by_a_vanished_session_is_waited_for() -> None:
    """A node whose id is still locked by a session without a live node behind it (a host that
    vanished, until PostgreSQL ends its session) waits for the lock instead of refusing."""
    async with postgres_database() as url:
        node_id = str(uuid.uuid4())
        holder = await asyncpg.connect(url.replace("+asyncpg", ""))
        await holder.execute("SELECT pg_advisory_lock($1)", node_lock_key(node_id))
        held_for = scaled(4)  # past the patience for a live node's lock

        async def session_ends() -> None:
            await asyncio.sleep(held_for)
            await holder.close()

        ending = asyncio.create_task(session_ends())
        began = time.monotonic()
        try:
            async with running_server(make_settings(url, node_id=node_id)) as server:
                assert time.monotonic() - began >= held_for
                health = (await server.http.get("/healthz")).json()
                assert health["node_id"] == node_id
        finally:
            await ending
