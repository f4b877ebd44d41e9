"""The JSON-RPC adapter: what reaches the wire when a method fails, params binding, metrics."""

from __future__ import annotations

import gc
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any

import pytest
from pydantic import Field
from sqlalchemy import event

from taskd import rpc
from taskd.protocol import AgentUuid
from tests.helpers import Server, make_settings, running_server


@pytest.fixture
def failing_method() -> Iterator[str]:
    """A method registered through the public decorator that fails with a private message."""
    name = "test_fails_unexpectedly"

    @rpc.method(name)
    async def fails(ctx: rpc.CallContext, value: Any = None) -> Any:
        """Always fails with an exception whose text must not leave the server."""
        raise RuntimeError("secret detail: /etc/shadow at 10.0.0.1")

    try:
        yield name
    finally:
        del rpc.REGISTRY[name]


async def test_unexpected_exception_is_internal_error_without_its_text(
    server: Server, failing_method: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A method crashing is answered -32603 "Internal error"; the text is only logged."""
    response = await server.post(
        [
            {"jsonrpc": "2.0", "method": failing_method, "id": 1},
            {"jsonrpc": "2.0", "method": "server_hello", "id": 2},
        ]
    )
    failed, hello = response.json()
    assert failed == {
        "jsonrpc": "2.0",
        "error": {"code": -32603, "message": "Internal error"},
        "id": 1,
    }
    assert "secret detail" not in response.text
    assert hello["result"].startswith("hello")
    assert any("secret detail" in r.getMessage() or r.exc_info for r in caplog.records)


@pytest.fixture
def typed_method() -> Iterator[str]:
    """A method whose params are typed: one parsed by its Parse marker, one by pydantic."""
    name = "test_typed_params"

    @rpc.method(name)
    async def typed(
        ctx: rpc.CallContext,
        agent: AgentUuid,
        count: Annotated[int, Field(ge=1, strict=True)] | None = None,
        raw: Any = None,
    ) -> dict[str, Any]:
        """Answers what it was given."""
        return {"agent": agent, "count": count, "raw": raw}

    try:
        yield name
    finally:
        del rpc.REGISTRY[name]


async def test_typed_params_reach_the_method_parsed(server: Server, typed_method: str) -> None:
    """A method gets its params parsed as annotated; a bad one is -32602 naming it, and a
    missing one is reported before any value is parsed."""
    upper = "6F1F7A5E-7A57-4D4B-9D0A-1C2B3C4D5E6F"
    expected = {"agent": upper.lower(), "count": 3, "raw": {"any": ["thing"]}}
    assert await server.call(typed_method, upper, 3, {"any": ["thing"]}) == expected
    assert await server.call(typed_method, raw={"any": ["thing"]}, count=3, agent=upper) == (
        expected
    )
    assert await server.call(typed_method, upper, None) == {
        "agent": upper.lower(),
        "count": None,
        "raw": None,
    }
    for params, fragment in (
        ([upper, "3"], "count: Input should be a valid integer"),
        ([upper, True], "count: Input should be a valid integer"),
        ([upper, 0], "count: Input should be greater than or equal to 1"),
        (["nope"], "agent: 'nope' is not a valid UUID"),
        ({"count": "x"}, "missing a required argument: 'agent'"),
    ):
        reply = await server.request(typed_method, params)
        assert reply["error"]["code"] == -32602, params
        assert fragment in reply["error"]["message"], reply


async def test_params_are_checked_before_the_token(server: Server) -> None:
    """A malformed param is answered -32602 naming it, even with a token that would be refused."""
    reply = await server.request(
        "task_create_task", ["nokey:nosecret", "not-a-uuid", {"ping": "host"}]
    )
    assert reply["error"]["code"] == -32602 and "target_uuid" in reply["error"]["message"]
    reply = await server.request("task_create_task", ["nokey:nosecret", str(uuid.uuid4()), "ip"])
    assert reply["error"]["code"] == 102


async def test_params_binding_errors_name_the_param(server: Server) -> None:
    """Missing and surplus positional params are -32602 with a message naming the problem."""
    cases = [
        ([], "missing a required argument: 'token'"),
        ({"token": "x"}, "missing a required argument: 'target_uuid'"),
        ({"token": "x", "version": "1"}, "missing a required argument: 'target_uuid'"),
        (["a", "b", "c", 1, 2], "expected at most 4 params, got 5"),
    ]
    for params, fragment in cases:
        reply = await server.request("task_create_task", params)
        assert reply["error"]["code"] == -32602, params
        assert fragment in reply["error"]["message"], reply


async def test_unknown_named_params_are_ignored(server: Server) -> None:
    """Extra named params (NodeGet-board sends ``version``) are ignored, as serde does."""
    rows = await server.call(
        "task_query_task",
        token=server.super_token,
        task_data_query={"condition": []},
        version="0.1.0",
        colour=1,
    )
    assert rows == []
    reply = await server.request(
        "task_create_task",
        {"token": server.super_token, "target_uuid": "not-a-uuid", "task_type": "ip", "x": 1},
    )
    assert reply["error"]["code"] == -32602 and "target_uuid" in reply["error"]["message"]


async def test_metrics_count_what_happened(server: Server) -> None:
    """/metrics exposes counters that move with the traffic (text format, no auth), and the
    error counter counts every error reply: parse, invalid request and unknown method too."""
    await server.request("task_query_task", ["bad:token", {"condition": []}])
    await server.request("task_create_task", [])
    await server.post(b"{not json")
    await server.post({"jsonrpc": "1.0", "method": "server_hello", "id": 1})
    await server.post([])
    await server.request("no_such_method")
    await server.post({"jsonrpc": "2.0", "method": "no_such_method"})  # a notification
    response = await server.http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert 'taskd_rpc_errors_total{code="102"} 1.0' in text
    assert 'taskd_rpc_errors_total{code="-32602"} 1.0' in text
    assert 'taskd_rpc_errors_total{code="-32700"} 1.0' in text
    assert 'taskd_rpc_errors_total{code="-32600"} 2.0' in text
    assert 'taskd_rpc_errors_total{code="-32601"} 2.0' in text
    assert "taskd_auth_failures_total 1.0" in text
    assert "taskd_agents_connected 0.0" in text


async def test_metrics_time_the_cycle_collectors_pauses(server: Server) -> None:
    """Each pause of the cycle collector (it stops the event loop) is timed, by generation."""

    async def collected() -> float:
        text = (await server.http.get("/metrics")).text
        name = 'taskd_gc_pause_seconds_count{generation="2"} '
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))

    before = await collected()
    gc.collect()
    gc.collect()
    assert await collected() == before + 2


@pytest.fixture
async def roomy_server(database_url: str) -> AsyncIterator[Server]:
    """A server whose read pool could serve far more than a batch window at once."""
    async with running_server(make_settings(database_url, db_pool_size=40)) as running:
        yield running


async def test_a_large_batch_is_answered_in_order_a_window_at_a_time(roomy_server: Server) -> None:
    """Every item of a batch bigger than the window is answered, in order; about
    BATCH_WINDOW of them hold a database connection at once (a background read of
    the server's own may add one or two), not as many as the pool has."""
    server = roomy_server
    out = [0, 0]  # connections checked out now, most at once
    lock = threading.Lock()  # SQLite's read threads check out their own connections

    def checkout(*_: Any) -> None:
        with lock:
            out[0] += 1
            out[1] = max(out)

    def checkin(*_: Any) -> None:
        with lock:
            out[0] -= 1

    for engine in server.service.store.read_engines:
        event.listen(engine.pool, "checkout", checkout)
        event.listen(engine.pool, "checkin", checkin)
    items = 12 * rpc.BATCH_WINDOW
    batch = [
        {
            "jsonrpc": "2.0",
            "method": "task_query_task",
            "params": [server.super_token, {"condition": [{"limit": 1}]}],
            "id": f"q{i}",
        }
        for i in range(items)
    ]
    replies = (await server.post(batch)).json()
    assert [r["id"] for r in replies] == [f"q{i}" for i in range(items)]
    assert all(r["result"] == [] for r in replies), replies[:3]
    assert 1 <= out[1] <= rpc.BATCH_WINDOW + 2, out
