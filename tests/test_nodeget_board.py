"""NodeGet-board works against taskd unchanged.

Each test sends, as literal JSON-RPC requests, what NodeGet-board's
``src/composables/*.ts`` (and the pages and components that call them) send:
one WebSocket, a random UUID string as every id, named params, the extra fields
the board adds (``version`` and credentials on ``token_edit``, ``{"last": null}``
style unit variants, batches). Each reply is checked for the fields the board's
code reads, and judged as the board judges it: an ``error``, or a result object
whose ``error_message`` is not null, is a failure. Every test runs against a real
server on SQLite and on PostgreSQL, with a scripted NodeGet agent where the board
needs a node.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import orjson

from tests.helpers import RpcError, ScriptedAgent, Server, WsClient, scaled, wait_for
from tests.nodeget_agent import NodeGetAgent, nodeget_agent

# the agent token the board pre-generates for a new node (tokenTemplates.ts)
AGENT_PERMISSIONS: list[dict[str, Any]] = [
    {"static_monitoring": "write"},
    {"dynamic_monitoring": "write"},
    {"dynamic_monitoring_summary": "write"},
    {"task": "listen"},
    {"task": {"write": "ping"}},
    {"task": {"write": "tcp_ping"}},
    {"task": {"write": "http_ping"}},
    {"task": {"write": "web_shell"}},
    {"task": {"write": "execute"}},
    {"task": {"write": "edit_config"}},
    {"task": {"write": "read_config"}},
    {"task": {"write": "http_request"}},
    {"task": {"write": "self_update"}},
    {"task": {"write": "ip"}},
    {"task": {"write": "version"}},
]
# the board's "visitor" token template
VISITOR_PERMISSIONS: list[dict[str, Any]] = [
    {"static_monitoring": {"read": "cpu"}},
    {"static_monitoring": {"read": "system"}},
    {"static_monitoring": {"read": "gpu"}},
    {"dynamic_monitoring_summary": "read"},
    {"node_get": "list_all_agent_uuid"},
    {"task": {"read": "ping"}},
    {"task": {"read": "tcp_ping"}},
    {"kv": {"read": "metadata_*"}},
]
TOKEN_FIELDS = {"version", "token_key", "timestamp_from", "timestamp_to", "token_limit", "username"}
TASK_RECORD_FIELDS = {
    "task_id",
    "uuid",
    "timestamp",
    "success",
    "error_message",
    "task_event_type",
    "task_event_result",
    "cron_source",
}
CRON_FIELDS = {"id", "name", "enable", "cron_expression", "cron_type", "last_run_time"}
CRON_RESULT_FIELDS = {"id", "cron_id", "cron_name", "run_time", "success", "message"}


def rid() -> str:
    """A request id as the board makes it (crypto.randomUUID)."""
    return str(uuid.uuid4())


def rpc(method: str, params: Any) -> dict[str, Any]:
    """One JSON-RPC request as the board builds it: version 2.0 and a fresh UUID id."""
    return {"jsonrpc": "2.0", "id": rid(), "method": method, "params": params}


def now_ms() -> int:
    """Wall-clock milliseconds."""
    return time.time_ns() // 1_000_000


def board_result(reply: dict[str, Any]) -> Any:
    """The result as the board's WsConnection accepts it, or raise as the board rejects it."""
    if "error" in reply:
        raise RpcError(reply["error"])
    result = reply["result"]
    if isinstance(result, dict) and result.get("error_message") is not None:
        raise AssertionError(f"the board treats this result as an error: {result}")
    return result


def is_global(scope: Any) -> bool:
    """Whether a scope is global in either form the board's scopeCodec reads."""
    return scope == "global" or (isinstance(scope, dict) and "global" in scope)


class Board(WsClient):
    """NodeGet-board's one WebSocket to a backend: requests matched by their string ids."""

    async def __aenter__(self) -> Board:
        await super().__aenter__()
        return self

    async def send(self, request: dict[str, Any], timeout: float = 10) -> dict[str, Any]:
        """Send one literal request; its reply, whose id must echo the request's."""
        [reply] = await self.batch([request], timeout, as_batch=False)
        return reply

    async def batch(
        self, requests: list[dict[str, Any]], timeout: float = 10, *, as_batch: bool = True
    ) -> list[dict[str, Any]]:
        """Send requests (as one JSON array, like callBatch); their replies in request order."""
        loop = asyncio.get_running_loop()
        futures = []
        for request in requests:
            future: asyncio.Future[Any] = loop.create_future()
            self._pending[request["id"]] = future
            futures.append(future)
        payload = requests if as_batch else requests[0]
        await self.ws.send(orjson.dumps(payload).decode())
        replies: list[dict[str, Any]] = await asyncio.wait_for(
            asyncio.gather(*futures), scaled(timeout)
        )
        for request, reply in zip(requests, replies, strict=True):
            assert reply["id"] == request["id"]
            assert reply["jsonrpc"] == "2.0"
        return replies


async def test_server_info_the_board_reads(server: Server) -> None:
    """The heartbeat, server UUID and version calls answer with what the servers page shows."""
    async with Board(server.ws_url) as board:
        hello = board_result(await board.send(rpc("nodeget-server_hello", [])))
        server_uuid = board_result(await board.send(rpc("nodeget-server_uuid", [])))
        version = board_result(await board.send(rpc("nodeget-server_version", [])))
    assert isinstance(hello, str) and hello
    assert server_uuid == server.settings.server_uuid
    # shown as `${cargo_version}-${git_commit_sha}`; the node delete page compares cargo_version
    assert isinstance(version, dict)
    for field in ("cargo_version", "git_commit_sha", "binary_type"):
        assert isinstance(version[field], str) and version[field], field


async def test_token_pages(server: Server) -> None:
    """Token create (agent, template), list, detail, own limits, edit with extras, delete."""
    su = server.super_token
    agent_uuid = str(uuid.uuid4())
    expires = now_ms() + 365 * 24 * 3600 * 1000
    async with Board(server.ws_url) as board:
        # AddAgentDialog → preGenerateToken
        agent_token = board_result(
            await board.send(
                rpc(
                    "token_create",
                    {
                        "father_token": su,
                        "token_creation": {
                            "username": f"[agent]:{agent_uuid}",
                            "password": "Zq8vKp2LmX4nR7tB",
                            "timestamp_from": None,
                            "timestamp_to": None,
                            "version": 1,
                            "token_limit": [
                                {
                                    "scopes": [{"agent_uuid": agent_uuid}],
                                    "permissions": AGENT_PERMISSIONS,
                                }
                            ],
                        },
                    },
                )
            )
        )
        # CreateTokenCard → useCreateToken(serializeTokenPayload(visitor template))
        visitor_name = "visitor-template-h3Jd9sKq0PzW1mXc"
        visitor = board_result(
            await board.send(
                rpc(
                    "token_create",
                    {
                        "father_token": su,
                        "token_creation": {
                            "version": 1,
                            "token_limit": [
                                {"scopes": ["global"], "permissions": VISITOR_PERMISSIONS}
                            ],
                            "username": visitor_name,
                            "password": "T5yGf8Jk2LpQ9wEr",
                            "timestamp_to": expires,
                        },
                    },
                )
            )
        )
        listed = board_result(await board.send(rpc("token_list_all_tokens", {"token": su})))
        detail = board_result(
            await board.send(rpc("token_get", {"supertoken": su, "token": visitor["key"]}))
        )
        # stores/permission: the visitor signed in reads its own permissions
        own = board_result(
            await board.send(rpc("token_get", {"token": f"{visitor['key']}:{visitor['secret']}"}))
        )
        # editTokenCard → useEditToken(mapTokenDetailToForm(detail) with one more permission)
        new_limit = [
            {"scopes": ["global"], "permissions": [*VISITOR_PERMISSIONS, {"crontab": "read"}]}
        ]
        edited = board_result(
            await board.send(
                rpc(
                    "token_edit",
                    {
                        "token": su,
                        "target_token": visitor["key"],
                        "version": 1,
                        "limit": new_limit,
                        "username": visitor_name,
                        "timestamp_to": expires,
                    },
                )
            )
        )
        after_edit = board_result(
            await board.send(rpc("token_get", {"supertoken": su, "token": visitor_name}))
        )
        # token list page deletes by token_key; the node delete page by username
        deleted_by_key = board_result(
            await board.send(rpc("token_delete", {"token": su, "target_token": visitor["key"]}))
        )
        deleted_by_name = board_result(
            await board.send(
                rpc("token_delete", {"token": su, "target_token": f"[agent]:{agent_uuid}"})
            )
        )
        relisted = board_result(await board.send(rpc("token_list_all_tokens", {"token": su})))
    for created in (agent_token, visitor):
        assert isinstance(created["key"], str) and created["key"]
        assert isinstance(created["secret"], str) and created["secret"]
    by_key = {token["token_key"]: token for token in listed["tokens"]}
    for token in listed["tokens"]:
        assert set(token) >= TOKEN_FIELDS
    listed_agent = by_key[agent_token["key"]]
    assert listed_agent["username"] == f"[agent]:{agent_uuid}"
    assert listed_agent["token_limit"][0]["scopes"] == [{"agent_uuid": agent_uuid}]
    assert listed_agent["token_limit"][0]["permissions"] == AGENT_PERMISSIONS
    for shown in (detail, own):
        assert set(shown) >= TOKEN_FIELDS
        assert shown["token_key"] == visitor["key"]
        assert shown["username"] == visitor_name
        assert shown["timestamp_to"] == expires
        [limit] = shown["token_limit"]
        assert all(is_global(scope) for scope in limit["scopes"])
        assert limit["permissions"] == VISITOR_PERMISSIONS
    assert edited.get("success") or edited.get("token_key")
    assert after_edit["token_key"] == visitor["key"]
    assert after_edit["token_limit"][0]["permissions"] == new_limit[0]["permissions"]
    assert deleted_by_key["message"] and deleted_by_name["message"]
    remaining = {token["token_key"] for token in relisted["tokens"]}
    assert visitor["key"] not in remaining and agent_token["key"] not in remaining


async def test_node_list_and_node_delete(server: Server) -> None:
    """Agent UUID list, KV namespaces and node metadata, then the node delete steps."""
    su = server.super_token
    stranger = str(uuid.uuid4())
    async with nodeget_agent(server) as agent, Board(server.ws_url) as board:
        node = agent.uuid
        uuids = board_result(
            await board.send(rpc("nodeget-server_list_all_agent_uuid", {"token": su}))
        )
        namespaces = board_result(await board.send(rpc("kv_list_all_namespace", {"token": su})))
        # useAgentInfo.fixAgentNamespace → afterAgentCreate
        created_ns = board_result(
            await board.send(rpc("kv_create", {"token": su, "namespace": node}))
        )
        metadata = {
            "metadata_name": "节点" + node[-6:],
            "metadata_tags": ["hk", "cn2"],
            "metadata_price": 0,
            "metadata_price_unit": "$",
            "metadata_price_cycle": 30,
            "metadata_expire_time": "",
            "metadata_region": "",
            "metadata_hidden": False,
            "metadata_order": now_ms(),
        }
        for key, value in metadata.items():  # useKv.setValue: set, then read back
            set_reply = board_result(
                await board.send(
                    rpc(
                        "kv_set_value", {"token": su, "namespace": node, "key": key, "value": value}
                    )
                )
            )
            assert set_reply == {"success": True}
            read_back = board_result(
                await board.send(rpc("kv_get_value", {"token": su, "namespace": node, "key": key}))
            )
            assert read_back == value, key
        # NodeManageTabAgents.persistOrders: one batch of kv_set_value
        order_replies = await board.batch(
            [
                rpc(
                    "kv_set_value",
                    {"token": su, "namespace": node, "key": "metadata_order", "value": 1},
                )
            ]
        )
        # the node list: every metadata key of the nodes with a namespace
        node_list = board_result(
            await board.send(
                rpc(
                    "kv_get_multi_value",
                    {
                        "token": su,
                        "namespace_key": [{"namespace": node, "key": "metadata_*"}],
                    },
                )
            )
        )
        # cron page: metadata_name of every listed node, with a namespace or not
        names = board_result(
            await board.send(
                rpc(
                    "kv_get_multi_value",
                    {
                        "token": su,
                        "namespace_key": [
                            {"namespace": node, "key": "metadata_name"},
                            {"namespace": stranger, "key": "metadata_name"},
                            {"namespace": stranger, "key": "metadata_*"},
                        ],
                    },
                )
            )
        )
        # useBackendExtra.getAgentConfigWsUrl: the "global" namespace, an unset key
        board_result(await board.send(rpc("kv_create", {"token": su, "namespace": "global"})))
        ws_url = board_result(
            await board.send(
                rpc(
                    "kv_get_value",
                    {"token": su, "namespace": "global", "key": "agent_config_ws_url"},
                )
            )
        )
        # useKv.deleteNamespace: every key, then one batch of kv_delete_key
        keys = board_result(
            await board.send(rpc("kv_get_all_keys", {"token": su, "namespace": node}))
        )
        delete_replies = await board.batch(
            [rpc("kv_delete_key", {"token": su, "namespace": node, "key": key}) for key in keys]
        )
        emptied = board_result(
            await board.send(
                rpc(
                    "kv_get_multi_value",
                    {
                        "token": su,
                        "namespace_key": [{"namespace": node, "key": "metadata_*"}],
                    },
                )
            )
        )
    # NodeSettingTabDelete, after the agent was uninstalled (its connection is gone)
    async with Board(server.ws_url) as board:
        soft_deleted = board_result(
            await board.send(rpc("agent-uuid_delete", {"token": su, "agent_uuid": node}))
        )
        uuids_after = board_result(
            await board.send(rpc("nodeget-server_list_all_agent_uuid", {"token": su}))
        )
    assert node in uuids["uuids"]
    assert isinstance(namespaces, list) and node not in namespaces
    assert created_ns == {"namespace": node, "kv": {}}
    assert [board_result(reply) for reply in order_replies] == [{"success": True}]
    assert [item["key"] for item in node_list] == sorted(metadata)
    assert all(item["namespace"] == node for item in node_list)
    values = {item["key"]: item["value"] for item in node_list}
    assert values == {**metadata, "metadata_order": 1}
    assert names == [
        {"namespace": node, "key": "metadata_name", "value": metadata["metadata_name"]},
        {"namespace": stranger, "key": "metadata_name", "value": None},
    ]
    assert ws_url is None
    assert set(metadata) <= set(keys)
    assert all(board_result(reply) == {"success": True} for reply in delete_replies)
    assert emptied == []
    assert soft_deleted["success"] is True and isinstance(soft_deleted["message"], str)
    assert node not in uuids_after["uuids"]


async def _uploads(agent: NodeGetAgent, count: int) -> bool:
    """Whether the server acknowledged ``count`` uploads of the agent."""
    return len(agent.upload_acks) >= count


async def test_task_requests(server: Server) -> None:
    """Ping page, node IP and version, batch exec, web terminal, task history and its deletion."""
    su = server.super_token
    async with nodeget_agent(server) as agent, Board(server.ws_url) as board:
        node = agent.uuid
        # usePingTask: create, then poll the record with [{task_id}, "last"]
        ping = board_result(
            await board.send(
                rpc(
                    "task_create_task",
                    {
                        "token": su,
                        "target_uuid": node,
                        "task_type": {"tcp_ping": "www.example.com:80"},
                    },
                )
            )
        )

        async def ping_record() -> dict[str, Any] | None:
            records = board_result(
                await board.send(
                    rpc(
                        "task_query",
                        {
                            "token": su,
                            "task_data_query": {"condition": [{"task_id": ping["id"]}, "last"]},
                        },
                    )
                )
            )
            return records[-1] if records and records[-1]["success"] is not None else None

        ping_done = await wait_for(ping_record)
        # useAgentInfo.fetchAgentIp / fetchAgentVersion
        ip = board_result(
            await board.send(
                rpc(
                    "task_create_task_blocking",
                    {
                        "token": su,
                        "target_uuid": node,
                        "task_type": "ip",
                        "timeout_ms": 8000,
                    },
                ),
                timeout=8.2,
            )
        )
        version = board_result(
            await board.send(
                rpc(
                    "task_create_task_blocking",
                    {
                        "token": su,
                        "target_uuid": node,
                        "task_type": "version",
                        "timeout_ms": 8000,
                    },
                ),
                timeout=8.2,
            )
        )
        # useBatchExec: create, then one batch of task_query per task id
        executed = board_result(
            await board.send(
                rpc(
                    "task_create_task",
                    {
                        "token": su,
                        "target_uuid": node,
                        "task_type": {"execute": {"cmd": "echo", "args": ["batch", "exec"]}},
                    },
                )
            )
        )
        # WebTerminal.createTask
        terminal_id = str(uuid.uuid4())
        shell = board_result(
            await board.send(
                rpc(
                    "task_create_task",
                    {
                        "token": su,
                        "target_uuid": node,
                        "task_type": {
                            "web_shell": {
                                "url": f"ws://127.0.0.1:{server.port}/auto_gen",
                                "terminal_id": terminal_id,
                            }
                        },
                    },
                ),
                timeout=10,
            )
        )
        await wait_for(lambda: _uploads(agent, 5))
        exec_replies = await board.batch(
            [
                rpc(
                    "task_query",
                    {
                        "token": su,
                        "task_data_query": {"condition": [{"task_id": executed["id"]}]},
                    },
                )
            ]
        )
        # useTask.queryByUuid / queryByType
        by_uuid = board_result(
            await board.send(
                rpc(
                    "task_query",
                    {
                        "token": su,
                        "task_data_query": {"condition": [{"uuid": node}, {"limit": 100}]},
                    },
                )
            )
        )
        by_type = board_result(
            await board.send(
                rpc(
                    "task_query",
                    {
                        "token": su,
                        "task_data_query": {"condition": [{"type": "tcp_ping"}, {"limit": 100}]},
                    },
                )
            )
        )
        # useLifecycle.afterAgentDelete("data") / useTask.deleteByUuid
        deleted = board_result(
            await board.send(
                rpc("task_delete", {"token": su, "conditions": [{"uuid": node}]}),
                timeout=10,
            )
        )
        left = board_result(
            await board.send(
                rpc(
                    "task_query",
                    {
                        "token": su,
                        "task_data_query": {"condition": [{"uuid": node}, {"limit": 100}]},
                    },
                )
            )
        )
    assert agent.errors == []
    assert isinstance(ping["id"], int)
    assert set(ping_done) >= TASK_RECORD_FIELDS
    assert ping_done["task_id"] == ping["id"] and ping_done["success"] is True
    assert isinstance(ping_done["task_event_result"]["tcp_ping"], float)
    assert ip["error_message"] is None
    assert ip["task_event_result"]["ip"][0] == "203.0.113.7"
    assert version["task_event_result"]["version"]["cargo_version"]
    assert version["task_event_result"]["version"]["git_commit_sha"]
    [[exec_record]] = [board_result(reply) for reply in exec_replies]
    assert exec_record["task_id"] == executed["id"]
    assert exec_record["success"] is True
    assert exec_record["task_event_result"]["execute"] == "batch exec\n"
    assert isinstance(shell["id"], int)
    assert agent.uploads[shell["id"]]["task_event_result"] == {"web_shell": True}
    assert {record["task_id"] for record in by_uuid} == set(agent.uploads)
    for record in by_uuid:
        assert set(record) >= TASK_RECORD_FIELDS
        assert record["uuid"] == node
    assert [record["task_id"] for record in by_type] == [ping["id"]]
    assert deleted == {"success": True, "deleted": 5, "condition_count": 1}
    assert left == []


async def test_cron_pages(server: Server) -> None:
    """Cron create, list, history with object-form conditions, toggle, node removal, deletes."""
    su = server.super_token
    offline = str(uuid.uuid4())
    ping_task = {"task": {"tcp_ping": "www.example.com:80"}}
    exec_task = {"task": {"execute": {"cmd": "uptime", "args": []}}}
    async with nodeget_agent(server) as agent, Board(server.ws_url) as board:
        node = agent.uuid
        start = now_ms()

        async def send(method: str, params: dict[str, Any]) -> Any:
            return board_result(await board.send(rpc(method, params)))

        async def history(*condition: Any) -> list[dict[str, Any]]:
            rows: list[dict[str, Any]] = await send(
                "crontab-result_query",
                {"token": su, "query": {"condition": [{"cron_name": "ping-nodes"}, *condition]}},
            )
            return rows

        await send(
            "crontab_create",
            {
                "token": su,
                "name": "ping-nodes",
                "cron_expression": "* * * * * *",
                "cron_type": {"agent": [[node, offline], ping_task]},
            },
        )
        await send(
            "crontab_create",
            {
                "token": su,
                "name": "weekly-uptime",
                "cron_expression": "0 0 0 * * 0",
                "cron_type": {"agent": [[node], exec_task]},
            },
        )
        listed = await send("crontab_get", {"token": su})

        async def fired() -> list[dict[str, Any]] | None:
            rows = await history({"limit": 20}, {"run_time_from_to": [start - 3600_000, now_ms()]})
            answered = [r for r in rows if r["success"] and r.get("relative_id") is not None]
            return rows if len(answered) >= 2 and any(not r["success"] for r in rows) else None

        rows = await wait_for(fired, timeout=6)
        successes = await history({"limit": 20}, {"is_success": None})
        latest = await history({"limit": 20}, {"last": None})
        # CronHistoryDetailDialog: the task behind a result
        relative = next(r["relative_id"] for r in rows if r.get("relative_id") is not None)
        [detail] = await send(
            "task_query",
            {"token": su, "task_data_query": {"condition": [{"task_id": relative}]}},
        )
        toggled = await send(
            "crontab_set_enable", {"token": su, "name": "ping-nodes", "enable": False}
        )
        # useLifecycle.afterAgentDelete("cron"): every cron edited without the node
        edited_ping = await send(
            "crontab_edit",
            {
                "token": su,
                "name": "ping-nodes",
                "cron_expression": "* * * * * *",
                "cron_type": {"agent": [[offline], ping_task]},
            },
        )
        edited_exec = await send(
            "crontab_edit",
            {
                "token": su,
                "name": "weekly-uptime",
                "cron_expression": "* * * * * *",
                "cron_type": {"agent": [[], exec_task]},
            },
        )
        relisted = await send("crontab_get", {"token": su})
        await asyncio.sleep(scaled(2.5))
        empty_runs = await send(
            "crontab-result_query",
            {"token": su, "query": {"condition": [{"cron_name": "weekly-uptime"}]}},
        )
        before_delete = await history()
        result_deleted = await send(
            "crontab-result_delete",
            {"token": su, "query": {"condition": [{"cron_name": "ping-nodes"}, {"last": None}]}},
        )
        after_delete = await history()
        removed = [
            await send("crontab_delete", {"token": su, "name": name})
            for name in ("ping-nodes", "weekly-uptime")
        ]
        final = await send("crontab_get", {"token": su})
    crons = {cron["name"]: cron for cron in listed}
    for cron in crons.values():
        assert set(cron) >= CRON_FIELDS
        assert isinstance(cron["id"], int) and cron["enable"] is True
    assert crons["ping-nodes"]["cron_type"] == {"agent": [[node, offline], ping_task]}
    assert crons["weekly-uptime"]["cron_type"] == {"agent": [[node], exec_task]}
    assert crons["weekly-uptime"]["cron_expression"] == "0 0 0 * * 0"
    assert crons["weekly-uptime"]["last_run_time"] is None
    for row in rows:
        assert set(row) >= CRON_RESULT_FIELDS
        assert row["cron_name"] == "ping-nodes"
        assert row["cron_id"] == crons["ping-nodes"]["id"]
        assert isinstance(row["run_time"], int) and isinstance(row["message"], str)
    assert successes and all(row["success"] is True for row in successes)
    assert len(latest) == 1
    assert set(detail) >= TASK_RECORD_FIELDS
    assert detail["uuid"] == node and detail["cron_source"] == "ping-nodes"
    assert detail["task_event_type"] == ping_task["task"]
    assert toggled["success"] is True and toggled["enabled"] is False
    assert edited_ping["success"] is True and edited_exec["success"] is True
    recrons = {cron["name"]: cron for cron in relisted}
    assert recrons["ping-nodes"]["cron_type"] == {"agent": [[offline], ping_task]}
    assert recrons["ping-nodes"]["enable"] is False
    assert recrons["weekly-uptime"]["cron_type"] == {"agent": [[], exec_task]}
    assert empty_runs == []
    assert result_deleted == {"success": True, "deleted": 1, "condition_count": 2}
    assert len(after_delete) == len(before_delete) - 1
    assert {row["id"] for row in before_delete} - {row["id"] for row in after_delete} == {
        before_delete[0]["id"]
    }
    assert removed == [{"success": True}, {"success": True}]
    assert not {"ping-nodes", "weekly-uptime"} & {cron["name"] for cron in final}


async def test_visitor_token_sees_the_public_node_list(server: Server) -> None:
    """A visitor-template token lists nodes and reads their metadata, but creates no task."""
    su = server.super_token
    async with nodeget_agent(server) as agent, Board(server.ws_url) as board:
        node = agent.uuid

        async def send(method: str, params: dict[str, Any]) -> dict[str, Any]:
            return await board.send(rpc(method, params))

        created = board_result(
            await send(
                "token_create",
                {
                    "father_token": su,
                    "token_creation": {
                        "version": 1,
                        "token_limit": [{"scopes": ["global"], "permissions": VISITOR_PERMISSIONS}],
                    },
                },
            )
        )
        visitor = f"{created['key']}:{created['secret']}"
        board_result(await send("kv_create", {"token": su, "namespace": node}))
        board_result(
            await send(
                "kv_set_value",
                {"token": su, "namespace": node, "key": "metadata_name", "value": "Tokyo 1"},
            )
        )
        board_result(
            await send(
                "kv_set_value",
                {"token": su, "namespace": node, "key": "secret_note", "value": "root pw"},
            )
        )
        uuids = board_result(await send("nodeget-server_list_all_agent_uuid", {"token": visitor}))
        metadata = board_result(
            await send(
                "kv_get_multi_value",
                {"token": visitor, "namespace_key": [{"namespace": node, "key": "metadata_*"}]},
            )
        )
        secret = await send(
            "kv_get_multi_value",
            {"token": visitor, "namespace_key": [{"namespace": node, "key": "secret_note"}]},
        )
        pings = board_result(
            await send(
                "task_query",
                {
                    "token": visitor,
                    "task_data_query": {"condition": [{"type": "ping"}, {"limit": 100}]},
                },
            )
        )
        create = await send(
            "task_create_task",
            {"token": visitor, "target_uuid": node, "task_type": {"ping": "www.example.com"}},
        )
    assert node in uuids["uuids"]
    assert metadata == [{"namespace": node, "key": "metadata_name", "value": "Tokyo 1"}]
    assert secret["error"]["code"] == 102
    assert secret["error"]["message"].startswith("Permission denied: ")
    assert pings == []
    assert create["error"]["code"] == 102
    assert create["error"]["message"].startswith("Permission denied: ")


async def test_errors_carry_nodeget_codes_and_prefixes(server: Server) -> None:
    """Failures the board shows as toasts carry NodeGet's code and message prefix."""
    su = server.super_token
    offline = str(uuid.uuid4())
    cron = {"agent": [[offline], {"task": {"tcp_ping": "www.example.com:80"}}]}
    async with ScriptedAgent(server.ws_url, su) as silent, Board(server.ws_url) as board:

        async def error_of(method: str, params: dict[str, Any]) -> dict[str, Any]:
            reply = await board.send(rpc(method, params))
            assert "error" in reply, reply
            error: dict[str, Any] = reply["error"]
            return error

        board_result(
            await board.send(
                rpc(
                    "crontab_create",
                    {
                        "token": su,
                        "name": "ping-offline",
                        "cron_expression": "0 * * * * *",
                        "cron_type": cron,
                    },
                )
            )
        )
        errors = {
            "offline node": await error_of(
                "task_create_task",
                {"token": su, "target_uuid": offline, "task_type": {"ping": "www.example.com"}},
            ),
            "blocking timeout": await error_of(
                "task_create_task_blocking",
                {"token": su, "target_uuid": silent.uuid, "task_type": "ip", "timeout_ms": 300},
            ),
            "unknown token": await error_of(
                "token_delete", {"token": su, "target_token": "NoSuchTokenKey00"}
            ),
            "duplicate cron": await error_of(
                "crontab_create",
                {
                    "token": su,
                    "name": "ping-offline",
                    "cron_expression": "0 * * * * *",
                    "cron_type": cron,
                },
            ),
            "unknown cron": await error_of(
                "crontab_edit",
                {
                    "token": su,
                    "name": "no-such-cron",
                    "cron_expression": "0 * * * * *",
                    "cron_type": cron,
                },
            ),
            "blank command": await error_of(
                "task_create_task",
                {
                    "token": su,
                    "target_uuid": silent.uuid,
                    "task_type": {"execute": {"cmd": "  ", "args": []}},
                },
            ),
            "bad cron expression": await error_of(
                "crontab_create",
                {
                    "token": su,
                    "name": "bad-expression",
                    "cron_expression": "61 * * * * *",
                    "cron_type": cron,
                },
            ),
            "wrong secret": await error_of(
                "token_list_all_tokens", {"token": su.split(":")[0] + ":wrong-secret"}
            ),
            "malformed credential": await error_of(
                "token_list_all_tokens", {"token": "no-separator-here"}
            ),
        }
    expected = {
        "offline node": (104, "Unable to connect agent: "),
        "blocking timeout": (999, "Other error: "),
        "unknown token": (105, "Not found in database: "),
        "duplicate cron": (108, "Invalid input: "),
        "unknown cron": (105, "Not found in database: "),
        "blank command": (108, "Invalid input: "),
        "bad cron expression": (101, "Parse error: "),
        "wrong secret": (102, "Permission denied: "),
        "malformed credential": (101, "Parse error: "),
    }
    for case, (code, prefix) in expected.items():
        error = errors[case]
        assert error["code"] == code, (case, error)
        assert error["message"].startswith(prefix), (case, error)
        assert len(error["message"]) > len(prefix), (case, error)
