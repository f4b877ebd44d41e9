"""self_update: install another taskd release into the agent's own environment with pip.

``"vX.Y.Z"`` installs ``taskd==X.Y.Z`` with the interpreter that runs the agent,
from ``self_update_index_url`` and/or the wheel directory
``self_update_find_links`` (alone, it is the only source: ``--no-index``), or
from pip's own configuration when neither is set. Any version may be installed,
older ones too, except the one already running. If pip fails, nothing changes
and the old version keeps running.

The running process keeps its loaded code: once the result is uploaded, the
client calls ``reexec()`` to replace the process with the new version.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from typing import NoReturn

import taskd
from taskd.agent.tasks import TaskContext, TaskFailed
from taskd.config import AgentSettings
from taskd.protocol import SelfUpdate, SelfUpdateResult

logger = logging.getLogger(__name__)

INSTALL_TIMEOUT_S = 300.0
TIMEOUT_S = INSTALL_TIMEOUT_S + 10.0
PIP_TAIL_LINES = 20
"""How many of pip's last output lines a failure reports."""


async def run(
    task: SelfUpdate, ctx: TaskContext, *, python: str = sys.executable
) -> SelfUpdateResult:
    """Install the requested version next to the running one; fail if it is the running one."""
    version = task.self_update.removeprefix("v")
    if version == taskd.__version__:
        raise TaskFailed(f"already running v{version}")
    await install(version, ctx.settings, python=python)
    logger.info("installed taskd %s; restarting once the result is uploaded", version)
    return SelfUpdateResult(self_update=True)


def pip_command(version: str, settings: AgentSettings, python: str = sys.executable) -> list[str]:
    """The pip invocation that installs ``taskd==version`` for ``python``."""
    # -P keeps the working directory off sys.path: a taskd source tree or
    # .egg-info there would otherwise pass for the installed distribution
    command = [python, "-P", "-m", "pip", "install", "--no-input", "--disable-pip-version-check"]
    if settings.self_update_index_url:
        command += ["--index-url", settings.self_update_index_url]
    if settings.self_update_find_links:
        if not settings.self_update_index_url:
            command.append("--no-index")
        command += ["--find-links", settings.self_update_find_links]
    return [*command, f"taskd=={version}"]


async def install(
    version: str,
    settings: AgentSettings,
    *,
    python: str = sys.executable,
    timeout_s: float = INSTALL_TIMEOUT_S,
) -> None:
    """Run pip for ``python``; raise TaskFailed with the end of pip's output if it fails."""
    command = pip_command(version, settings, python)
    try:
        process = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
    except OSError as exc:
        raise TaskFailed(f"cannot start {python}: {exc.strerror or exc}") from None
    try:
        async with asyncio.timeout(timeout_s):
            output, _ = await process.communicate()
    except TimeoutError:
        raise TaskFailed(f"pip install taskd=={version} took longer than {timeout_s:g} s") from None
    finally:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
    if process.returncode != 0:
        lines = output.decode("utf-8", errors="replace").rstrip().splitlines()
        tail = "\n".join(lines[-PIP_TAIL_LINES:])
        raise TaskFailed(
            f"pip install taskd=={version} failed (exit {process.returncode}):\n{tail}"
        )


def reexec() -> NoReturn:
    """Replace this process with ``python -m taskd`` and the same arguments, now the new version.

    The client calls it after the self_update result is uploaded; sockets close
    on exec (Python opens them non-inheritable) and the spool is on disk.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    # -P: run the installed taskd, not a source tree in the working directory
    os.execv(sys.executable, [sys.executable, "-P", "-m", "taskd", *sys.argv[1:]])
