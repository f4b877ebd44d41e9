"""The version task kind."""

from __future__ import annotations

import json
import os
import platform
import socket

import pytest

import taskd
from taskd.agent.tasks import TaskContext, runner_for
from taskd.agent.tasks import version as version_task
from taskd.config import parse_agent_config
from taskd.protocol import Version, VersionResult, parse_task_event_result, parse_task_event_type

AGENT_UUID = "5f0e3c2a-9b1d-4e7f-a6c8-d2b4e1f3a5c7"


@pytest.fixture
def ctx() -> TaskContext:
    """A context from a real agent config document with a fixed agent UUID."""
    settings = parse_agent_config(
        f'agent_uuid = "{AGENT_UUID}"\n'
        '[[server]]\nws_url = "ws://127.0.0.1:9/ws"\ntoken = "secret"\n'
    )
    return TaskContext(settings=settings, server=settings.servers[0], task_id=1, task_token="t")


def version_task_event() -> Version:
    """The parsed unit task "version"."""
    task = parse_task_event_type("version")
    assert isinstance(task, Version)
    return task


async def test_fields_describe_this_agent(ctx: TaskContext) -> None:
    """Every field equals what this process and host report about themselves."""
    result = await version_task.run(version_task_event(), ctx)
    version = result.version
    uname = platform.uname()
    assert version["taskd"] == taskd.__version__
    assert version["python"] == platform.python_version()
    assert version["implementation"] == platform.python_implementation()
    assert version["platform"] == platform.platform()
    assert version["system"] == uname.system
    assert version["release"] == uname.release
    assert version["machine"] == uname.machine
    assert version["hostname"] == socket.gethostname()
    assert version["pid"] == os.getpid()
    assert version["agent_uuid"] == AGENT_UUID


async def test_os_name_comes_from_os_release(ctx: TaskContext) -> None:
    """On a freedesktop system the os field is the PRETTY_NAME of os-release."""
    try:
        pretty = platform.freedesktop_os_release()["PRETTY_NAME"]
    except OSError:
        pytest.skip("no os-release file on this system")
    result = await version_task.run(version_task_event(), ctx)
    assert result.version["os"] == pretty


async def test_result_round_trips_through_the_wire(ctx: TaskContext) -> None:
    """The result is plain JSON and parses back as the same version result."""
    runner, timeout = runner_for("version", ctx.settings)
    assert timeout == version_task.TIMEOUT_S
    result = await runner(version_task_event(), ctx)
    wire = json.loads(json.dumps(result.to_wire()))
    parsed = parse_task_event_result(wire)
    assert isinstance(parsed, VersionResult)
    assert parsed == result
