"""Go-betweens the fault scenarios put between agents and the server.

``WsRecorder`` relays WebSocket messages and writes down what crossed: every
task pushed, every result upload, and which uploads the server answered with
a result (acknowledged: the agent may forget them) — the evidence that "every
result whose upload got a reply is stored". ``TcpProxy`` relays raw bytes and
can cut, refuse, black-hole or cut exactly when a given reply passes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.server import Server, ServerConnection, serve


@dataclass
class Recorded:
    """What crossed a WsRecorder."""

    pushed: dict[int, float] = field(default_factory=dict)
    """task id → when it was first pushed to an agent (monotonic)."""
    acked: dict[int, dict[str, Any]] = field(default_factory=dict)
    """task id → the upload the server answered with a result."""
    acked_at: dict[int, float] = field(default_factory=dict)
    double_acks: list[int] = field(default_factory=list)
    """Tasks whose result the server accepted twice (must stay empty)."""
    already: set[int] = field(default_factory=set)
    """Uploads answered 108 "already has a result" (an earlier one, or the reaper's, stood)."""
    upload_errors: dict[int, int] = field(default_factory=dict)
    """task id → the last other error code an upload of it got (103 during an outage ...)."""
    uploads: dict[int, int] = field(default_factory=dict)
    """task id → how many times it was uploaded."""
    unanswered: int = 0
    """Uploads whose connection ended before their reply."""
    connections: int = 0
    refused: int = 0
    """Agent connections turned away because the server could not be reached."""


class WsRecorder:
    """A WebSocket relay to ``upstream`` that records pushes, uploads and their replies."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.record = Recorded()
        self.port = 0
        self._server: Server | None = None
        self._open: set[ServerConnection] = set()

    @property
    def url(self) -> str:
        """Where agents connect."""
        return f"ws://127.0.0.1:{self.port}/"

    async def __aenter__(self) -> WsRecorder:
        self._server = await serve(
            self._relay,
            "127.0.0.1",
            0,
            max_size=None,
            compression=None,
            ping_interval=None,
            backlog=1024,
        )
        self.port = next(iter(self._server.sockets)).getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _relay(self, down: ServerConnection) -> None:
        try:
            up = await websockets.connect(
                self.upstream,
                open_timeout=3,
                max_size=None,
                compression=None,
                ping_interval=None,
                proxy=None,
            )
        except (OSError, TimeoutError, websockets.WebSocketException):
            # the server is down: the agent sees its connection refused and backs off
            self.record.refused += 1
            await down.close(1013, "server unavailable")
            return
        self.record.connections += 1
        pending: dict[Any, dict[str, Any]] = {}
        to_server = asyncio.create_task(self._pump(down, up, self._from_agent, pending))
        to_agent = asyncio.create_task(self._pump(up, down, self._from_server, pending))
        await asyncio.wait({to_server, to_agent}, return_when=asyncio.FIRST_COMPLETED)
        for side in (to_server, to_agent):
            side.cancel()
        await up.close()
        await down.close(1011, "relay: the other side went away")
        self.record.unanswered += len(pending)

    async def _pump(
        self,
        source: ServerConnection | ClientConnection,
        sink: ServerConnection | ClientConnection,
        inspect: Callable[[Any, dict[Any, dict[str, Any]]], None],
        pending: dict[Any, dict[str, Any]],
    ) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            async for message in source:
                inspect(message, pending)
                await sink.send(message)

    def _from_agent(self, message: Any, pending: dict[Any, dict[str, Any]]) -> None:
        for item in _items(message):
            params = item.get("params")
            if item.get("method") != "task_upload_task_result" or "id" not in item:
                continue
            response = params[1] if isinstance(params, list) and len(params) > 1 else None
            if isinstance(params, dict):
                response = params.get("task_response")
            if isinstance(response, dict) and isinstance(response.get("task_id"), int):
                pending[item["id"]] = response
                task_id = response["task_id"]
                self.record.uploads[task_id] = self.record.uploads.get(task_id, 0) + 1

    def _from_server(self, message: Any, pending: dict[Any, dict[str, Any]]) -> None:
        record = self.record
        for item in _items(message):
            if item.get("method") == "task_register_task":
                task = (item.get("params") or {}).get("result") or {}
                if isinstance(task.get("task_id"), int):
                    record.pushed.setdefault(task["task_id"], time.monotonic())
                continue
            response = pending.pop(item.get("id"), None)
            if response is None:
                continue
            task_id = response["task_id"]
            error = item.get("error")
            if error is None:
                if task_id in record.acked:
                    record.double_acks.append(task_id)
                else:
                    record.acked[task_id] = response
                    record.acked_at[task_id] = time.monotonic()
            elif error.get("code") == 108 and "already" in str(error.get("message")):
                record.already.add(task_id)
            else:
                record.upload_errors[task_id] = int(error.get("code", 0))


def _items(message: Any) -> list[dict[str, Any]]:
    try:
        data = orjson.loads(message)
    except orjson.JSONDecodeError:
        return []
    items = data if isinstance(data, list) else [data]
    return [item for item in items if isinstance(item, dict)]


# --------------------------------------------------------------------------- raw TCP


@dataclass(eq=False)
class _Pair:
    client: asyncio.StreamWriter
    server: asyncio.StreamWriter
    blackholed: bool = False

    def abort(self) -> None:
        for writer in (self.client, self.server):
            writer.transport.abort()


class TcpProxy:
    """A byte relay to a local port that the scenario controls."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self.refusing = False
        self.accepted = 0
        self.turned_away = 0
        self.cuts = 0
        self._pairs: set[_Pair] = set()
        self._server: asyncio.Server | None = None
        self._watch: bytes | None = None
        self._watch_hit: asyncio.Event = asyncio.Event()
        self._on_hit: Callable[[], Awaitable[None]] | None = None

    @property
    def url(self) -> str:
        """The WebSocket URL agents use through this proxy."""
        return f"ws://127.0.0.1:{self.port}/"

    async def __aenter__(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
        for pair in list(self._pairs):
            pair.abort()

    @property
    def open_connections(self) -> int:
        """Relayed connections currently open."""
        return len(self._pairs)

    def cut(self) -> int:
        """Reset every relayed connection now; how many there were."""
        pairs = list(self._pairs)
        for pair in pairs:
            pair.abort()
        self._pairs.clear()
        self.cuts += len(pairs)
        return len(pairs)

    def refuse(self, refusing: bool = True) -> None:
        """Turn new connections away (reset at once) until called with False."""
        self.refusing = refusing

    def blackhole(self) -> int:
        """Stop relaying on every open connection, in both directions, without closing it."""
        for pair in self._pairs:
            pair.blackholed = True
        return len(self._pairs)

    def cut_when_server_sends(self, pattern: bytes) -> asyncio.Event:
        """Cut every connection (refusing new ones) the moment the server sends ``pattern``.

        The bytes carrying it are dropped: the agent never sees them.
        """
        self._watch = pattern
        self._watch_hit = asyncio.Event()
        return self._watch_hit

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            self.turned_away += 1
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            self.turned_away += 1
            writer.transport.abort()
            return
        self.accepted += 1
        pair = _Pair(writer, up_writer)
        self._pairs.add(pair)
        await asyncio.gather(
            self._pump(reader, up_writer, pair, watch=False),
            self._pump(up_reader, writer, pair, watch=True),
            return_exceptions=True,
        )
        self._pairs.discard(pair)
        pair.abort()

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pair: _Pair, watch: bool
    ) -> None:
        tail = b""
        while True:
            chunk = await reader.read(65536)
            if not chunk:
                writer.close()
                return
            if pair.blackholed:
                continue
            if watch and self._watch is not None and self._watch in tail + chunk:
                self._watch = None
                self.refuse()
                self.cut()
                self._watch_hit.set()
                return
            tail = chunk[-256:]
            writer.write(chunk)
            await writer.drain()
