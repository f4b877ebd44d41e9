"""``taskd agents`` as people and scripts run it: real subprocesses against a real server
whose agents reported their hosts (a real ``taskd agent``, and the agent's own Monitor)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from taskd.agent.monitor import Monitor
from taskd.config import parse_agent_config
from taskd.roles import role_limits
from tests.agent.test_client import running_agent
from tests.helpers import ScriptedAgent, Server, add_token, agent_token_limits, scaled, wait_for

A = "a1a1a1a1-0000-4000-8000-00000000000a"
B = "b2b2b2b2-0000-4000-8000-00000000000b"
HOSTILE = "evil\x1b[2J\x1b]0;owned\x07\rhost\x9b31m\u202e"
"""A hostname that would clear the screen, retitle the terminal and recolour it."""


async def taskd(server: Server, *args: str, token: str | None = None) -> tuple[int, str, str]:
    """Run ``python -m taskd ARGS`` against ``server`` (the super token unless ``token``)."""
    env = {**os.environ, "TASKD_URL": server.url, "TASKD_TOKEN": token or server.super_token}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "taskd",
        *args,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), scaled(60))
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def static_report(agent_uuid: str, now_ms: int, hostname: str) -> dict[str, Any]:
    """This host's static report as the agent's Monitor makes it, under another hostname."""
    static = Monitor(agent_uuid, clock=lambda: now_ms / 1000).static()
    static["system"]["system_host_name"] = hostname
    return static


def summary(agent_uuid: str, time_ms: int, available_space: int) -> dict[str, Any]:
    """A NodeGet-format summary of a 100 GiB disk with ``available_space`` bytes free."""
    return {
        "uuid": agent_uuid,
        "time": time_ms,
        "cpu_usage": 375,
        "used_memory": 2 << 30,
        "total_memory": 8 << 30,
        "total_space": 100 << 30,
        "available_space": available_space,
        "receive_speed": 4096,
        "transmit_speed": 512,
        "load_one": 7,
        "uptime": 7200,
    }


async def reported(server: Server, agent_uuid: str, hostname: str, free: int) -> str:
    """An agent token for ``agent_uuid`` whose static report and two summaries are stored."""
    token = await add_token(server, agent_token_limits(agent_uuid))
    now = server.clock.now_ms()
    reports = [
        ("agent_report_static", static_report(agent_uuid, now - 3000, hostname)),
        ("agent_report_dynamic_summary", summary(agent_uuid, now - 2000, free)),
        ("agent_report_dynamic_summary", summary(agent_uuid, now - 1000, free)),
    ]
    for method, data in reports:
        assert await server.call(method, token, data) == {"status": "stored"}
    return token


def row_of(out: str, agent_uuid: str) -> str:
    """The table line of an agent (its short UUID starts it)."""
    [line] = [line for line in out.splitlines() if line.startswith(agent_uuid[:8])]
    return line


async def test_the_table_shows_the_fleet_and_marks_offline_agents_and_full_disks(
    server: Server,
) -> None:
    """`taskd agents` lists each agent's host, state, CPU, memory and disk; an offline agent
    and a disk over 90% full are marked; --json is agent_list; the filters keep their agents."""
    token_a = await reported(server, A, "web-1", 5 << 30)  # 95% full
    await reported(server, B, "db-1", 60 << 30)
    async with ScriptedAgent(server.ws_url, token_a, A):
        code, out, err = await taskd(server, "agents")
        assert code == 0, err
        online_a = row_of(out, A)
        assert "web-1" in online_a and " yes " in online_a
        assert "37.5" in online_a and "2.0G/8.0G 25%" in online_a
        assert "95G/100G 95% !" in online_a
        offline_b = row_of(out, B)
        assert "db-1" in offline_b and "OFFLINE" in offline_b and "40G/100G 40%" in offline_b
        assert "!" not in offline_b
        assert out.splitlines()[0].split() == [
            *("UUID", "HOSTNAME", "ONLINE", "OS", "CPU%", "MEM", "DISK", "LAST", "SEEN"),
        ]
        assert "2 agent(s), 1 online, 1 offline; 1 with disks over 90% full (!)" in out

        code, out, err = await taskd(server, "agents", "--json")
        assert code == 0, err
        listed = json.loads(out)
        assert [agent["uuid"] for agent in listed] == [A, B]
        assert listed[0]["host"]["hostname"] == "web-1" and listed[0]["online"] is True
        assert listed[1]["metrics"]["available_space"] == 60 << 30

        for flags, expected in (
            (["--online"], [A]),
            (["--offline"], [B]),
            (["--search", "DB-"], [B]),
            (["--search", A[:4]], [A]),
            (["--search", "nothing-like-this"], []),
        ):
            code, out, err = await taskd(server, "agents", *flags, "--json")
            assert code == 0, err
            assert [agent["uuid"] for agent in json.loads(out)] == expected, flags
        code, _, err = await taskd(server, "agents", "--online", "--offline")
        assert code == 2 and "not both" in err


async def test_show_prints_one_agent_and_its_recent_metrics(server: Server) -> None:
    """`taskd agents show` (full UUID or a unique start) prints the host facts, state and
    recent summaries; --json (before or after `show`) carries the same; an unknown UUID is
    a clear error, exit 1."""
    await reported(server, A, "web-1", 5 << 30)
    code, out, err = await taskd(server, "agents", "show", A[:6])
    assert code == 0, err
    lines = dict(line.split(None, 1) for line in out.splitlines() if line and "  " in line)
    assert lines["uuid"].strip() == A
    assert lines["hostname"].strip() == "web-1"
    assert lines["online"].strip() == "OFFLINE"
    assert "2.0G/8.0G 25%" in out and "95G/100G 95% !" in out
    [cpu] = [line for line in out.splitlines() if line.startswith("CPU %")]
    assert cpu.split()[2:] == ["37.5/37.5/37.5"] * 2  # min/avg/max over 10 min and 1 h
    recent = [line.split()[2:4] for line in out.splitlines() if line.startswith("20")]
    assert recent == [["37.5", "2.0G"]] * 2  # the two newest summaries

    code, out, err = await taskd(server, "agents", "--json", "show", A)  # options before show
    assert code == 0, err
    shown = json.loads(out)
    assert shown["agent"]["uuid"] == A and shown["agent"]["host"]["hostname"] == "web-1"
    assert [row["cpu_usage"] for row in shown["recent"]["rows"]] == [37.5, 37.5]
    assert shown["recent"]["windows"]["1 h"]["cpu_usage"] == {"min": 37.5, "avg": 37.5, "max": 37.5}

    unknown = str(uuid.uuid4())
    code, out, err = await taskd(server, "agents", "show", unknown)
    assert (code, out) == (1, "")
    assert err.strip() == f"taskd agents: no agent {unknown} (or the token may not list it)"
    code, _, err = await taskd(server, "agents", "show")
    assert code == 2 and "show needs the agent's UUID" in err


async def test_a_token_that_may_not_read_metrics_sees_the_agent_without_them(
    server: Server,
) -> None:
    """A token with agent list but no monitoring read gets the row, no host or figures, and
    `show` says the summaries are not readable instead of failing."""
    await reported(server, A, "web-1", 5 << 30)
    lister = await add_token(server, [{"scopes": ["global"], "permissions": [{"agent": "list"}]}])
    code, out, err = await taskd(server, "agents", token=lister)
    assert code == 0, err
    assert row_of(out, A).split()[1:7] == ["-", "OFFLINE", "-", "-", "-", "-"]
    assert "web-1" not in out
    code, out, err = await taskd(server, "agents", "show", A, token=lister)
    assert code == 0, err
    assert "recent metrics: this token may not read the agent's summaries" in out
    assert "web-1" not in out


async def test_agent_strings_cannot_drive_the_terminal(server: Server) -> None:
    """A hostname with escape sequences and control characters is printed escaped, in the
    table and in `show`, and comes back unchanged from --json."""
    await reported(server, A, HOSTILE, 60 << 30)
    for args in (("agents",), ("agents", "show", A)):
        code, out, err = await taskd(server, *args)
        assert code == 0, err
        assert not any(char in out for char in "\x1b\x07\r\x9b\u202e"), args
        assert "evil\\x1b[2J" in out, args
    code, out, err = await taskd(server, "agents", "--json")
    assert code == 0 and "\x1b" not in out
    assert json.loads(out)[0]["host"]["hostname"] == HOSTILE


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_running_agent_shows_in_the_table(server: Server, tmp_path: Path) -> None:
    """A real taskd agent reporting to the server appears online with this machine's name."""
    agent_uuid = str(uuid.uuid4())
    token = await add_token(server, role_limits("agent", agents=[agent_uuid]))
    settings = parse_agent_config(
        f'agent_uuid = "{agent_uuid}"\n'
        "dynamic_summary_report_interval_ms = 100\n"
        f'[[server]]\nname = "s"\nws_url = "{server.ws_url}"\ntoken = "{token}"\n'
    )

    async def metrics_in() -> Any:
        listed = await server.su("agent_list")
        return listed and all(a["host"] and a["metrics"] for a in listed)

    async with running_agent(settings, tmp_path / "state"):
        await wait_for(metrics_in, timeout=15)
        code, out, err = await taskd(server, "agents")
        assert code == 0, err
        line = row_of(out, agent_uuid)
        assert socket.gethostname()[:32] in line and " yes " in line
