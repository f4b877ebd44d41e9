"""One module per task kind. Each exposes ``async def run(task, ctx) -> ResultVariant``.

A runner returns the typed result on success and raises ``TaskFailed`` with a
readable reason on failure; the client uploads that as ``success: false``.
Runners never enforce the allow-list (the client does) but do enforce their
own limits; the client adds a hard timeout on top (``TIMEOUT_S`` seconds, or
``timeout_s(settings)``), so no task runs forever.
"""

from __future__ import annotations

import contextlib
import importlib
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from taskd.config import AgentServer, AgentSettings
from taskd.protocol import ResultVariant


class TaskFailed(Exception):
    """The task could not be done; the message becomes the uploaded error_message."""


@dataclass(frozen=True)
class TaskContext:
    """What a runner knows besides its task."""

    settings: AgentSettings
    server: AgentServer
    task_id: int
    task_token: str


Runner = Callable[[Any, TaskContext], Awaitable[ResultVariant]]


def default_signals() -> None:
    """In a child between fork and exec: every signal to its default action, none blocked.

    An agent started in the background (``nohup taskd agent ... &``) inherits
    SIGHUP, SIGINT and SIGQUIT ignored, and a signal still ignored at exec
    stays ignored: without this a terminal's Ctrl-\\ (or Ctrl-C) would do
    nothing and commands would shrug off hangups. It only makes sigaction and
    sigprocmask calls, so it is safe in a child forked from a threaded agent.
    """
    for signum in signal.valid_signals():
        if signum not in (signal.SIGKILL, signal.SIGSTOP):
            with contextlib.suppress(OSError, ValueError):
                signal.signal(signum, signal.SIG_DFL)
    # a forked child starts with no pending signals: unblocking delivers none
    signal.pthread_sigmask(signal.SIG_SETMASK, ())


SHARED_MODULES: dict[str, str] = {
    "http_ping": "http",
    "http_request": "http",
    "read_config": "config",
    "edit_config": "config",
}
"""The kinds whose module is not named after the kind: one module serves related kinds.

The kinds themselves are declared once, by the variants in ``taskd.protocol``.
"""


def runner_for(kind: str, settings: AgentSettings) -> tuple[Runner, float]:
    """The runner of a task kind and the client's hard timeout for it in seconds.

    A kind runs in the module named after it (or in ``SHARED_MODULES``); a module
    that serves several kinds names its runners ``run_<kind>``; a module whose
    limit depends on the settings defines ``timeout_s(settings)``.
    """
    module = importlib.import_module(f"taskd.agent.tasks.{SHARED_MODULES.get(kind, kind)}")
    runner: Runner = getattr(module, f"run_{kind}", None) or module.run
    limit = getattr(module, "timeout_s", None)
    timeout: float = limit(settings) if limit is not None else getattr(module, "TIMEOUT_S", 60.0)
    return runner, timeout
