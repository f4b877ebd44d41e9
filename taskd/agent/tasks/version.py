"""version: what the agent runs — taskd, Python, the operating system and the host."""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import socket
from typing import Any

import taskd
from taskd.agent.tasks import TaskContext
from taskd.protocol import Version, VersionResult

TIMEOUT_S = 5.0


async def run(task: Version, ctx: TaskContext) -> VersionResult:
    """Describe the agent; never fails."""
    # platform.platform() scans the interpreter binary for its libc version: keep it off the loop
    details = await asyncio.to_thread(_details)
    return VersionResult(version={**details, "agent_uuid": ctx.settings.agent_uuid})


def _details() -> dict[str, Any]:
    uname = platform.uname()
    details: dict[str, Any] = {
        "taskd": taskd.__version__,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "system": uname.system,
        "release": uname.release,
        "machine": uname.machine,
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
    }
    # without an os-release file (macOS, the BSDs) there is no distribution name to give
    with contextlib.suppress(OSError):
        details["os"] = platform.freedesktop_os_release()["PRETTY_NAME"]
    return details
