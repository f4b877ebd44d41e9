"""Agent enrollment: agent_enroll over JSON-RPC and `taskd agent enroll` with a real agent."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from taskd.config import load_agent_settings
from taskd.roles import role_limits
from tests.helpers import (
    RpcError,
    ScriptedAgent,
    Server,
    add_token,
    agent_token_limits,
    scaled,
)


def now_ms() -> int:
    """The wall clock in milliseconds."""
    return time.time_ns() // 1_000_000


async def enroll_token(server: Server, **fields: Any) -> str:
    """A token with the enroll role (and ``fields`` such as max_uses) created over JSON-RPC."""
    created = await server.call(
        "token_create",
        father_token=server.super_token,
        token_creation={"token_limit": role_limits("enroll"), **fields},
    )
    return f"{created['key']}:{created['secret']}"


async def token_row(server: Server, token: str) -> Any:
    """The stored row of a KEY:SECRET token."""
    return await server.service.store.token_by_key(token.split(":")[0])


async def refused(server: Server, code: int, *params: Any, **named: Any) -> str:
    """Call agent_enroll and require error ``code``; return its message."""
    with pytest.raises(RpcError) as error:
        await server.call("agent_enroll", *params, **named)
    assert error.value.code == code, error.value.message
    return str(error.value.message)


async def test_enrollment_hands_out_exactly_the_agent_role(server: Server) -> None:
    """agent_enroll draws a UUID and a token that may listen and upload as that agent only."""
    enroller = await enroll_token(server, max_uses=5)
    enrolled = await server.call("agent_enroll", enroller)
    assert set(enrolled) == {"uuid", "token"}
    agent_uuid = enrolled["uuid"]
    assert str(uuid.UUID(agent_uuid)) == agent_uuid
    row = await token_row(server, enrolled["token"])
    assert row.limits == role_limits("agent", agents=[agent_uuid])
    assert row.secret_hash != enrolled["token"].split(":")[1]
    assert (await token_row(server, enroller)).uses == 1
    [listed] = await server.su("agent_list")
    assert listed["uuid"] == agent_uuid and listed["online"] is False
    async with ScriptedAgent(server.ws_url, enrolled["token"], agent_uuid) as agent:
        created = await server.su("task_create_task", agent_uuid, "version")
        assert (await agent.next_task())["task_id"] == created["id"]
        with pytest.raises(RpcError) as error:
            await agent.call("task_register_task", enrolled["token"], str(uuid.uuid4()))
        assert error.value.code == 102
        with pytest.raises(RpcError) as error:
            await server.call("task_create_task", enrolled["token"], agent_uuid, "version")
        assert error.value.code == 102


async def test_max_uses_is_counted_atomically(server: Server) -> None:
    """Ten concurrent enrollments with max_uses 3: exactly three succeed, the rest are 102."""
    enroller = await enroll_token(server, max_uses=3)
    replies = await asyncio.gather(*(server.request("agent_enroll", [enroller]) for _ in range(10)))
    successes = [r["result"] for r in replies if "result" in r]
    assert len(successes) == 3
    assert all(r["error"]["code"] == 102 for r in replies if "error" in r)
    assert len({s["uuid"] for s in successes}) == 3
    assert (await token_row(server, enroller)).uses == 3
    message = await refused(server, 102, enroller)
    assert "no uses left" in message
    tokens = (await server.su("token_list_all_tokens"))["tokens"]
    assert sum(t["description"].startswith("agent ") for t in tokens if t["description"]) == 3


async def test_a_proposed_uuid_is_accepted_only_when_free(server: Server) -> None:
    """A free proposed UUID is used; one held by an agent row or another token's scope is 108."""
    enroller = await enroll_token(server)
    free = str(uuid.uuid4())
    assert (await server.call("agent_enroll", enroller, free))["uuid"] == free
    assert "already taken" in await refused(server, 108, enroller, free)
    claimed = str(uuid.uuid4())
    await add_token(server, agent_token_limits(claimed))
    await refused(server, 108, enroller, claimed)
    connected = str(uuid.uuid4())
    async with ScriptedAgent(server.ws_url, server.super_token, connected):
        await refused(server, 108, enroller, connected)
    shouted = str(uuid.uuid4())
    assert (await server.call("agent_enroll", enroller, shouted.upper()))["uuid"] == shouted
    assert (await token_row(server, enroller)).uses == 2  # refusals used up nothing
    await refused(server, -32602, enroller, "not-a-uuid")


async def test_a_uuid_with_work_waiting_is_taken(server: Server) -> None:
    """A UUID that queued tasks or a cron target is 108; once the work is gone it is free."""
    enroller = await enroll_token(server)
    queued, targeted = str(uuid.uuid4()), str(uuid.uuid4())
    await server.su("task_create_task", queued, "version", 3_600_000)
    cron_type = {"agent": [[str(uuid.uuid4()), targeted], {"task": "ip"}]}
    await server.su("crontab_create", "nightly", "0 0 0 1 1 * 2099", cron_type)
    assert "already taken" in await refused(server, 108, enroller, queued)
    assert "already taken" in await refused(server, 108, enroller, targeted.upper())
    assert (await token_row(server, enroller)).uses == 0
    await server.su("task_delete_task", [{"uuid": queued}])
    await server.su("crontab_delete", "nightly")
    assert (await server.call("agent_enroll", enroller, queued))["uuid"] == queued
    assert (await server.call("agent_enroll", enroller, targeted))["uuid"] == targeted


async def test_enrollment_tokens_honour_window_and_permission(server: Server) -> None:
    """Expired, not-yet-valid and non-enroll tokens are 102; a scoped one enrolls only its UUID."""
    expired = await enroll_token(server, timestamp_to=now_ms() - 1000)
    early = await enroll_token(server, timestamp_from=now_ms() + 3_600_000)
    caller = await add_token(server, role_limits("caller", agents=[str(uuid.uuid4())]))
    assert "expired" in await refused(server, 102, expired)
    assert "not valid yet" in await refused(server, 102, early)
    await refused(server, 102, caller)
    await refused(server, 102, caller, str(uuid.uuid4()))
    mine = str(uuid.uuid4())
    scoped = await add_token(
        server, [{"scopes": [{"agent_uuid": mine}], "permissions": [{"agent": "enroll"}]}]
    )
    await refused(server, 102, scoped)
    await refused(server, 102, scoped, str(uuid.uuid4()))
    assert (await server.call("agent_enroll", token=scoped, uuid=mine))["uuid"] == mine
    assert len(await server.su("agent_list")) == 1


async def taskd(*args: str) -> tuple[int, str, str]:
    """Run the taskd command; its exit status, stdout and stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "taskd",
        *args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), scaled(60))
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_cli_enrollment_writes_a_config_the_agent_runs_with(
    server: Server, tmp_path: Path
) -> None:
    """`taskd agent enroll` writes a 0600 config; `taskd agent --config` then answers tasks."""
    enroller = await enroll_token(server, max_uses=2)
    config = tmp_path / "etc" / "agent.toml"
    old_umask = os.umask(0)
    try:
        code, out, err = await taskd(
            "agent", "enroll", "--server", server.url, "--enroll-token", enroller,
            "--config", str(config), "--allow", "version,ip",
        )  # fmt: skip
    finally:
        os.umask(old_umask)
    assert code == 0, err
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    settings = load_agent_settings(config)
    [link] = settings.servers
    assert link.ws_url == server.ws_url and link.server_uuid == server.settings.server_uuid
    assert link.allow_task_type == ("version", "ip")
    assert settings.agent_uuid in out and str(config) in out and link.token not in out
    row = await token_row(server, link.token)
    assert row.limits == role_limits("agent", agents=[settings.agent_uuid])

    before = config.read_bytes()
    code, _, err = await taskd(
        "agent", "enroll", "--server", server.url, "--enroll-token", enroller,
        "--config", str(config),
    )  # fmt: skip
    assert code == 2 and "--force" in err
    assert config.read_bytes() == before
    assert (await token_row(server, enroller)).uses == 1

    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "taskd", "agent", "--config", str(config),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + scaled(30)
        while not any(a["online"] for a in await server.su("agent_list")):
            assert time.monotonic() < deadline, "the enrolled agent never came online"
            await asyncio.sleep(0.1)
        reply = await server.su("task_create_task_blocking", settings.agent_uuid, "version", 20000)
        assert reply["success"] is True and "version" in reply["task_event_result"]
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), scaled(20))

    code, out, err = await taskd(
        "agent", "enroll", "--server", server.ws_url, "--enroll-token", enroller,
        "--config", str(config), "--force",
    )  # fmt: skip
    assert code == 0, err
    assert load_agent_settings(config).agent_uuid != settings.agent_uuid
    code, _, err = await taskd(
        "agent", "enroll", "--server", server.url, "--enroll-token", enroller,
        "--config", str(tmp_path / "third.toml"),
    )  # fmt: skip
    assert code == 1 and "102" in err and not (tmp_path / "third.toml").exists()
