"""Child processes of a run (benchmarks and fault suite): start, watch (CPU, RSS), stop, clean up.

Every child starts in its own session, so stopping it stops whatever it
forked (a Celery worker's pool, the httpload workers) by its process group.
A child is recorded the moment it starts, with stop signals held off
meanwhile (``shutdown.held``), and once ``stop_all`` has begun nothing new
starts, whatever thread asks: no process outlives its run.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import orjson

from benchmarks import shutdown

PYTHON = sys.executable
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """A scenario could not be measured (a child failed, a wait timed out)."""


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def raise_open_files_limit() -> int:
    """Raise RLIMIT_NOFILE to the hard limit (children inherit it); return the new limit."""
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def memory(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM of a process in MiB (empty once it is gone)."""
    found: dict[str, float] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key.lower() + "_mb"] = round(int(value.split()[0]) / 1024, 1)
    return found


def group_cpu_seconds(pgid: int) -> float:
    """User+system CPU seconds of every live process in a process group."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = Path(f"/proc/{entry}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            # fields[0] is state (field 3); pgrp is field 5, utime 14, stime 15
            if int(fields[2]) == pgid:
                total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


class Child:
    """One started process, its log file, and optionally a pipe on its stdout."""

    def __init__(self, name: str, popen: subprocess.Popen[bytes], log: Path) -> None:
        self.name = name
        self.popen = popen
        self.log = log
        self._buffer = b""

    @property
    def pid(self) -> int:
        """The process id (also its process group id)."""
        return self.popen.pid

    def alive(self) -> bool:
        """Whether it is still running."""
        return self.popen.poll() is None

    def cpu_seconds(self) -> float:
        """CPU seconds used so far by it and the processes it forked."""
        return group_cpu_seconds(self.pid)

    def memory(self) -> dict[str, float]:
        """VmRSS / VmHWM of the main process in MiB."""
        return memory(self.pid)

    def last_words(self) -> str:
        """The last line of its log: usually the error that ended it."""
        lines = self.tail(1)
        return lines or "(no output)"

    def tail(self, lines: int = 15) -> str:
        """The end of its log, for error messages."""
        with contextlib.suppress(OSError):
            text = self.log.read_text(errors="replace").strip().splitlines()
            return "\n".join(text[-lines:])
        return ""

    def wait_line(self, prefix: str, timeout: float) -> str:
        """Read stdout until a line starting with ``prefix``; BenchError on timeout or exit."""
        stream = self.popen.stdout
        if stream is None:
            raise BenchError(f"{self.name}: stdout is not piped")
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            selector.register(stream, selectors.EVENT_READ)
            while True:
                while b"\n" in self._buffer:
                    line, self._buffer = self._buffer.split(b"\n", 1)
                    if line.decode().startswith(prefix):
                        return line.decode()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BenchError(f"{self.name}: no {prefix!r} within {timeout:.0f} s")
                if selector.select(min(left, 0.5)):
                    chunk = os.read(stream.fileno(), 65536)
                    if not chunk:
                        raise BenchError(f"{self.name} exited: {self.last_words()}\n{self.tail()}")
                    self._buffer += chunk
                elif not self.alive():
                    raise BenchError(f"{self.name} exited: {self.last_words()}\n{self.tail()}")


class Children:
    """Every process a run started; ``stop_all`` ends them, whatever happened."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.children: list[Child] = []
        self._logs: list[IO[bytes]] = []
        self._lock = threading.Lock()
        self._closed = False

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        pipe_stdout: bool = False,
    ) -> Child:
        """Start ``argv`` in its own session, stderr (and stdout unless piped) to a log file."""
        with shutdown.held(), self._lock:
            if self._closed:
                raise BenchError(f"{name} not started: the run is stopping")
            log_path = self.workdir / f"{name}.log"
            counter = 1
            while log_path.exists():
                counter += 1
                log_path = self.workdir / f"{name}-{counter}.log"
            log = log_path.open("wb")
            self._logs.append(log)
            popen = subprocess.Popen(
                list(argv),
                stdout=subprocess.PIPE if pipe_stdout else log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
                cwd=cwd,
                start_new_session=True,
            )
            child = Child(name, popen, log_path)
            self.children.append(child)
        return child

    def run_text(
        self,
        name: str,
        argv: Sequence[str],
        *,
        timeout: float,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> str:
        """Run a client to completion and return what it printed; BenchError if it failed."""
        child = self.start(name, argv, env=env, cwd=cwd, pipe_stdout=True)
        try:
            out, _ = child.popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop(child)
            raise BenchError(
                f"{name} did not finish within {timeout:.0f} s:\n{child.tail()}"
            ) from None
        # interrupted meanwhile, it stays recorded: stop_all ends it
        self.forget(child)
        if child.popen.returncode != 0:
            raise BenchError(
                f"{name} exited with {child.popen.returncode}: {child.last_words()}\n{child.tail()}"
            )
        return out.decode()

    def run_json(
        self,
        name: str,
        argv: Sequence[str],
        *,
        timeout: float,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> dict[str, Any]:
        """Run a client to completion and parse the JSON object it prints last."""
        lines = self.run_text(name, argv, timeout=timeout, env=env, cwd=cwd).strip().splitlines()
        if not lines:
            raise BenchError(f"{name} printed nothing")
        report: dict[str, Any] = orjson.loads(lines[-1])
        return report

    def stop(self, child: Child, timeout: float = 10.0) -> None:
        """SIGTERM the child's process group, then SIGKILL what is left after ``timeout``."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.popen.wait(timeout=timeout)
        # the group may outlive its leader (a worker pool): make sure it is gone
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.popen.wait(timeout=5)
        if child.popen.stdout is not None:
            child.popen.stdout.close()
        self.forget(child)

    def forget(self, child: Child) -> None:
        """Stop tracking a child that has ended."""
        if child in self.children:
            self.children.remove(child)

    def stop_all(self) -> None:
        """Refuse new children, then stop every child still tracked, newest first."""
        with self._lock:
            self._closed = True
        for child in reversed(list(self.children)):
            self.stop(child, timeout=5)
        for log in self._logs:
            log.close()

    @contextlib.contextmanager
    def running(self, child: Child) -> Iterator[Child]:
        """Stop ``child`` when the block ends."""
        try:
            yield child
        finally:
            self.stop(child)


@contextlib.contextmanager
def work_directory(prefix: str, keep: bool = False) -> Iterator[Path]:
    """A fresh temporary directory for a run's files and logs, removed at the end unless kept.

    Stop signals wait while it is made and removed: it never outlives the run unseen.
    """
    path: Path | None = None
    try:
        with shutdown.held():
            path = Path(tempfile.mkdtemp(prefix=prefix))
        yield path
    finally:
        with shutdown.held():
            if path is not None and keep:
                print(f"work directory kept: {path}", file=sys.stderr)
            elif path is not None:
                shutil.rmtree(path, ignore_errors=True)


def wait_until(check: Any, what: str, timeout: float, interval: float = 0.05) -> Any:
    """Call ``check`` until it returns something truthy; BenchError after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
        except Exception as exc:  # not up yet
            last_error = exc
        else:
            if value:
                return value
        time.sleep(interval)
    raise BenchError(f"{what} not reached within {timeout:.0f} s (last error: {last_error})")


def flags(**options: Any) -> list[str]:
    """Command-line flags: ``agent_file=x`` → ``--agent-file x``; True is a bare flag."""
    argv = []
    for key, value in options.items():
        if value is None or value is False:
            continue
        argv.append("--" + key.replace("_", "-"))
        if value is not True:
            argv.append(str(value))
    return argv


def died(child: Child) -> str:
    """How a child that should still run ended: its exit status or the signal that killed it."""
    code = child.popen.returncode
    how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
    return f"{child.name} died ({how}): {child.last_words()}"


def check_alive(child: Child) -> bool:
    """True while ``child`` runs; BenchError with its log once it has exited."""
    if not child.alive():
        raise BenchError(f"{child.name} exited: {child.last_words()}\n{child.tail()}")
    return True
