"""Security hardening: the denial matrix over every method, agent confinement, rate limits,
Origin checks, secrets kept out of logs, replies and the database, private files."""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import stat
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import websockets
from sqlalchemy import select
from sqlmodel import SQLModel

import taskd.methods
import taskd.models  # noqa: F401 - registers every table
from taskd.agent.monitor import Monitor, summarize
from taskd.rpc import REGISTRY
from taskd.server import RPC_PATHS
from taskd.store import Store
from tests.helpers import (
    RpcError,
    ScriptedAgent,
    Server,
    WsClient,
    add_token,
    agent_token_limits,
    make_settings,
    running_server,
    scaled,
    tmp_sqlite_url,
    unwrap,
)

NO_TOKEN_METHODS = {
    "server_uuid",
    "nodeget-server_uuid",
    "server_hello",
    "nodeget-server_hello",
    "server_version",
    "nodeget-server_version",
    "rpc.discover",
    "task_unregister_task",
}
NEVER_SOON = "0 0 0 1 1 * 2099"
EVERYTHING = [
    {"task": "listen"},
    *({"task": {action: "*"}} for action in ("create", "read", "write", "delete")),
    *({"crontab": action} for action in ("read", "write", "delete")),
    *({"crontab_result": {action: "*"}} for action in ("read", "delete")),
    {"terminal": "connect"},
    {"agent": "list"},
    {"agent": "enroll"},
    *({"token": action} for action in ("read", "write", "delete")),
]


def now_ms() -> int:
    """The wall clock in milliseconds."""
    return time.time_ns() // 1_000_000


@dataclass
class World:
    """What the matrix works on: a connected agent A with one open task, a cron, a victim token."""

    agent_uuid: str
    task: dict[str, Any]
    victim_key: str
    fresh_uuid: str


def _alert_rule(name: str, targets: Any) -> dict[str, Any]:
    """An agent_offline alert rule sending to the channel the matrix creates."""
    return {
        "name": name,
        "kind": "agent_offline",
        "targets": [targets] if targets != "all" else "all",
        "params": {"grace_ms": 3_600_000},
        "channels": ["matrix"],
    }


# Valid params (after the token) for every method that takes a token, in an order in which
# the super token can run them all one after the other. ``lists`` marks methods that answer
# only what the token may see: a token scoped to another agent gets an empty list from them.
Params = Callable[[World], list[Any]]
TABLE: list[tuple[str, Params, bool]] = [
    ("agent_list", lambda w: [], True),
    ("crontab-result_query", lambda w: [{"condition": [{"cron_name": "nightly"}]}], False),
    ("crontab-result_delete", lambda w: [{"condition": [{"cron_name": "nightly"}]}], False),
    # no cron_name: every cron's results, which needs the permission on every name
    ("crontab-result_query", lambda w: [{"condition": []}], False),
    ("crontab-result_query", lambda w: [{"condition": ["is_success", {"limit": 5}]}], False),
    ("crontab-result_delete", lambda w: [{"condition": []}], False),
    ("crontab_get", lambda w: [], True),
    (
        "crontab_create",
        lambda w: ["other", NEVER_SOON, {"agent": [[w.agent_uuid], {"task": "version"}]}],
        False,
    ),
    (
        "crontab_edit",
        lambda w: ["nightly", NEVER_SOON, {"agent": [[w.agent_uuid], {"task": "ip"}]}],
        False,
    ),
    ("crontab_set_enable", lambda w: ["nightly", False], False),
    ("crontab_delete", lambda w: ["nightly"], False),
    ("task_query", lambda w: [{"condition": [{"uuid": w.agent_uuid}, {"type": "ip"}]}], False),
    (
        "task_query_task",
        lambda w: [{"condition": [{"uuid": w.agent_uuid}, {"type": "version"}]}],
        False,
    ),
    (
        "task_upload_task_result",
        lambda w: [
            {
                "task_id": w.task["task_id"],
                "agent_uuid": w.agent_uuid,
                "task_token": w.task["task_token"],
                "timestamp": 1,
                "success": True,
                "task_event_result": {"version": {"taskd": "x"}},
            }
        ],
        False,
    ),
    ("task_create_task", lambda w: [w.agent_uuid, "version"], False),
    ("task_create_task_blocking", lambda w: [w.agent_uuid, "version", 100], False),
    ("task_register_task", lambda w: [w.agent_uuid], False),
    ("task_delete", lambda w: [[{"uuid": w.agent_uuid}, {"type": "ip"}]], False),
    ("task_delete_task", lambda w: [[{"uuid": w.agent_uuid}, {"type": "version"}]], False),
    ("token_get", lambda w: [], False),
    ("token_list_all_tokens", lambda w: [], False),
    ("token_create", lambda w: [{"token_limit": []}], False),
    ("token_edit", lambda w: [w.victim_key, []], False),
    ("token_change_password", lambda w: [w.victim_key, "a new password"], False),
    ("token_roll_token_secret", lambda w: [w.victim_key], False),
    ("token_delete", lambda w: [w.victim_key], False),
    ("agent_enroll", lambda w: [w.fresh_uuid], False),
    ("nodeget-server_list_all_agent_uuid", lambda w: [], True),
    ("agent-uuid_list_all", lambda w: [], False),
    ("agent-uuid_list_all_with_agent_mode", lambda w: [], False),
    ("kv_create", lambda w: ["matrix"], False),
    ("kv_list_all_namespace", lambda w: [], False),
    ("kv_set_value", lambda w: ["matrix", "metadata_name", "A"], False),
    ("kv_get_value", lambda w: ["matrix", "metadata_name"], False),
    ("kv_get_multi_value", lambda w: [[{"namespace": "matrix", "key": "metadata_*"}]], False),
    ("kv_get_all_keys", lambda w: ["matrix"], False),
    ("kv_delete_key", lambda w: ["matrix", "metadata_name"], False),
    ("agent_report_static", lambda w: [Monitor(w.agent_uuid).static()], False),
    ("agent_report_dynamic", lambda w: [Monitor(w.agent_uuid).dynamic()], False),
    (
        "agent_report_dynamic_summary",
        lambda w: [summarize(Monitor(w.agent_uuid).dynamic())],
        False,
    ),
    (
        "agent_query_static",
        lambda w: [{"fields": ["system"], "condition": [{"uuid": w.agent_uuid}]}],
        True,
    ),
    (
        "agent_query_dynamic",
        lambda w: [{"fields": ["load"], "condition": [{"uuid": w.agent_uuid}]}],
        True,
    ),
    (
        "agent_query_dynamic_summary",
        lambda w: [{"fields": [], "condition": [{"uuid": w.agent_uuid}]}],
        True,
    ),
    ("agent_static_data_multi_last_query", lambda w: [[w.agent_uuid], ["system"]], True),
    ("agent_dynamic_data_multi_last_query", lambda w: [[w.agent_uuid], ["load"]], True),
    ("agent_dynamic_summary_multi_last_query", lambda w: [[w.agent_uuid], []], True),
    ("agent_delete_static", lambda w: [[{"uuid": w.agent_uuid}]], False),
    ("agent_delete_dynamic", lambda w: [[{"uuid": w.agent_uuid}]], False),
    ("agent_delete_dynamic_summary", lambda w: [[{"uuid": w.agent_uuid}]], False),
    ("alert_channel_create", lambda w: ["matrix", "json://127.0.0.1:9/matrix"], False),
    ("alert_channel_list", lambda w: [], False),
    ("alert_channel_edit", lambda w: ["matrix", "json://127.0.0.1:9/edited"], False),
    ("alert_channel_test", lambda w: ["matrix"], False),
    ("alert_rule_create", lambda w: [_alert_rule("matrix-rule", w.agent_uuid)], False),
    ("alert_rule_list", lambda w: [], False),
    ("alert_rule_edit", lambda w: ["matrix-rule", _alert_rule("matrix-rule", "all")], False),
    ("alert_event_query", lambda w: [{"condition": [{"rule": "matrix-rule"}]}], False),
    ("alert_rule_delete", lambda w: ["matrix-rule"], False),
    ("alert_channel_delete", lambda w: ["matrix"], False),
    ("agent-uuid_delete", lambda w: [w.agent_uuid], False),
]
# what the super token may get instead of a result, where a result cannot be had (nothing
# listens on port 9: the channel test cannot deliver)
POSITIVE_ERRORS = {"task_create_task_blocking": 999, "alert_channel_test": 999}
SELF_SERVICE = {"token_get"}
"""Methods any valid token may call on itself: NodeGet's token_get reads the caller's token."""
VALID = {"scoped to another agent", "type patterns miss the task"}
"""Credential cases that are valid, however narrow their limits."""
MALFORMED = {"no token": -32602, "not a string": -32602, "empty token": 101, "malformed token": 101}
"""Credential cases that are not a credential at all: a params error or NodeGet's parse error."""
VOLATILE = {("agent", "last_seen"), ("node", "heartbeat")}


def _takes_token(name: str) -> bool:
    parameters = inspect.signature(REGISTRY[name].fn).parameters
    return "token" in parameters or "father_token" in parameters  # token_create, as in NodeGet


def test_only_the_server_info_methods_and_unregister_take_no_token() -> None:
    """Every registered method takes a token except exactly the listed server-info ones."""
    assert {name for name in REGISTRY if not _takes_token(name)} == NO_TOKEN_METHODS


def test_every_method_has_a_row_in_the_matrix() -> None:
    """A method added to the registry without a row in TABLE fails here, naming it."""
    tabled = {name for name, _, _ in TABLE}
    missing = sorted(set(REGISTRY) - NO_TOKEN_METHODS - tabled)
    assert not missing, (
        f"methods without a row in the security matrix: {missing}; "
        "add valid params for them to TABLE in tests/test_security.py"
    )
    assert not tabled - set(REGISTRY), "TABLE names methods that do not exist"


async def snapshot(store: Store) -> dict[str, list[str]]:
    """Every row of every table (minus heartbeat-like columns), for before/after comparison."""

    def fetch(conn: Any) -> dict[str, list[str]]:
        tables: dict[str, list[str]] = {}
        for table in SQLModel.metadata.sorted_tables:
            columns = [c for c in table.c if (table.name, c.name) not in VOLATILE]
            rows = conn.execute(select(*columns)).all()
            tables[str(table.name)] = sorted(repr(tuple(row)) for row in rows)
        return tables

    return await store.read(fetch)


@pytest.fixture
async def roomy_server(database_url: str) -> AsyncIterator[Server]:
    """A server whose failed-auth limit is out of the way (the matrix fails hundreds of times)."""
    settings = make_settings(database_url, auth_burst=1_000_000, auth_rate_per_s=1000.0)
    async with running_server(settings) as running:
        yield running


async def test_every_method_refuses_bad_credentials_and_foreign_scopes(
    roomy_server: Server,
) -> None:
    """No token, bad or out-of-window tokens, other agents' and narrow tokens: 102 (-32602 or
    101 for what is not a credential string), no effect."""
    server = roomy_server
    test_every_method_has_a_row_in_the_matrix()
    agent_uuid, elsewhere_uuid = str(uuid.uuid4()), str(uuid.uuid4())
    agent_token = await add_token(server, agent_token_limits(agent_uuid))
    every = [{"scopes": ["global"], "permissions": EVERYTHING}]
    tokens = {
        "expired": await add_token(server, every, timestamp_to=now_ms() - 60_000),
        "not yet valid": await add_token(server, every, timestamp_from=now_ms() + 3_600_000),
        "scoped to another agent": await add_token(
            server, [{"scopes": [{"agent_uuid": elsewhere_uuid}], "permissions": EVERYTHING}]
        ),
        "type patterns miss the task": await add_token(
            server,
            [
                {
                    "scopes": ["global"],
                    "permissions": [
                        {"task": {action: "tcp*"}}
                        for action in ("create", "read", "write", "delete")
                    ],
                }
            ],
        ),
    }
    victim = await server.call(
        "token_create",
        father_token=server.super_token,
        token_creation={"token_limit": [], "username": "victim", "password": "the right password"},
    )
    cases: list[tuple[str, Any]] = [
        ("no token", None),
        ("empty token", ""),
        ("not a string", 12345),
        ("malformed token", "no-separator-here"),
        ("unknown key", "AAAAAAAAAAAAAAAA:" + "b" * 32),
        ("wrong secret", f"{victim['key']}:{'x' * 32}"),
        ("wrong password", "victim|the wrong password"),
        *tokens.items(),
    ]
    secrets = [t.split(":")[1] for t in (agent_token, *tokens.values())] + [
        victim["secret"],
        "the right password",
        "x" * 32,
    ]
    async with (
        ScriptedAgent(server.ws_url, agent_token, agent_uuid) as agent,
        WsClient(server.ws_url) as ws,
    ):
        nightly = {"agent": [[agent_uuid], {"task": "version"}]}
        await server.su("crontab_create", "nightly", NEVER_SOON, nightly)
        await server.su("task_create_task", agent_uuid, "version")
        world = World(agent_uuid, await agent.next_task(), victim["key"], str(uuid.uuid4()))
        before = await snapshot(server.service.store)

        for name, params, lists in TABLE:
            rest = params(world)
            for case, token in cases:
                transports = [("websocket", ws.request)]
                if not REGISTRY[name].websocket_only:
                    transports.append(("http", server.request))
                for transport, request in transports:
                    reply = await request(name, [token, *rest])
                    where = f"{name} over {transport} with {case}"
                    if "result" in reply and lists and case == "scoped to another agent":
                        assert reply["result"] in ([], {"uuids": []}), where
                        continue
                    if "result" in reply and name in SELF_SERVICE and case in VALID:
                        assert reply["result"]["token_key"] == token.split(":")[0], where
                        continue
                    assert "error" in reply, f"{where} was answered {reply}"
                    error = reply["error"]
                    assert error["code"] == MALFORMED.get(case, 102), f"{where}: {error}"
                    assert "Too many" not in error["message"], where
                    assert not any(s in error["message"] for s in secrets), where
            missing = await ws.request(name, {})
            assert missing["error"]["code"] == -32602, (name, missing)
            assert "token'" in missing["error"]["message"], (name, missing)

        await asyncio.sleep(scaled(0.3))
        assert agent.notifications.empty(), "a refused call reached the agent"
        assert await snapshot(server.service.store) == before

        # the same params pass with the super token: the refusals above were about credentials
        for name, params, _ in TABLE:
            reply = await ws.request(name, [server.super_token, *params(world)])
            if name in POSITIVE_ERRORS:
                assert reply["error"]["code"] == POSITIVE_ERRORS[name], (name, reply)
            else:
                assert "result" in reply, (name, reply)


# --------------------------------------------------------------------------- agent tokens


async def test_an_agent_token_is_confined_to_its_own_agent(server: Server) -> None:
    """An agent token cannot act for another agent or create tasks; replays 108, guesses 105."""
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    token_a = await add_token(server, agent_token_limits(a))
    token_b = await add_token(server, agent_token_limits(b))
    async with (
        ScriptedAgent(server.ws_url, token_a, a) as agent_a,
        ScriptedAgent(server.ws_url, token_b, b) as agent_b,
    ):
        await server.su("task_create_task", b, "version")
        task_b = await agent_b.next_task()
        result = {"version": {"taskd": "forged"}}
        reply = await agent_a.upload(task_b, result, agent_uuid=b)
        assert reply["error"]["code"] == 102
        reply = await agent_a.upload(task_b, result)  # as itself: no such task for a
        assert reply["error"]["code"] == 105
        with pytest.raises(RpcError) as error:
            await agent_a.call("task_register_task", token_a, b)
        assert error.value.code == 102
        for target in (a, b):
            with pytest.raises(RpcError) as error:
                await agent_a.call("task_create_task", token_a, target, "version")
            assert error.value.code == 102

        await server.su("task_create_task", b, "ip")
        task_b2 = await agent_b.next_task()
        guessed = await agent_b.upload(task_b2, {"ip": [None, None]}, task_token="Guess12345")
        assert guessed["error"]["code"] == 105
        unwrap(await agent_b.upload(task_b, {"version": {"taskd": "real"}}))
        replayed = await agent_b.upload(task_b, {"version": {"taskd": "again"}})
        assert replayed["error"]["code"] == 108

        await server.su("task_create_task", b, "version")
        assert (await agent_b.next_task())["task_event_type"] == "version"
        assert agent_a.notifications.empty()
    records = await server.su("task_query_task", {"condition": [{"uuid": b}]})
    by_id = {r["task_id"]: r for r in records}
    assert by_id[task_b["task_id"]]["task_event_result"] == {"version": {"taskd": "real"}}
    assert by_id[task_b2["task_id"]]["success"] is None


# --------------------------------------------------------------------------- rate limit


async def test_failed_authentications_are_rate_limited_per_address(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """After a burst of failures an address is refused even the right token, until it refills."""
    caplog.set_level(logging.INFO)
    refill_s = scaled(1.0)
    settings = make_settings(database_url, auth_burst=5, auth_rate_per_s=1 / refill_s)
    wrong = "x" * 32
    async with (
        running_server(settings) as server,
        httpx.AsyncClient(
            base_url=server.url, transport=httpx.AsyncHTTPTransport(local_address="127.0.0.2")
        ) as other,
    ):
        key, secret = server.super_token.split(":")

        async def call(client: httpx.AsyncClient, token: str, **headers: str) -> dict[str, Any]:
            body = {"jsonrpc": "2.0", "method": "agent_list", "params": [token], "id": 1}
            reply: dict[str, Any] = (await client.post("/", json=body, headers=headers)).json()
            return reply

        for _ in range(5):
            reply = await call(server.http, f"{key}:{wrong}")
            assert reply["error"]["code"] == 102 and "Invalid token" in reply["error"]["message"]
        refused = await call(server.http, server.super_token)
        assert refused["error"]["code"] == 102 and "Too many" in refused["error"]["message"]
        spoofed = await call(server.http, server.super_token, **{"x-forwarded-for": "127.0.0.9"})
        assert "Too many" in spoofed["error"]["message"]
        assert (await call(other, server.super_token))["result"] == []

        await asyncio.sleep(refill_s * 1.2)
        assert (await call(server.http, server.super_token))["result"] == []
        assert "Invalid token" in (await call(server.http, f"{key}:{wrong}"))["error"]["message"]
        assert "Too many" in (await call(server.http, server.super_token))["error"]["message"]

    failures = [r for r in caplog.records if "authentication failed" in r.getMessage()]
    assert len(failures) == 6
    assert all("127.0.0.1" in r.getMessage() for r in failures)
    assert secret not in caplog.text and wrong not in caplog.text


async def test_a_trusted_proxy_forwarded_address_is_limited_on_its_own(database_url: str) -> None:
    """Behind a trusted proxy the limit applies to each X-Forwarded-For client separately."""
    settings = make_settings(
        database_url, auth_burst=2, auth_rate_per_s=0.01, trust_forwarded_for=("127.0.0.1",)
    )
    async with running_server(settings) as server:

        async def call(token: str, client: str) -> dict[str, Any]:
            body = {"jsonrpc": "2.0", "method": "agent_list", "params": [token], "id": 1}
            response = await server.http.post("/", json=body, headers={"x-forwarded-for": client})
            reply: dict[str, Any] = response.json()
            return reply

        for _ in range(2):
            await call("nokey:nosecret", "198.51.100.7")
        assert "Too many" in (await call(server.super_token, "198.51.100.7"))["error"]["message"]
        assert (await call(server.super_token, "198.51.100.8"))["result"] == []


# --------------------------------------------------------------------------- Origin


async def test_browser_websockets_need_an_allowed_origin(database_url: str) -> None:
    """JSON-RPC WebSockets and /terminal refuse a foreign Origin; allowed or absent ones pass."""
    settings = make_settings(database_url, allowed_origins=("https://dash.example",))
    hello = orjson.dumps({"jsonrpc": "2.0", "method": "server_uuid", "id": 1}).decode()
    async with running_server(settings) as server:
        base = f"ws://127.0.0.1:{server.port}"
        for path in RPC_PATHS:
            with pytest.raises(websockets.InvalidStatus) as refused:
                async with websockets.connect(base + path, origin="https://evil.example"):
                    pass
            assert refused.value.response.status_code == 403, path
            for origin in ("https://dash.example", "https://DASH.example:443", None):
                async with websockets.connect(base + path, origin=origin) as ws:
                    await ws.send(hello)
                    reply = orjson.loads(await ws.recv())
                    assert reply["result"] == settings.server_uuid, (path, origin)
        query = f"agent_uuid={uuid.uuid4()}&terminal_id={uuid.uuid4()}&token={server.super_token}"
        async with websockets.connect(
            f"{base}/terminal?{query}", origin="https://evil.example"
        ) as ws:
            frame = orjson.loads(await ws.recv())
            assert frame["error_id"] == 102 and "Origin" in frame["error_message"]
            with pytest.raises(websockets.ConnectionClosed):
                await ws.recv()


# --------------------------------------------------------------------------- secrets


async def test_no_secret_reaches_logs_replies_or_the_database(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    """Through tokens, enrollment and a task round trip no secret is logged, answered or stored."""
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.DEBUG, logger="taskd")
    password = "a person's password"
    replies: list[Any] = []

    async def su(method: str, *params: Any) -> Any:
        result = await server.su(method, *params)
        replies.append(result)
        return result

    caller = await server.call(
        "token_create",
        father_token=server.super_token,
        token_creation={
            "token_limit": [{"scopes": ["global"], "permissions": EVERYTHING}],
            "username": "ops",
            "password": password,
        },
    )
    enroller = await su(
        "token_create",
        {"token_limit": [{"scopes": ["global"], "permissions": [{"agent": "enroll"}]}]},
    )
    enrolled = await server.call("agent_enroll", f"{enroller['key']}:{enroller['secret']}")
    agent_uuid = enrolled["uuid"]
    agent_key, agent_secret = enrolled["token"].split(":")
    async with ScriptedAgent(server.ws_url, enrolled["token"], agent_uuid) as agent:
        blocking = asyncio.create_task(
            server.call("task_create_task_blocking", f"ops|{password}", agent_uuid, "version", 5000)
        )
        task = await agent.next_task()
        unwrap(await agent.upload(task, {"version": {"taskd": "x"}}))
        replies.append(await blocking)
        listed = await su("agent_list")
        replies.append(await su("task_query_task", {"condition": [{"uuid": agent_uuid}]}))
        replies.append(await su("token_list_all_tokens"))
        rolled = await su("token_roll_token_secret", caller["key"])
        for bad in (f"{caller['key']}:{caller['secret']}", f"ops|{password}x", "junk"):
            with pytest.raises(RpcError) as error:
                await server.call("agent_list", bad)
            replies.append(error.value.error)
    secrets = {
        "super": server.super_token.split(":")[1],
        "caller": caller["secret"],
        "rolled": rolled["secret"],
        "enroller": enroller["secret"],
        "agent": agent_secret,
        "password": password,
    }
    [row] = [r for r in listed if r["uuid"] == agent_uuid]
    assert "token_key" not in row
    stored_agents = (await snapshot(server.service.store))["agent"]
    assert any(agent_key in line for line in stored_agents)
    tables = orjson.dumps(await snapshot(server.service.store)).decode()
    answered = orjson.dumps(replies[1:]).decode()  # the first reply is the enroller's creation
    for name, secret in secrets.items():
        assert secret not in caplog.text, f"the {name} secret was logged"
        assert secret not in tables, f"the {name} secret is stored in the database"
        if name not in ("rolled",):
            assert secret not in answered, f"the {name} secret was answered"
    if server.settings.is_sqlite:
        path = Path(server.settings.database_url.split("///", 1)[1])
        for file in (path, path.with_name(path.name + "-wal")):
            if file.exists():
                raw = file.read_bytes()
                assert not any(s.encode() in raw for s in secrets.values()), file


async def test_query_records_carry_the_creating_token(server: Server) -> None:
    """Each task record names the key of the token that created it as created_by."""
    agent_uuid = str(uuid.uuid4())
    caller = await add_token(
        server,
        [
            {
                "scopes": [{"agent_uuid": agent_uuid}],
                "permissions": [{"task": {"create": "*"}}, {"task": {"read": "*"}}],
            }
        ],
    )
    async with ScriptedAgent(server.ws_url, server.super_token, agent_uuid):
        mine = await server.call("task_create_task", caller, agent_uuid, "ip")
        theirs = await server.su("task_create_task", agent_uuid, "ip")
    records = await server.call("task_query_task", caller, {"condition": [{"uuid": agent_uuid}]})
    created_by = {r["task_id"]: r["created_by"] for r in records}
    assert created_by == {
        mine["id"]: caller.split(":")[0],
        theirs["id"]: server.super_token.split(":")[0],
    }


# --------------------------------------------------------------------------- files


async def test_the_sqlite_database_files_are_private(tmp_path: Path) -> None:
    """The database and its -wal and -shm files are 0600 even under a permissive umask."""
    old_umask = os.umask(0)
    try:
        url = tmp_sqlite_url(tmp_path / "data")
        async with running_server(make_settings(url)) as server:
            await server.su("token_create", {"token_limit": []})
            files = sorted((tmp_path / "data").iterdir())
            assert {f.name for f in files} >= {"taskd.db", "taskd.db-wal", "taskd.db-shm"}
            for file in files:
                assert stat.S_IMODE(file.stat().st_mode) == 0o600, file.name
    finally:
        os.umask(old_umask)
