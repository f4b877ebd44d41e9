"""web_shell: a shell on a pseudo-terminal, relayed over a WebSocket to the server's /terminal.

PTY output goes out as binary frames; incoming frames (text or binary) are
typed into the PTY, except the control frames ``{"type": "resize", ...}``
(resize the PTY) and ``{"error_id": ..., "error_message": ...}`` (the relay
refused the session). When either side ends, the shell's whole session is
killed. A session lasts as long as its user wants, up to
``terminal_max_session_ms``: then it is killed and the task fails saying so.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import logging
import os
import pty
import shlex
import signal
import ssl
import struct
import termios
from typing import Any, TypeGuard
from urllib.parse import urlencode, urlsplit, urlunsplit

import websockets
from websockets.asyncio.client import ClientConnection

from taskd.agent.tasks import TaskContext, TaskFailed, default_signals
from taskd.config import AgentServer, AgentSettings
from taskd.protocol import WebShell, WebShellResult

MAX_MESSAGE_BYTES = 1 << 20
READ_CHUNK = 64 * 1024
KILL_GRACE_S = 2.0
WIND_DOWN_S = KILL_GRACE_S + 10.0 + 1.0
"""Killing the shell, then closing the WebSocket (websockets' 10 s close timeout), plus slack."""
EXIT_DRAIN_S = 0.5
"""How long output still in the PTY is passed on after the shell exited."""

_sessions: set[object] = set()


def timeout_s(settings: AgentSettings) -> float:
    """The client's hard limit: connecting, the longest session, then winding down."""
    return (settings.connect_timeout_ms + settings.terminal_max_session_ms) / 1000 + WIND_DOWN_S


class _WithoutDebug(logging.LoggerAdapter[logging.Logger]):
    """websockets' logger minus DEBUG, whose lines carry the task_token URL and every keystroke."""

    def isEnabledFor(self, level: int) -> bool:
        """Whether ``level`` is logged: never DEBUG."""
        return level > logging.DEBUG and self.logger.isEnabledFor(level)


def session_url(task: WebShell, ctx: TaskContext) -> str:
    """Where to connect: the task's URL with this session's identity in the query.

    A URL whose path is ``/auto_gen`` means the ``/terminal`` endpoint of the
    server that sent the task.
    """
    spec = task.web_shell
    query = urlencode(
        {
            "agent_uuid": ctx.settings.agent_uuid,
            "task_id": ctx.task_id,
            "task_token": ctx.task_token,
            "terminal_id": spec.terminal_id,
        }
    )
    url = urlsplit(spec.url)
    if url.path == "/auto_gen":
        server = urlsplit(ctx.server.ws_url)
        return urlunsplit((server.scheme, server.netloc, "/terminal", query, ""))
    return urlunsplit(
        (url.scheme, url.netloc, url.path, f"{url.query}&{query}" if url.query else query, "")
    )


async def run(task: WebShell, ctx: TaskContext) -> WebShellResult:
    """Run ``terminal_shell`` on a PTY and relay it until the user or the shell ends the session."""
    if len(_sessions) >= ctx.settings.max_terminals:
        raise TaskFailed(
            f"too many terminals: at most {ctx.settings.max_terminals} may be open at once"
        )
    session = object()
    _sessions.add(session)
    try:
        await _session(task, ctx)
    finally:
        _sessions.discard(session)
    return WebShellResult(web_shell=True)


async def _session(task: WebShell, ctx: TaskContext) -> None:
    argv = shlex.split(ctx.settings.terminal_shell)
    if not argv:
        raise TaskFailed("terminal_shell is empty")
    url = session_url(task, ctx)
    host = urlsplit(url).netloc
    try:
        ws = await websockets.connect(
            url,
            open_timeout=ctx.settings.connect_timeout_ms / 1000,
            ping_interval=ctx.settings.ping_interval_ms / 1000,
            ping_timeout=ctx.settings.ping_timeout_ms / 1000,
            max_size=MAX_MESSAGE_BYTES,
            ssl=_ssl_context(url, ctx.server),
            proxy=None,
            user_agent_header="taskd-agent",
            logger=_WithoutDebug(logging.getLogger("websockets.client")),
        )
    except (OSError, TimeoutError, websockets.InvalidURI, websockets.InvalidHandshake) as exc:
        raise TaskFailed(f"cannot connect the terminal to {host}: {exc}") from None
    async with ws:
        try:
            shell = await Shell.spawn(argv)
        except OSError as exc:
            raise TaskFailed(f"cannot start {argv[0]}: {exc.strerror or exc}") from None
        limit = ctx.settings.terminal_max_session_ms / 1000
        try:
            async with asyncio.timeout(limit):
                failure = await _relay(ws, shell)
        except TimeoutError:
            failure = f"the session reached terminal_max_session_ms ({limit:g} s); shell killed"
        finally:
            await shell.kill()
    if failure is not None:
        raise TaskFailed(failure)


def _ssl_context(url: str, server: AgentServer) -> ssl.SSLContext | None:
    if not url.startswith("wss://"):
        return None
    context = ssl.create_default_context()
    if server.ignore_cert:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


async def _relay(ws: ClientConnection, shell: Shell) -> str | None:
    """Relay until a side ends; the reason the session failed, or None if it ended normally."""
    output = asyncio.create_task(_shell_to_ws(shell, ws))
    keys = asyncio.create_task(_ws_to_shell(ws, shell))
    exited = asyncio.create_task(shell.process.wait())
    tasks: set[asyncio.Task[Any]] = {output, keys, exited}
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        if exited in done and output not in done:
            await asyncio.wait({output}, timeout=EXIT_DRAIN_S)
    finally:
        for job in tasks:
            job.cancel()
        for job in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await job
    return keys.result() if keys.done() and not keys.cancelled() else None


async def _shell_to_ws(shell: Shell, ws: ClientConnection) -> None:
    with contextlib.suppress(websockets.ConnectionClosed, OSError):
        while data := await shell.read():
            await ws.send(data)


async def _ws_to_shell(ws: ClientConnection, shell: Shell) -> str | None:
    try:
        async for message in ws:
            if isinstance(message, bytes):
                await shell.write(message)
                continue
            control = _control(message)
            if control is None:
                await shell.write(message.encode())
            elif "error_id" in control:
                return f"the terminal relay refused the session: {control['error_message']}"
            else:
                size = _resize_of(control)
                if size is not None:
                    shell.resize(*size)
    except websockets.ConnectionClosedError as exc:
        return f"the terminal connection was lost: {exc}"
    except OSError:
        pass  # the shell closed its terminal
    return None


def _control(text: str) -> dict[str, Any] | None:
    """A resize or error frame, parsed; None for anything to be typed."""
    if not text.startswith("{"):
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, dict):
        return None
    if value.get("type") == "resize":
        return value
    if set(value) == {"error_id", "error_message"}:
        return value
    return None


def _resize_of(control: dict[str, Any]) -> tuple[int, int] | None:
    cols, rows = control.get("cols"), control.get("rows")
    if _is_dimension(cols) and _is_dimension(rows):
        return cols, rows
    return None


def _is_dimension(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < 1 << 16


def _prepare_child() -> None:
    # runs in the child between fork and exec, after setsid: make the PTY the
    # controlling terminal so job control, Ctrl-C and SIGWINCH work, and give
    # the shell the signals the agent may have inherited ignored
    default_signals()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Shell:
    """A shell process on a pseudo-terminal; this side holds the non-blocking master end."""

    def __init__(self, master: int, process: asyncio.subprocess.Process) -> None:
        self.master = master
        self.process = process

    @classmethod
    async def spawn(cls, argv: list[str], cols: int = 80, rows: int = 24) -> Shell:
        """Start ``argv`` in a new session whose controlling terminal is a fresh PTY."""
        master, slave = pty.openpty()
        try:
            _set_size(master, cols, rows)
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=slave,
                stdout=slave,
                stderr=slave,
                env={**os.environ, "TERM": "xterm-256color"},
                start_new_session=True,
                preexec_fn=_prepare_child,
            )
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        os.set_blocking(master, False)
        return cls(master, process)

    async def read(self) -> bytes:
        """The next chunk of output; b"" once no process has the terminal open any more."""
        while True:
            try:
                return os.read(self.master, READ_CHUNK)
            except BlockingIOError:
                await _ready(self.master, write=False)
            except OSError as exc:
                if exc.errno == errno.EIO:
                    return b""
                raise

    async def write(self, data: bytes) -> None:
        """Type ``data`` into the terminal."""
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.master, view) :]
            except BlockingIOError:
                await _ready(self.master, write=True)

    def resize(self, cols: int, rows: int) -> None:
        """Set the window size (the kernel signals SIGWINCH to the foreground job)."""
        _set_size(self.master, cols, rows)

    async def kill(self) -> None:
        """Hang up the shell and everything in its session: SIGHUP and SIGTERM, then SIGKILL."""
        sid = self.process.pid
        _signal_session(sid, signal.SIGHUP)
        _signal_session(sid, signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.process.wait(), KILL_GRACE_S)
        _signal_session(sid, signal.SIGKILL)
        await self.process.wait()
        os.close(self.master)


def _set_size(fd: int, cols: int, rows: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


async def _ready(fd: int, *, write: bool) -> None:
    loop = asyncio.get_running_loop()
    ready = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    if write:
        loop.add_writer(fd, wake)
    else:
        loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        if write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


def _signal_session(sid: int, sig: signal.Signals) -> None:
    """Signal the shell's process group and every other process of its session.

    Jobs the shell started in the background have process groups of their own;
    on Linux /proc finds them, elsewhere only the shell's group is reached.
    """
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(sid, sig)
    for pid in _session_members(sid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _session_members(sid: int) -> list[int]:
    members = []
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError):
                    if os.getsid(int(entry)) == sid:
                        members.append(int(entry))
    return members
