"""A minimal JSON-RPC server that records what agents send, and a proxy that refuses WebSockets.

``Endpoint`` is a real Starlette app under uvicorn on a local port: JSON-RPC over
HTTP POST and over WebSocket on ``/``. It answers ``task_register_task`` with a
subscription, ``task_upload_task_result`` and ``agent_report_*`` as a server that
stored them, and ``server_uuid``; it records every call with the transport it
came over, and can push tasks to the subscribed WebSockets. It stands in for the
taskd server until the server has the monitoring methods.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from tests.helpers import scaled

SERVER_UUID = str(uuid.uuid4())


@dataclass(frozen=True)
class Call:
    """One JSON-RPC request the endpoint received."""

    transport: str
    method: str
    params: Any
    at: float
    busy: bool = False
    """Answered "server busy" (-32000) rather than taken."""


class Endpoint:
    """A recording JSON-RPC endpoint on a real uvicorn server."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.missing: set[str] = set()
        self.busy_summaries = 0
        """This many summaries, from now, are answered "server busy" with ``busy_ms``."""
        self.busy_ms = 500
        self.busy_dynamic = 0
        """This many dynamic reports, from now, are answered "server busy" with ``busy_ms``."""
        self.sockets: set[WebSocket] = set()
        self.port = 0
        self._server: uvicorn.Server | None = None
        self._serving: asyncio.Task[None] | None = None
        self._socket: socket.socket | None = None
        self._next_subscription = 1
        self.app = Starlette(
            routes=[Route("/", self._http, methods=["POST"]), WebSocketRoute("/", self._ws)]
        )

    @property
    def ws_url(self) -> str:
        """The URL agents connect to."""
        return f"ws://127.0.0.1:{self.port}/"

    def of(self, method: str, transport: str | None = None) -> list[Call]:
        """The calls of one method so far (over one transport)."""
        return [
            c
            for c in self.calls
            if c.method == method and (transport is None or c.transport == transport)
        ]

    def reports(self, method: str, transport: str | None = None) -> list[dict[str, Any]]:
        """The data of every report of ``method`` received so far."""
        return [c.params[1] for c in self.of(method, transport)]

    async def wait_for(
        self, condition: Callable[[], Any], timeout: float = 10, what: str = "condition"
    ) -> Any:
        """Poll until ``condition()`` is true; return its value."""
        deadline = time.monotonic() + scaled(timeout)
        while time.monotonic() < deadline:
            if value := condition():
                return value
            await asyncio.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}")

    def _answer(self, transport: str, request: Any) -> dict[str, Any] | None:
        if not isinstance(request, dict):
            return {"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": "bad"}}
        method = str(request.get("method"))
        busy = method == "agent_report_dynamic_summary" and self.busy_summaries > 0
        self.busy_summaries -= busy
        busy_dynamic = method == "agent_report_dynamic" and self.busy_dynamic > 0
        self.busy_dynamic -= busy_dynamic
        busy = busy or busy_dynamic
        self.calls.append(Call(transport, method, request.get("params"), time.monotonic(), busy))
        if "id" not in request:
            return None
        reply: dict[str, Any] = {"jsonrpc": "2.0", "id": request["id"]}
        if busy:
            data = {"retry_after_ms": self.busy_ms}
            reply["error"] = {"code": -32000, "message": "Server busy", "data": data}
        elif method in self.missing:
            reply["error"] = {"code": -32601, "message": f"Method not found: {method}"}
        elif method == "task_register_task":
            reply["result"] = self._next_subscription
            self._next_subscription += 1
        elif method == "server_uuid":
            reply["result"] = SERVER_UUID
        elif method == "task_upload_task_result":
            reply["result"] = True
        elif method.startswith("agent_report_"):
            reply["result"] = {"status": "stored"}
        else:
            reply["error"] = {"code": -32601, "message": f"Method not found: {method}"}
        return reply

    def _answer_all(self, transport: str, body: bytes | str) -> bytes | None:
        data = orjson.loads(body)
        if isinstance(data, list):
            replies = [r for r in (self._answer(transport, item) for item in data) if r]
            return orjson.dumps(replies) if replies else None
        reply = self._answer(transport, data)
        return orjson.dumps(reply) if reply else None

    async def _http(self, request: Request) -> Response:
        body = self._answer_all("http", await request.body())
        return Response(body or b"", media_type="application/json")

    async def _ws(self, websocket: WebSocket) -> None:
        await websocket.accept()
        self.sockets.add(websocket)
        try:
            while True:
                reply = self._answer_all("ws", await websocket.receive_text())
                if reply is not None:
                    await websocket.send_text(reply.decode())
        except WebSocketDisconnect:
            pass
        finally:
            self.sockets.discard(websocket)

    async def push(self, task: dict[str, Any]) -> None:
        """Push a task to every connected agent, as task_register_task does."""
        frame = {
            "jsonrpc": "2.0",
            "method": "task_register_task",
            "params": {"subscription": 1, "result": task},
        }
        for websocket in list(self.sockets):
            await websocket.send_text(orjson.dumps(frame).decode())

    async def start(self, port: int = 0) -> None:
        """Listen on ``port`` (a free one if 0)."""
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            http="httptools",
            ws="websockets-sansio",
            lifespan="off",
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=1,
        )
        self._server = uvicorn.Server(config)
        self._serving = asyncio.create_task(self._server.serve(sockets=[sock]))
        self._socket = sock
        while not self._server.started:
            if self._serving.done():
                self._serving.result()
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """Close every WebSocket and stop listening."""
        for websocket in list(self.sockets):
            with contextlib.suppress(Exception):
                await websocket.close(1001)
        if self._server is not None and self._serving is not None:
            self._server.should_exit = True
            await self._serving
            self._server = self._serving = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None


@contextlib.asynccontextmanager
async def running_endpoint(port: int = 0) -> AsyncIterator[Endpoint]:
    """An Endpoint listening for the block."""
    endpoint = Endpoint()
    await endpoint.start(port)
    try:
        yield endpoint
    finally:
        await endpoint.stop()


class NoUpgradeProxy:
    """A TCP proxy that answers WebSocket upgrades with 426 and passes plain HTTP through.

    Set ``refuse_upgrades`` to False and it passes WebSockets too.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.refuse_upgrades = True
        self.refused = 0
        self.port = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def ws_url(self) -> str:
        """The URL agents connect to through the proxy."""
        return f"ws://127.0.0.1:{self.port}/"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            writer.close()
            return
        if self.refuse_upgrades and b"\r\nupgrade: websocket" in head.lower():
            self.refused += 1
            writer.write(
                b"HTTP/1.1 426 Upgrade Required\r\ncontent-type: text/plain\r\n"
                b"content-length: 27\r\nconnection: close\r\n\r\nWebSockets are not allowed"
                b"\n"
            )
            with contextlib.suppress(OSError):
                await writer.drain()
            writer.close()
            return
        try:
            upstream_reader, upstream = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.write(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n")
            writer.close()
            return
        self._writers.add(upstream)
        upstream.write(head)
        for source, sink in ((reader, upstream), (upstream_reader, writer)):
            task = asyncio.create_task(self._pump(source, sink))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        sink.close()


@contextlib.asynccontextmanager
async def no_upgrade_proxy(target_port: int) -> AsyncIterator[NoUpgradeProxy]:
    """A NoUpgradeProxy in front of ``target_port`` for the block."""
    proxy = NoUpgradeProxy(target_port)
    server = await asyncio.start_server(proxy._handle, "127.0.0.1", 0)
    proxy.port = server.sockets[0].getsockname()[1]
    try:
        yield proxy
    finally:
        server.close()
        for writer in list(proxy._writers):
            writer.close()
        for task in list(proxy._tasks):
            task.cancel()
        await asyncio.gather(*proxy._tasks, return_exceptions=True)
        await server.wait_closed()
