"""Token management end to end: the token_* methods, the escalation guard, presets and the CLI."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from taskd.auth import Need, Principal, allows
from taskd.methods.token import uncovered
from taskd.protocol import TASK_TYPES, parse_limits
from taskd.roles import describe_limits, role_limits
from tests.helpers import RpcError, ScriptedAgent, Server, add_token, agent_token_limits, scaled

ROOT = Path(__file__).resolve().parent.parent
A, B = "0b0b0b0b-aaaa-4aaa-8aaa-000000000001", "0b0b0b0b-bbbb-4bbb-8bbb-000000000002"
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


async def denied(server: Server, method: str, *params: Any) -> RpcError:
    """Call ``method`` and require a 102 error; return it."""
    with pytest.raises(RpcError) as error:
        await server.call(method, *params)
    assert error.value.code == 102, (method, error.value.message)
    return error.value


async def stored_token(server: Server, key: str) -> Any:
    """The token row with ``key``, straight from the store."""
    return await server.service.store.token_by_key(key)


async def created(server: Server, limits: Any, **fields: Any) -> str:
    """A token made by the super token with ``token_create``; its KEY:SECRET."""
    reply = await server.su("token_create", {"token_limit": limits, **fields})
    return f"{reply['key']}:{reply['secret']}"


NODEGET_FIELDS = [
    "version",
    "token_key",
    "timestamp_from",
    "timestamp_to",
    "token_limit",
    "username",
]
"""NodeGet's Token struct, in its order; taskd's extras follow."""


# --------------------------------------------------------------------------- methods


async def test_create_answers_key_and_secret_once_and_stores_only_hashes(server: Server) -> None:
    """token_create [father_token, token_creation] answers {key, secret}; nothing else holds it."""
    reply = await server.su("token_create", {"token_limit": role_limits("readonly")})
    assert set(reply) == {"key", "secret"}
    key, secret = reply["key"], reply["secret"]
    assert len(key) == 16 and len(secret) == 32 and (key + secret).isalnum()
    assert await server.call("agent_list", f"{key}:{secret}") == []
    row = await stored_token(server, key)
    assert secret not in json.dumps([str(value) for value in row])
    listing = await server.su("token_list_all_tokens")
    assert set(listing) == {"tokens"}
    [mine] = [t for t in listing["tokens"] if t["token_key"] == key]
    assert list(mine)[:6] == NODEGET_FIELDS
    assert mine["version"] == 1 and mine["username"] is None
    assert mine["token_limit"] == role_limits("readonly") and mine["is_super"] is False
    assert secret not in json.dumps(listing)
    assert not {"secret", "secret_hash", "password_hash", "password"} & set(mine)
    assert [t["is_super"] for t in listing["tokens"]].count(True) == 1


async def test_token_get_answers_nodegets_token_struct_for_the_caller(server: Server) -> None:
    """Any valid token reads itself, even without token permissions; an expired one cannot."""
    limits = [{"scopes": [{"agent_uuid": A}], "permissions": [{"task": "listen"}]}]
    end = now_ms() + 60_000
    token = await created(server, limits, timestamp_to=end, description="me")
    key, secret = token.split(":")
    info = await server.call("token_get", token)
    assert list(info)[:6] == NODEGET_FIELDS
    assert {field: info[field] for field in NODEGET_FIELDS} == {
        "version": 1,
        "token_key": key,
        "timestamp_from": None,
        "timestamp_to": end,
        "token_limit": limits,
        "username": None,
    }
    assert info["description"] == "me" and info["is_super"] is False and info["uses"] == 0
    assert secret not in json.dumps(info)
    assert await server.call("token_get", token=token) == info
    expired = await add_token(server, limits, timestamp_to=now_ms() - 1000)
    await denied(server, "token_get", expired)
    await denied(server, "token_get", f"{key}:{'x' * 32}")


async def test_the_super_token_looks_like_nodegets(server: Server) -> None:
    """token_get of the super token: username root, no limits, no window, as NodeGet shows it."""
    super_key = server.super_token.split(":")[0]
    info = await server.su("token_get")
    assert {field: info[field] for field in NODEGET_FIELDS} == {
        "version": 1,
        "token_key": super_key,
        "timestamp_from": None,
        "timestamp_to": None,
        "token_limit": [],
        "username": "root",
    }
    assert info["is_super"] is True
    assert server.super_token.split(":")[1] not in json.dumps(info)
    listing = (await server.su("token_list_all_tokens"))["tokens"]
    assert [t for t in listing if t["username"] == "root"] == [info]
    for target in ("root", super_key, server.super_token):
        assert await server.call("token_get", target, server.super_token) == info


async def test_the_super_token_keeps_the_username_root(server: Server) -> None:
    """root is refused to other tokens; a password on the super token logs in as root|PASSWORD."""
    with pytest.raises(RpcError) as reserved:
        await created(server, [], username="root", password="a password")
    assert reserved.value.code == 108 and "reserved" in reserved.value.message
    await created(server, [], username="ops", password="a password")
    with pytest.raises(RpcError) as taken:
        await server.su("token_change_password", "ops", "a password", "root")
    assert taken.value.code == 108 and "reserved" in taken.value.message
    with pytest.raises(RpcError) as renamed:
        await server.su("token_change_password", "root", "a password", "admin")
    assert renamed.value.code == 108
    await denied(server, "agent_list", "root|the root password")
    assert await server.su("token_change_password", "root", "the root password") == {
        "success": True,
        "message": "Password changed successfully",
    }
    assert await server.call("agent_list", "root|the root password") == []
    assert (await server.call("token_get", "root|the root password"))["is_super"] is True


async def test_nodeget_board_requests_work_as_they_are_sent(server: Server) -> None:
    """The board's named-param token requests: agent token by username, get, list, edit, delete."""
    agent_uuid = str(uuid.uuid4())
    username = f"[agent]:{agent_uuid}"
    agent_limits = [
        {
            "scopes": [{"agent_uuid": agent_uuid}],
            "permissions": [{"task": "listen"}, {"task": {"write": "ping"}}],
        }
    ]
    reply = await server.call(
        "token_create",
        father_token=server.super_token,
        token_creation={
            "username": username,
            "password": "aB3:|x!9#kL0-_=+",  # generatePassword(16) draws ':' and '|' too
            "timestamp_from": None,
            "timestamp_to": None,
            "version": 1,
            "token_limit": agent_limits,
        },
    )
    key = reply["key"]
    agent_token = f"{key}:{reply['secret']}"
    async with ScriptedAgent(server.ws_url, agent_token, agent_uuid):
        pass
    by_key = await server.call("token_get", token=key, supertoken=server.super_token)
    by_name = await server.call("token_get", token=username, supertoken=server.super_token)
    assert by_key == by_name and by_key["username"] == username
    assert by_key["token_limit"] == agent_limits
    listed = await server.call("token_list_all_tokens", token=server.super_token)
    assert by_key in listed["tokens"]
    new_limits = [{"scopes": ["global"], "permissions": [{"task": {"read": "ping"}}]}]
    edited = await server.call(  # the board also sends version and the form's username
        "token_edit",
        token=server.super_token,
        target_token=key,
        version=1,
        limit=new_limits,
        username=username,
    )
    assert edited == {"success": True, "id": (await stored_token(server, key)).id, "token_key": key}
    assert (await server.call("token_get", agent_token))["token_limit"] == new_limits
    deleted = await server.call("token_delete", token=server.super_token, target_token=username)
    assert deleted["rows_affected"] == 1 and deleted["matched_by"] == "username"
    assert key in deleted["message"]
    await denied(server, "token_get", agent_token)


async def test_username_and_password_log_in_and_the_password_changes_at_once(
    server: Server,
) -> None:
    """USERNAME|PASSWORD works; after token_change_password the old password fails at once."""
    token = await created(server, role_limits("readonly"), username="ops", password="correct horse")
    key = token.split(":")[0]
    assert await server.call("agent_list", "ops|correct horse") == []
    row = await stored_token(server, key)
    assert row.password_hash.startswith("scrypt$") and "correct horse" not in row.password_hash
    changed = await server.su("token_change_password", key, "battery staple")
    assert changed == {"success": True, "message": "Password changed successfully"}
    await denied(server, "agent_list", "ops|correct horse")
    assert await server.call("agent_list", "ops|battery staple") == []
    # the target may be the username, or a credential string whose secret is not checked
    await server.su("token_change_password", "ops", "third password")
    await server.su("token_change_password", f"{key}:{'x' * 32}", "fourth password")
    await server.su("token_change_password", "ops|any", "fifth password")
    assert await server.call("agent_list", "ops|fifth password") == []
    nameless = (await server.su("token_create", {"token_limit": []}))["key"]
    for target, password, code in (
        (nameless, "long enough", 108),
        (key, "short", -32602),
        ("NoSuchKey", "long enough", 105),
        ("", "long enough", 108),
    ):
        with pytest.raises(RpcError) as error:
            await server.su("token_change_password", target, password)
        assert error.value.code == code, (target, error.value.message)
    named = await server.su("token_change_password", nameless, "long enough", "dev")
    assert named["success"] is True
    assert (await server.call("token_get", "dev|long enough"))["token_key"] == nameless
    with pytest.raises(RpcError) as taken:
        await server.su(
            "token_create", {"token_limit": [], "username": "ops", "password": "pass12"}
        )
    assert taken.value.code == 108 and "already taken" in taken.value.message


async def test_edit_applies_at_once_and_omitted_fields_stay(server: Server) -> None:
    """token_edit [token, target_token, limit] replaces limits at once; extras ride along."""
    token = await created(server, role_limits("readonly"), description="before")
    key = token.split(":")[0]
    assert await server.call("agent_list", token) == []  # now in the auth cache
    edited = await server.su("token_edit", key, role_limits("enroll"))
    assert edited == {"success": True, "id": (await stored_token(server, key)).id, "token_key": key}
    info = await server.call("token_get", token)
    assert info["token_limit"] == role_limits("enroll") and info["description"] == "before"
    await denied(server, "agent_list", token)
    await server.call(
        "token_edit",
        token=server.super_token,
        target_token=key,
        limit=role_limits("readonly"),
        timestamp_to=now_ms() - 1000,
    )
    error = await denied(server, "agent_list", token)
    assert "expired" in error.message
    await server.call(
        "token_edit",
        token=server.super_token,
        target_token=key,
        timestamp_to=None,
        description=None,
    )
    info = await server.call("token_get", token)
    assert info["timestamp_to"] is None and info["description"] is None
    assert info["token_limit"] == role_limits("readonly")
    with pytest.raises(RpcError) as error_105:
        await server.su("token_edit", "NoSuchKey", [])
    assert error_105.value.code == 105
    with pytest.raises(RpcError) as error_limit:
        await server.su("token_edit", key, [{"scopes": ["nowhere"], "permissions": []}])
    assert error_limit.value.code == -32602 and "limit" in error_limit.value.message
    for target in (server.super_token.split(":")[0], "root"):
        with pytest.raises(RpcError) as error_108:
            await server.su("token_edit", target, [])
        assert error_108.value.code == 108
    await server.call(
        "token_edit", token=server.super_token, target_token="root", description="the root"
    )
    assert (await server.su("token_get"))["description"] == "the root"


async def test_delete_revokes_at_once_and_the_super_token_stays(server: Server) -> None:
    """token_delete answers message, rows_affected, matched_by; the super token is refused."""
    token = await created(server, role_limits("readonly"))
    key = token.split(":")[0]
    assert await server.call("agent_list", token) == []
    deleted = await server.su("token_delete", key)
    assert deleted == {
        "message": f"Token {key} deleted successfully by token {server.super_token.split(':')[0]}",
        "rows_affected": 1,
        "matched_by": "token_key",
    }
    await denied(server, "agent_list", token)
    assert await stored_token(server, key) is None
    for target, code in (
        (server.super_token.split(":")[0], 102),
        ("root", 102),
        (key, 105),
        ("  ", 108),
    ):
        with pytest.raises(RpcError) as error:
            await server.su("token_delete", target)
        assert error.value.code == code, target
    assert await server.su("agent_list") == []


async def test_rolled_secret_replaces_the_old_one_at_once(server: Server) -> None:
    """token_roll_token_secret answers {key, secret}; the old secret fails on the next call."""
    limits = [{"scopes": ["global"], "permissions": [{"agent": "list"}, {"token": "write"}]}]
    old = await add_token(server, limits, username="roller")
    key = old.split(":")[0]
    assert await server.call("agent_list", old) == []
    rolled = await server.su("token_roll_token_secret", "roller")
    assert set(rolled) == {"key", "secret"} and rolled["key"] == key
    await denied(server, "agent_list", old)
    new = f"{key}:{rolled['secret']}"
    assert await server.call("agent_list", new) == []
    own = await server.call("token_roll_token_secret", new)
    assert own["key"] == key
    await denied(server, "agent_list", new)
    assert await server.call("agent_list", f"{key}:{own['secret']}") == []
    with pytest.raises(RpcError) as error:
        await server.su("token_roll_token_secret", "NoSuchKey")
    assert error.value.code == 105


async def test_changing_a_token_ends_the_subscriptions_it_opened(server: Server) -> None:
    """Rolling, deleting or re-scoping a token closes its agents' WebSockets; a relabel does not."""
    rolled_uuid, deleted_uuid, kept_uuid, moved_uuid = (str(uuid.uuid4()) for _ in range(4))
    rolled = await add_token(server, agent_token_limits(rolled_uuid))
    moved = await add_token(server, agent_token_limits(moved_uuid))
    deleted = await add_token(server, agent_token_limits(deleted_uuid))
    self_rolling = await add_token(
        server,
        [
            *agent_token_limits(kept_uuid),
            {"scopes": ["global"], "permissions": [{"token": "write"}]},
        ],
    )
    async with (
        ScriptedAgent(server.ws_url, rolled, rolled_uuid) as first,
        ScriptedAgent(server.ws_url, deleted, deleted_uuid) as second,
        ScriptedAgent(server.ws_url, self_rolling, kept_uuid) as third,
        ScriptedAgent(server.ws_url, moved, moved_uuid) as fourth,
    ):
        await server.call(
            "token_edit",
            token=server.super_token,
            target_token=self_rolling.split(":")[0],
            description="label",
        )
        await server.su("task_create_task", kept_uuid, "ip")
        assert (await third.next_task())["task_event_type"] == "ip"
        await server.su("token_roll_token_secret", rolled.split(":")[0])
        await server.su("token_delete", deleted.split(":")[0])
        await server.su("token_edit", moved.split(":")[0], agent_token_limits(kept_uuid))
        assert await first.closed() == 1008 and await second.closed() == 1008
        assert await fourth.closed() == 1008
        for gone in (rolled_uuid, deleted_uuid, moved_uuid):
            with pytest.raises(RpcError) as error:
                await server.su("task_create_task", gone, "ip")
            assert error.value.code == 104
        own = await third.call("token_roll_token_secret", self_rolling)
        assert own["key"] == self_rolling.split(":")[0]
        assert await third.closed() == 1008
    async with ScriptedAgent(server.ws_url, f"{own['key']}:{own['secret']}", kept_uuid):
        await server.su("task_create_task", kept_uuid, "ip")


async def test_a_subscription_ends_when_its_token_expires(server: Server) -> None:
    """An agent subscribed with a token that expires a second later is closed with 1008 then."""
    agent_uuid = str(uuid.uuid4())
    expires_at = now_ms() + int(scaled(1.0) * 1000)
    token = await add_token(server, agent_token_limits(agent_uuid), timestamp_to=expires_at)
    async with ScriptedAgent(server.ws_url, token, agent_uuid) as agent:
        created = await server.su("task_create_task", agent_uuid, "ip")
        assert (await agent.next_task())["task_id"] == created["id"]
        assert await agent.closed(timeout=5) == 1008
        assert now_ms() >= expires_at
    with pytest.raises(RpcError) as error:
        await server.su("task_create_task", agent_uuid, "ip")
    assert error.value.code == 104
    deadline = time.monotonic() + scaled(5)
    while (await server.su("agent_list"))[0]["online"]:  # recorded in the background
        assert time.monotonic() < deadline, "the agent is still listed online"
        await asyncio.sleep(0.05)


async def test_no_task_is_pushed_once_the_token_has_expired(server: Server) -> None:
    """Even before the subscription's end comes due, a task for it after expiry is not pushed."""
    agent_uuid = str(uuid.uuid4())
    expires_at = now_ms() + int(scaled(0.5) * 1000)
    token = await add_token(server, agent_token_limits(agent_uuid), timestamp_to=expires_at)
    async with ScriptedAgent(server.ws_url, token, agent_uuid) as agent:
        subscription = server.service.hub.connected_agents()[agent_uuid]
        assert subscription.expires_at == expires_at
        subscription.timer.cancel()  # as if the loop were too busy to end it on time
        await asyncio.sleep(max(0.0, (expires_at - now_ms()) / 1000) + 0.05)
        with pytest.raises(RpcError) as error:
            await server.su("task_create_task", agent_uuid, "ip")
        assert error.value.code == 104
        assert await agent.closed() == 1008
        assert agent.notifications.empty()


async def test_token_permissions_grant_exactly_their_methods(server: Server) -> None:
    """{"token": read|write|delete} each open only their methods, and only on a global scope."""

    async def holder(action: str, scope: Any = "global") -> str:
        return await add_token(
            server, [{"scopes": [scope], "permissions": [{"token": action}, {"agent": "list"}]}]
        )

    reader, writer, deleter = await holder("read"), await holder("write"), await holder("delete")
    scoped = await holder("write", {"agent_uuid": A})
    victim = await created(server, [], username="victim", password="victim password")
    victim = victim.split(":")[0]
    for token in (reader, writer, deleter, scoped):  # anyone reads itself
        assert (await server.call("token_get", token))["token_key"] == token.split(":")[0]
    assert (await server.call("token_get", "victim", reader))["token_key"] == victim
    assert len((await server.call("token_list_all_tokens", reader))["tokens"]) == 6
    await denied(server, "token_get", "victim", writer)
    await denied(server, "token_get", "victim", scoped)
    await denied(server, "token_create", reader, {"token_limit": []})
    await denied(server, "token_delete", writer, victim)
    await denied(server, "token_list_all_tokens", writer)
    await denied(server, "token_create", scoped, {"token_limit": []})
    await denied(server, "token_create", deleter, {"token_limit": []})
    await denied(server, "token_change_password", reader, victim, "new password")
    made = await server.call(
        "token_create", father_token=writer, token_creation={"token_limit": [], "description": "e"}
    )
    assert (await server.call("token_roll_token_secret", writer, made["key"]))["key"] == made["key"]
    assert (await server.call("token_delete", deleter, "victim"))["matched_by"] == "username"


# --------------------------------------------------------------------------- escalation


async def test_a_delegate_cannot_grant_or_take_over_more_than_it_holds(server: Server) -> None:
    """A non-super token creates, edits, rolls and deletes only tokens within its own power."""
    own = [
        {
            "scopes": [{"agent_uuid": A}],
            "permissions": [{"task": {"create": "tcp*"}}, {"agent": "list"}],
        },
        {"scopes": [{"agent_uuid": B}], "permissions": [{"task": {"read": "*"}}]},
        {"scopes": ["global"], "permissions": [{"token": a} for a in ("read", "write", "delete")]},
    ]
    delegate = await add_token(server, own)

    def limit(scopes: list[Any], *permissions: Any) -> list[dict[str, Any]]:
        return [{"scopes": scopes, "permissions": list(permissions)}]

    granted = [
        limit([{"agent_uuid": A}], {"task": {"create": "tcp_ping"}}),
        limit([{"agent_uuid": A}], {"task": {"create": "tcp*"}}, {"agent": "list"}),
        limit([{"agent_uuid": B}], {"task": {"read": "ping"}}),
        limit(["global"], {"token": "read"}),
        limit([{"agent_uuid": A}], {"token": "write"}),
    ]
    refused = [
        limit([{"agent_uuid": A}], {"task": {"create": "*"}}),
        limit([{"agent_uuid": A}], {"task": {"create": "t*"}}),
        limit(["global"], {"task": {"create": "tcp_ping"}}),
        limit([{"agent_uuid": B}], {"task": {"create": "tcp_ping"}}),
        limit([{"agent_uuid": A}], {"terminal": "connect"}),
        limit(["global"], {"agent": "enroll"}),
        # each scope and each permission appear in the delegate's limits, but not together
        limit([{"agent_uuid": A}, {"agent_uuid": B}], {"task": {"create": "tcp*"}}),
        limit([{"agent_uuid": A}], {"task": {"read": "*"}}),
    ]

    def creation(limits: Any) -> dict[str, Any]:
        return {"token_limit": limits}

    for limits in granted:
        made = await server.call("token_create", delegate, creation(limits))
        assert (await stored_token(server, made["key"])).limits == parse_limits_wire(limits)
    for limits in refused:
        error = await denied(server, "token_create", delegate, creation(limits))
        assert "cannot grant" in error.message, limits
    everything = limit(["global"], {"task": {"create": "*"}})
    mighty = await created(server, everything, username="mighty", password="mighty password")
    mighty = mighty.split(":")[0]
    small = (await server.call("token_create", delegate, creation(granted[0])))["key"]
    delegate_key = delegate.split(":")[0]
    super_key = server.super_token.split(":")[0]
    for method, params in (
        ("token_edit", [mighty, []]),
        ("token_edit", ["mighty", []]),
        ("token_roll_token_secret", [mighty]),
        ("token_delete", [mighty]),
        ("token_delete", ["mighty"]),
        ("token_change_password", [mighty, "long enough", "user1"]),
        ("token_roll_token_secret", [super_key]),
        ("token_roll_token_secret", ["root"]),
        ("token_change_password", ["root", "long enough"]),
        ("token_edit", ["root", [], None, None, "mine now"]),
        ("token_delete", ["root"]),
        ("token_edit", [small, refused[0]]),
        ("token_edit", [delegate_key, [*own, *refused[0]]]),
    ):
        await denied(server, method, delegate, *params)
    assert (await stored_token(server, mighty)) is not None
    assert (await server.su("token_get"))["description"] == "super token"
    edited = await server.call("token_edit", delegate, small, granted[1])
    assert edited["token_key"] == small
    assert (await stored_token(server, small)).limits == parse_limits_wire(granted[1])
    deleted = await server.call("token_delete", delegate, small)
    assert deleted["matched_by"] == "token_key" and deleted["rows_affected"] == 1
    assert delegate_key in deleted["message"]


def parse_limits_wire(limits: Any) -> Any:
    """Limits as the server stores them (canonical wire form)."""
    from taskd.protocol import limits_to_wire

    return limits_to_wire(parse_limits(limits))


async def test_a_delegate_cannot_outlive_its_own_window(server: Server) -> None:
    """Tokens made or changed by an expiring token expire no later than it does."""
    end = now_ms() + 3_600_000
    delegate = await add_token(
        server,
        [{"scopes": ["global"], "permissions": [{"token": "write"}, {"agent": "list"}]}],
        timestamp_to=end,
    )
    inherited = await server.call("token_create", delegate, {"token_limit": []})
    assert (await stored_token(server, inherited["key"])).timestamp_to == end
    shorter = await server.call(
        "token_create", delegate, {"token_limit": [], "timestamp_to": end - 1}
    )
    assert (await stored_token(server, shorter["key"])).timestamp_to == end - 1
    await denied(server, "token_create", delegate, {"token_limit": [], "timestamp_to": end + 1})
    await denied(server, "token_edit", delegate, shorter["key"], [], None, None)
    forever = (await server.su("token_create", {"token_limit": []}))["key"]
    await denied(server, "token_roll_token_secret", delegate, forever)


async def test_invalid_params_name_the_field(server: Server) -> None:
    """Malformed creations, limits, usernames, passwords, windows and targets name the field."""
    cases: list[tuple[Any, int, str]] = [
        ([], -32602, "token_creation"),
        ({"username": "ab", "password": "long enough"}, -32602, "token_limit"),
        ({"token_limit": [{"scopes": ["nowhere"], "permissions": []}]}, -32602, "token_limit"),
        ({"token_limit": "all"}, -32602, "token_limit"),
        ({"token_limit": [], "username": "", "password": "long enough"}, -32602, "username"),
        ({"token_limit": [], "username": "a\nb", "password": "long enough"}, -32602, "username"),
        ({"token_limit": [], "username": "ab"}, -32602, "password"),
        ({"token_limit": [], "username": "ab", "password": "short"}, -32602, "password"),
        ({"token_limit": [], "timestamp_from": 5, "timestamp_to": 4}, 108, "timestamp_from"),
        ({"token_limit": [], "timestamp_to": "soon"}, -32602, "timestamp_to"),
        ({"token_limit": [], "version": "one"}, -32602, "version"),
        ({"token_limit": [], "max_uses": 0}, -32602, "max_uses"),
        ({"token_limit": [], "description": "x" * 257}, -32602, "description"),
    ]
    for creation, code, field in cases:
        with pytest.raises(RpcError) as error:
            await server.call(
                "token_create", father_token=server.super_token, token_creation=creation
            )
        assert error.value.code == code, (creation, error.value.message)
        assert field in error.value.message, (creation, error.value.message)
    for method, params, code, field in (
        ("token_delete", [12], -32602, "target_token"),
        ("token_delete", [""], 108, "target_token"),
        ("token_edit", ["x", [], "soon"], -32602, "timestamp_from"),
        ("token_change_password", ["root", 123456], -32602, "new_password"),
    ):
        with pytest.raises(RpcError) as error:
            await server.su(method, *params)
        assert error.value.code == code, (method, error.value.message)
        assert field in error.value.message, (method, error.value.message)
    with pytest.raises(RpcError) as error:
        await server.call("token_get", None, server.super_token)
    assert error.value.code == -32602 and "token" in error.value.message
    assert len((await server.su("token_list_all_tokens"))["tokens"]) == 1


async def test_board_passwords_and_usernames_with_separators_are_accepted(server: Server) -> None:
    """':' and '|' in usernames and passwords are stored as NodeGet stores them; the key logs in."""
    token = await created(server, [], username="a|b:c", password="p:a|ss")
    info = await server.call("token_get", "a|b:c", server.super_token)
    assert info["token_key"] == token.split(":")[0] and info["username"] == "a|b:c"
    assert (await server.call("token_get", token))["username"] == "a|b:c"


@st.composite
def _limits(draw: st.DrawFn) -> list[dict[str, Any]]:
    scope = st.sampled_from(["global", {"global": None}, {"agent_uuid": A}, {"agent_uuid": B}])
    pattern = st.sampled_from(["*", "tcp*", "tcp_ping", "ping", "p*", "http*", "http_ping"])
    permission = st.one_of(
        st.just({"task": "listen"}),
        st.builds(
            lambda a, p: {"task": {a: p}},
            st.sampled_from(["create", "read", "write", "delete"]),
            pattern,
        ),
        st.builds(lambda a: {"crontab": a}, st.sampled_from(["read", "write", "delete"])),
        st.builds(
            lambda a, p: {"crontab_result": {a: p}}, st.sampled_from(["read", "delete"]), pattern
        ),
        st.just({"terminal": "connect"}),
        st.builds(lambda a: {"agent": a}, st.sampled_from(["list", "enroll"])),
        st.builds(lambda a: {"token": a}, st.sampled_from(["read", "write", "delete"])),
    )
    limit = st.fixed_dictionaries(
        {
            "scopes": st.lists(scope, max_size=3),
            "permissions": st.lists(permission, max_size=4),
        }
    )
    drawn: list[dict[str, Any]] = draw(st.lists(limit, max_size=3))
    return drawn


_NEEDS = [
    Need("task", "listen"),
    *(
        Need("task", action, kind)
        for action in ("create", "read", "write", "delete")
        for kind in (*TASK_TYPES, "pingx", "tcp_future")
    ),
    *(Need("crontab", action) for action in ("read", "write", "delete")),
    *(
        Need("crontab_result", a, n)
        for a in ("read", "delete")
        for n in ("ping", "tcpx", "nightly")
    ),
    Need("terminal", "connect"),
    Need("agent", "list"),
    Need("agent", "enroll"),
    *(Need("token", action) for action in ("read", "write", "delete")),
]


@settings(max_examples=300, deadline=None)
@given(holder=_limits(), granted=_limits())
def test_covered_limits_never_allow_more_than_their_holder(
    holder: list[dict[str, Any]], granted: list[dict[str, Any]]
) -> None:
    """Whenever the guard lets limits through, every check they pass the holder passes too."""
    mine = Principal("holder", False, tuple(parse_limits(holder)))
    theirs = Principal("new", False, tuple(parse_limits(granted)))
    if uncovered(mine, theirs.limits) is not None:
        return
    for need in _NEEDS:
        for agent in (A, B, "0b0b0b0b-cccc-4ccc-8ccc-000000000003", None):
            if allows(theirs, need, agent):
                assert allows(mine, need, agent), (need, agent)


def test_the_guard_accepts_what_the_holder_already_has() -> None:
    """A token's own limits, and any one of its (scope, permission) pairs, pass the guard."""
    own = parse_limits(
        [
            {"scopes": [{"agent_uuid": A}, "global"], "permissions": [{"task": {"read": "tcp*"}}]},
            {"scopes": [{"agent_uuid": B}], "permissions": [{"task": "listen"}, {"agent": "list"}]},
        ]
    )
    holder = Principal("holder", False, tuple(own))
    assert uncovered(holder, own) is None
    single = parse_limits([{"scopes": [{"agent_uuid": B}], "permissions": [{"agent": "list"}]}])
    assert uncovered(holder, single) is None
    more = parse_limits([{"scopes": [{"agent_uuid": A}], "permissions": [{"agent": "list"}]}])
    assert uncovered(holder, more) == f"agent.list on agent {A}"


def test_the_guard_matches_kv_namespace_scopes_by_name() -> None:
    """A KV namespace scope covers only itself; a global scope covers every namespace."""

    def kv(scope: Any, pattern: str) -> list[dict[str, Any]]:
        return [{"scopes": [scope], "permissions": [{"kv": {"read": pattern}}]}]

    holder = Principal("holder", False, tuple(parse_limits(kv({"kv_namespace": "ns1"}, "m*"))))
    assert uncovered(holder, parse_limits(kv({"kv_namespace": "ns1"}, "meta"))) is None
    assert uncovered(holder, parse_limits(kv({"kv_namespace": "ns2"}, "meta"))) == (
        "kv.read(meta) on kv_namespace ns2"
    )
    assert uncovered(holder, parse_limits(kv("global", "meta"))) == "kv.read(meta) on global scope"
    assert uncovered(holder, parse_limits(kv({"kv_namespace": "ns1"}, "*"))) is not None
    everywhere = Principal("g", False, tuple(parse_limits(kv("global", "*"))))
    assert uncovered(everywhere, parse_limits(kv({"kv_namespace": "ns2"}, "x"))) is None


# --------------------------------------------------------------------------- presets


def test_role_presets_produce_the_documented_limits() -> None:
    """Every preset in the README equals what role_limits produces for it."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"<!-- role: (\w+)(?: ([^>]*))? -->\s*```json\n(.*?)```", text, re.S)
    assert {name for name, _, _ in blocks} == {"agent", "caller", "readonly", "enroll"}
    for name, arguments, block in blocks:
        options = dict(part.split("=", 1) for part in arguments.split())
        limits = role_limits(
            name,
            agents=[u for u in options.get("agents", "").split(",") if u],
            types=options.get("types", "*").split(","),
        )
        assert json.loads(block) == limits, name


def test_role_presets_refuse_what_does_not_fit() -> None:
    """Presets check their arguments: agent takes one UUID, caller some, types must match."""
    from taskd.errors import InvalidInput

    for role, agents, types in (
        ("agent", [], ["*"]),
        ("agent", [A, B], ["*"]),
        ("agent", ["not-a-uuid"], ["*"]),
        ("caller", [], ["*"]),
        ("caller", [A], ["pnig"]),
        ("caller", [A], []),
        ("readonly", [A], ["*"]),
        ("root", [], ["*"]),
    ):
        with pytest.raises(InvalidInput):
            role_limits(role, agents=agents, types=types)
    assert describe_limits(role_limits("agent", agents=[A])) == f"agent {A}"
    assert describe_limits(role_limits("caller", agents=[A, B], types=["ping", "tcp*"])) == (
        "caller 2 agents (ping,tcp*)"
    )
    assert describe_limits(agent_token_limits(A) * 2) == "custom"
    assert describe_limits([], is_super=True) == "super"


# --------------------------------------------------------------------------- CLI


async def taskd(server: Server, *args: str, stdin: str | None = None) -> tuple[int, str, str]:
    """Run the taskd command against ``server`` (URL and super token from the environment)."""
    env = {**os.environ, "TASKD_URL": server.url, "TASKD_TOKEN": server.super_token}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "taskd",
        *args,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(
        process.communicate(stdin.encode() if stdin else None), scaled(60)
    )
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_token_cli_creates_lists_rolls_and_deletes(server: Server) -> None:
    """`taskd token create/list/roll/delete` drive the token methods, as tables and as JSON."""
    code, out, err = await taskd(
        server, "token", "create", "--role", "caller", "--agents", f"{A},{B}", "--types",
        "ping,tcp*", "--description", "ci", "--json",
    )  # fmt: skip
    assert code == 0, err
    caller = json.loads(out)
    stored = await stored_token(server, caller["key"])
    assert stored.limits == role_limits("caller", agents=[A, B], types=["ping", "tcp*"])
    assert stored.description == "ci"
    code, out, err = await taskd(server, "token", "create", "--role", "agent", "--agent", A)
    assert code == 0, err
    assert caller["secret"] not in out
    agent_token = re.search(r"\b(\w{16}:\w{32})\b", out)
    assert agent_token is not None, out
    agent_key = agent_token.group(1).split(":")[0]
    code, out, err = await taskd(
        server, "token", "create", "--limits", json.dumps(role_limits("readonly")),
        "--valid-from", "1000", "--valid-to", str(now_ms() + 60_000), "--max-uses", "3", "--json",
    )  # fmt: skip
    assert code == 0, err
    readonly = await stored_token(server, json.loads(out)["key"])
    assert readonly.timestamp_from == 1000 and readonly.max_uses == 3
    code, out, err = await taskd(
        server, "token", "create", "--role", "readonly", "--username", "ops",
        "--password-stdin", stdin="correct horse\n",
    )  # fmt: skip
    assert code == 0, err
    assert await server.call("agent_list", "ops|correct horse") == []

    code, out, err = await taskd(server, "token", "list")
    assert code == 0, err
    assert "KEY" in out and "super" in out and f"agent {A}" in out and "readonly" in out
    assert "caller 2 agents (ping,tcp*)" in out and caller["secret"] not in out
    code, out, _ = await taskd(server, "token", "list", "--json")
    assert {t["token_key"] for t in json.loads(out)} >= {caller["key"], agent_key}

    code, out, err = await taskd(server, "token", "roll", caller["key"], "--json")
    assert code == 0, err
    rolled = json.loads(out)
    await denied(server, "agent_list", caller["token"])
    assert await server.call("agent_list", rolled["token"]) == []
    code, out, err = await taskd(server, "token", "delete", caller["key"])
    assert code == 0 and caller["key"] in out, err
    await denied(server, "agent_list", rolled["token"])
    code, out, err = await taskd(server, "token", "roll", "ops")  # a username names it too
    assert code == 0 and re.search(r"\b\w{16}:\w{32}\b", out), err
    code, out, err = await taskd(server, "token", "delete", "ops", "--json")
    assert code == 0 and json.loads(out)["matched_by"] == "username", err

    for args, message in (
        (["--role", "agent"], "exactly one agent"),
        (["--role", "caller", "--agents", A, "--types", "pnig"], "match no task type"),
        (["--role", "readonly", "--limits", "[]"], "either --role or --limits"),
        (["--limits", "{nope"], "not valid JSON"),
        ([], "either --role or --limits"),
    ):
        code, _, err = await taskd(server, "token", "create", *args)
        assert code == 2 and message in err, (args, err)
    code, _, err = await taskd(server, "token", "delete", "NoSuchKey")
    assert code == 1 and "105" in err
