"""self_update with real pip runs into throwaway virtual environments, from hand-built wheels."""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import http.server
import importlib.metadata
import shutil
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import taskd
from taskd.agent.tasks import TaskContext, TaskFailed, runner_for
from taskd.agent.tasks.self_update import (
    INSTALL_TIMEOUT_S,
    TIMEOUT_S,
    install,
    pip_command,
    run,
)
from taskd.config import AgentSettings, load_agent_settings
from taskd.protocol import SelfUpdate, parse_task_event_type
from tests.helpers import scaled


def _settings(tmp_path: Path, index_url: str = "", find_links: str = "") -> AgentSettings:
    """Settings from a real agent config file with the given package sources."""
    path = tmp_path / "agent.toml"
    path.write_text(
        f'self_update_index_url = "{index_url}"\n'
        f'self_update_find_links = "{find_links}"\n'
        '[[server]]\nws_url = "ws://127.0.0.1:1/"\ntoken = "t"\n'
    )
    return load_agent_settings(path)


def _context(settings: AgentSettings) -> TaskContext:
    return TaskContext(settings=settings, server=settings.servers[0], task_id=1, task_token="x")


def _build_wheel(directory: Path, version: str) -> Path:
    """Write a minimal pure-Python wheel of a distribution named taskd at ``version``."""
    dist_info = f"taskd-{version}.dist-info"
    files = {
        "taskd/__init__.py": f'__version__ = "{version}"\n',
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: taskd\nVersion: {version}\n",
        f"{dist_info}/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = []
    for name, text in files.items():
        data = text.encode()
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append(f"{dist_info}/RECORD,,")
    files[f"{dist_info}/RECORD"] = "\n".join(record) + "\n"
    directory.mkdir(parents=True, exist_ok=True)
    wheel = directory / f"taskd-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return wheel


@pytest.fixture(scope="session")
def template_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plain virtual environment with only pip in it, created once."""
    path = tmp_path_factory.mktemp("template") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, timeout=120)
    return path


@pytest.fixture
def venv(template_venv: Path, tmp_path: Path) -> Path:
    """A fresh copy of the template environment for one test."""
    path = tmp_path / "venv"
    shutil.copytree(template_venv, path, symlinks=True)
    return path


@pytest.fixture
def wheels(tmp_path: Path) -> Path:
    """A directory holding taskd wheels 1.0.0 and 9.9.9."""
    directory = tmp_path / "wheels"
    _build_wheel(directory, "1.0.0")
    _build_wheel(directory, "9.9.9")
    return directory


def _python(venv: Path) -> str:
    return str(venv / "bin" / "python")


def _installed(venv: Path, cwd: Path) -> tuple[str, str] | None:
    """The taskd distribution version and module version in ``venv``, or None if absent."""
    code = (
        "import importlib.metadata as m\n"
        "try:\n    import taskd; print(m.version('taskd'), taskd.__version__)\n"
        "except ImportError:\n    print('-')\n"
    )
    out = subprocess.run(
        [_python(venv), "-P", "-c", code], cwd=cwd, capture_output=True, text=True, check=True
    ).stdout.split()
    return None if out == ["-"] else (out[0], out[1])


def _tree(venv: Path) -> list[str]:
    """Every file path under the environment's site-packages, for before/after comparison."""
    (site,) = (venv / "lib").glob("python*/site-packages")
    return sorted(str(p.relative_to(site)) for p in site.rglob("*") if "__pycache__" not in p.parts)


@pytest.fixture
def simple_index(wheels: Path, tmp_path: Path) -> Iterator[str]:
    """A PEP 503 package index for the wheels, served over HTTP on 127.0.0.1."""
    root = tmp_path / "index"
    (root / "simple" / "taskd").mkdir(parents=True)
    links = "".join(
        f'<a href="/files/{w.name}">{w.name}</a>\n' for w in sorted(wheels.glob("*.whl"))
    )
    (root / "simple" / "taskd" / "index.html").write_text(f"<html><body>\n{links}</body></html>\n")
    shutil.copytree(wheels, root / "files")
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/simple/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def test_interface_finds_runner_and_limit(tmp_path: Path) -> None:
    """The client finds this runner, and its hard limit outlasts pip's own timeout."""
    runner, limit = runner_for("self_update", _settings(tmp_path))
    assert runner is run
    assert limit == TIMEOUT_S
    assert TIMEOUT_S > INSTALL_TIMEOUT_S >= 300


def test_pip_command_sources(tmp_path: Path) -> None:
    """find_links alone is the only source; an index URL replaces PyPI; both may be combined."""
    base = ["py", "-P", "-m", "pip", "install", "--no-input", "--disable-pip-version-check"]
    assert pip_command("1.2.3", _settings(tmp_path), "py") == [*base, "taskd==1.2.3"]
    assert pip_command("1.2.3", _settings(tmp_path, find_links="/w"), "py") == [
        *base,
        "--no-index",
        "--find-links",
        "/w",
        "taskd==1.2.3",
    ]
    assert pip_command("1.2.3", _settings(tmp_path, index_url="http://i/"), "py") == [
        *base,
        "--index-url",
        "http://i/",
        "taskd==1.2.3",
    ]
    assert pip_command("1.2.3", _settings(tmp_path, "http://i/", "/w"), "py") == [
        *base,
        "--index-url",
        "http://i/",
        "--find-links",
        "/w",
        "taskd==1.2.3",
    ]


async def test_running_version_is_refused_without_pip(tmp_path: Path) -> None:
    """Asking for the running version fails at once; pip is never started."""
    task = parse_task_event_type({"self_update": f"v{taskd.__version__}"})
    assert isinstance(task, SelfUpdate)
    # an interpreter that does not exist: starting pip would fail differently
    with pytest.raises(TaskFailed, match=rf"^already running v{taskd.__version__}$"):
        await run(task, _context(_settings(tmp_path)), python=str(tmp_path / "no-python"))


async def test_installs_from_find_links(venv: Path, wheels: Path, tmp_path: Path) -> None:
    """From a wheel directory, v9.9.9 is installed into the target environment only."""
    ours = importlib.metadata.version("taskd")
    assert _installed(venv, tmp_path) is None
    ctx = _context(_settings(tmp_path, find_links=str(wheels)))
    result = await run(SelfUpdate(self_update="v9.9.9"), ctx, python=_python(venv))
    assert result.self_update is True
    assert _installed(venv, tmp_path) == ("9.9.9", "9.9.9")
    assert importlib.metadata.version("taskd") == ours == taskd.__version__


async def test_replaces_an_installed_version(venv: Path, wheels: Path, tmp_path: Path) -> None:
    """An environment holding taskd 1.0.0 ends up with 9.9.9 and nothing of 1.0.0."""
    settings = _settings(tmp_path, find_links=str(wheels))
    await install("1.0.0", settings, python=_python(venv))
    assert _installed(venv, tmp_path) == ("1.0.0", "1.0.0")
    await install("9.9.9", settings, python=_python(venv))
    assert _installed(venv, tmp_path) == ("9.9.9", "9.9.9")
    assert [p for p in _tree(venv) if p.startswith("taskd-")] == [
        "taskd-9.9.9.dist-info",
        "taskd-9.9.9.dist-info/INSTALLER",
        "taskd-9.9.9.dist-info/METADATA",
        "taskd-9.9.9.dist-info/RECORD",
        "taskd-9.9.9.dist-info/REQUESTED",
        "taskd-9.9.9.dist-info/WHEEL",
    ]


async def test_missing_version_fails_and_changes_nothing(
    venv: Path, wheels: Path, tmp_path: Path
) -> None:
    """A version no source has fails with pip's own message and leaves the environment as it was."""
    settings = _settings(tmp_path, find_links=str(wheels))
    await install("1.0.0", settings, python=_python(venv))
    before = _tree(venv)
    with pytest.raises(TaskFailed) as failure:
        await run(SelfUpdate(self_update="v9.9.8"), _context(settings), python=_python(venv))
    message = str(failure.value)
    assert message.startswith("pip install taskd==9.9.8 failed (exit 1):\n")
    assert "No matching distribution found for taskd==9.9.8" in message
    assert len(message.splitlines()) <= 21
    assert _tree(venv) == before
    assert _installed(venv, tmp_path) == ("1.0.0", "1.0.0")


async def test_installs_from_an_index(venv: Path, simple_index: str, tmp_path: Path) -> None:
    """From a package index on loopback, the requested version is installed."""
    settings = _settings(tmp_path, index_url=simple_index)
    await install("9.9.9", settings, python=_python(venv))
    assert _installed(venv, tmp_path) == ("9.9.9", "9.9.9")


async def test_hanging_pip_is_killed_at_the_timeout(venv: Path, tmp_path: Path) -> None:
    """pip stuck on an index that never answers is killed at the timeout, changing nothing."""
    before = _tree(venv)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        settings = _settings(tmp_path, index_url=f"http://127.0.0.1:{silent.getsockname()[1]}/")
        limit = scaled(3)
        started = time.monotonic()
        with pytest.raises(TaskFailed, match=r"took longer than"):
            await install("9.9.9", settings, python=_python(venv), timeout_s=limit)
        elapsed = time.monotonic() - started
    assert limit <= elapsed < limit + scaled(3)
    assert _tree(venv) == before


async def test_missing_interpreter_fails(tmp_path: Path) -> None:
    """An interpreter that cannot be started fails with the operating system's reason."""
    with pytest.raises(TaskFailed, match="No such file or directory"):
        await install("9.9.9", _settings(tmp_path), python=str(tmp_path / "no-python"))


def test_reexec_runs_taskd_with_the_same_arguments(tmp_path: Path) -> None:
    """reexec replaces the process with ``python -m taskd`` and the original arguments."""
    code = (
        "import sys\n"
        "sys.argv = ['taskd', '--version']\n"
        "from taskd.agent.tasks.self_update import reexec\n"
        "print('before', flush=True)\n"
        "reexec()\n"
        "print('not reached')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"before\ntaskd {taskd.__version__}\n"


async def test_cancelled_install_leaves_no_pip_behind(venv: Path, tmp_path: Path) -> None:
    """Cancelling a running install (the client's hard limit) kills pip at once."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        settings = _settings(tmp_path, index_url=f"http://127.0.0.1:{silent.getsockname()[1]}/")
        task = asyncio.create_task(install("9.9.9", settings, python=_python(venv)))
        await asyncio.sleep(scaled(1))
        started = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert time.monotonic() - started < scaled(2)
        # still inside: the index keeps a surviving pip waiting
        leftover = subprocess.run(
            ["pgrep", "-f", f"{_python(venv)} -P -m pip"], capture_output=True, text=True
        )
    assert leftover.stdout == ""
