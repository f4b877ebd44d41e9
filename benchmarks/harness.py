"""What the scenarios stand on: the run's scale, fresh taskd servers, load agents, HTTP load."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import sqlite3
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import tomlkit

from benchmarks.procs import PYTHON, BenchError, Child, Children, free_port, wait_until
from benchmarks.report import ROOT, Row

PG_ADMIN_DSN = os.environ.get("TASKD_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")
HELLO = '{"jsonrpc": "2.0", "method": "server_hello", "id": 1}'
PROFILE_RATE = 200


@dataclass(frozen=True)
class Scale:
    """How much of each scenario a run does."""

    http_seconds: float
    http_rounds: int
    http_connections: int
    ws_seconds: float
    p2_tasks: int
    p2_agents: int
    celery_tasks: int
    celery_calls: int
    p3_calls: int
    agent_calls: int
    p4_agents: int
    p4_processes: int
    p5_rows: int
    p5_calls: int
    p6_idle_fires: int
    p6_load_seconds: float


FULL = Scale(
    http_seconds=5,
    http_rounds=2,
    http_connections=100,
    ws_seconds=5,
    p2_tasks=30_000,
    p2_agents=100,
    celery_tasks=5_000,
    celery_calls=500,
    p3_calls=2_000,
    agent_calls=300,
    p4_agents=10_000,
    p4_processes=4,
    p5_rows=1_000_000,
    p5_calls=500,
    p6_idle_fires=30,
    p6_load_seconds=20,
)
QUICK = Scale(
    http_seconds=2,
    http_rounds=1,
    http_connections=32,
    ws_seconds=1,
    p2_tasks=2_000,
    p2_agents=100,
    celery_tasks=300,
    celery_calls=50,
    p3_calls=200,
    agent_calls=30,
    p4_agents=600,
    p4_processes=2,
    p5_rows=100_000,
    p5_calls=50,
    p6_idle_fires=3,
    p6_load_seconds=3,
)


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


def now_ms() -> int:
    """Wall-clock milliseconds, the clock taskd stamps its rows with."""
    return time.time_ns() // 1_000_000


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) of values; NaN for none."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def check_alive(child: Child) -> bool:
    """True while ``child`` runs; BenchError with its log once it has exited."""
    if not child.alive():
        raise BenchError(f"{child.name} exited: {child.last_words()}\n{child.tail()}")
    return True


def died(child: Child) -> str:
    """How a child that should still run ended: its exit status or the signal that killed it."""
    code = child.popen.returncode
    how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
    return f"{child.name} died ({how}): {child.last_words()}"


@dataclass
class Taskd:
    """A running ``taskd serve``."""

    name: str
    child: Child
    port: int
    token: str
    directory: Path
    db_file: Path | None
    env: dict[str, str] = field(default_factory=dict)
    http: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.http = httpx.Client(base_url=self.url, timeout=60)

    @property
    def url(self) -> str:
        """HTTP URL of the RPC endpoint."""
        return f"http://127.0.0.1:{self.port}/"

    @property
    def ws_url(self) -> str:
        """WebSocket URL of the RPC endpoint."""
        return f"ws://127.0.0.1:{self.port}/"

    def rpc(self, method: str, *params: Any) -> Any:
        """One JSON-RPC call over HTTP with the super token; BenchError on an error reply."""
        body = {"jsonrpc": "2.0", "method": method, "params": [self.token, *params], "id": 1}
        reply = self.http.post("/", json=body).json()
        if "error" in reply:
            raise BenchError(f"{method} failed: {reply['error']}")
        return reply["result"]

    def sql(self, query: str, *args: Any) -> list[tuple[Any, ...]]:
        """Read the SQLite database directly (WAL: a reader never blocks the server)."""
        assert self.db_file is not None, "direct reads need SQLite"
        db = sqlite3.connect(f"file:{self.db_file}?mode=ro", uri=True, timeout=30)
        try:
            return db.execute(query, args).fetchall()
        finally:
            db.close()


async def pg_admin(statement: str) -> None:
    """Run one statement on the PostgreSQL admin database."""
    import asyncpg  # type: ignore[import-untyped]

    admin = await asyncpg.connect(PG_ADMIN_DSN, timeout=5)
    try:
        await admin.execute(statement)
    finally:
        await admin.close()


async def insert_agent_token(database_url: str, agent_uuid: str) -> str:
    """An agent token (listen, write results) for one agent, stored before the server starts."""
    from taskd.auth import NewToken, hash_secret
    from taskd.config import normalize_database_url
    from taskd.store import Store

    token = NewToken.generate()
    limits = [
        {
            "scopes": [{"agent_uuid": agent_uuid}],
            "permissions": [{"task": "listen"}, {"task": {"write": "*"}}],
        }
    ]
    async with Store(normalize_database_url(database_url, Path.cwd()), pool_size=1) as store:
        await store.insert_token(
            {
                "key": token.key,
                "secret_hash": hash_secret(token.secret),
                "limits": limits,
                "description": "benchmark agent",
            }
        )
    return str(token)


class Run:
    """One benchmark run: its scale, its children, its rows and raw figures."""

    def __init__(self, scale: Scale, workdir: Path, children: Children, http_load: str) -> None:
        self.scale = scale
        self.workdir = workdir
        self.children = children
        self.http_load = http_load
        self.rows: list[Row] = []
        self.data: dict[str, Any] = {}
        self.pg_databases: list[str] = []
        self.profile_dir: Path | None = None
        self._template: tuple[Path, str] | None = None

    def _init(self, name: str, directory: Path, env: dict[str, str] | None = None) -> str:
        """``taskd init`` in ``directory``; the super token."""
        argv = [PYTHON, "-m", "taskd", "init", "--config", str(directory / "taskd.toml"), "--json"]
        report = self.children.run_json(name, argv, timeout=60, env=env, cwd=directory)
        return str(report["super_token"])

    def _sqlite_template(self) -> tuple[Path, str]:
        """A database made once by ``taskd init``; each SQLite server starts from a copy."""
        if self._template is None:
            directory = self.workdir / "template"
            directory.mkdir()
            self._template = (directory, self._init("taskd-init", directory))
        return self._template

    @contextlib.contextmanager
    def taskd(
        self,
        name: str,
        database: str = "sqlite",
        prepare: Callable[[Path, str], None] | None = None,
    ) -> Iterator[Taskd]:
        """A fresh ``taskd serve``; ``prepare(directory, database_url)`` runs before it starts."""
        directory = self.workdir / name
        env = {"TASKD_LOG_LEVEL": "warning"}
        db_file: Path | None = None
        pg_name = None
        if database == "sqlite":
            template, token = self._sqlite_template()
            shutil.copytree(template, directory)
            db_file = directory / "taskd.db"
            database_url = f"sqlite:///{db_file}"
        else:
            pg_name = f"taskd_bench_{uuid.uuid4().hex[:12]}"
            try:
                asyncio.run(pg_admin(f'CREATE DATABASE "{pg_name}"'))
            except Exception as exc:
                raise BenchError(f"PostgreSQL not reachable at {PG_ADMIN_DSN}: {exc}") from None
            self.pg_databases.append(pg_name)
            database_url = f"postgresql://postgres@127.0.0.1:5432/{pg_name}"
            env["TASKD_DATABASE_URL"] = database_url
            directory.mkdir()
            token = self._init(f"{name}-init", directory, env)
        child: Child | None = None
        server: Taskd | None = None
        try:
            if prepare is not None:
                prepare(directory, database_url)
            port = free_port()
            child = self.children.start(
                f"{name}-server",
                [PYTHON, "-m", "taskd", "serve", "--config", str(directory / "taskd.toml")],
                env=env | {"TASKD_PORT": str(port)},
                cwd=directory,
            )
            server = Taskd(name, child, port, token, directory, db_file, env)
            up = server
            wait_until(
                lambda: check_alive(up.child) and up.http.get("/healthz").status_code == 200,
                f"{name}: server up",
                60,
            )
            try:
                yield server
            except BenchError as exc:
                if not child.alive():
                    raise BenchError(f"{died(child)}; then: {exc}") from exc
                raise
            # figures measured against a server that crashed on the way are not figures
            if not child.alive():
                raise BenchError(died(child))
        finally:
            if server is not None:
                server.http.close()
            if child is not None:
                self.children.stop(child)
            if pg_name is not None:
                with contextlib.suppress(Exception):
                    asyncio.run(pg_admin(f'DROP DATABASE IF EXISTS "{pg_name}" WITH (FORCE)'))
                self.pg_databases.remove(pg_name)

    @contextlib.contextmanager
    def node(self, first: Taskd, name: str) -> Iterator[Taskd]:
        """Another ``taskd serve`` node of ``first``'s cluster (its PostgreSQL database)."""
        directory = self.workdir / name
        directory.mkdir()
        document = tomlkit.parse((first.directory / "taskd.toml").read_text())
        document["server"].pop("node_id", None)  # type: ignore[union-attr]
        (directory / "taskd.toml").write_text(tomlkit.dumps(document))
        port = free_port()
        child = self.children.start(
            f"{name}-server",
            [PYTHON, "-m", "taskd", "serve", "--config", str(directory / "taskd.toml")],
            env=first.env | {"TASKD_PORT": str(port)},
            cwd=directory,
        )
        server = Taskd(name, child, port, first.token, directory, None, first.env)
        try:
            wait_until(
                lambda: check_alive(child) and server.http.get("/healthz").status_code == 200,
                f"{name}: server up",
                60,
            )
            yield server
            if not child.alive():
                raise BenchError(died(child))
        finally:
            server.http.close()
            self.children.stop(child)

    def load_agents(
        self, server: Taskd, count: int, processes: int = 1, batch: bool = False
    ) -> tuple[list[Child], list[str], Path]:
        """``count`` subscriptions over ``processes`` load-agent processes; their UUIDs."""
        shares = [count // processes + (i < count % processes) for i in range(processes)]
        started: list[tuple[Child, int, Path]] = []
        for share in shares:
            uuid_file = server.directory / f"agents-{uuid.uuid4().hex[:8]}.txt"
            argv = [
                PYTHON,
                "-m",
                "benchmarks.loadagent",
                *flags(
                    url=server.ws_url,
                    token=server.token,
                    count=share,
                    uuid_file=uuid_file,
                    batch=batch,
                ),
            ]
            child = self.children.start(
                f"{server.name}-loadagent", argv, pipe_stdout=True, cwd=ROOT
            )
            started.append((child, share, uuid_file))
        for child, share, _ in started:
            line = child.wait_line("ready", timeout=60 + share / 50)
            if line.split()[1:] != [str(share)]:
                raise BenchError(f"{child.name}: {line!r}, wanted {share} subscriptions")
        uuids = [u for _, _, path in started for u in path.read_text().split()]
        joined = server.directory / f"agents-{uuid.uuid4().hex[:8]}-all.txt"
        joined.write_text("\n".join(uuids) + "\n")
        return [child for child, _, _ in started], uuids, joined

    def caller(self, name: str, scenario: str, timeout: float = 900, **options: Any) -> Any:
        """Run one ``benchmarks.caller`` scenario and return its report."""
        argv = [PYTHON, "-m", "benchmarks.caller", scenario, *flags(**options)]
        return self.children.run_json(name, argv, timeout=timeout, cwd=ROOT)

    @contextlib.contextmanager
    def profiled(self, server: Taskd, name: str) -> Iterator[None]:
        """With --profile: py-spy samples the server (GIL holders only) while the block runs."""
        if self.profile_dir is None:
            yield
            return
        spy = shutil.which("py-spy") or str(Path(PYTHON).parent / "py-spy")
        raw = self.profile_dir / f"{name}.txt"
        argv = [spy, "record", "--gil", "--rate", str(PROFILE_RATE), "--format", "raw"]
        child = self.children.start(
            f"py-spy-{name}", [*argv, "-o", str(raw), "--pid", str(server.child.pid)]
        )
        started = time.monotonic()
        try:
            yield
        finally:
            seconds = time.monotonic() - started
            # py-spy writes its file when interrupted
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGINT)
            with contextlib.suppress(Exception):
                child.popen.wait(timeout=30)
            self.children.stop(child)
            if raw.exists():
                profiles = self.data.setdefault("profiles", {})
                profiles[name] = summarize_profile(raw, seconds, PROFILE_RATE)

    def http_rate(self, url: str, name: str) -> dict[str, Any]:
        """Requests/s of ``server_hello`` over keep-alive connections, by wrk or httpload."""
        scale = self.scale
        if self.http_load == "httpload":
            argv = [
                PYTHON,
                "-m",
                "benchmarks.httpload",
                *flags(
                    url=url,
                    body=HELLO,
                    connections=scale.http_connections,
                    duration=scale.http_seconds,
                ),
            ]
            return self.children.run_json(name, argv, timeout=scale.http_seconds + 60, cwd=ROOT)
        script = self.workdir / "post.lua"
        script.write_text(
            f"wrk.method = \"POST\"\nwrk.body = '{HELLO}'\n"
            'wrk.headers["Content-Type"] = "application/json"\n'
        )
        argv = ["wrk", f"-t{min(2, os.cpu_count() or 1)}", f"-c{scale.http_connections}"]
        # wrk takes whole seconds only
        argv += [f"-d{max(1, round(scale.http_seconds))}s", "--latency", "-s", str(script), url]
        text = self.children.run_text(name, argv, timeout=scale.http_seconds + 60)
        return parse_wrk(text, scale.http_connections)


def parse_wrk(text: str, connections: int) -> dict[str, Any]:
    """The figures of a ``wrk --latency`` report."""

    def latency(label: str) -> float:
        found = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s)\b", text, re.M)
        if not found:
            return float("nan")
        return float(found.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[found.group(2)]

    rate = re.search(r"Requests/sec:\s+([\d.]+)", text)
    total = re.search(r"(\d+) requests in ([\d.]+)(m?s)", text)
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    socket_errors = re.search(r"Socket errors: (.*)", text)
    if rate is None or total is None:
        raise BenchError(f"unexpected wrk output:\n{text}")
    return {
        "generator": "wrk",
        "connections": connections,
        "requests": int(total.group(1)),
        "seconds": float(total.group(2)) / (1000 if total.group(3) == "ms" else 1),
        "requests_per_s": float(rate.group(1)),
        "errors": int(non_2xx.group(1)) if non_2xx else 0,
        "socket_errors": socket_errors.group(1) if socket_errors else None,
        "p50_ms": latency("50"),
        "p99_ms": latency("99"),
    }


def _module_of(frame: str) -> str:
    """The file of a py-spy frame; outside taskd only its top-level package."""
    found = re.search(r"\(([^:()]+):\d+\)$", frame)
    path = found.group(1) if found else frame
    return path if path.startswith("taskd/") else path.split("/")[0]


def summarize_profile(raw: Path, seconds: float, rate: int) -> dict[str, Any]:
    """Top frames of a py-spy raw (collapsed) profile: where the GIL-holding time went."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    modules: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        own[frames[-1]] += count
        modules[_module_of(frames[-1])] += count
        for frame in set(frames):
            inclusive[frame] += count

    def share(n: int) -> float:
        return round(100 * n / total, 1) if total else 0.0

    return {
        "file": raw.name,
        "samples": total,
        "seconds": round(seconds, 1),
        "gil_held_percent": round(100 * total / (seconds * rate), 1) if seconds else None,
        "self_by_module": [[module, share(n)] for module, n in modules.most_common(20)],
        "top_self": [[frame, share(n)] for frame, n in own.most_common(25)],
        "top_inclusive": [[frame, share(n)] for frame, n in inclusive.most_common(40)],
    }
