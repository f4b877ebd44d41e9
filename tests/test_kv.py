"""The KV store end to end: NodeGet's kv_* methods, their shapes, permissions and limits."""

from __future__ import annotations

from typing import Any

import pytest

from taskd.methods.kv import NAMESPACE_MARKER
from tests.helpers import RpcError, Server, add_token

NS = "830cec66-8fc9-5c21-9e2d-2da2b2f2d3b3"
"""An agent namespace, named by the agent's UUID as NodeGet-board does."""


async def failed(server: Server, code: int, method: str, *params: Any, **named: Any) -> str:
    """Call ``method``, require error ``code``, return its message."""
    with pytest.raises(RpcError) as error:
        await server.call(method, *params, **named)
    assert error.value.code == code, (method, error.value.message)
    return str(error.value.message)


async def test_values_round_trip_in_nodegets_shapes(server: Server) -> None:
    """A created namespace stores any JSON per key and answers in NodeGet's shapes, marker too."""
    assert await server.su("kv_create", NS) == {"namespace": NS, "kv": {}}
    assert await server.su("kv_list_all_namespace") == [NS]
    stored = {
        "metadata_name": "tokyo-1",
        "metadata_tags": ["jp", "vps"],
        "metadata_price": 12.5,
        "metadata_hidden": False,
        "database_limit_task": 86_400_000,
        "nested": {"a": [1, {"b": None}]},
        "nothing": None,
    }
    for key, value in stored.items():
        reply = await server.call(
            "kv_set_value", token=server.super_token, namespace=NS, key=key, value=value
        )
        assert reply == {"success": True}
    for key, value in stored.items():
        assert await server.su("kv_get_value", NS, key) == value
    assert await server.su("kv_get_value", NS, NAMESPACE_MARKER) is None
    assert await server.su("kv_get_value", NS, "missing") is None
    assert await server.su("kv_get_all_keys", NS) == sorted([NAMESPACE_MARKER, *stored])

    assert await server.su("kv_set_value", NS, "metadata_name", "osaka-2") == {"success": True}
    assert await server.su("kv_get_value", NS, "metadata_name") == "osaka-2"
    assert await server.su("kv_delete_key", NS, "metadata_name") == {"success": True}
    assert await server.su("kv_get_value", NS, "metadata_name") is None
    assert await server.su("kv_delete_key", NS, "metadata_name") == {"success": True}


async def test_a_namespace_exists_while_it_holds_a_key(server: Server) -> None:
    """Deleting every key, marker too, removes the namespace, as NodeGet-board relies on."""
    await server.su("kv_create", "global")
    await server.su("kv_set_value", "global", "inited", True)
    for key in await server.su("kv_get_all_keys", "global"):
        await server.su("kv_delete_key", "global", key)
    assert await server.su("kv_list_all_namespace") == []
    message = await failed(server, 105, "kv_get_all_keys", server.super_token, "global")
    assert "KV namespace 'global' does not exist" in message
    assert await server.su("kv_create", "global") == {"namespace": "global", "kv": {}}


async def test_a_missing_namespace_is_105_and_a_duplicate_108(server: Server) -> None:
    """Reads and writes on an absent namespace are 105; creating an existing one is 108."""
    for method, params in (
        ("kv_get_value", ["nowhere", "k"]),
        ("kv_set_value", ["nowhere", "k", 1]),
        ("kv_delete_key", ["nowhere", "k"]),
        ("kv_get_all_keys", ["nowhere"]),
    ):
        message = await failed(server, 105, method, server.super_token, *params)
        assert message.startswith("Not found in database: ") and "nowhere" in message
    assert await server.su("kv_list_all_namespace") == []
    await server.su("kv_create", "frontend_nodeget")
    message = await failed(server, 108, "kv_create", server.super_token, "frontend_nodeget")
    assert "already exists" in message


async def test_multi_value_keeps_request_order_and_sorts_wildcard_matches(server: Server) -> None:
    """Exact keys answer their value or null, ``prefix*`` every matching key sorted, in order."""
    await server.su("kv_create", "ns1")
    await server.su("kv_create", "ns2")
    for key, value in (("metadata_ram", 20), ("metadata_cpu", 10), ("other", "x")):
        await server.su("kv_set_value", "ns1", key, value)
    await server.su("kv_set_value", "ns2", "key2", "v2")
    reply = await server.call(
        "kv_get_multi_value",
        token=server.super_token,
        namespace_key=[
            {"namespace": "ns2", "key": "key2"},
            {"namespace": "ns1", "key": "metadata_*"},
            {"namespace": "ns1", "key": "absent"},
            {"namespace": "no_such_namespace", "key": "metadata_name"},
            {"namespace": "no_such_namespace", "key": "metadata_*"},
        ],
    )
    assert reply == [
        {"namespace": "ns2", "key": "key2", "value": "v2"},
        {"namespace": "ns1", "key": "metadata_cpu", "value": 10},
        {"namespace": "ns1", "key": "metadata_ram", "value": 20},
        {"namespace": "ns1", "key": "absent", "value": None},
        {"namespace": "no_such_namespace", "key": "metadata_name", "value": None},
    ]
    everything = await server.su("kv_get_multi_value", [{"namespace": "ns1", "key": "*"}])
    assert [item["key"] for item in everything] == [
        NAMESPACE_MARKER,
        "metadata_cpu",
        "metadata_ram",
        "other",
    ]


async def test_wildcards_match_literal_prefixes_only(server: Server) -> None:
    """``_`` and ``%`` in a prefix are plain characters, and case matters."""
    await server.su("kv_create", "ns")
    for key in ("a_b1", "axb2", "a%c", "abc", "A_B3", "a_", "a"):
        await server.su("kv_set_value", "ns", key, key)

    async def keys(pattern: str) -> list[str]:
        reply = await server.su("kv_get_multi_value", [{"namespace": "ns", "key": pattern}])
        return [item["key"] for item in reply]

    assert await keys("a_*") == ["a_", "a_b1"]
    assert await keys("a%*") == ["a%c"]
    assert await keys("A*") == ["A_B3"]
    many = [{"namespace": "ns", "key": f"p{i}_*"} for i in range(20)]
    assert await server.su("kv_get_multi_value", [*many, {"namespace": "ns", "key": "a_*"}]) == [
        {"namespace": "ns", "key": "a_", "value": "a_"},
        {"namespace": "ns", "key": "a_b1", "value": "a_b1"},
    ]


async def test_the_boards_node_list_with_nothing_stored_gets_an_empty_list(server: Server) -> None:
    """NodeGet-board asks for metadata with an empty list before any namespace exists: ``[]``."""
    reader = await add_token(
        server, [{"scopes": ["global"], "permissions": [{"kv": "list_all_namespace"}]}]
    )
    assert await server.call("kv_get_multi_value", token=reader, namespace_key=[]) == []
    assert await server.call("kv_get_multi_value", reader, []) == []
    await failed(server, 102, "kv_get_multi_value", "NoSuchKey0000000:" + "s" * 32, [])


async def test_permissions_hold_per_namespace_and_key_pattern(server: Server) -> None:
    """A kv_namespace scope covers that namespace only, and key patterns cover matching keys."""
    for name in ("ns1", "ns2"):
        await server.su("kv_create", name)
        await server.su("kv_set_value", name, "metadata_name", name)
        await server.su("kv_set_value", name, "secret", "s")
    token = await add_token(
        server,
        [
            {
                "scopes": [{"kv_namespace": "ns1"}],
                "permissions": [
                    {"kv": "list_all_keys"},
                    {"kv": "list_all_namespace"},
                    {"kv": {"read": "metadata_*"}},
                    {"kv": {"write": "metadata_*"}},
                    {"kv": {"delete": "metadata_*"}},
                ],
            }
        ],
    )
    assert await server.call("kv_get_value", token, "ns1", "metadata_name") == "ns1"
    assert await server.call("kv_set_value", token, "ns1", "metadata_tags", ["a"]) == {
        "success": True
    }
    assert await server.call("kv_delete_key", token, "ns1", "metadata_tags") == {"success": True}
    assert await server.call("kv_get_all_keys", token, "ns1") == [
        NAMESPACE_MARKER,
        "metadata_name",
        "secret",
    ]
    assert await server.call("kv_list_all_namespace", token) == ["ns1"]
    assert await server.call(
        "kv_get_multi_value", token, [{"namespace": "ns1", "key": "metadata_*"}]
    ) == [{"namespace": "ns1", "key": "metadata_name", "value": "ns1"}]

    message = await failed(server, 102, "kv_get_value", token, "ns1", "secret")
    assert "kv.read(secret)" in message and "KV namespace 'ns1'" in message
    await failed(server, 102, "kv_set_value", token, "ns1", "secret", 1)
    await failed(server, 102, "kv_delete_key", token, "ns1", "secret")
    await failed(server, 102, "kv_get_value", token, "ns2", "metadata_name")
    await failed(server, 102, "kv_get_all_keys", token, "ns2")
    await failed(server, 102, "kv_create", token, "ns3")
    # one refused item refuses the whole read: nothing of ns1 leaks
    await failed(
        server,
        102,
        "kv_get_multi_value",
        token,
        [
            {"namespace": "ns1", "key": "metadata_name"},
            {"namespace": "ns2", "key": "metadata_name"},
        ],
    )
    await failed(server, 102, "kv_get_multi_value", token, [{"namespace": "ns1", "key": "*"}])
    assert await server.su("kv_get_value", "ns1", "secret") == "s"


async def test_global_scope_covers_every_namespace_but_an_agent_scope_none(server: Server) -> None:
    """A global kv permission reaches all namespaces; an agent scope named like one does not."""
    await server.su("kv_create", NS)
    await server.su("kv_create", "global")
    everywhere = await add_token(
        server,
        [
            {
                "scopes": ["global"],
                "permissions": [{"kv": "list_all_namespace"}, {"kv": {"read": "*"}}],
            }
        ],
    )
    assert await server.call("kv_list_all_namespace", everywhere) == sorted([NS, "global"])
    assert await server.call("kv_get_value", everywhere, NS, "anything") is None
    agent_scoped = await add_token(
        server,
        [
            {
                "scopes": [{"agent_uuid": NS}],
                "permissions": [{"kv": "list_all_namespace"}, {"kv": {"read": "*"}}],
            }
        ],
    )
    await failed(server, 102, "kv_get_value", agent_scoped, NS, "anything")
    await failed(server, 102, "kv_list_all_namespace", agent_scoped)
    nothing = await add_token(server, [{"scopes": ["global"], "permissions": [{"task": "listen"}]}])
    await failed(server, 102, "kv_list_all_namespace", nothing)


async def test_only_the_super_token_creates_namespaces(server: Server) -> None:
    """kv_create is refused to every other token, whatever its kv permissions."""
    writer = await add_token(
        server,
        [
            {
                "scopes": ["global"],
                "permissions": [{"kv": {"write": "*"}}, {"kv": "list_all_namespace"}],
            }
        ],
    )
    message = await failed(server, 102, "kv_create", writer, "mine")
    assert "only the super token" in message
    assert await server.call("kv_list_all_namespace", writer) == []


async def test_a_token_created_with_kv_limits_works_as_granted(server: Server) -> None:
    """token_create stores kv permissions and kv_namespace scopes, and they take effect."""
    await server.su("kv_create", "frontend_nodeget")
    limits = [
        {
            "scopes": [{"kv_namespace": "frontend_nodeget"}],
            "permissions": [{"kv": {"read": "*"}}, {"kv": {"write": "title"}}],
        }
    ]
    issued = await server.su("token_create", {"token_limit": limits})
    token = f"{issued['key']}:{issued['secret']}"
    assert (await server.call("token_get", token))["token_limit"] == limits
    assert await server.call("kv_set_value", token, "frontend_nodeget", "title", "Fleet") == {
        "success": True
    }
    assert await server.call("kv_get_value", token, "frontend_nodeget", "title") == "Fleet"
    await failed(server, 102, "kv_set_value", token, "frontend_nodeget", "custom_head", "<x>")


async def test_bad_input_is_a_clear_error(server: Server) -> None:
    """Keys, namespaces, values and item lists out of shape or bounds name the problem."""
    await server.su("kv_create", "ns")
    su = server.super_token
    assert "cannot contain '*'" in await failed(server, 108, "kv_set_value", su, "ns", "a*", 1)
    assert "key: must not be empty" in await failed(server, 108, "kv_get_value", su, "ns", "")
    assert "control characters" in await failed(server, 108, "kv_delete_key", su, "ns", "a\nb")
    assert "longer than 512" in await failed(server, 108, "kv_set_value", su, "ns", "k" * 513, 1)
    assert "longer than 128" in await failed(server, 108, "kv_create", su, "n" * 129)
    assert "key: must be a string" in await failed(server, -32602, "kv_get_value", su, "ns", 5)
    assert "namespace: must be a string" in await failed(server, -32602, "kv_create", su, None)
    too_big = "x" * (1 << 20)
    assert "exceed the 1048576-byte limit" in await failed(
        server, 108, "kv_set_value", su, "ns", "big", too_big
    )
    deep: Any = 1
    for _ in range(40):
        deep = [deep]
    assert "nested deeper than 32" in await failed(server, 108, "kv_set_value", su, "ns", "d", deep)
    assert "missing a required argument: 'value'" in await failed(
        server, -32602, "kv_set_value", token=su, namespace="ns", key="k"
    )
    assert "namespace_key: must be an array" in await failed(
        server, -32602, "kv_get_multi_value", su, {"namespace": "ns", "key": "k"}
    )
    assert "namespace_key.1: must be an object" in await failed(
        server, -32602, "kv_get_multi_value", su, [{"namespace": "ns", "key": "k"}, {"key": "k"}]
    )
    assert "exactly one '*', at its end" in await failed(
        server, 108, "kv_get_multi_value", su, [{"namespace": "ns", "key": "a*b"}]
    )
    assert "exceed the limit of 10000" in await failed(
        server, 108, "kv_get_multi_value", su, [{"namespace": "ns", "key": "k"}] * 10_001
    )
    assert await server.su("kv_get_all_keys", "ns") == [NAMESPACE_MARKER]
