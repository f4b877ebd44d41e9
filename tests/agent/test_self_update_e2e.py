"""self_update end to end: a real agent in its own environment updates itself and restarts."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import importlib.metadata
import os
import re
import signal
import subprocess
import sys
import sysconfig
import time
import uuid
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import taskd
from tests.agent.test_client import wait_online
from tests.helpers import (
    Server,
    add_token,
    agent_token_limits,
    make_settings,
    running_server,
    scaled,
    tmp_sqlite_url,
)

START_S = 30
"""How long a fresh Python process may take to import taskd and subscribe."""
UPDATE_MS = int(scaled(60) * 1000)
"""How long pip may take to install the new version, as the self_update task's deadline."""


def _build_wheel(directory: Path, version: str) -> Path:
    """Pack this taskd's package files and dependencies into a wheel that says ``version``."""
    source = Path(taskd.__file__).parent
    files = {
        f"taskd/{path.relative_to(source).as_posix()}": path.read_bytes()
        for path in sorted(source.rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts
    }
    init = files["taskd/__init__.py"].decode()
    init, found = re.subn(r'__version__ = "[^"]*"', f'__version__ = "{version}"', init)
    assert found == 1, "taskd/__init__.py has no __version__ line"
    files["taskd/__init__.py"] = init.encode()
    installed = importlib.metadata.distribution("taskd")
    dist_info = f"taskd-{version}.dist-info"
    metadata = [
        "Metadata-Version: 2.1",
        "Name: taskd",
        f"Version: {version}",
        f"Requires-Python: {installed.metadata['Requires-Python']}",
        *(f"Provides-Extra: {extra}" for extra in installed.metadata.get_all("Provides-Extra", [])),
        *(f"Requires-Dist: {requirement}" for requirement in installed.requires or []),
    ]
    files[f"{dist_info}/METADATA"] = ("\n".join(metadata) + "\n").encode()
    files[f"{dist_info}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    files[f"{dist_info}/entry_points.txt"] = (
        installed.read_text("entry_points.txt") or ""
    ).encode()
    record = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append(f"{dist_info}/RECORD,,")
    files[f"{dist_info}/RECORD"] = ("\n".join(record) + "\n").encode()
    directory.mkdir(parents=True, exist_ok=True)
    wheel = directory / f"taskd-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return wheel


@pytest.fixture
def agent_python(tmp_path: Path) -> Path:
    """The interpreter of a new virtual environment holding a wheel-installed taskd.

    taskd's dependencies are made importable from the test environment by a .pth
    file, after the environment's own site-packages, so pip finds them installed.
    """
    venv = tmp_path / "venv"
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    wheel = _build_wheel(tmp_path / "current", taskd.__version__)
    # installed before the .pth exists: pip would take the test environment's taskd for it
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-index", "--no-deps", str(wheel)],
        check=True,
        cwd=tmp_path,
        timeout=120,
    )
    (site,) = (venv / "lib").glob("python*/site-packages")
    ours = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    (site / "taskd-test-dependencies.pth").write_text("".join(f"{p}\n" for p in sorted(ours)))
    code = "import taskd; print(taskd.__file__); print(taskd.__version__)"
    where = subprocess.run(
        [str(python), "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout.split()
    assert where == [str(site / "taskd" / "__init__.py"), taskd.__version__]
    return python


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    """A real taskd server on SQLite."""
    async with running_server(make_settings(tmp_sqlite_url(tmp_path))) as running:
        yield running


def _cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]


async def _version(server: Server, agent_uuid: str) -> dict[str, object]:
    """The agent's answer to a version task."""
    result = await server.su("task_create_task_blocking", agent_uuid, "version", 10_000)
    assert result["success"] is True, result
    version: dict[str, object] = result["task_event_result"]["version"]
    return version


async def test_self_update_installs_reexecs_and_reconnects(
    server: Server, agent_python: Path, tmp_path: Path
) -> None:
    """Told to self_update, the agent pip-installs v9.9.9, re-executes itself and answers as it."""
    wheels = tmp_path / "wheels"
    _build_wheel(wheels, "9.9.9")
    agent_uuid = str(uuid.uuid4())
    token = await add_token(server, agent_token_limits(agent_uuid))
    config = tmp_path / "agent.toml"
    config.write_text(
        f'agent_uuid = "{agent_uuid}"\n'
        f'self_update_find_links = "{wheels}"\n'
        f'[[server]]\nname = "main"\nws_url = "{server.ws_url}"\ntoken = "{token}"\n'
        "allow_self_update = true\n"
    )
    args = ["agent", "--config", str(config), "--state-dir", str(tmp_path / "state")]
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "xdg")}
    for name in ("TASKD_AGENT_CONFIG", "PYTHONPATH"):
        env.pop(name, None)
    with (tmp_path / "agent.log").open("ab") as log:
        process = subprocess.Popen(
            [str(agent_python), "-m", "taskd", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tmp_path,
        )
    try:
        await wait_online(server, agent_uuid, timeout=START_S)
        before = await _version(server, agent_uuid)
        assert (before["taskd"], before["pid"]) == (taskd.__version__, process.pid)
        first = server.service.hub.connected_agents()[agent_uuid]

        update = {"self_update": "v9.9.9"}
        result = await server.su("task_create_task_blocking", agent_uuid, update, UPDATE_MS)
        assert result["success"] is True, result
        [record] = await server.su(
            "task_query_task", {"condition": [{"task_id": result["task_id"]}]}
        )
        assert record["success"] is True
        assert record["task_event_result"] == {"self_update": True}

        deadline = time.monotonic() + scaled(START_S)
        while server.service.hub.connected_agents().get(agent_uuid) in (None, first):
            assert process.poll() is None, f"taskd agent exited with {process.returncode}"
            assert time.monotonic() < deadline, "the agent did not subscribe again"
            await asyncio.sleep(0.02)
        await wait_online(server, agent_uuid)

        after = await _version(server, agent_uuid)
        assert (after["taskd"], after["pid"]) == ("9.9.9", process.pid)
        assert process.poll() is None
        assert _cmdline(process.pid) == [str(agent_python), "-P", "-m", "taskd", *args]
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            status = await asyncio.to_thread(process.wait, scaled(15))
        except subprocess.TimeoutExpired:
            process.kill()
            await asyncio.to_thread(process.wait)
            raise
    assert status == 0
    log_text = (tmp_path / "agent.log").read_text()
    assert log_text.count(f"agent {agent_uuid} starting") == 2
