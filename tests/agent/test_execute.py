"""execute with real subprocesses: output format, exit codes, timeouts, truncation, huge output."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
import time
import tracemalloc
from pathlib import Path

import pytest

from taskd.agent.tasks import TaskContext, TaskFailed, runner_for
from taskd.agent.tasks.execute import KILL_GRACE_S, run, timeout_s
from taskd.config import load_agent_settings
from taskd.protocol import Execute, ExecuteSpec, parse_task_event_type
from tests.agent.test_cli_agent import nohup_agent, status_signals
from tests.helpers import make_settings, running_server, scaled, tmp_sqlite_url

MARKER = re.compile(r"\n\.\.\. \[(\d+) characters truncated\] \.\.\.\n")
SEPARATOR = "\n--- STDERR ---\n"


def _context(tmp_path: Path, max_character: int = 10_000, timeout_ms: int = 60_000) -> TaskContext:
    """A context from a real agent config file with the given exec limits."""
    path = tmp_path / "agent.toml"
    path.write_text(
        f"exec_max_character = {max_character}\n"
        f"exec_timeout_ms = {timeout_ms}\n"
        '[[server]]\nws_url = "ws://127.0.0.1:1/"\ntoken = "t"\n'
    )
    settings = load_agent_settings(path)
    return TaskContext(settings=settings, server=settings.servers[0], task_id=1, task_token="x")


def _task(cmd: str, *args: str) -> Execute:
    return Execute(execute=ExecuteSpec(cmd=cmd, args=list(args)))


async def _execute(ctx: TaskContext, cmd: str, *args: str) -> str:
    return (await run(_task(cmd, *args), ctx)).execute


def _python(code: str) -> tuple[str, ...]:
    return (sys.executable, "-c", code)


def _gone(pid: int) -> bool:
    """Whether a process has ended (absent, or a zombie nobody reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat[stat.rindex(")") + 2] in ("Z", "X")


def _read_pids(pidfile: Path) -> list[int]:
    try:
        return [int(line) for line in pidfile.read_text().split()]
    except FileNotFoundError:
        return []


async def _pids(pidfile: Path, count: int) -> list[int]:
    """Wait until the shell has written ``count`` pids to ``pidfile``."""
    for _ in range(int(scaled(5) / 0.02)):
        pids = _read_pids(pidfile)
        if len(pids) >= count:
            return pids
        await asyncio.sleep(0.02)
    raise AssertionError(f"{pidfile} never held {count} pids")


def _check_truncated(output: str, full: str, limit: int) -> None:
    """Assert that ``output`` is ``full`` cut to ``limit`` characters around the marker."""
    match = MARKER.search(output)
    assert match is not None, output[:200]
    head, tail = output[: match.start()], output[match.end() :]
    assert len(output) <= limit
    assert full.startswith(head)
    assert full.endswith(tail)
    assert len(head) + int(match[1]) + len(tail) == len(full)
    assert abs(len(head) - len(tail)) <= 1


def test_interface_finds_runner_and_limit(tmp_path: Path) -> None:
    """The client finds this runner; its hard limit outlasts the exec timeout and the kill grace."""
    ctx = _context(tmp_path, timeout_ms=7000)
    runner, limit = runner_for("execute", ctx.settings)
    assert runner is run
    assert limit == timeout_s(ctx.settings)
    assert limit is not None and limit > 7 + KILL_GRACE_S


async def test_parsed_wire_task_runs(tmp_path: Path) -> None:
    """A task parsed from its wire JSON runs the named program with its arguments."""
    task = parse_task_event_type({"execute": {"cmd": "echo", "args": ["-n", "hi"]}})
    assert isinstance(task, Execute)
    assert (await run(task, _context(tmp_path))).execute == "hi"


async def test_stdout_only(tmp_path: Path) -> None:
    """Only stdout: the output is stdout alone, without a separator."""
    assert await _execute(_context(tmp_path), "printf", "out\nput") == "out\nput"


async def test_stderr_only(tmp_path: Path) -> None:
    """Only stderr: the output is stderr alone, without a separator."""
    output = await _execute(_context(tmp_path), "sh", "-c", "printf err >&2")
    assert output == "err"


async def test_stdout_and_stderr(tmp_path: Path) -> None:
    """Both streams: stdout, the separator, then stderr, whatever order they were written in."""
    output = await _execute(_context(tmp_path), "sh", "-c", "printf err >&2; printf out")
    assert output == "out\n--- STDERR ---\nerr"


async def test_no_output(tmp_path: Path) -> None:
    """A silent successful program reports "(No Output)"."""
    assert await _execute(_context(tmp_path), "true") == "(No Output)"


async def test_stdin_is_dev_null(tmp_path: Path) -> None:
    """A program reading stdin gets end-of-file at once instead of waiting for input."""
    assert await _execute(_context(tmp_path, timeout_ms=int(scaled(10_000))), "cat") == (
        "(No Output)"
    )


async def test_nonzero_exit_is_reported_in_the_output(tmp_path: Path) -> None:
    """Exit code 3 appends the exit suffix to the output and still returns a result."""
    ctx = _context(tmp_path)
    output = await _execute(ctx, "sh", "-c", "printf out; printf err >&2; exit 3")
    assert output == "out\n--- STDERR ---\nerr\n\n[Process exited with code 3]"
    assert (
        await _execute(ctx, "sh", "-c", "exit 3") == "(No Output)\n\n[Process exited with code 3]"
    )


async def test_killed_by_signal_reports_negative_code(tmp_path: Path) -> None:
    """A program killed by SIGKILL reports exit code -9."""
    output = await _execute(_context(tmp_path), "sh", "-c", "printf bye; kill -9 $$")
    assert output == "bye\n\n[Process exited with code -9]"


async def test_arguments_arrive_verbatim(tmp_path: Path) -> None:
    """Arguments with spaces, quotes and shell syntax each arrive as one untouched argv item."""
    args = ["a b", 'it\'s "quoted"', "$HOME", "*", "", "; rm -rf /", "\\n", "ünï"]
    code = "import json, sys; print(json.dumps(sys.argv[1:]), end='')"
    output = await _execute(_context(tmp_path), *_python(code), *args)
    assert json.loads(output) == args


async def test_invalid_utf8_is_replaced(tmp_path: Path) -> None:
    """Bytes that are not UTF-8 become U+FFFD while valid multi-byte characters survive."""
    code = "import sys; sys.stdout.buffer.write(b'caf\\xc3\\xa9 \\xff\\xfe end')"
    output = await _execute(_context(tmp_path), *_python(code))
    assert output == "café \ufffd\ufffd end"


async def test_command_not_found(tmp_path: Path) -> None:
    """A program that does not exist fails with the operating system's reason."""
    with pytest.raises(TaskFailed, match="No such file or directory"):
        await _execute(_context(tmp_path), "taskd-test-no-such-program")


async def test_permission_denied(tmp_path: Path) -> None:
    """A file without execute permission fails with the operating system's reason."""
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o644)
    with pytest.raises(TaskFailed, match="Permission denied"):
        await _execute(_context(tmp_path), str(script))


async def test_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    """On timeout the shell and both of its background children are terminated."""
    pidfile = tmp_path / "pids"
    timeout_ms = int(scaled(1000))
    ctx = _context(tmp_path, timeout_ms=timeout_ms)
    script = (
        f"echo $$ > {pidfile}; sleep 100 & echo $! >> {pidfile}; "
        f"sleep 100 & echo $! >> {pidfile}; wait"
    )
    started = time.monotonic()
    with pytest.raises(TaskFailed) as failure:
        await _execute(ctx, "sh", "-c", script)
    elapsed = time.monotonic() - started
    assert str(failure.value) == f"timed out after {timeout_ms} ms; process group killed"
    pids = await _pids(pidfile, 3)
    assert all(_gone(pid) for pid in pids), pids
    # SIGTERM was enough: no wait for the SIGKILL grace period
    assert elapsed < timeout_ms / 1000 + KILL_GRACE_S


async def test_sigterm_ignored_means_sigkill_after_grace(tmp_path: Path) -> None:
    """A group that ignores SIGTERM is SIGKILLed about two seconds after it."""
    pidfile = tmp_path / "pids"
    timeout_ms = int(scaled(500))
    ctx = _context(tmp_path, timeout_ms=timeout_ms)
    script = f'trap "" TERM; echo $$ > {pidfile}; sleep 100 & echo $! >> {pidfile}; wait'
    started = time.monotonic()
    with pytest.raises(TaskFailed, match="timed out"):
        await _execute(ctx, "sh", "-c", script)
    elapsed = time.monotonic() - started
    pids = await _pids(pidfile, 2)
    assert all(_gone(pid) for pid in pids), pids
    assert timeout_ms / 1000 + KILL_GRACE_S - 0.1 <= elapsed
    assert elapsed < timeout_ms / 1000 + KILL_GRACE_S + scaled(1.5)


async def test_an_agent_started_under_nohup_runs_commands_with_default_signals(
    tmp_path: Path,
) -> None:
    """An agent started ignoring SIGHUP, SIGINT and SIGQUIT runs commands that ignore none."""
    async with (
        running_server(make_settings(tmp_sqlite_url(tmp_path))) as server,
        nohup_agent(server, tmp_path, "execute") as agent_uuid,
    ):
        task = {"execute": {"cmd": "cat", "args": ["/proc/self/status"]}}
        result = await server.su("task_create_task_blocking", agent_uuid, task, 10_000)
    assert result["success"] is True, result
    status = result["task_event_result"]["execute"]
    # the C library reserves a few real-time signals for itself (no program can set them,
    # so they keep whatever the environment gave): every other signal must be default
    settable = {int(signum) for signum in signal.valid_signals()}
    assert status_signals(status, "SigIgn") & settable == set()
    assert status_signals(status, "SigBlk") & settable == set()


async def test_cancellation_kills_the_process_group(tmp_path: Path) -> None:
    """Cancelling the runner (the client's hard limit) kills the program and its children."""
    pidfile = tmp_path / "pids"
    script = f'trap "" TERM; echo $$ > {pidfile}; sleep 100 & echo $! >> {pidfile}; wait'
    runner = asyncio.create_task(_execute(_context(tmp_path), "sh", "-c", script))
    pids = await _pids(pidfile, 2)
    started = time.monotonic()
    runner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await runner
    assert time.monotonic() - started < scaled(1)
    assert all(_gone(pid) for pid in pids), pids


async def test_exact_limit_is_not_truncated(tmp_path: Path) -> None:
    """Output of exactly exec_max_character characters comes back whole."""
    ctx = _context(tmp_path, max_character=100)
    output = await _execute(ctx, *_python("print('x' * 100, end='')"))
    assert output == "x" * 100


@pytest.mark.parametrize("size", [101, 150, 199, 200, 201, 250, 1000, 5000])
async def test_truncation_keeps_head_and_tail(tmp_path: Path, size: int) -> None:
    """Longer output keeps its first and last halves around a marker counting what was left out."""
    limit = 100
    full = "".join(f"{i:04d}," for i in range(size))[:size]
    code = f"import sys; sys.stdout.write({full!r})"
    output = await _execute(_context(tmp_path, max_character=limit), *_python(code))
    _check_truncated(output, full, limit)
    # the count is sized for what it counts, so no room is wasted
    assert len(output) == limit


async def test_truncation_spans_both_streams_and_exit_code(tmp_path: Path) -> None:
    """Both streams long and a failing exit: the head is stdout, the tail ends with the code."""
    limit = 1000
    out = "".join(f"out{i:06d}\n" for i in range(3000))
    err = "".join(f"err{i:06d}\n" for i in range(3000))
    code = f"import sys; sys.stdout.write({out!r}); sys.stderr.write({err!r}); sys.exit(5)"
    output = await _execute(_context(tmp_path, max_character=limit), *_python(code))
    full = out + SEPARATOR + err + "\n\n[Process exited with code 5]"
    _check_truncated(output, full, limit)
    assert output.startswith("out000000\nout000001\n")
    assert output.endswith("err002999\n\n\n[Process exited with code 5]")


async def test_tiny_limit_cuts_without_marker(tmp_path: Path) -> None:
    """A limit too small for the marker simply cuts the output to the limit."""
    ctx = _context(tmp_path, max_character=5)
    assert await _execute(ctx, "printf", "abcdefghij") == "abcde"


async def test_huge_output_completes_in_bounded_memory(tmp_path: Path) -> None:
    """50 MB on stdout after 1 MB on stderr completes with exact counts in little memory."""
    limit = 10_000
    ctx = _context(tmp_path, max_character=limit, timeout_ms=int(scaled(60_000)))
    out_size, err_size = 50_000_000, 990_000
    # stderr first: a reader that drained stdout to the end before stderr would deadlock here
    script = f"yes 0123456789 | head -c {err_size} >&2; yes abcdefghi | head -c {out_size}"
    tracemalloc.start()
    try:
        started = time.monotonic()
        output = await _execute(ctx, "sh", "-c", script)
        elapsed = time.monotonic() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    match = MARKER.search(output)
    assert match is not None
    head, tail = output[: match.start()], output[match.end() :]
    assert len(head) + int(match[1]) + len(tail) == out_size + len(SEPARATOR) + err_size
    assert head.startswith("abcdefghi\nabcdefghi\n")
    assert tail.endswith("0123456789\n" * 3)
    assert len(output) <= limit
    assert peak < 4_000_000, f"peak traced memory {peak} bytes"
    print(f"50 MB + 1 MB executed in {elapsed:.2f} s, peak traced memory {peak / 1e6:.2f} MB")
