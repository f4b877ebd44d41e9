"""The taskd command as scripts drive it: init, serve, call, schemas — real subprocesses."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest
from alembic.script import ScriptDirectory

from tests.helpers import ScriptedAgent, WsClient, postgres_database, scaled

ROOT = Path(__file__).resolve().parent.parent
TASKD = [sys.executable, "-m", "taskd"]
LISTENING = re.compile(rb"listening on (http://127\.0\.0\.1:\d+/)")
"""The line `taskd serve --port 0` logs with the URL of the port it got."""


def run(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the taskd command and capture its output."""
    return subprocess.run(
        [*TASKD, *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=scaled(60),
    )


def test_init_creates_config_schema_and_one_super_token(tmp_path: Path) -> None:
    """init writes a 0600 config and database and prints the super token once."""
    first = run("init", "--config", "conf/taskd.toml", "--json", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    data = json.loads(first.stdout)
    assert data["config"] == "conf/taskd.toml"
    assert str(uuid.UUID(data["server_uuid"])) == data["server_uuid"]
    key, secret = data["super_token"].split(":")
    assert len(key) == 16 and len(secret) == 32 and (key + secret).isalnum()
    for name in ("conf/taskd.toml", "conf/taskd.db"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name
    second = run("init", "--config", "conf/taskd.toml", "--json", cwd=tmp_path)
    assert second.returncode == 0
    again = json.loads(second.stdout)
    assert again["super_token"] is None and again["server_uuid"] == data["server_uuid"]
    plain = run("init", "--config", "conf/taskd.toml", cwd=tmp_path)
    assert "already exists" in plain.stdout
    assert secret not in (tmp_path / "conf/taskd.db").read_bytes().decode("latin-1")


def start_serve(
    *args: str,
    cwd: Path,
    env: dict[str, str] | None = None,
    log: str = "serve.log",
    port: int | None = None,
) -> tuple[subprocess.Popen[str], str]:
    """Start `taskd serve ARGS` and wait until it answers: on ``port`` if the settings name
    it, or else given --port 0, on the port it logs."""
    with (cwd / log).open("w") as output:
        process = subprocess.Popen(
            [*TASKD, "serve", *args, *(() if port else ("--port", "0"))],
            cwd=cwd,
            env={**os.environ, **(env or {})},
            stdout=output,
            stderr=subprocess.STDOUT,
            text=True,
        )
    url = f"http://127.0.0.1:{port}/" if port else None
    deadline = time.monotonic() + scaled(30)
    while True:
        if url is None and (found := LISTENING.search((cwd / log).read_bytes())):
            url = found[1].decode()
        try:
            if url is not None and httpx.get(url + "healthz", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"server did not start: {(cwd / log).read_text()}")
        time.sleep(0.1)


def stop(process: subprocess.Popen[str]) -> int:
    """SIGTERM a server and return its exit status."""
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=scaled(20))
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str, str]]:
    """A `taskd serve --port 0` process (on the port it logs) with its super token."""
    init = run("init", "--json", cwd=tmp_path)
    token = json.loads(init.stdout)["super_token"]
    process, url = start_serve(cwd=tmp_path)
    try:
        yield process, url, token
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_call_creates_queries_and_deletes(
    served: tuple[subprocess.Popen[str], str, str], tmp_path: Path
) -> None:
    """`taskd call` with TASKD_URL/TASKD_TOKEN drives the whole task life cycle."""
    _, url, token = served
    env = {"TASKD_URL": url, "TASKD_TOKEN": token}
    agent_uuid = str(uuid.uuid4())
    created = run(
        "call", "task_create_task", json.dumps([agent_uuid, "ip", 60000]), cwd=tmp_path, env=env
    )
    assert created.returncode == 0, created.stderr
    task_id = json.loads(created.stdout)["id"]
    query = json.dumps({"task_data_query": {"condition": [{"uuid": agent_uuid}]}})
    listed = run("call", "task_query_task", query, cwd=tmp_path, env=env)
    assert [r["task_id"] for r in json.loads(listed.stdout)] == [task_id]
    deleted = run(
        "call", "task_delete_task", json.dumps([[{"task_id": task_id}]]), cwd=tmp_path, env=env
    )
    assert json.loads(deleted.stdout) == {"success": True, "deleted": 1, "condition_count": 1}
    failed = run("call", "task_create_task", json.dumps([agent_uuid, "ip"]), cwd=tmp_path, env=env)
    assert failed.returncode == 1
    assert json.loads(failed.stderr)["code"] == 104
    denied = run(
        "call",
        "task_query_task",
        '[{"condition": []}]',
        "--token",
        "a:b",
        "--url",
        url,
        cwd=tmp_path,
    )
    assert denied.returncode == 1 and json.loads(denied.stderr)["code"] == 102
    hello = run("call", "server_hello", "--url", url, cwd=tmp_path)
    assert "taskd" in json.loads(hello.stdout)


def test_call_without_a_token_says_how_to_give_one(
    tmp_path: Path, held_ports: Callable[[], int]
) -> None:
    """`taskd call` of a method taking a token, given none, names --token and TASKD_TOKEN."""
    env = {"TASKD_URL": f"http://127.0.0.1:{held_ports()}/", "TASKD_TOKEN": ""}
    for method, *params in (
        ("task_query_task", '[{"condition": []}]'),
        ("crontab_get",),
        ("token_create", '{"token_creation": {}}'),
    ):
        refused = run("call", method, *params, cwd=tmp_path, env=env)
        assert refused.returncode == 2, refused.stderr
        assert refused.stderr == (
            f"{method} needs a token: pass --token KEY:SECRET or set TASKD_TOKEN\n"
        )
    # a token among named params is sent as given: here to a server that is not there
    named = '{"token": "a:b", "task_data_query": {"condition": []}}'
    sent = run("call", "task_query_task", named, cwd=tmp_path, env=env)
    assert sent.returncode == 3 and "cannot reach" in sent.stderr


def test_sigterm_closes_websockets_with_1001_and_exits_0(
    served: tuple[subprocess.Popen[str], str, str],
) -> None:
    """SIGTERM: open WebSockets are closed with 1001, the process exits 0."""
    process, url, token = served
    ws_url = url.replace("http://", "ws://")

    async def scenario() -> tuple[int | None, int | None]:
        async with ScriptedAgent(ws_url, token) as agent, WsClient(ws_url) as caller:
            assert (await caller.call("server_hello")).startswith("hello")
            process.send_signal(signal.SIGTERM)
            return await agent.closed(), await caller.closed()

    agent_code, caller_code = asyncio.run(scenario())
    assert (agent_code, caller_code) == (1001, 1001)
    assert process.wait(timeout=scaled(20)) == 0


def test_flags_override_environment_and_file(tmp_path: Path, held_ports: Callable[[], int]) -> None:
    """--port beats TASKD_PORT, which beats the file's listen setting."""
    run("init", cwd=tmp_path)
    port = held_ports()
    process = subprocess.Popen(
        [*TASKD, "serve", "--port", str(port)],
        cwd=tmp_path,
        env={**os.environ, "TASKD_PORT": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + scaled(30)
        while time.monotonic() < deadline:
            try:
                reply = httpx.post(
                    f"http://127.0.0.1:{port}/",
                    json={"jsonrpc": "2.0", "method": "server_hello", "id": 1},
                    timeout=1,
                )
                assert reply.json()["result"].startswith("hello")
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            pytest.fail("server did not listen on the --port given")
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=scaled(20)) == 0


def test_bad_config_is_a_clear_error(tmp_path: Path) -> None:
    """serve with a missing config file says how to create one."""
    result = run("serve", "--config", "missing.toml", cwd=tmp_path)
    assert result.returncode == 2
    assert "taskd init" in result.stderr


def test_checked_in_schemas_are_current() -> None:
    """`taskd schemas --check` passes: schemas/ matches the wire types and methods."""
    result = run("schemas", "--check", "--dir", str(ROOT / "schemas"), cwd=ROOT)
    assert result.returncode == 0, result.stderr
    document = json.loads((ROOT / "schemas" / "openrpc.json").read_text())
    assert "task_create_task" in {m["name"] for m in document["methods"]}


def test_demo_starts_server_and_agent_and_shows_a_round_trip(
    tmp_path: Path, held_ports: Callable[[], int]
) -> None:
    """`taskd demo` (what `make run` starts) runs a real agent and prints real results."""
    port = held_ports()
    result = run("demo", "--dir", "var", "--port", str(port), "--once", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "agent" in result.stdout and "online" in result.stdout
    uname = subprocess.run(["uname", "-a"], capture_output=True, text=True).stdout.strip()
    assert json.dumps(uname)[1:-1] in result.stdout
    assert '"tcp_ping"' in result.stdout and '{"tcp_ping": ' in result.stdout
    again = run("demo", "--dir", "var", "--port", str(port), "--once", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "super token" not in again.stdout, "a second run reuses the first run's setup"
    assert "online" in again.stdout


def test_server_outlives_the_reader_of_its_log(tmp_path: Path) -> None:
    """When whatever reads serve's output goes away, logging fails but the server runs on."""
    run("init", cwd=tmp_path)
    process = subprocess.Popen(
        [*TASKD, "serve", "--port", "0"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert process.stdout is not None
        for line in process.stdout:  # it has started writing its log
            if found := LISTENING.search(line):
                url = found[1].decode()
                break
        else:
            pytest.fail("serve logged no port")
        deadline = time.monotonic() + scaled(30)
        while True:
            try:
                httpx.get(url + "healthz", timeout=1)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.1)
        process.stdout.close()  # the log reader is gone
        for _ in range(5):  # each failed authentication writes a log line
            httpx.post(
                url, json={"jsonrpc": "2.0", "method": "agent_list", "params": ["a:b"], "id": 1}
            )
        time.sleep(0.3)
        assert process.poll() is None, f"serve died with status {process.returncode}"
        reply = httpx.post(
            url, json={"jsonrpc": "2.0", "method": "server_hello", "id": 1}, timeout=5
        )
        assert reply.json()["result"].startswith("hello")
    finally:
        process.kill()
        process.wait()


def test_stray_taskd_variables_are_ignored_and_a_misspelt_setting_is_named(
    tmp_path: Path, held_ports: Callable[[], int]
) -> None:
    """TASKD_* variables of other commands and tools leave init and serve working, a likely
    misspelling of a setting is named in a warning, and real settings still apply."""
    stray = {
        "TASKD_TEST_TIME_FACTOR": "2",
        "TASKD_AGENT_CONFIG": "/x",
        "TASKD_ENROLL_TOKEN": "a:b",
        "TASKD_REAPER_INTERVAL": "5",
    }
    init = run("init", "--json", cwd=tmp_path, env=stray)
    assert init.returncode == 0, init.stderr
    assert "TASKD_REAPER_INTERVAL_MS" in init.stderr
    port = held_ports()
    process, url = start_serve(cwd=tmp_path, env={**stray, "TASKD_PORT": str(port)}, port=port)
    try:
        reply = httpx.post(url, json={"jsonrpc": "2.0", "method": "server_hello", "id": 1})
        assert reply.json()["result"].startswith("hello")
    finally:
        assert stop(process) == 0
    log = (tmp_path / "serve.log").read_text()
    warning = next(line for line in log.splitlines() if "TASKD_REAPER_INTERVAL" in line)
    assert "WARNING" in warning and "did you mean TASKD_REAPER_INTERVAL_MS" in warning
    for name in ("TASKD_TEST_TIME_FACTOR", "TASKD_AGENT_CONFIG", "TASKD_ENROLL_TOKEN"):
        assert name not in log


async def test_init_and_serve_on_a_fresh_postgresql_database(tmp_path: Path) -> None:
    """`taskd init --database postgresql://…` puts the schema and super token there, and
    `taskd serve --host --port --database` serves from it (no SQLite file is made)."""
    async with postgres_database() as database_url:
        plain = database_url.replace("postgresql+asyncpg://", "postgresql://")
        init = run("init", "--config", "taskd.toml", "--database", plain, "--json", cwd=tmp_path)
        assert init.returncode == 0, init.stderr
        token = json.loads(init.stdout)["super_token"]
        database = await asyncpg.connect(plain)
        try:
            assert await database.fetchval("SELECT count(*) FROM token WHERE is_super") == 1
            head = ScriptDirectory(str(ROOT / "taskd" / "migrations")).get_current_head()
            assert await database.fetchval("SELECT version_num FROM alembic_version") == head
            process, url = await asyncio.to_thread(
                start_serve, "--host", "127.0.0.1", "--database", plain, cwd=tmp_path
            )
            try:
                agent_uuid = str(uuid.uuid4())
                body = {
                    "jsonrpc": "2.0",
                    "method": "task_create_task",
                    "params": [token, agent_uuid, "version", 60_000],
                    "id": 1,
                }
                async with httpx.AsyncClient(timeout=scaled(10)) as client:
                    created = (await client.post(url, json=body)).json()["result"]
            finally:
                assert stop(process) == 0
            stored = await database.fetchval("SELECT uuid FROM task WHERE id = $1", created["id"])
            assert stored == agent_uuid
        finally:
            await database.close()
    assert not (tmp_path / "taskd.db").exists()


async def test_serve_on_port_0_logs_the_port_it_got_and_is_reached_there(
    tmp_path: Path,
) -> None:
    """`taskd serve --port 0` listens on a free port, logs its URL, and records that URL as
    the node's address, where the other nodes of a cluster reach it."""
    async with postgres_database() as database_url:
        plain = database_url.replace("postgresql+asyncpg://", "postgresql://")
        init = run("init", "--database", plain, "--json", cwd=tmp_path)
        assert init.returncode == 0, init.stderr
        process, url = await asyncio.to_thread(start_serve, "--database", plain, cwd=tmp_path)
        try:
            assert not url.endswith(":0/") and not url.endswith(":2211/")
            database = await asyncpg.connect(plain)
            try:
                assert await database.fetchval("SELECT address FROM node") + "/" == url
            finally:
                await database.close()
        finally:
            assert stop(process) == 0


async def test_sigterm_during_uploads_loses_no_acknowledged_result(
    tmp_path: Path, database_url: str
) -> None:
    """SIGTERM while an agent uploads hundreds of results: every upload the server
    acknowledged is in the database when the next server process starts."""
    init = run("init", "--database", database_url, "--json", cwd=tmp_path)
    assert init.returncode == 0, init.stderr
    token = json.loads(init.stdout)["super_token"]
    args = ("--database", database_url)
    process, url = await asyncio.to_thread(start_serve, *args, cwd=tmp_path)
    ws_url = url.replace("http://", "ws://")
    count = 600
    async with ScriptedAgent(ws_url, token) as agent:
        async with WsClient(ws_url) as caller:
            await asyncio.gather(
                *(caller.call("task_create_task", token, agent.uuid, "ip") for _ in range(count))
            )
        tasks = [await agent.next_task() for _ in range(count)]
        uploads = [
            asyncio.create_task(agent.upload(task, {"ip": [f"10.0.{i // 256}.{i % 256}", None]}))
            for i, task in enumerate(tasks)
        ]
        await asyncio.wait(uploads, return_when=asyncio.FIRST_COMPLETED)
        process.send_signal(signal.SIGTERM)
        outcomes = await asyncio.gather(*uploads, return_exceptions=True)
    assert await asyncio.to_thread(process.wait, scaled(20)) == 0
    acknowledged = {
        task["task_id"]
        for task, outcome in zip(tasks, outcomes, strict=True)
        if isinstance(outcome, dict) and "result" in outcome
    }
    assert acknowledged, "no upload was acknowledged before the shutdown"
    process, url = await asyncio.to_thread(start_serve, *args, cwd=tmp_path, log="2.log")
    try:
        query = {"condition": [{"uuid": agent.uuid}, {"limit": count}]}
        body = {"jsonrpc": "2.0", "method": "task_query_task", "params": [token, query], "id": 1}
        async with httpx.AsyncClient(timeout=scaled(10)) as client:
            rows = (await client.post(url, json=body)).json()["result"]
    finally:
        assert stop(process) == 0
    answered = {row["task_id"] for row in rows if row["success"] is True}
    print(f"{len(acknowledged)} of {count} uploads acknowledged before the shutdown")
    assert acknowledged <= answered, sorted(acknowledged - answered)
