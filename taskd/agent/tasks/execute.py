"""execute: run a program without a shell and report its output in the wire format.

The output is stdout, then ``"\\n--- STDERR ---\\n"`` and stderr when both are
non-empty (stderr alone when stdout is empty), or ``"(No Output)"`` when both
are empty. A non-zero exit appends ``"\\n\\n[Process exited with code N]"`` and
still succeeds; a process killed by a signal reports the negative signal
number as its code (``-9`` for SIGKILL), as Python's ``returncode`` does.

Output longer than ``exec_max_character`` keeps its first and last halves
around ``"\\n... [N characters truncated] ...\\n"``, N counting the characters
left out; the result never exceeds ``exec_max_character`` characters (if the
limit is too small to hold the marker, the output is simply cut to it). While
the program runs, each stream keeps only its first and last
``exec_max_character`` characters, so a program printing gigabytes costs no
more memory than one printing a page.

The program runs in its own session, so it and everything it starts form one
process group: a timeout sends SIGTERM to the group, then SIGKILL to whatever
is still alive ``KILL_GRACE_S`` later. It starts with every signal at its
default action: ``taskd agent`` catches the signals it inherited ignored
(``nohup ... &`` ignores SIGINT, SIGQUIT and SIGHUP), and a caught signal is
reset at exec. No Python code runs between fork and exec (a ``preexec_fn``
forks a threaded agent, where a lock held by another thread at that moment can
stall the child).
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import logging
import os
import signal
from pathlib import Path

from taskd.agent.tasks import TaskContext, TaskFailed
from taskd.config import AgentSettings
from taskd.protocol import Execute, ExecuteResult

logger = logging.getLogger(__name__)

KILL_GRACE_S = 2.0
"""How long a timed-out process group has to exit after SIGTERM before SIGKILL."""

POLL_S = 0.1
READ_CHUNK = 64 * 1024
STDERR_SEPARATOR = "\n--- STDERR ---\n"
NO_OUTPUT = "(No Output)"

Segment = str | int
"""A piece of output: text, or a count of characters that were not kept."""


def timeout_s(settings: AgentSettings) -> float:
    """The client's hard limit: the exec timeout plus time to kill the group and report."""
    return settings.exec_timeout_ms / 1000 + KILL_GRACE_S + 3.0


async def run(task: Execute, ctx: TaskContext) -> ExecuteResult:
    """Run ``cmd`` with ``args``, stdin from /dev/null, and return its combined output."""
    spec = task.execute
    limit = ctx.settings.exec_max_character
    timeout_ms = ctx.settings.exec_timeout_ms
    try:
        process = await asyncio.create_subprocess_exec(
            spec.cmd,
            *spec.args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
    except OSError as exc:
        raise TaskFailed(f"cannot start {spec.cmd}: {exc.strerror or exc}") from None
    assert process.stdout is not None and process.stderr is not None
    stdout, stderr = _Capture(limit), _Capture(limit)
    readers = [
        asyncio.create_task(stdout.read_from(process.stdout)),
        asyncio.create_task(stderr.read_from(process.stderr)),
    ]
    try:
        async with asyncio.timeout(timeout_ms / 1000):
            await asyncio.gather(*readers)
            returncode = await process.wait()
    except TimeoutError:
        logger.warning("%s timed out after %d ms; killing its process group", spec.cmd, timeout_ms)
        await _stop_group(process)
        raise TaskFailed(f"timed out after {timeout_ms} ms; process group killed") from None
    finally:
        if process.returncode is None:
            # cancelled from outside (the client's hard limit, shutdown): no grace period
            _signal_group(process.pid, signal.SIGKILL)
            await _reap(process)
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
    return ExecuteResult(execute=_truncate(_compose(stdout, stderr, returncode), limit))


class _Capture:
    """A stream decoded as UTF-8: its first and last ``keep`` characters and a count of the rest."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.head = ""
        self.tail = ""
        self.omitted = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    @property
    def empty(self) -> bool:
        """Whether the stream produced nothing."""
        return not self.head

    def segments(self) -> list[Segment]:
        """The stream as text pieces around the count of characters not kept."""
        return [self.head, self.omitted, self.tail] if self.omitted else [self.head + self.tail]

    async def read_from(self, stream: asyncio.StreamReader) -> None:
        """Consume the stream to its end."""
        while chunk := await stream.read(READ_CHUNK):
            self._add(self._decoder.decode(chunk))
        self._add(self._decoder.decode(b"", final=True))

    def _add(self, text: str) -> None:
        room = self.keep - len(self.head)
        if room > 0:
            self.head += text[:room]
            text = text[room:]
        if not text:
            return
        tail = self.tail + text
        if len(tail) > self.keep:
            self.omitted += len(tail) - self.keep
            tail = tail[-self.keep :]
        self.tail = tail


def _compose(stdout: _Capture, stderr: _Capture, returncode: int) -> list[Segment]:
    if not stdout.empty and not stderr.empty:
        parts = [*stdout.segments(), STDERR_SEPARATOR, *stderr.segments()]
    elif not stdout.empty:
        parts = stdout.segments()
    elif not stderr.empty:
        parts = stderr.segments()
    else:
        parts = [NO_OUTPUT]
    if returncode:
        parts.append(f"\n\n[Process exited with code {returncode}]")
    return parts


def _marker(dropped: int) -> str:
    return f"\n... [{dropped} characters truncated] ...\n"


def _truncate(parts: list[Segment], limit: int) -> str:
    total = sum(len(p) if isinstance(p, str) else p for p in parts)
    if total <= limit:
        # a stream only drops characters beyond 2 * limit, so everything here is text
        return "".join(p for p in parts if isinstance(p, str))
    keep = limit - len(_marker(total))
    if keep < 2:
        return _head(parts, limit)
    # fewer characters dropped may mean a shorter count, leaving room for one more kept character
    keep = limit - len(_marker(total - keep))
    head = keep // 2
    return _head(parts, head) + _marker(total - keep) + _tail(parts, keep - head)


def _head(parts: list[Segment], count: int) -> str:
    # each stream keeps `limit` characters at both ends: more than either half needs
    taken: list[str] = []
    for part in parts:
        if count <= 0:
            break
        assert isinstance(part, str)
        taken.append(part[:count])
        count -= len(part)
    return "".join(taken)


def _tail(parts: list[Segment], count: int) -> str:
    taken: list[str] = []
    for part in reversed(parts):
        if count <= 0:
            break
        assert isinstance(part, str)
        taken.append(part[-count:])
        count -= len(part)
    return "".join(reversed(taken))


async def _stop_group(process: asyncio.subprocess.Process) -> None:
    """SIGTERM the process group, SIGKILL it after the grace period, and reap the leader."""
    _signal_group(process.pid, signal.SIGTERM)
    # no event announces the end of a whole group: poll it
    for _ in range(int(KILL_GRACE_S / POLL_S)):
        # scanning /proc on a busy host takes a while: keep it off the event loop
        if not await asyncio.to_thread(_group_alive, process.pid):
            break
        await asyncio.sleep(POLL_S)
    if await asyncio.to_thread(_group_alive, process.pid):
        _signal_group(process.pid, signal.SIGKILL)
    await _reap(process)


async def _reap(process: asyncio.subprocess.Process) -> None:
    """Wait for the killed leader, not for a pipe held by a process that left the group."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(KILL_GRACE_S):
            await process.wait()


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def _group_alive(pgid: int) -> bool:
    """Whether a process of the group still runs; zombies do not count."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    # killpg also reaches zombies, which linger where init does not reap orphans
    # (many containers): look for a member that is not one
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # the command name may hold spaces and parentheses: the fields follow the last ")"
        state, _ppid, group = stat[stat.rindex(")") + 2 :].split()[:3]
        if int(group) == pgid and state not in ("Z", "X"):
            return True
    return False
