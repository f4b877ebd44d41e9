"""taskd under test, as child processes: servers, real agents, load agents, their databases.

The benchmarks and the fault suite start these the same way; each process is
a ``procs.Child`` of the run's ``Children``, so it is stopped with the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import httpx
import orjson

from benchmarks.procs import PYTHON, BenchError, Child, Children, died, flags, free_port, memory
from benchmarks.rpc import Rpc
from benchmarks.shutdown import completed

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN_DSN = (
    os.environ.get("TASKD_BENCH_PG")
    or os.environ.get("TASKD_TEST_PG")
    or "postgresql://postgres@127.0.0.1:5432/test"
)


def now_ms() -> int:
    """Wall-clock milliseconds, the clock taskd stamps its rows with."""
    return time.time_ns() // 1_000_000


# --------------------------------------------------------------------------- PostgreSQL


async def pg_admin(statement: str) -> None:
    """Run one statement on the PostgreSQL admin database."""
    try:
        admin = await asyncpg.connect(PG_ADMIN_DSN, timeout=10)
    except (OSError, asyncpg.PostgresError) as exc:
        raise BenchError(f"PostgreSQL not reachable at {PG_ADMIN_DSN}: {exc}") from None
    try:
        await admin.execute(statement)
    finally:
        await admin.close()


def database_url(name: str) -> str:
    """The URL of a database on the shared PostgreSQL."""
    return f"postgresql://postgres@127.0.0.1:5432/{name}"


async def create_database() -> str:
    """A fresh database on the shared PostgreSQL; its name."""
    name = f"taskd_bench_{uuid.uuid4().hex[:12]}"
    await pg_admin(f'CREATE DATABASE "{name}"')
    return name


async def drop_database(name: str) -> None:
    """Drop a database made by ``create_database``, even with connections left open."""
    await pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.asynccontextmanager
async def postgres_database() -> AsyncIterator[str]:
    """A fresh database on the shared PostgreSQL for one scenario (its URL); dropped afterwards."""
    name = await completed(create_database())
    try:
        yield database_url(name)
    finally:
        await completed(drop_database(name))


# --------------------------------------------------------------------------- taskd serve


class TaskdServer:
    """One ``taskd serve`` over its own config and database, restartable on the same port."""

    def __init__(
        self,
        children: Children,
        directory: Path,
        *,
        database_url: str | None = None,
        env: dict[str, str] | None = None,
        name: str = "taskd",
        token: str = "",
    ) -> None:
        self.children = children
        self.directory = directory
        self.database_url = database_url
        self.env = {"TASKD_LOG_LEVEL": "warning", **(env or {})}
        self.name = name
        self.token = token
        self.port = free_port()
        self._child: Child | None = None
        self.started_at = 0.0
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        """HTTP URL of the RPC endpoint."""
        return f"http://127.0.0.1:{self.port}/"

    @property
    def ws_url(self) -> str:
        """WebSocket URL of the RPC endpoint."""
        return f"ws://127.0.0.1:{self.port}/"

    @property
    def config(self) -> Path:
        """The config file ``taskd init`` wrote."""
        return self.directory / "taskd.toml"

    @property
    def db_file(self) -> Path | None:
        """The SQLite database file; None on PostgreSQL."""
        return self.directory / "taskd.db" if self.database_url is None else None

    @property
    def child(self) -> Child:
        """The running server process."""
        if self._child is None:
            raise BenchError(f"{self.name} was never started")
        return self._child

    def init(self) -> str:
        """``taskd init``: config, schema and the super token (kept as ``token``)."""
        argv = [PYTHON, "-m", "taskd", "init", "--config", str(self.config), "--json"]
        if self.database_url is not None:
            argv += ["--database", self.database_url]
        report = self.children.run_json(
            f"{self.name}-init", argv, timeout=120, env=self.env, cwd=self.directory
        )
        self.token = str(report["super_token"])
        return self.token

    def start(self) -> None:
        """Start ``taskd serve`` (again) on this server's port."""
        env = self.env | {"TASKD_PORT": str(self.port)}
        if self.database_url is not None:
            env["TASKD_DATABASE_URL"] = self.database_url
        self.started_at = time.monotonic()
        self._child = self.children.start(
            f"{self.name}-serve",
            [PYTHON, "-m", "taskd", "serve", "--config", str(self.config)],
            env=env,
            cwd=self.directory,
        )

    @property
    def pid(self) -> int:
        """The server's process id."""
        return self.child.pid

    def alive(self) -> bool:
        """Whether the server process runs."""
        return self._child is not None and self._child.alive()

    def kill(self) -> None:
        """SIGKILL the server: no shutdown, no flush, open sockets reset by the kernel."""
        child = self.child
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.popen.wait()
        self.children.forget(child)

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL)."""
        if self._child is not None:
            self.children.stop(self._child)

    def rss_mb(self) -> float | None:
        """The server's VmRSS in MiB."""
        return memory(self.pid).get("vmrss_mb") if self.alive() else None

    def log_tail(self, lines: int = 20) -> str:
        """The end of the server's log."""
        return self._child.tail(lines) if self._child is not None else ""

    async def wait_ready(self, within: float = 60.0) -> dict[str, float]:
        """Wait until /healthz and a JSON-RPC call answer; seconds from start to each."""
        hello = orjson.dumps({"jsonrpc": "2.0", "method": "server_hello", "id": 1})
        healthz: float | None = None
        deadline = self.started_at + within
        async with httpx.AsyncClient(base_url=self.url, timeout=2.0) as http:
            while True:
                if not self.alive():
                    raise BenchError(f"{died(self.child)} during start-up\n{self.log_tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    if healthz is None and (await http.get("/healthz")).status_code == 200:
                        healthz = time.monotonic() - self.started_at
                    if healthz is not None:
                        reply = (await http.post("/", content=hello)).json()
                        if "result" in reply:
                            rpc = time.monotonic() - self.started_at
                            return {"healthz_s": round(healthz, 3), "rpc_s": round(rpc, 3)}
                if time.monotonic() > deadline:
                    raise BenchError(f"{self.name} not ready in {within:.0f} s")
                await asyncio.sleep(0.01)

    async def launch(self) -> None:
        """``taskd init`` (in a thread), ``taskd serve``, and wait until it answers."""
        await asyncio.to_thread(self.init)
        self.start()
        await self.wait_ready()

    def rpc(self, timeout: float = 30.0, local_address: str | None = None) -> Rpc:
        """A super-token RPC client for this server."""
        return Rpc(self.url, self.token, timeout, local_address)

    def call(self, method: str, *params: Any) -> Any:
        """One super-token call from synchronous code (the benchmark driver)."""

        async def once() -> Any:
            async with self.rpc(timeout=60) as rpc:
                return await rpc.su(method, *params)

        return asyncio.run(once())

    async def agent_token(self, agent_uuid: str) -> str:
        """A new agent token for ``agent_uuid`` (listen, write its results), made by the server."""
        async with self.rpc() as rpc:
            created = await rpc.su("token_create", {"token_limit": agent_limits(agent_uuid)})
        return f"{created['key']}:{created['secret']}"

    def sql(self, query: str, *args: Any) -> list[tuple[Any, ...]]:
        """Read the SQLite database directly (WAL: a reader never blocks the server)."""
        if self.db_file is None:
            raise BenchError("direct reads need SQLite")
        db = sqlite3.connect(f"file:{self.db_file}?mode=ro", uri=True, timeout=30)
        try:
            return db.execute(query, args).fetchall()
        finally:
            db.close()

    async def task_rows(self) -> dict[int, dict[str, Any]]:
        """Every task row, read straight from the database (not through the server)."""
        query = (
            "SELECT id, uuid, state, success, error_message, task_event_result, timestamp FROM task"
        )
        if self.database_url is None:
            rows = await asyncio.to_thread(self.sql, query)
        else:
            dsn = self.database_url.replace("postgresql+asyncpg://", "postgresql://", 1)
            conn = await asyncpg.connect(dsn, timeout=10)
            try:
                rows = [tuple(r) for r in await conn.fetch(query)]
            finally:
                await conn.close()
        names = ("id", "uuid", "state", "success", "error_message", "result", "timestamp")
        found = {}
        for row in rows:
            record = dict(zip(names, row, strict=True))
            if isinstance(record["result"], str):
                record["result"] = orjson.loads(record["result"])
            if record["success"] is not None:
                record["success"] = bool(record["success"])
            found[int(record["id"])] = record
        return found


def agent_limits(agent_uuid: str) -> list[dict[str, Any]]:
    """The agent role: listen and write results on its own UUID."""
    return [
        {
            "scopes": [{"agent_uuid": agent_uuid}],
            "permissions": [{"task": "listen"}, {"task": {"write": "*"}}],
        }
    ]


# --------------------------------------------------------------------------- agents


class AgentProcess:
    """A real ``taskd agent`` (quick form) with its own state directory."""

    def __init__(
        self,
        children: Children,
        directory: Path,
        server_url: str,
        token: str,
        agent_uuid: str,
        allow: str,
        log_level: str = "info",
    ) -> None:
        self.children = children
        self.directory = directory
        self.agent_uuid = agent_uuid
        options = flags(
            server=server_url,
            token=token,
            uuid=agent_uuid,
            allow=allow,
            state_dir=directory,
            log_level=log_level,
        )
        self.argv = [PYTHON, "-m", "taskd", "agent", *options]
        self.child: Child | None = None

    def start(self) -> Child:
        """Start the agent process."""
        self.child = self.children.start(f"agent-{self.agent_uuid[:8]}", self.argv, cwd=ROOT)
        return self.child

    def stop(self) -> None:
        """SIGTERM the agent (it stops its links and exits)."""
        if self.child is not None:
            self.children.stop(self.child)

    @property
    def spool(self) -> Path:
        """The agent's on-disk result spools, one folder per server connection."""
        return self.directory / "taskd-agent" / self.agent_uuid / "spool"

    def spooled(self) -> tuple[int, int]:
        """(results waiting in the spool, results set aside as unreadable)."""
        if not self.spool.exists():
            return 0, 0
        return len(list(self.spool.glob("*/*.json"))), len(list(self.spool.glob("*/*.bad")))

    def log(self) -> str:
        """The agent's whole log."""
        if self.child is None:
            return ""
        with contextlib.suppress(OSError):
            return self.child.log.read_text(errors="replace")
        return ""


@dataclass
class LoadAgent:
    """One ``benchmarks.loadagent`` process and the subscriptions it holds."""

    child: Child
    count: int
    uuid_file: Path
    stats_file: Path | None

    def uuids(self) -> list[str]:
        """The agent UUIDs it subscribed."""
        return self.uuid_file.read_text().split()


def start_load_agents(
    children: Children,
    url: str,
    token: str,
    count: int,
    directory: Path,
    *,
    processes: int = 1,
    batch: bool = False,
    reconnect: bool = False,
    stats: bool = False,
    name: str = "loadagent",
) -> list[LoadAgent]:
    """``count`` subscriptions over ``processes`` load-agent processes; returns once all stand.

    ``reconnect``: each subscription reconnects with the real agent's backoff;
    ``stats``: a SIGUSR1 makes the process write its connection stats.
    """
    shares = [count // processes + (i < count % processes) for i in range(processes)]
    started = []
    for share in shares:
        tag = uuid.uuid4().hex[:8]
        uuid_file = directory / f"agents-{tag}.txt"
        stats_file = directory / f"loadagent-{tag}.json" if stats else None
        options = flags(
            url=url,
            token=token,
            count=share,
            uuid_file=uuid_file,
            batch=batch,
            reconnect=reconnect,
            stats=stats_file,
        )
        argv = [PYTHON, "-m", "benchmarks.loadagent", *options]
        child = children.start(name, argv, pipe_stdout=True, cwd=ROOT)
        started.append(LoadAgent(child, share, uuid_file, stats_file))
    for agent in started:
        line = agent.child.wait_line("ready", timeout=120 + agent.count / 20)
        if line.split()[1:] != [str(agent.count)]:
            raise BenchError(f"{agent.child.name}: {line!r}, wanted {agent.count} subscriptions")
    return started
