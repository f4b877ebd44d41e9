"""The dashboard's HTTP and WebSocket endpoints, mounted at ``/ui``.

- ``GET /ui/`` the page; ``/ui/static/...`` its modules, styles and vendored assets.
- ``POST /ui/login`` ``{"token"}`` opens a session (cookie HttpOnly, SameSite=Strict,
  Secure over https); ``GET /ui/session`` tells the page who it is and its CSRF token;
  ``POST /ui/logout`` ends it.
- ``POST /ui/api`` takes a JSON-RPC request (or batch) without the token: the session's
  token is put in as the first param and the request goes to the one dispatcher, so
  the dashboard can do exactly what the token can over JSON-RPC, no more.
- ``POST /ui/can`` answers which permissions the token holds, to hide controls.
- ``WS /ui/live`` the live fleet feed (``live.py``); ``WS /ui/terminal`` a terminal on
  the ``/terminal`` relay, the session's token added on the server side.

Every POST needs the session's CSRF token in ``X-CSRF-Token`` and an ``Origin`` of this
server; WebSockets need that Origin too. Every response carries a Content-Security-Policy
without inline script.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args, get_type_hints
from urllib.parse import urlencode

import orjson
from starlette.requests import HTTPConnection, Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route, Router, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

from taskd import rpc
from taskd.auth import Need, allows, client_address, normal_origin
from taskd.errors import TaskdError
from taskd.ui.session import COOKIE, Session, Sessions

if TYPE_CHECKING:
    from taskd.app import App

logger = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
MAX_LOGIN_BYTES = 4096
RECHECK_S = 2.0
"""How often an open live feed or page checks its token again (revoked: it ends)."""
TOKEN_PARAMS = ("token", "father_token")
CATEGORIES = frozenset(get_args(get_type_hints(Need)["category"]))
CSP = (
    "default-src 'self'; script-src 'self'; connect-src 'self'; img-src 'self' data:; "
    # xterm.js writes its theme into a <style> element; no script can come in that way
    "style-src 'self' 'unsafe-inline'; font-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
]


class SecurityHeaders:
    """Adds the dashboard's security headers to every HTTP response below it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *HEADERS]
            await send(message)

        await self.app(scope, receive, send_with_headers)


class Dashboard:
    """The ``/ui`` endpoints of one server process."""

    def __init__(self, service: App) -> None:
        self.service = service
        self.sessions = Sessions(service.auth)
        self.fleet = service.fleet
        service.metrics.gauge(
            "taskd_ui_live_busy_seconds",
            "Time the dashboard's live fleet feed has worked (CPU and database reads)",
            lambda: self.fleet.busy_seconds,
        )

    def mount(self) -> Mount:
        """The ``/ui`` mount."""
        router = Router(
            [
                Route("/", self.page, methods=["GET"]),
                Route("/login", self.login, methods=["POST"]),
                Route("/logout", self.logout, methods=["POST"]),
                Route("/session", self.whoami, methods=["GET"]),
                Route("/api", self.api, methods=["POST"]),
                Route("/can", self.can, methods=["POST"]),
                WebSocketRoute("/live", self.live),
                WebSocketRoute("/terminal", self.terminal),
                Mount("/static", StaticFiles(directory=STATIC, check_dir=False)),
            ],
            redirect_slashes=False,
        )
        return Mount("/ui", app=SecurityHeaders(router))

    # ------------------------------------------------------------------ checks

    def _remote(self, connection: HTTPConnection) -> str:
        return client_address(
            connection.scope, connection.headers, self.service.settings.trust_forwarded_for
        )

    def _origin_ok(self, connection: HTTPConnection) -> bool:
        """Whether the request comes from a page of this server (or an allowed origin)."""
        origin = connection.headers.get("origin")
        if not origin:
            return False
        scheme = {"ws": "http", "wss": "https"}.get(connection.url.scheme, connection.url.scheme)
        own = f"{scheme}://{connection.headers.get('host', '')}"
        allowed = {normal_origin(own), *map(normal_origin, self.service.settings.allowed_origins)}
        return normal_origin(origin) in allowed

    def _session(self, connection: HTTPConnection) -> Session | None:
        return self.sessions.get(connection.cookies.get(COOKIE))

    async def _checked(self, request: Request) -> Session | Response:
        """The session of a POST with a good Origin and CSRF token and a token still valid;
        else the refusal."""
        if not self._origin_ok(request):
            return _refused(403, "Forbidden: the request does not come from this dashboard")
        session = self._session(request)
        if session is None:
            return _refused(401, "Not logged in")
        if not session.csrf_matches(request.headers.get("x-csrf-token")):
            return _refused(403, "Forbidden: missing or wrong CSRF token")
        if await self.sessions.principal(session, self._remote(request)) is None:
            return _refused(401, "Logged out: the token is no longer valid")
        return session

    # ------------------------------------------------------------------ pages and sessions

    async def page(self, request: Request) -> Response:
        """The single page; its modules route between fleet, agent, probes and tasks."""
        return FileResponse(STATIC / "index.html", headers={"cache-control": "no-store"})

    async def login(self, request: Request) -> Response:
        """Open a session for a token (rate-limited as token authentication is)."""
        if not self._origin_ok(request):
            return _refused(403, "Forbidden: the request does not come from this dashboard")
        body = await request.body()
        if len(body) > MAX_LOGIN_BYTES:
            return _refused(413, "Login body too large")
        try:
            token = orjson.loads(body).get("token")
        except (orjson.JSONDecodeError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            return _refused(400, 'Expected {"token": "KEY:SECRET" or "USERNAME|PASSWORD"}')
        try:
            session = await self.sessions.login(token, self._remote(request))
        except TaskdError as exc:
            return _refused(401, exc.message)
        response = JSONResponse(_who(session), headers={"cache-control": "no-store"})
        response.set_cookie(
            COOKIE,
            session.id,
            path="/ui",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        logger.info("dashboard login with token %s from %s", session.key, self._remote(request))
        return response

    async def whoami(self, request: Request) -> Response:
        """The logged-in token's key and the session's CSRF token (401 when logged out)."""
        session = self._session(request)
        if session is None or await self.sessions.principal(session, self._remote(request)) is None:
            return _refused(401, "Not logged in")
        return JSONResponse(_who(session), headers={"cache-control": "no-store"})

    async def logout(self, request: Request) -> Response:
        """End the session."""
        checked = await self._checked(request)
        if isinstance(checked, Session):
            self.sessions.end(checked)
        response = JSONResponse({"success": True})
        response.delete_cookie(COOKIE, path="/ui", httponly=True, samesite="strict")
        return response

    # ------------------------------------------------------------------ data

    async def api(self, request: Request) -> Response:
        """A JSON-RPC request (or batch) with the session's token put in."""
        checked = await self._checked(request)
        if not isinstance(checked, Session):
            return checked
        limit = self.service.settings.max_message_bytes
        body = await request.body()
        if len(body) > limit:
            return _refused(413, f"Request body exceeds the {limit}-byte limit")
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError:
            parsed = None
        if isinstance(parsed, list):
            parsed = [_with_token(item, checked.token) for item in parsed]
        else:
            parsed = _with_token(parsed, checked.token)
        context = rpc.CallContext(self.service, "http", self._remote(request))
        reply = await rpc.handle(orjson.dumps(parsed), context)
        for job in context.after_reply:
            await job()
        return Response(
            reply or b"",
            status_code=204 if reply is None else 200,
            media_type="application/json",
            headers={"cache-control": "no-store"},
        )

    async def can(self, request: Request) -> Response:
        """Which of the listed permissions the token holds: ``{"needs": [[category, action,
        subject, agent_uuid], ...]}`` → ``[bool, ...]`` (the same check as every method)."""
        checked = await self._checked(request)
        if not isinstance(checked, Session):
            return checked
        principal = await self.sessions.principal(checked, self._remote(request))
        try:
            needs = orjson.loads(await request.body())["needs"]
            answers = [
                principal is not None
                and category in CATEGORIES
                and allows(principal, Need(category, action, subject), agent)
                for category, action, subject, agent in needs[:1000]
            ]
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return _refused(400, 'Expected {"needs": [[category, action, subject, agent], ...]}')
        return JSONResponse(answers, headers={"cache-control": "no-store"})

    async def live(self, websocket: WebSocket) -> None:
        """The live fleet feed for the session's token."""
        session = self._session(websocket) if self._origin_ok(websocket) else None
        principal = (
            None
            if session is None
            else await self.sessions.principal(session, self._remote(websocket))
        )
        if session is None or principal is None:
            await websocket.close(1008)
            return
        await websocket.accept()
        remote = self._remote(websocket)

        async def watch_client() -> None:
            with contextlib.suppress(WebSocketDisconnect):
                while (await websocket.receive())["type"] != "websocket.disconnect":
                    pass

        async def recheck() -> None:
            while True:
                await asyncio.sleep(RECHECK_S)
                if await self.sessions.principal(session, remote) is None:
                    return

        async with self.fleet.subscribe(principal) as subscriber:

            async def forward() -> None:
                while True:
                    await websocket.send_text((await subscriber.frames.get()).decode())

            tasks = [asyncio.create_task(job()) for job in (watch_client, recheck, forward)]
            try:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(RuntimeError, OSError, WebSocketDisconnect):
            await websocket.close(1000 if self.sessions.get(session.id) else 4401)

    async def terminal(self, websocket: WebSocket) -> None:
        """A terminal of the ``/terminal`` relay, the session's token added server-side."""
        session = self._session(websocket) if self._origin_ok(websocket) else None
        if (
            session is None
            or await self.sessions.principal(session, self._remote(websocket)) is None
        ):
            await websocket.close(1008)
            return
        wanted = {
            name: websocket.query_params.get(name, "") for name in ("agent_uuid", "terminal_id")
        }
        scope = dict(websocket.scope)
        scope["query_string"] = urlencode({**wanted, "token": session.token}).encode()
        # the Origin was checked above as this dashboard's own; the relay checks the
        # configured browser origins only
        scope["headers"] = [(k, v) for k, v in websocket.scope["headers"] if k != b"origin"]
        await self.service.terminals.serve(WebSocket(scope, websocket.receive, websocket.send))


def _who(session: Session) -> dict[str, str]:
    return {"key": session.key, "csrf": session.csrf}


def _refused(status: int, message: str) -> Response:
    return JSONResponse(
        {"error": message}, status_code=status, headers={"cache-control": "no-store"}
    )


def _with_token(item: Any, token: str) -> Any:
    """A request item with ``token`` as its first param, for the methods that take one."""
    if not isinstance(item, dict):
        return item
    name = item.get("method")
    info = rpc.REGISTRY.get(name) if isinstance(name, str) else None
    if info is None or not info.params or info.params[0].name not in TOKEN_PARAMS:
        return item
    params = item.get("params", [])
    if isinstance(params, list):
        return {**item, "params": [token, *params]}
    if isinstance(params, dict):
        return {**item, "params": {**params, info.params[0].name: token}}
    return item
