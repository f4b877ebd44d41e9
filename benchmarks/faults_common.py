"""What every fault scenario stands on: its scale and outcome, taskd processes, RPC, the database.

A scenario returns an ``Outcome``: the load it ran, the faults it injected, and
one ``Check`` per property it verified. Invariants (nothing lost, nothing let
in) decide a scenario everywhere; timing targets decide it only in a full run,
so the short CI version never fails on timing noise.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import sqlite3
import subprocess
import time
import traceback
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import httpx
import orjson

from benchmarks.procs import PYTHON, Child, Children, free_port, memory

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN_DSN = os.environ.get("TASKD_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
DONE_STATES = (2, 3)
"""TaskState.DONE (the agent's result) and FAILED_BY_SERVER (reaped or expired)."""


@dataclass(frozen=True)
class Scale:
    """How much of each scenario a run does."""

    name: str
    enforce_targets: bool
    r1_tasks: int
    r1_agents: int
    r1_kills: int
    r1_window: int
    r1_deadline_ms: int
    r1_databases: tuple[str, ...]
    r2_variants: tuple[str, ...]
    r3_agents: int
    r3_processes: int
    r4_inputs: int
    r4_databases: tuple[str, ...]
    r4_slow_clients: int
    r4_slow_readers: int
    r6_outage_s: float
    r6_agents: int


FULL = Scale(
    name="full",
    enforce_targets=True,
    r1_tasks=20_000,
    r1_agents=4,
    r1_kills=2,
    r1_window=400,
    r1_deadline_ms=20_000,
    r1_databases=("sqlite", "postgresql"),
    r2_variants=("cut-mid-task", "reply-lost", "blackhole"),
    r3_agents=10_000,
    r3_processes=4,
    r4_inputs=100_000,
    r4_databases=("sqlite", "postgresql"),
    r4_slow_clients=1_000,
    r4_slow_readers=4,
    r6_outage_s=8.0,
    r6_agents=20,
)
CI = Scale(
    name="ci",
    enforce_targets=False,
    r1_tasks=500,
    r1_agents=2,
    r1_kills=1,
    r1_window=100,
    r1_deadline_ms=8_000,
    r1_databases=("sqlite",),
    r2_variants=("cut-mid-task", "reply-lost"),
    r3_agents=200,
    r3_processes=2,
    r4_inputs=3_000,
    r4_databases=("sqlite", "postgresql"),
    r4_slow_clients=50,
    r4_slow_readers=1,
    r6_outage_s=3.0,
    r6_agents=4,
)


@dataclass
class Check:
    """One property a scenario verified."""

    name: str
    passed: bool
    detail: str = ""
    target: bool = False
    """A timing target (decides full runs only) rather than an invariant."""


@dataclass
class Outcome:
    """What one scenario ran, injected, checked and measured."""

    scenario: str
    title: str
    enforce_targets: bool = True
    load: str = ""
    faults: str = ""
    checks: list[Check] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def check(self, name: str, passed: bool, detail: str = "", *, target: bool = False) -> bool:
        """Record a check; returns whether it passed."""
        self.checks.append(Check(name, bool(passed), detail, target))
        return bool(passed)

    @property
    def broken(self) -> list[Check]:
        """Invariants that did not hold."""
        return [c for c in self.checks if not c.passed and not c.target]

    @property
    def missed(self) -> list[Check]:
        """Timing targets that were not met."""
        return [c for c in self.checks if not c.passed and c.target]

    @property
    def passed(self) -> bool:
        """No error, every invariant held, and (in a full run) every target was met."""
        if self.error is not None or self.broken or not self.checks:
            return False
        return not (self.enforce_targets and self.missed)

    def explain(self) -> str:
        """The error and every failed check, one a line (for assertion messages)."""
        lines = [f"error: {self.error}"] if self.error else []
        lines += [f"{c.name}: {c.detail}" for c in self.broken + self.missed]
        return "\n".join(lines) or "ok"

    def to_json(self) -> dict[str, Any]:
        """The outcome as a JSON-able object."""
        data = asdict(self)
        data["passed"] = self.passed
        return data


# --------------------------------------------------------------------------- figures


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100) of values; None for none."""
    ordered = sorted(values)
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def ms(seconds: float | None) -> float | None:
    """Seconds as milliseconds, rounded for the report."""
    return None if seconds is None else round(seconds * 1000, 1)


def histogram(values: list[float], edges: list[float]) -> dict[str, int]:
    """Counts of values per [edge, next edge) bucket, with an overflow bucket."""
    counts = {f"{a:g}-{b:g}": 0 for a, b in itertools.pairwise(edges)}
    counts[f">={edges[-1]:g}"] = 0
    counts[f"<{edges[0]:g}"] = 0
    for value in values:
        if value < edges[0]:
            counts[f"<{edges[0]:g}"] += 1
        elif value >= edges[-1]:
            counts[f">={edges[-1]:g}"] += 1
        else:
            for a, b in itertools.pairwise(edges):
                if a <= value < b:
                    counts[f"{a:g}-{b:g}"] += 1
                    break
    return {k: v for k, v in counts.items() if v}


class RssSampler:
    """Samples a process's VmRSS every ``interval`` seconds in the background."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            value = memory(self.pid).get("vmrss_mb")
            if value is not None:
                self.samples.append(value)
            await asyncio.sleep(self.interval)

    def __enter__(self) -> RssSampler:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()

    @property
    def peak(self) -> float | None:
        """The largest sample, MiB."""
        return max(self.samples, default=None)


# --------------------------------------------------------------------------- RPC


class RpcFailure(Exception):
    """A JSON-RPC error reply."""

    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(f"{error.get('code')}: {error.get('message')}")
        self.code = error.get("code")
        self.error = error


class Rpc:
    """JSON-RPC over HTTP keep-alive to one server, with one token."""

    def __init__(
        self, url: str, token: str = "", timeout: float = 30.0, local_address: str | None = None
    ) -> None:
        transport = httpx.AsyncHTTPTransport(local_address=local_address)
        self.token = token
        self.http = httpx.AsyncClient(base_url=url, timeout=timeout, transport=transport)
        self._ids = 0

    async def __aenter__(self) -> Rpc:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.aclose()

    async def request(self, method: str, params: Any = None) -> dict[str, Any]:
        """One request; the whole reply object."""
        self._ids += 1
        body: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": self._ids}
        if params is not None:
            body["params"] = params
        response = await self.http.post("/", content=orjson.dumps(body))
        reply: dict[str, Any] = orjson.loads(response.content)
        return reply

    async def call(self, method: str, *params: Any) -> Any:
        """The result of a call, or RpcFailure."""
        reply = await self.request(method, list(params))
        if "error" in reply:
            raise RpcFailure(reply["error"])
        return reply["result"]

    async def su(self, method: str, *params: Any) -> Any:
        """A call with this client's token as the first param."""
        return await self.call(method, self.token, *params)


def agent_limits(agent_uuid: str) -> list[dict[str, Any]]:
    """The agent role: listen and write results on its own UUID."""
    return [
        {
            "scopes": [{"agent_uuid": agent_uuid}],
            "permissions": [{"task": "listen"}, {"task": {"write": "*"}}],
        }
    ]


async def agent_token(rpc: Rpc, agent_uuid: str) -> str:
    """Create an agent token for ``agent_uuid`` through the server."""
    created = await rpc.su("token_create", agent_limits(agent_uuid))
    return f"{created['key']}:{created['secret']}"


# --------------------------------------------------------------------------- taskd


class TaskdProcess:
    """One ``taskd serve`` over its own config and database, restartable on the same port."""

    def __init__(
        self,
        children: Children,
        directory: Path,
        *,
        database_url: str | None = None,
        env: dict[str, str] | None = None,
        name: str = "taskd",
    ) -> None:
        self.children = children
        self.directory = directory
        self.database_url = database_url
        self.env = {"TASKD_LOG_LEVEL": "warning", **(env or {})}
        self.name = name
        self.port = free_port()
        self.child: Child | None = None
        self.started_at = 0.0
        self.token = ""
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
    def db_file(self) -> Path:
        """The SQLite database file (when there is no database_url)."""
        return self.directory / "taskd.db"

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
        """Start ``taskd serve`` (again) on this process's port."""
        env = self.env | {"TASKD_PORT": str(self.port)}
        if self.database_url is not None:
            env["TASKD_DATABASE_URL"] = self.database_url
        self.started_at = time.monotonic()
        self.child = self.children.start(
            f"{self.name}-serve",
            [PYTHON, "-m", "taskd", "serve", "--config", str(self.config)],
            env=env,
            cwd=self.directory,
        )

    @property
    def pid(self) -> int:
        """The server's process id."""
        assert self.child is not None
        return self.child.pid

    def alive(self) -> bool:
        """Whether the server process runs."""
        return self.child is not None and self.child.alive()

    def kill(self) -> None:
        """SIGKILL the server: no shutdown, no flush, open sockets reset by the kernel."""
        assert self.child is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.child.pid, signal.SIGKILL)
        self.child.popen.wait()
        self.children.forget(self.child)

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL)."""
        if self.child is not None:
            self.children.stop(self.child)

    def rss_mb(self) -> float | None:
        """The server's VmRSS in MiB."""
        return memory(self.pid).get("vmrss_mb") if self.alive() else None

    def log_tail(self, lines: int = 20) -> str:
        """The end of the server's log."""
        return self.child.tail(lines) if self.child is not None else ""

    async def wait_ready(self, within: float = 60.0) -> dict[str, float]:
        """Wait until /healthz and a JSON-RPC call answer; seconds from start to each."""
        hello = orjson.dumps({"jsonrpc": "2.0", "method": "server_hello", "id": 1})
        healthz: float | None = None
        deadline = self.started_at + within
        async with httpx.AsyncClient(base_url=self.url, timeout=2.0) as http:
            while True:
                if not self.alive():
                    raise RuntimeError(f"{self.name} exited during start-up:\n{self.log_tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    if healthz is None and (await http.get("/healthz")).status_code == 200:
                        healthz = time.monotonic() - self.started_at
                    if healthz is not None:
                        reply = (await http.post("/", content=hello)).json()
                        if "result" in reply:
                            rpc = time.monotonic() - self.started_at
                            return {"healthz_s": round(healthz, 3), "rpc_s": round(rpc, 3)}
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.name} not ready in {within:.0f} s")
                await asyncio.sleep(0.01)

    def rpc(self, timeout: float = 30.0, local_address: str | None = None) -> Rpc:
        """A super-token RPC client for this server."""
        return Rpc(self.url, self.token, timeout, local_address)

    async def task_rows(self) -> dict[int, dict[str, Any]]:
        """Every task row, read straight from the database (not through the server)."""
        query = (
            "SELECT id, uuid, state, success, error_message, task_event_result, timestamp FROM task"
        )
        if self.database_url is None:
            rows = await asyncio.to_thread(_sqlite_rows, self.db_file, query)
        else:
            conn = await asyncpg.connect(_plain_dsn(self.database_url), timeout=10)
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


def _sqlite_rows(path: Path, query: str) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        return db.execute(query).fetchall()
    finally:
        db.close()


def _plain_dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


@contextlib.asynccontextmanager
async def shared_postgres_database() -> Any:
    """A fresh database on the shared PostgreSQL for one scenario; dropped afterwards."""
    name = f"taskd_faults_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(PG_ADMIN_DSN, timeout=10)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        admin = await asyncpg.connect(PG_ADMIN_DSN, timeout=10)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


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
        self.argv = [
            PYTHON,
            "-m",
            "taskd",
            "agent",
            "--server",
            server_url,
            "--token",
            token,
            "--uuid",
            agent_uuid,
            "--allow",
            allow,
            "--state-dir",
            str(directory),
            "--log-level",
            log_level,
        ]
        self.child: Child | None = None

    def start(self) -> None:
        """Start the agent process."""
        self.child = self.children.start(f"agent-{self.agent_uuid[:8]}", self.argv, cwd=ROOT)

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


async def wait_for(check: Any, within: float, interval: float = 0.1) -> bool:
    """Await ``check()`` until truthy; False after ``within`` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if await check():
                return True
        await asyncio.sleep(interval)
    return False


def run_quietly(argv: list[str], timeout: float = 60.0, **options: Any) -> str:
    """Run a helper command; its output (CalledProcessError on failure)."""
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, check=True, **options
    )
    return done.stdout


async def metric(url: str, name: str) -> float | None:
    """One unlabelled sample from the server's /metrics, or None."""
    async with httpx.AsyncClient(timeout=5.0) as http:
        text = (await http.get(url + "metrics")).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


@contextlib.asynccontextmanager
async def scenario(outcome: Outcome, workdir: Path) -> Any:
    """Run a scenario body: its children are stopped and any exception becomes its error."""
    children = Children(workdir)
    started = time.monotonic()
    try:
        yield children
    except Exception as exc:  # the scenario could not finish: reported, never hidden
        outcome.error = f"{type(exc).__name__}: {exc}"
        outcome.figures["traceback"] = traceback.format_exc(limit=-8)
    finally:
        children.stop_all()
        outcome.figures["duration_s"] = round(time.monotonic() - started, 1)
