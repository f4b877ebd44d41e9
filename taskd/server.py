"""``create_app(settings)``: the Starlette application and its HTTP and WebSocket adapters.

Both adapters feed ``rpc.handle``. A WebSocket gets a bounded send queue
drained by its own task (a slow agent never blocks pushes to others) and
handles each incoming message as its own task (callers may pipeline).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import re
import signal
import socket
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import replace
from types import FrameType
from typing import Any

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

import taskd.methods  # noqa: F401 - registers every method
from taskd import __version__, rpc
from taskd.admission import (
    REPORT_WINDOW,
    TURN_HEADER,
    AcceptQueue,
    Admission,
    Limits,
    Refusal,
    is_agent,
    parse_turn,
    peer_closed,
)
from taskd.app import App
from taskd.auth import client_address, origin_allowed
from taskd.clock import Clock
from taskd.config import ServerSettings
from taskd.errors import InvalidRequest
from taskd.metrics import CONTENT_TYPE
from taskd.ui.routes import Dashboard

logger = logging.getLogger(__name__)

RPC_PATHS = ("/", "/rpc", "/nodeget/rpc")
MAX_IN_FLIGHT = REPORT_WINDOW
REPORT_PREFIX = "agent_report_"
"""Methods whose calls are answered "busy" beyond a connection's ``REPORT_WINDOW``."""
MAX_QUEUED_FRAMES = 100_000
MAX_QUEUED_BYTES = 64 * 1024 * 1024
"""Replies a peer has not read yet; past either bound it is disconnected (1008). One frame
bigger than this still goes out when nothing else waits."""


class WsPeer:
    """One WebSocket connection with a bounded send queue.

    A sender task drains the queue while it has frames and then ends, so the
    thousands of idle agent connections of a big fleet hold no task for it.
    """

    def __init__(self, send: Send, remote: str) -> None:
        self._send = send
        self.remote: str | None = remote
        self._frames: deque[bytes] = deque()
        self._queued_bytes = 0
        self._closed = False
        self._close_code: int | None = None
        self._sender: asyncio.Task[None] | None = None

    @property
    def closed(self) -> bool:
        """Whether the connection has ended (or is ending)."""
        return self._closed

    def send(self, frame: bytes) -> bool:
        """Queue a frame; False if closed. A peer that stops reading is disconnected."""
        if self._closed:
            return False
        if self._frames and (
            len(self._frames) >= MAX_QUEUED_FRAMES
            or self._queued_bytes + len(frame) > MAX_QUEUED_BYTES
        ):
            logger.warning("closing WebSocket from %s: it stopped reading", self.remote)
            # it would never read the backlog: free it now instead of when the socket dies
            self._frames.clear()
            self._queued_bytes = 0
            self.close_soon(1008)
            return False
        self._frames.append(frame)
        self._queued_bytes += len(frame)
        self._wake()
        return True

    def close_soon(self, code: int) -> None:
        """Send what is queued, then close with ``code``."""
        if self._close_code is None:
            self._close_code = code
        self._closed = True
        self._wake()

    def lost(self) -> None:
        """The connection is gone: nothing more can be sent."""
        self._closed = True
        self._close_code = None
        self._frames.clear()
        self._queued_bytes = 0

    def _wake(self) -> None:
        if self._sender is None:
            self._sender = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        send = self._send
        try:
            while self._frames:
                frame = self._frames.popleft()
                self._queued_bytes -= len(frame)
                await send({"type": "websocket.send", "text": frame.decode()})
            if self._closed and self._close_code is not None:
                code, self._close_code = self._close_code, None
                await send({"type": "websocket.close", "code": code})
        except (OSError, RuntimeError):  # the client went away mid-send
            self.lost()
        finally:
            self._sender = None
            if self._frames or self._close_code is not None:
                self._wake()  # queued while the last send was in flight

    async def finished(self) -> None:
        """Wait for the frames already queued to be written."""
        while self._sender is not None:
            await asyncio.shield(self._sender)


class Connections:
    """Every open WebSocket, so shutdown can close them with 1001."""

    def __init__(self) -> None:
        self.peers: set[WsPeer] = set()
        self._empty = asyncio.Event()

    def add(self, peer: WsPeer) -> None:
        """Track an open WebSocket."""
        self.peers.add(peer)
        self._empty.clear()

    def discard(self, peer: WsPeer) -> None:
        """Forget a closed WebSocket."""
        self.peers.discard(peer)
        if not self.peers:
            self._empty.set()

    async def close_all(self, code: int = 1001, wait: float = 2.0) -> None:
        """Close every WebSocket with ``code`` and wait a little for the frames to go out."""
        for peer in list(self.peers):
            peer.close_soon(code)
        if self.peers:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._empty.wait(), wait)


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}


class RpcEndpoint:
    """JSON-RPC on ``/``, ``/rpc`` and ``/nodeget/rpc`` straight from ASGI.

    It sits in front of Starlette's router and exception middleware: every frame
    of a busy WebSocket would otherwise pass through a per-message wrapper. Other
    paths (and other HTTP methods) go on to the router.
    """

    def __init__(
        self, app: ASGIApp, service: App, connections: Connections, admission: Admission
    ) -> None:
        self.app = app
        self.service = service
        self.connections = connections
        self.admission = admission
        self.settings = service.settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and scope["path"] in RPC_PATHS:
            await self._websocket(scope, receive, send)
        elif scope["type"] == "http" and scope["path"] in RPC_PATHS and scope["method"] == "POST":
            await self._http(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self.settings.max_message_bytes
        headers = _headers(scope)
        length = headers.get("content-length", "")
        chunks: list[bytes] = []
        size = int(length) if length.isdigit() else 0
        while size <= limit:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            chunks.append(chunk)
            size = max(size, sum(map(len, chunks)))
            if not message.get("more_body", False):
                break
        if size > limit:
            await _respond(send, 413, _too_large(size, limit))
            return
        remote = client_address(scope, headers, self.settings.trust_forwarded_for)
        context = rpc.CallContext(self.service, "http", remote)
        reply = await rpc.handle(b"".join(chunks), context)
        for job in context.after_reply:
            await job()
        await _respond(send, 204 if reply is None else 200, reply or b"")

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (await receive())["type"] != "websocket.connect":
            return
        headers = _headers(scope)
        if not origin_allowed(headers.get("origin"), self.settings.allowed_origins):
            logger.warning("refused a WebSocket from origin %s", headers.get("origin"))
            await send({"type": "websocket.close", "code": 1008})
            return
        slot: _Slot | None = None
        if self.admission.enabled and is_agent(headers.get("user-agent")):
            refusal = self.admission.admit(parse_turn(headers.get(TURN_HEADER)))
            if refusal is not None:
                await _refuse(scope, send, refusal)
                return
            slot = _Slot(self.admission)
        await send({"type": "websocket.accept"})
        remote = client_address(scope, headers, self.settings.trust_forwarded_for)
        peer = WsPeer(send, remote)
        self.connections.add(peer)
        window = _Window(MAX_IN_FLIGHT)
        handlers: set[asyncio.Task[None]] = set()
        service = self.service

        lane = self.admission.lane
        clock = service.clock

        defer = self.admission.defer_backlog if slot is not None else rpc.take_now

        async def answer(body: bytes | str, received_ms: int, in_lane: bool) -> None:
            # ``in_lane``: the call holds a turn in the agents' lane, given back when done
            try:
                try:
                    context = rpc.CallContext(
                        service,
                        "websocket",
                        remote,
                        peer,
                        defer_backlog=defer,
                        received_ms=received_ms,
                    )
                    reply = await rpc.handle(body, context)
                    if reply is not None:
                        peer.send(reply)
                    for job in context.after_reply:
                        await job()
                finally:
                    if in_lane:
                        lane.release()
                if slot is not None and service.hub.subscribed_on(peer):
                    slot.release()  # in: its subscription and queued tasks are done
            except Exception:
                logger.exception("WebSocket message handling failed")
            finally:
                window.release()

        try:
            while True:
                message = await receive()
                if message["type"] != "websocket.receive":
                    break
                received_ms = clock.now_ms()
                body = message.get("text")
                if body is None:
                    body = message.get("bytes") or b""
                if window.used >= REPORT_WINDOW and self._shed(body, peer, remote):
                    continue
                # A subscribed agent's calls (reports, results) take turns in the agents'
                # lane, and its next message is not read while this one waits: under
                # overload the server reads no more than it handles (the rest waits in
                # the kernel), instead of reading every connection on every turn of the
                # loop, which made turns seconds long and left nothing to store them.
                await window.acquire()
                in_lane = slot is not None and slot.done
                if in_lane:
                    await lane.acquire()  # (a cancelled wait takes no turn)
                handler = asyncio.create_task(answer(body, received_ms, in_lane))
                handlers.add(handler)
                handler.add_done_callback(handlers.discard)
        finally:
            if slot is not None and not slot.done:
                self.admission.abandoned()  # gone before it subscribed: it waited too long
            if slot is not None:
                slot.release()
            service.hub.peer_closed(peer)
            peer.lost()
            self.connections.discard(peer)
            with contextlib.suppress(Exception):
                await peer.finished()

    def _shed(self, body: bytes | str, peer: WsPeer, remote: str) -> bool:
        """Answer ``body`` "server busy" if it holds reports only (its connection has
        ``REPORT_WINDOW`` calls in progress); False for anything else."""
        context = rpc.CallContext(self.service, "websocket", remote, peer)
        busy = rpc.busy_reply(body, REPORT_PREFIX, self.admission.shed_wait_ms, context)
        if busy is None:
            return False
        reply, reports = busy
        self.admission.shed(reports)
        if reply:
            peer.send(reply)
        return True


class _Window:
    """A bound on messages in progress per connection (asyncio.Semaphore scans its waiters)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.used = 0
        self._room = asyncio.Event()
        self._room.set()

    async def acquire(self) -> None:
        """Wait until fewer than ``size`` are in progress, then take one place."""
        while self.used >= self.size:
            self._room.clear()
            await self._room.wait()
        self.used += 1

    def release(self) -> None:
        """Give a place back."""
        self.used -= 1
        self._room.set()


class _Slot:
    """An admitted agent connection's place among those in progress, given back once."""

    def __init__(self, admission: Admission) -> None:
        self.admission = admission
        self._timer: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(
            admission.limits.hold_s, self.release
        )

    @property
    def done(self) -> bool:
        """Whether the place was given back."""
        return self._timer is None

    def release(self) -> None:
        """Give the place back (it subscribed, left, or held it ``hold_s``)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self.admission.release()


async def _refuse(scope: Scope, send: Send, refusal: Refusal) -> None:
    """Refuse a WebSocket handshake: HTTP 503 with ``Retry-After`` and the agent's turn.

    Where the server cannot answer a handshake with HTTP, the WebSocket is accepted
    and closed with 1013 "try again later", the hint in the reason.
    """
    retry_after = refusal.retry_after
    if "websocket.http.response" not in scope.get("extensions", {}):
        await send({"type": "websocket.accept"})
        await send(
            {"type": "websocket.close", "code": 1013, "reason": f"retry after {retry_after} s"}
        )
        return
    body = f"server busy: retry after {retry_after} s\n".encode()
    headers = [
        (b"retry-after", str(retry_after).encode()),
        (TURN_HEADER.encode(), str(refusal.turn).encode()),
        (b"content-type", b"text/plain"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "websocket.http.response.start", "status": 503, "headers": headers})
    await send({"type": "websocket.http.response.body", "body": body})


async def _respond(send: Send, status: int, body: bytes) -> None:
    headers = [(b"content-length", str(len(body)).encode())]
    if body:
        headers.append((b"content-type", b"application/json"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def create_app(settings: ServerSettings, clock: Clock | None = None) -> Starlette:
    """Build the Starlette application for ``settings`` (crons keep ``clock``'s time)."""
    service = App(settings, clock)
    connections = Connections()
    admission = Admission(
        Limits(
            max_in_progress=settings.admission_max_in_progress,
            rate_per_s=settings.admission_rate_per_s,
            max_lag_ms=settings.admission_max_lag_ms,
            retry_after_min_s=settings.admission_retry_after_min_s,
            retry_after_max_s=settings.admission_retry_after_max_s,
            lane_size=settings.admission_lane_size,
        ),
        service.metrics,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with service, admission.lag.running():
            yield
            await connections.close_all(1001)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok", "version": __version__, "node_id": service.node_id})

    async def metrics(request: Request) -> Response:
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)

    service.metrics.gauge(
        "taskd_websockets_open", "Open JSON-RPC WebSockets", lambda: len(connections.peers)
    )
    routes: list[Any] = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        WebSocketRoute("/terminal", service.terminals.serve),
        Dashboard(service).mount(),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        middleware=[
            Middleware(RpcEndpoint, service=service, connections=connections, admission=admission)
        ],
    )
    app.state.taskd = service
    app.state.connections = connections
    app.state.admission = admission
    app.state.terminals = service.terminals
    return app


def _admitting_protocol(admission: Admission) -> type[HttpToolsProtocol]:
    """uvicorn's HTTP protocol, refusing agents' WebSocket handshakes at the door.

    While admission control refuses agents, an agent's upgrade request is answered
    with the 503 right where it was parsed: no WebSocket protocol, no ASGI task, a
    few microseconds instead of most of a handshake's cost. A refused crowd then
    costs the event loop little. (An upgrade admitted here is decided again, and
    counted, by ``RpcEndpoint``.) An upgrade whose client has already closed (it gave
    up while the request waited in the accept queue) is dropped unanswered.
    """

    class AdmittingProtocol(HttpToolsProtocol):
        def handle_websocket_upgrade(self) -> None:
            if peer_closed(self.transport.get_extra_info("socket")):
                admission.gone()  # its client gave up while it waited in the accept queue
                self.transport.abort()
                return
            if admission.enabled:
                turn = parse_turn(next((v for n, v in self.headers if n == TURN_BYTES), None))
                reason = admission.verdict(turn)
                if reason is not None and self._agent_rpc_upgrade():
                    self.transport.write(_busy_response(admission.refuse(reason, turn)))
                    self.transport.close()
                    return
            super().handle_websocket_upgrade()

        def _agent_rpc_upgrade(self) -> bool:
            if self.url.partition(b"?")[0].decode("latin-1") not in RPC_PATHS:
                return False
            agent = next((v for n, v in self.headers if n == b"user-agent"), None)
            return agent is not None and is_agent(agent.decode("latin-1"))

    return AdmittingProtocol


TURN_BYTES = TURN_HEADER.encode()


def _busy_response(refusal: Refusal) -> bytes:
    body = f"server busy: retry after {refusal.retry_after} s\n".encode()
    return (
        b"HTTP/1.1 503 Service Unavailable\r\n"
        b"retry-after: %d\r\n%s: %d\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n"
        b"connection: close\r\n\r\n%s"
        % (refusal.retry_after, TURN_BYTES, refusal.turn, len(body), body)
    )


def uvicorn_config(app: Starlette, settings: ServerSettings, **options: Any) -> uvicorn.Config:
    """The uvicorn settings taskd runs with (fastest HTTP and WebSocket backends here)."""
    admission: Admission | None = getattr(app.state, "admission", None)
    defaults: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "http": "httptools" if admission is None else _admitting_protocol(admission),
        "ws": "websockets-sansio",
        "ws_max_size": settings.max_message_bytes * 2,
        "ws_ping_interval": settings.ws_ping_interval_s,
        "ws_ping_timeout": settings.ws_ping_timeout_s,
        "lifespan": "on",
        "log_config": None,
        "access_log": False,
        "timeout_graceful_shutdown": 10,
        # compression costs CPU on every frame, and one read of compressed frames can
        # expand into far more memory than the bytes on the wire
        "ws_per_message_deflate": False,
        # uvicorn would believe X-Forwarded-For from any local process and so let it pose
        # as any address (dodging the failed-auth limit); client_address() believes it
        # only from the proxies in trust_forwarded_for
        "proxy_headers": False,
        # connections the kernel holds before taskd sees them (at most net.core.somaxconn):
        # beyond it the kernel drops handshakes unseen, and their agents retry the SYN at
        # 1, 3 and 7 s and give up after their connect timeout. A reconnect storm arrives
        # faster than even refusals are written; a long queue holds it for the door, which
        # refuses while the queue is more than 1/8 full (admission.py)
        "backlog": 4096,
    }
    return uvicorn.Config(app, **(defaults | options))


_SECRET_PARAM = re.compile(r"([?&](?:task_)?token=)[^&\s\"]*")


class HideTokens(logging.Filter):
    """Masks ``token=`` and ``task_token=`` query values in log records."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite string arguments that carry a secret query value; keep every record."""
        if isinstance(record.args, tuple) and any(
            isinstance(arg, str) and "token=" in arg for arg in record.args
        ):
            record.args = tuple(
                _SECRET_PARAM.sub(r"\1***", arg) if isinstance(arg, str) else arg
                for arg in record.args
            )
        return True


class TaskdServer(uvicorn.Server):
    """uvicorn's server, shutting down and logging the taskd way.

    Open WebSockets are closed with 1001 "going away" (uvicorn would send 1012)
    and a SIGTERM/SIGINT ends the process with status 0 once shutdown is done
    (uvicorn would re-raise the signal). uvicorn logs every WebSocket path with its
    query, and /terminal carries tokens there: its records are masked (HideTokens).
    """

    def __init__(self, config: uvicorn.Config, app: Starlette) -> None:
        super().__init__(config)
        self.connections: Connections = app.state.connections
        self.admission: Admission | None = getattr(app.state, "admission", None)
        self._accept_queue: AcceptQueue | None = None
        uvicorn_logger = logging.getLogger("uvicorn.error")
        if not any(isinstance(f, HideTokens) for f in uvicorn_logger.filters):
            uvicorn_logger.addFilter(HideTokens())

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        self.should_exit = True

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.admission is not None and self.started:
            # admission refuses agents while the kernel's queue of handshakes fills up
            listeners = [s for server in self.servers for s in server.sockets]
            self._accept_queue = AcceptQueue(listeners)
            self.admission.accept_queue = self._accept_queue

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await self.connections.close_all(1001)
        await super().shutdown(sockets)
        if self._accept_queue is not None:
            if self.admission is not None:
                self.admission.accept_queue = None
            self._accept_queue.close()


def serve(settings: ServerSettings) -> bool:
    """Run taskd under uvicorn until a signal; False if it never started.

    Port 0 takes a free port (see ``_bind_free_port``).
    """
    sockets: list[socket.socket] | None = None
    if settings.port == 0:
        try:
            sock = _bind_free_port(settings.host)
        except OSError as exc:
            logger.error("cannot listen on %s: %s", settings.host, exc)
            return False
        settings = replace(settings, port=sock.getsockname()[1])
        sockets = [sock]
    app = create_app(settings)
    server = TaskdServer(uvicorn_config(app, settings, loop="uvloop"), app)
    _tune_gc()
    server.run(sockets=sockets)
    return bool(server.started)


def _bind_free_port(host: str) -> socket.socket:
    """A socket bound to a free port of ``host``; the URL it will serve is logged.

    It is bound before the app is made so that the app knows its port (a node's address in
    a cluster), and listens only once uvicorn serves on it: until the app has started,
    connections are refused, as on a configured port.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, 0))
    except OSError:
        sock.close()
        raise
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    logger.info("listening on http://%s:%d/", shown, sock.getsockname()[1])
    return sock


def _tune_gc() -> None:
    """Keep the cycle collector off the hot path of a busy server.

    Under load the default thresholds ran a collection every few hundred
    allocations, each walking every live request, future and task: about a
    fifth of the server's CPU. What exists at start-up (modules, schemas,
    tables) is frozen out of collections (without a collection first: that took
    a second of a restart), and young objects are collected after 50,000
    allocations instead of 700; almost everything taskd allocates is freed by
    reference counting anyway.
    """
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def _too_large(size: int, limit: int) -> bytes:
    error = InvalidRequest(f"Invalid request: body of {size} bytes exceeds the {limit}-byte limit")
    return orjson.dumps(rpc.error_reply(error))
