"""Test helpers: real servers on port-0 sockets, held ports, JSON-RPC clients, a scripted agent."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import websockets
from websockets.asyncio.connection import Connection

from taskd.auth import ensure_super_token
from taskd.clock import Clock
from taskd.config import ServerSettings
from taskd.server import TaskdServer, create_app, uvicorn_config
from taskd.store import Store

UNIT = float(os.environ.get("TASKD_TEST_TIME_FACTOR", "1"))
PG_ADMIN_DSN = os.environ.get("TASKD_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
_ids = itertools.count(1)


def scaled(seconds: float) -> float:
    """A time limit scaled for slow machines."""
    return seconds * UNIT


async def wait_for(
    probe: Callable[[], Awaitable[Any]], timeout: float = 3.0, interval: float = 0.05
) -> Any:
    """Poll ``probe`` until it returns something truthy; fail after ``timeout`` (scaled)."""
    deadline = time.monotonic() + scaled(timeout)
    while True:
        value = await probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {scaled(timeout)} s")
        await asyncio.sleep(interval)


class RpcError(Exception):
    """A JSON-RPC error reply."""

    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(f"{error.get('code')}: {error.get('message')}")
        self.code = error.get("code")
        self.message = error.get("message", "")
        self.error = error


def unwrap(reply: dict[str, Any]) -> Any:
    """The result of a reply, or raise RpcError."""
    if "error" in reply:
        raise RpcError(reply["error"])
    return reply["result"]


@contextlib.contextmanager
def hold_port() -> Iterator[int]:
    """A local port held for the test, where connections are refused until a server listens.

    The port is bound (with SO_REUSEADDR) but never listened on. A server that binds it with
    SO_REUSEADDR too (uvicorn, asyncio and ``running_server`` do) may listen on it, and once
    that server stops the port is still held: Linux gives no port bound by another socket to
    one asking for a free port (bind to port 0, or connect). For a server that restarts at
    the same address, an address where nothing listens, or a port that is itself the subject.
    """
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def postgres_database() -> AsyncIterator[str]:
    """A fresh, empty PostgreSQL database for one test; dropped afterwards."""
    name = f"taskd_test_{uuid.uuid4().hex[:16]}"
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"
    finally:
        admin = await asyncpg.connect(PG_ADMIN_DSN)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


def make_settings(database_url: str, **overrides: Any) -> ServerSettings:
    """Server settings for a test."""
    base = ServerSettings(
        server_uuid=str(uuid.uuid4()),
        database_url=database_url,
        reaper_interval_ms=100,
        ws_ping_interval_s=1.0,
        ws_ping_timeout_s=2.0,
    )
    return replace(base, **overrides)


@dataclass
class Server:
    """A running taskd server inside the test's event loop."""

    settings: ServerSettings
    port: int
    super_token: str
    app: Any
    uvicorn_server: TaskdServer
    http: httpx.AsyncClient = field(init=False)

    def __post_init__(self) -> None:
        self.http = httpx.AsyncClient(base_url=self.url, timeout=scaled(30))

    @property
    def url(self) -> str:
        """HTTP base URL."""
        return f"http://127.0.0.1:{self.port}/"

    @property
    def ws_url(self) -> str:
        """WebSocket URL of the RPC endpoint."""
        return f"ws://127.0.0.1:{self.port}/"

    @property
    def service(self) -> Any:
        """The taskd App behind the server."""
        return self.app.state.taskd

    @property
    def clock(self) -> Clock:
        """The clock the server's crons keep (tests move it ahead)."""
        clock: Clock = self.service.clock
        return clock

    async def post(self, payload: Any) -> httpx.Response:
        """POST raw JSON (or bytes) to /."""
        if isinstance(payload, bytes | str):
            return await self.http.post("/", content=payload)
        return await self.http.post("/", content=orjson.dumps(payload))

    async def request(self, method: str, params: Any = None) -> dict[str, Any]:
        """One JSON-RPC request over HTTP; the whole reply object."""
        body: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": next(_ids)}
        if params is not None:
            body["params"] = params
        response = await self.post(body)
        reply: dict[str, Any] = response.json()
        return reply

    async def call(self, method: str, *params: Any, **named: Any) -> Any:
        """One JSON-RPC call over HTTP; the result, or RpcError."""
        return unwrap(await self.request(method, named if named else list(params)))

    async def su(self, method: str, *params: Any) -> Any:
        """A call with the super token as the first param."""
        return await self.call(method, self.super_token, *params)


@contextlib.asynccontextmanager
async def running_server(
    settings: ServerSettings,
    super_token: str | None = None,
    port: int = 0,
    clock: Clock | None = None,
) -> AsyncIterator[Server]:
    """Start taskd under uvicorn on a socket bound to ``port``; stop it afterwards.

    Port 0 (the default) takes a free port, read back from the socket into ``Server.port``;
    a server restarting at the same address takes a port from ``hold_port``.

    The database gets a super token unless it has one; pass ``super_token`` to
    start again over a database that already has one. Crons keep ``clock``'s time (by
    default a new clock, reached as ``Server.clock``).
    """
    async with Store(settings.database_url, pool_size=2) as store:
        await store.migrate()
        token = await ensure_super_token(store) or super_token
    assert token is not None, "the database has a super token: pass it in"
    app = create_app(settings, clock)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    server = TaskdServer(uvicorn_config(app, settings, timeout_graceful_shutdown=2), app)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    deadline = time.monotonic() + scaled(20)
    while not server.started:
        if serving.done():
            serving.result()
            raise RuntimeError("server stopped during start-up")
        if time.monotonic() > deadline:
            raise TimeoutError("server did not start")
        await asyncio.sleep(0.01)
    running = Server(settings, sock.getsockname()[1], token, app, server)
    try:
        yield running
    finally:
        await running.http.aclose()
        server.should_exit = True
        await serving
        sock.close()


class WsClient:
    """A JSON-RPC client over one WebSocket: replies by id, notifications queued."""

    def __init__(self, url: str, user_agent: str | None = None) -> None:
        self.url = url
        self.user_agent = user_agent
        self.notifications: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._pending: dict[Any, asyncio.Future[Any]] = {}
        self._reader: asyncio.Task[None] | None = None
        self.ws: Any = None
        self.close_code: int | None = None

    async def __aenter__(self) -> WsClient:
        self.ws = await websockets.connect(
            self.url,
            max_size=None,
            ping_interval=None,
            **({} if self.user_agent is None else {"user_agent_header": self.user_agent}),
        )
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.ws.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader

    async def _read(self) -> None:
        try:
            async for message in self.ws:
                data = orjson.loads(message)
                items = data if isinstance(data, list) else [data]
                for item in items:
                    if "id" in item and item["id"] in self._pending:
                        future = self._pending.pop(item["id"])
                        if not future.done():
                            future.set_result(item)
                    else:
                        await self.notifications.put(item)
        except websockets.ConnectionClosed as exc:
            self.close_code = exc.rcvd.code if exc.rcvd is not None else None
        finally:
            if self.close_code is None and self.ws.close_code is not None:
                self.close_code = self.ws.close_code
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(ConnectionError("WebSocket closed"))

    async def request(self, method: str, params: Any = None, timeout: float = 30) -> dict[str, Any]:
        """Send one request and wait for its reply object."""
        request_id = next(_ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        body: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": request_id}
        if params is not None:
            body["params"] = params
        await self.ws.send(orjson.dumps(body).decode())
        reply: dict[str, Any] = await asyncio.wait_for(future, scaled(timeout))
        return reply

    async def call(self, method: str, *params: Any) -> Any:
        """Send one request; its result or RpcError."""
        return unwrap(await self.request(method, list(params)))

    async def closed(self, timeout: float = 10) -> int | None:
        """Wait until the server closes the socket; return the close code."""
        assert self._reader is not None
        await asyncio.wait_for(asyncio.shield(self._reader), scaled(timeout))
        return self.close_code


class ScriptedAgent(WsClient):
    """A minimal agent: subscribes, collects pushed tasks, uploads chosen results."""

    def __init__(self, url: str, token: str, agent_uuid: str | None = None) -> None:
        super().__init__(url)
        self.token = token
        self.uuid = agent_uuid or str(uuid.uuid4())
        self.subscription: int | None = None

    async def __aenter__(self) -> ScriptedAgent:
        await super().__aenter__()
        self.subscription = await self.call("task_register_task", self.token, self.uuid)
        return self

    async def next_task(self, timeout: float = 10) -> dict[str, Any]:
        """The next pushed task (the push frame's ``result``)."""
        frame = await asyncio.wait_for(self.notifications.get(), scaled(timeout))
        assert frame["method"] == "task_register_task", frame
        assert frame["params"]["subscription"] == self.subscription
        result: dict[str, Any] = frame["params"]["result"]
        return result

    async def upload(
        self,
        task: dict[str, Any],
        result: Any = None,
        *,
        success: bool = True,
        error_message: str | None = None,
        timestamp: int | None = None,
        **override: Any,
    ) -> dict[str, Any]:
        """Upload a result for a pushed task; the whole reply object."""
        response: dict[str, Any] = {
            "task_id": task["task_id"],
            "agent_uuid": self.uuid,
            "task_token": task["task_token"],
            "timestamp": timestamp if timestamp is not None else time.time_ns() // 1_000_000,
            "success": success,
        }
        if error_message is not None:
            response["error_message"] = error_message
        if result is not None:
            response["task_event_result"] = result
        response.update(override)
        return await self.request("task_upload_task_result", [self.token, response])


def agent_token_limits(agent_uuid: str) -> list[dict[str, Any]]:
    """Limits of an agent token: listen, write results and report monitoring on its own UUID."""
    from taskd.roles import agent_limits

    return agent_limits(agent_uuid)


async def add_token(server: Server, limits: list[dict[str, Any]], **fields: Any) -> str:
    """Insert a token with ``limits`` straight into the store; return KEY:SECRET."""
    from taskd.auth import NewToken, hash_secret

    token = NewToken.generate()
    await server.service.store.insert_token(
        {"key": token.key, "secret_hash": hash_secret(token.secret), "limits": limits, **fields}
    )
    return str(token)


def tmp_sqlite_url(directory: Path) -> str:
    """A SQLite database URL in ``directory``."""
    return f"sqlite+aiosqlite:///{directory / 'taskd.db'}"


async def read_until(ws: Connection, pattern: bytes, timeout: float = 10) -> bytes:
    """Collect binary frames until ``pattern`` (a regex) matches; return everything read."""
    seen = b""
    async with asyncio.timeout(scaled(timeout)):
        while not re.search(pattern, seen):
            frame = await ws.recv()
            assert isinstance(frame, bytes), f"PTY output must come as binary frames: {frame!r}"
            seen += frame
    return seen


def alive(pid: int) -> bool:
    """Whether a process with that pid exists (zombies count as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def gone(pid: int, timeout: float = 10) -> bool:
    """Wait until the process ``pid`` no longer exists."""
    deadline = time.monotonic() + scaled(timeout)
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def has_ipv6_loopback() -> bool:
    """Whether a TCP socket can bind ::1 here."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True
