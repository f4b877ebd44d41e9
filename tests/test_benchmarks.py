"""Benchmarks: the harness's pieces, and a quick run that must report every scenario.

Nothing here asserts a timing target: these tests prove the harness measures
and reports, so CI never fails on timing noise.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import math
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

from benchmarks import seed, wsclient
from benchmarks.harness import parse_wrk
from benchmarks.loadagent import RESULTS
from tests.helpers import make_settings, running_server, scaled, tmp_sqlite_url

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
HELLO = {"jsonrpc": "2.0", "method": "server_hello", "id": 7}
QUICK = ("--quick", "--no-readme", "--http-load", "httpload")
QUICK_P4 = (*QUICK, "--only", "P4")
ROW_IDS = {
    "P1",
    "P1-ws",
    "P2",
    "P2-batch",
    "P2-pg",
    "P2-pg-batch",
    "P2-2n",
    "P3",
    "P3-agent",
    "P4-rss",
    "P4-fire",
    "P5",
    "P6-idle",
    "P6-load",
}


def _module(name: str, *args: str) -> list[str]:
    """The command line running a module with this interpreter."""
    return [PYTHON, "-m", name, *args]


def _stop(process: subprocess.Popen[Any]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=scaled(10))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def floor_url(tmp_path: Path, held_ports: Callable[[], int]) -> Iterator[str]:
    """The echo floor running in its own process."""
    port = held_ports()
    log = tmp_path / "floor.log"
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            [PYTHON, "-m", "benchmarks.floor", "--port", str(port)], cwd=ROOT, stderr=stderr
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + scaled(30)
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.post(url, json=HELLO, timeout=2).status_code == 200:
                    break
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the floor did not come up"
            time.sleep(0.05)
        yield url
    finally:
        _stop(process)


def test_floor_echoes_json_over_http_and_websocket(floor_url: str) -> None:
    """The floor answers a POST with the same JSON, and echoes each WebSocket message."""
    reply = httpx.post(floor_url, content=json.dumps(HELLO), timeout=5)
    assert reply.status_code == 200
    assert reply.headers["content-type"] == "application/json"
    assert reply.json() == HELLO
    with ws_connect(floor_url.replace("http://", "ws://"), proxy=None) as ws:
        for i in range(3):
            ws.send(json.dumps(HELLO | {"id": i}))
            assert json.loads(ws.recv(timeout=scaled(5))) == HELLO | {"id": i}


def test_httpload_counts_keep_alive_responses(floor_url: str) -> None:
    """httpload spreads connections over processes and reports requests, rate and latency."""
    argv = ["--url", floor_url, "--body", json.dumps(HELLO), "--connections", "5"]
    argv += ["--processes", "2", "--duration", "0.5", "--warmup", "0.2"]
    out = subprocess.run(
        _module("benchmarks.httpload", *argv),
        cwd=ROOT,
        capture_output=True,
        check=True,
        timeout=scaled(60),
    ).stdout
    report = json.loads(out)
    assert report["generator"] == "httpload"
    assert report["processes"] == 2 and report["connections"] == 5
    assert report["errors"] == 0
    assert report["requests"] > 0
    assert report["requests_per_s"] > 0
    assert 0 < report["p50_ms"] <= report["p99_ms"]


def test_parse_wrk_reads_rate_latency_and_errors() -> None:
    """parse_wrk reads the rate, the request count, the latency percentiles and non-2xx replies."""
    text = """Running 2s test @ http://127.0.0.1:1234/
  2 threads and 32 connections
  Latency Distribution
     50%  850.00us
     75%    1.20ms
     90%    2.00ms
     99%    1.05s
  24111 requests in 2.01s, 3.98MB read
  Non-2xx or 3xx responses: 3
Requests/sec:  12000.72
Transfer/sec:      1.98MB
"""
    report = parse_wrk(text, 32)
    assert report["requests"] == 24111
    assert report["seconds"] == pytest.approx(2.01)
    assert report["requests_per_s"] == pytest.approx(12000.72)
    assert report["p50_ms"] == pytest.approx(0.85)
    assert report["p99_ms"] == pytest.approx(1050)
    assert report["errors"] == 3


async def test_load_agent_answers_every_task_type(tmp_path: Path) -> None:
    """A load agent subscribes and answers each of the 12 task types with a result of its type."""
    uuid_file = tmp_path / "agents.txt"
    async with running_server(make_settings(tmp_sqlite_url(tmp_path))) as server:
        agent = await asyncio.create_subprocess_exec(
            *[PYTHON, "-m", "benchmarks.loadagent", "--url", server.ws_url],
            *["--token", server.super_token, "--count", "1", "--uuid-file", str(uuid_file)],
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            assert agent.stdout is not None
            line = await asyncio.wait_for(agent.stdout.readline(), scaled(30))
            assert line.decode().split() == ["ready", "1"]
            agent_uuid = uuid_file.read_text().split()[0]
            for kind, task in seed.TASKS.items():
                result = await server.su("task_create_task_blocking", agent_uuid, task, 5000)
                assert result["success"] is True, (kind, result)
                assert result["task_event_result"] == RESULTS[kind], kind
        finally:
            agent.terminate()
            await agent.wait()


def test_seed_fills_the_schema_taskd_init_made(tmp_path: Path) -> None:
    """seed fills the init-made table with done tasks, equal per (agent, type), indexes rebuilt."""
    subprocess.run(
        [PYTHON, "-m", "taskd", "init", "--config", str(tmp_path / "taskd.toml"), "--json"],
        cwd=tmp_path,
        capture_output=True,
        check=True,
        timeout=scaled(60),
    )
    db_file = tmp_path / "taskd.db"

    def indexes() -> set[str]:
        with contextlib.closing(sqlite3.connect(db_file)) as db:
            rows = db.execute("SELECT name FROM sqlite_master WHERE tbl_name = 'task'").fetchall()
        return {row[0] for row in rows if row[0] != "task"}

    before = indexes()
    report = seed.seed(db_file, 4800, 4)
    assert report["rows"] == 4800 and report["rows_per_agent_and_type"] == 100
    assert indexes() == before
    with contextlib.closing(sqlite3.connect(db_file)) as db:
        pairs = db.execute("SELECT count(*) FROM task GROUP BY uuid, type").fetchall()
        open_rows = db.execute("SELECT count(*) FROM task WHERE timestamp IS NULL").fetchone()
        mode = db.execute("PRAGMA journal_mode").fetchone()
    assert sorted({n for (n,) in pairs}) == [100] and len(pairs) == 4 * 12
    assert open_rows == (0,)
    assert mode == ("wal",)


RUN_MARK = "TASKD_BENCH_TEST_RUN"
"""Set in a driver's environment by a test: every process of that run inherits it."""


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _marked(mark: str) -> list[int]:
    """Live processes whose environment carries ``mark``: the processes of one test's run."""
    needle = f"{RUN_MARK}={mark}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0") and _running(int(entry)):
            found.append(int(entry))
    return found


def _as_typed_at_a_terminal() -> None:
    # drivers (and make) keep a stop signal that was ignored at start ignored, as
    # they should under nohup; the run here stands for one typed at a terminal,
    # even when the tests themselves run under `nohup make test &`
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


STOPS = [
    # driver, signal, children running when it arrives (1: while the scenario starts them)
    pytest.param("bench", signal.SIGINT, 3, id="bench-SIGINT"),
    pytest.param("bench", signal.SIGTERM, 1, id="bench-SIGTERM-starting"),
    pytest.param("bench", signal.SIGHUP, 3, id="bench-SIGHUP"),
    pytest.param("faults", signal.SIGTERM, 3, id="faults-SIGTERM"),
    pytest.param("faults", signal.SIGHUP, 1, id="faults-SIGHUP-starting"),
    pytest.param("make", signal.SIGTERM, 3, id="make-faults-SIGTERM"),
    pytest.param("make", signal.SIGHUP, 3, id="make-faults-SIGHUP"),
]


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("driver", "stop", "running"), STOPS)
def test_a_stopped_run_leaves_no_process_behind(
    tmp_path: Path, driver: str, stop: signal.Signals, running: int
) -> None:
    """Ctrl-C, SIGTERM or SIGHUP to a driver (or to make running it) kills and reaps every
    process of the run, removes its work directory and writes no results."""
    if driver == "make" and shutil.which("make") is None:
        pytest.skip("make is not installed")
    results, temp = tmp_path / "results", tmp_path / "tmp"
    temp.mkdir()
    bench = _module("benchmarks.run", "--results-dir", str(results), *QUICK_P4)
    faults = _module("benchmarks.faults", "--quick", "--only", "R3", "--results-dir", str(results))
    argv = bench if driver == "bench" else faults
    if driver == "make":
        # a plain command, as in the Makefile: make runs it without a shell in between
        (tmp_path / "Makefile").write_text("faults:\n\t" + " ".join(faults) + "\n")
        argv = ["make", "--no-print-directory", "-f", str(tmp_path / "Makefile"), "faults"]
    mark = uuid.uuid4().hex
    log = tmp_path / "driver.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=os.environ | {RUN_MARK: mark, "TMPDIR": str(temp)},
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_as_typed_at_a_terminal,
        )
    try:
        deadline = time.monotonic() + scaled(90)
        while len([pid for pid in _marked(mark) if pid != process.pid]) < running:
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"the run did not start\n{log.read_text()}"
            time.sleep(0.02)
        process.send_signal(stop)
        status = process.wait(timeout=scaled(120))
        # the driver exits as a shell reports a process ended by the signal; make dies of it
        assert status == (-stop if driver == "make" else 128 + stop), log.read_text()
        # the driver reaped its children; processes they forked may take a moment to vanish
        deadline = time.monotonic() + scaled(10)
        while _marked(mark) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = {pid: Path(f"/proc/{pid}/cmdline").read_bytes() for pid in _marked(mark)}
        assert not left, f"left running: {left}\n{log.read_text()}"
    finally:
        _stop(process)
        for pid in _marked(mark):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert f"interrupted ({stop.name})" in log.read_text()
    assert not list(temp.iterdir()), "the work directory was left behind"
    assert not list(results.glob("*.json")), "an interrupted run wrote results"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One quick run of every scenario with the in-repo HTTP load generator."""
    results = tmp_path_factory.mktemp("bench")
    done = subprocess.run(
        _module("benchmarks.run", "--results-dir", str(results), *QUICK),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=scaled(600),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    document: dict[str, Any] = json.loads((results / "quick.json").read_text())
    document["table"] = (results / "quick.md").read_text()
    document["stdout"] = done.stdout
    return document


def _finite_numbers(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite_numbers(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite_numbers(v) for v in value)
    return True


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quick_run_reports_every_scenario(quick_run: dict[str, Any]) -> None:
    """A quick run measures P1 to P6: every row has a figure, a target and a verdict, no errors."""
    rows = quick_run["rows"]
    assert {row["id"] for row in rows} >= ROW_IDS
    for row in rows:
        assert row["error"] is None, row
        assert row["figure"] and row["scenario"] and row["target"], row
        assert row["result"] in ("PASS", "FAIL", "info"), row
        assert _finite_numbers(row["values"]), row
        if row["id"] in ("P1", "P4-rss", "P4-fire", "P5", "P6-idle", "P6-load"):
            assert row["result"] in ("PASS", "FAIL"), row
    agents = [row for row in rows if row["id"] == "P3-agent"]
    assert {row["values"]["task"] for row in agents} == {"version", "execute true"}
    assert quick_run["mode"] == "quick"
    assert quick_run["http_load_generator"] == "httpload"
    machine = quick_run["machine"]
    assert machine["cpu_count"] and machine["cpu_model"] and machine["kernel"]
    assert len(machine["git_commit"]) == 40
    assert machine["packages"]["taskd"] and machine["packages"]["uvicorn"]
    assert len(quick_run["load_average"]["start"]) == 3
    data = quick_run["data"]
    assert data["P4"]["tasks"] == data["P4"]["succeeded"] == quick_run["scale"]["p4_agents"]
    assert data["P5"]["seed"]["rows"] == quick_run["scale"]["p5_rows"]
    assert data["P2"]["P2"]["server_memory"]["vmrss_mb"] > 0
    table = quick_run["table"]
    assert "| id | scenario | figure | comparison | target | result |" in table
    assert all(f"| {row['id']} |" in table for row in rows)
    assert table in quick_run["stdout"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quick_run_compares_with_celery(quick_run: dict[str, Any]) -> None:
    """With Celery installed, a quick run measures it and compares P2 and P3 against it."""
    if importlib.util.find_spec("celery") is None:
        pytest.skip("celery is not installed (pip install -e '.[bench]' or '.[test]')")
    rows = {row["id"]: row for row in quick_run["rows"]}
    assert rows["C-tput"]["values"]["tasks_per_s"] > 0
    assert rows["C-lat"]["values"]["p50_ms"] > 0
    assert rows["P2"]["values"]["times_celery"] > 0
    assert rows["P3"]["values"]["times_celery"] > 0
    assert "Celery" in rows["P2"]["comparison"] and "Celery" in rows["P3"]["comparison"]


def test_unknown_scenario_is_refused(tmp_path: Path) -> None:
    """--only with an unknown scenario id fails at once, before starting anything."""
    done = subprocess.run(
        [PYTHON, "-m", "benchmarks.run", "--only", "P1,P99", "--results-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=scaled(60),
    )
    assert done.returncode == 2
    assert "unknown scenario" in done.stderr


async def test_the_load_agents_client_reports_a_closed_connection(tmp_path: Path) -> None:
    """The load agents' WebSocket client answers a JSON-RPC call, and when the server closes
    the connection (1001 at shutdown, both close frames exchanged) it raises
    ConnectionClosed for the load agent to handle, not an error of its own."""
    settings = make_settings(tmp_sqlite_url(tmp_path))
    async with running_server(settings) as server, wsclient.connect(server.ws_url) as ws:
        await ws.send(json.dumps(HELLO))
        assert json.loads(await ws.recv())["id"] == 7
        await server.app.state.connections.close_all(1001)
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), scaled(5))
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
