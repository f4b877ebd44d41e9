"""`taskd agent` as a real process against a real server: the quick form and a config file."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tomllib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from taskd.protocol import canonical_uuid
from tests.agent.test_client import wait_online
from tests.helpers import Server, scaled

START_S = 30
"""How long a fresh Python process may take to import taskd and subscribe."""


NOHUP_IN_BACKGROUND = (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT)
"""What ``nohup taskd agent ... &`` in a script starts the agent with ignored."""


@contextlib.asynccontextmanager
async def agent_process(
    tmp_path: Path, *args: str, ignoring: tuple[signal.Signals, ...] = ()
) -> AsyncIterator[asyncio.subprocess.Process]:
    """Run ``taskd agent ARGS`` in ``tmp_path`` (its output in agent.log) until the block ends.

    Of the signals in NOHUP_IN_BACKGROUND, the agent starts with ``ignoring``
    ignored and the others at their defaults, whatever this test inherited.
    """
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "xdg")}
    env.pop("TASKD_AGENT_CONFIG", None)

    def dispositions() -> None:
        for signum in NOHUP_IN_BACKGROUND:
            signal.signal(signum, signal.SIG_IGN if signum in ignoring else signal.SIG_DFL)

    with (tmp_path / "agent.log").open("ab") as log:
        process = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "taskd", "agent", *args),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tmp_path,
            preexec_fn=dispositions,
        )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def stop(process: asyncio.subprocess.Process) -> int:
    """Send SIGTERM and return the exit status."""
    process.send_signal(signal.SIGTERM)
    return await asyncio.wait_for(process.wait(), scaled(15))


def proc_status(pid: int) -> str:
    """The text of /proc/PID/status."""
    return Path(f"/proc/{pid}/status").read_text()


def status_signals(status: str, field: str) -> set[int]:
    """The signal numbers in one mask (``SigIgn``, ``SigBlk`` ...) of /proc/PID/status text."""
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key == field:
            mask = int(value, 16)
            return {bit + 1 for bit in range(64) if mask >> bit & 1}
    raise AssertionError(f"no {field} in {status!r}")


@contextlib.asynccontextmanager
async def nohup_agent(server: Server, tmp_path: Path, allow: str) -> AsyncIterator[str]:
    """A `taskd agent` started as ``nohup taskd agent ... &`` in a script would be; its UUID."""
    agent_uuid = str(uuid.uuid4())
    async with agent_process(
        tmp_path,
        *("--server", server.ws_url, "--token", server.super_token, "--uuid", agent_uuid),
        *("--allow", allow, "--state-dir", str(tmp_path / "state")),
        ignoring=NOHUP_IN_BACKGROUND,
    ) as process:
        await wait_online(server, agent_uuid, timeout=START_S)
        # the agent catches SIGINT to stop, and catches the other two only to drop them: it
        # still shrugs them off as nohup intended, but its children exec with the defaults
        caught = status_signals(proc_status(process.pid), "SigCgt")
        assert {signal.SIGHUP, signal.SIGQUIT} <= caught
        process.send_signal(signal.SIGHUP)
        process.send_signal(signal.SIGQUIT)
        yield agent_uuid
        assert process.returncode is None, "a hangup stopped an agent started under nohup"
        assert await stop(process) == 0


def _exists(path: Path) -> bool:
    return path.exists()


async def wait_for_file(path: Path, process: asyncio.subprocess.Process) -> None:
    """Wait until ``path`` exists, failing early if the process died."""
    for _ in range(int(scaled(START_S) / 0.05)):
        if _exists(path):
            return
        assert process.returncode is None, f"taskd agent exited with {process.returncode}"
        await asyncio.sleep(0.05)
    raise AssertionError(f"{path} was not written")


async def test_quick_form_runs_the_allowed_kinds_only(server: Server, tmp_path: Path) -> None:
    """--server, --token, --uuid and --allow start an agent that runs exactly the listed kinds."""
    agent_uuid = str(uuid.uuid4())
    async with agent_process(
        tmp_path,
        *("--server", server.ws_url, "--token", server.super_token, "--uuid", agent_uuid),
        *("--allow", "version,execute", "--state-dir", str(tmp_path / "state")),
    ) as process:
        await wait_online(server, agent_uuid, timeout=START_S)
        version = await server.su("task_create_task_blocking", agent_uuid, "version", 10_000)
        echo = {"execute": {"cmd": "echo", "args": ["from the cli"]}}
        executed = await server.su("task_create_task_blocking", agent_uuid, echo, 10_000)
        ping = {"tcp_ping": f"127.0.0.1:{server.port}"}
        refused = await server.su("task_create_task_blocking", agent_uuid, ping, 10_000)
        assert await stop(process) == 0
    assert version["success"] is True and "taskd" in version["task_event_result"]["version"]
    assert executed["task_event_result"] == {"execute": "from the cli\n"}
    assert refused["success"] is False
    assert refused["error_message"] == (
        "permission denied: task type tcp_ping is not allowed on this agent"
    )
    log = (tmp_path / "agent.log").read_text()
    assert f"agent {agent_uuid} starting (1 server(s))" in log
    assert server.super_token not in log


async def test_quick_form_generates_a_uuid_and_keeps_it(server: Server, tmp_path: Path) -> None:
    """Without --uuid the agent makes one up, stores it in its state directory and reuses it."""
    state = tmp_path / "state"
    args = ("--server", server.url, "--token", server.super_token, "--state-dir", str(state))
    uuid_file = state / "taskd-agent" / "agent_uuid"
    async with agent_process(tmp_path, *args) as process:
        await wait_for_file(uuid_file, process)
        agent_uuid = canonical_uuid(uuid_file.read_text().strip())
        await wait_online(server, agent_uuid, timeout=START_S)
        assert await stop(process) == 0
    async with agent_process(tmp_path, *args) as process:
        await wait_online(server, agent_uuid, timeout=START_S)
        result = await server.su("task_create_task_blocking", agent_uuid, "version", 10_000)
        assert await stop(process) == 0
    assert result["success"] is True
    assert uuid_file.read_text().strip() == agent_uuid


async def test_auto_gen_uuid_is_written_back_into_the_config(
    server: Server, tmp_path: Path
) -> None:
    """Started with --config, an agent_uuid of "auto_gen" is replaced in the file on first start."""
    path = tmp_path / "agent.toml"
    path.write_text(
        "# managed by hand\n"
        'agent_uuid = "auto_gen"  # filled in on first start\n'
        f'[[server]]\nname = "main"\nws_url = "{server.ws_url}"\n'
        f'token = "{server.super_token}"\n'
    )
    async with agent_process(tmp_path, "--config", str(path)) as process:
        for _ in range(int(scaled(START_S) / 0.05)):
            if "auto_gen" not in path.read_text():
                break
            assert process.returncode is None, f"taskd agent exited with {process.returncode}"
            await asyncio.sleep(0.05)
        agent_uuid = tomllib.loads(path.read_text())["agent_uuid"]
        assert agent_uuid == canonical_uuid(agent_uuid)
        await wait_online(server, agent_uuid, timeout=START_S)
        result = await server.su("task_create_task_blocking", agent_uuid, "version", 10_000)
        assert await stop(process) == 0
    assert result["success"] is True
    text = path.read_text()
    assert "# managed by hand" in text and "# filled in on first start" in text
    assert tomllib.loads(text)["server"][0]["token"] == server.super_token
    assert (tmp_path / "agent.state" / "spool").is_dir(), "the spool lives next to the config"


async def test_an_agent_survives_a_server_that_resets_its_connections(tmp_path: Path) -> None:
    """An agent whose connections are reset mid-handshake keeps SIGPIPE ignored and retries."""
    resets = 0

    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal resets
        resets += 1
        writer.transport.abort()

    listener = await asyncio.start_server(reset, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    async with (
        listener,
        agent_process(
            tmp_path,
            *("--server", f"ws://127.0.0.1:{port}/", "--token", "KEY:SECRET"),
            *("--uuid", str(uuid.uuid4()), "--state-dir", str(tmp_path / "state")),
        ) as process,
    ):
        for _ in range(int(scaled(START_S) / 0.1)):
            if resets >= 2 or process.returncode is not None:
                break
            await asyncio.sleep(0.1)
        assert process.returncode is None, (tmp_path / "agent.log").read_text()
        assert resets >= 2, "the agent did not come back after a reset"
        assert signal.SIGPIPE in status_signals(proc_status(process.pid), "SigIgn")
        assert await stop(process) == 0
    log = (tmp_path / "agent.log").read_text()
    assert "HTTP POST" not in log, "a reset is no reason to fall back to HTTP"
