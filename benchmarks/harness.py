"""What the benchmark scenarios stand on: fresh taskd servers, load agents, callers, HTTP load."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import tomlkit

from benchmarks import shutdown
from benchmarks.procs import (
    PYTHON,
    BenchError,
    Children,
    check_alive,
    died,
    flags,
    free_port,
    wait_until,
)
from benchmarks.report import ROOT, Row
from benchmarks.scale import Scale
from benchmarks.services import (
    LoadAgent,
    TaskdServer,
    create_database,
    database_url,
    drop_database,
    start_load_agents,
)

HELLO = '{"jsonrpc": "2.0", "method": "server_hello", "id": 1}'
PROFILE_RATE = 200


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

    def _sqlite_template(self) -> tuple[Path, str]:
        """A database made once by ``taskd init``; each SQLite server starts from a copy."""
        if self._template is None:
            template = TaskdServer(self.children, self.workdir / "template", name="taskd")
            self._template = (template.directory, template.init())
        return self._template

    @contextlib.contextmanager
    def floor(self, name: str) -> Iterator[str]:
        """The bare Starlette floor (``benchmarks.floor``) on a free port, once it answers:
        its base URL (``http://127.0.0.1:PORT``)."""
        port = free_port()
        child = self.children.start(
            name, [PYTHON, "-m", "benchmarks.floor", "--port", str(port)], cwd=ROOT
        )
        url = f"http://127.0.0.1:{port}"
        with self.children.running(child), httpx.Client(timeout=10) as client:
            wait_until(
                lambda: check_alive(child) and client.post(f"{url}/", content=HELLO).json(),
                f"{name} up",
                60,
            )
            yield url

    @contextlib.contextmanager
    def taskd(
        self,
        name: str,
        database: str = "sqlite",
        prepare: Callable[[TaskdServer], None] | None = None,
    ) -> Iterator[TaskdServer]:
        """A fresh ``taskd serve``; ``prepare(server)`` runs before it starts."""
        directory = self.workdir / name
        pg_name = None
        if database == "sqlite":
            template, token = self._sqlite_template()
            shutil.copytree(template, directory)
            server = TaskdServer(self.children, directory, name=name, token=token)
        else:
            with shutdown.held():  # recorded as soon as it exists, so the cleanup drops it
                pg_name = asyncio.run(create_database())
                self.pg_databases.append(pg_name)
            server = TaskdServer(
                self.children, directory, database_url=database_url(pg_name), name=name
            )
        try:
            if pg_name is not None:
                server.init()
            if prepare is not None:
                prepare(server)
            server.start()
            asyncio.run(server.wait_ready())
            try:
                yield server
            except BenchError as exc:
                if not server.alive():
                    raise BenchError(f"{died(server.child)}; then: {exc}") from exc
                raise
            # figures measured against a server that crashed on the way are not figures
            if not server.alive():
                raise BenchError(died(server.child))
        finally:
            server.stop()
            if pg_name is not None:
                with contextlib.suppress(BenchError):
                    asyncio.run(drop_database(pg_name))
                self.pg_databases.remove(pg_name)

    @contextlib.contextmanager
    def node(self, first: TaskdServer, name: str) -> Iterator[TaskdServer]:
        """Another ``taskd serve`` node of ``first``'s cluster (its PostgreSQL database)."""
        directory = self.workdir / name
        directory.mkdir()
        document = tomlkit.parse(first.config.read_text())
        document["server"].pop("node_id", None)
        (directory / "taskd.toml").write_text(tomlkit.dumps(document))
        server = TaskdServer(
            self.children,
            directory,
            database_url=first.database_url,
            env=first.env,
            name=name,
            token=first.token,
        )
        try:
            server.start()
            asyncio.run(server.wait_ready())
            yield server
            if not server.alive():
                raise BenchError(died(server.child))
        finally:
            server.stop()

    def load_agents(
        self, server: TaskdServer, count: int, processes: int = 1, batch: bool = False
    ) -> tuple[list[LoadAgent], list[str], Path]:
        """``count`` subscriptions over ``processes`` load-agent processes; their UUIDs and file."""
        agents = start_load_agents(
            self.children,
            server.ws_url,
            server.token,
            count,
            server.directory,
            processes=processes,
            batch=batch,
            name=f"{server.name}-loadagent",
        )
        uuids = [u for agent in agents for u in agent.uuids()]
        joined = server.directory / f"agents-{uuid.uuid4().hex[:8]}-all.txt"
        joined.write_text("\n".join(uuids) + "\n")
        return agents, uuids, joined

    def caller(self, name: str, scenario: str, timeout: float = 900, **options: Any) -> Any:
        """Run one ``benchmarks.caller`` scenario and return its report."""
        argv = [PYTHON, "-m", "benchmarks.caller", scenario, *flags(**options)]
        return self.children.run_json(name, argv, timeout=timeout, cwd=ROOT)

    @contextlib.contextmanager
    def profiled(self, server: TaskdServer, name: str) -> Iterator[None]:
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
