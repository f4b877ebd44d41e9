"""The agent's connection to its servers: connect, subscribe, run tasks, upload results.

One ``ServerLink`` per ``[[server]]``, all running at once. A link reconnects
with exponential backoff (1 s doubling to 60 s, ±20% jitter), re-subscribes
after every reconnect and detects dead connections with WebSocket pings
(``ping_interval_ms``, ``ping_timeout_ms``). Every result goes to the link's
on-disk spool before the upload, and leaves it only when the server
acknowledged it (a 108 "already uploaded" counts). Host reports go the same way
from the link's ``Outbox`` (``monitor_report``).

When the server answers the WebSocket upgrade with plain HTTP (a proxy that
does not pass WebSockets), the link falls back to JSON-RPC over HTTP POST to
the same URL (ws→http, wss→https): it keeps reporting and uploads the spooled
results, but gets no tasks (only a WebSocket carries pushes), and tries the
upgrade again every ``http_fallback_retry_ms``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import ssl
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import orjson
import websockets
from websockets.asyncio.client import ClientConnection

from taskd.admission import AGENT_USER_AGENT, TURN_HEADER, parse_retry_after, parse_turn
from taskd.agent.monitor_report import Collector, Outbox
from taskd.agent.spool import ReportBuffer, Spool, link_id
from taskd.agent.tasks import TaskContext, TaskFailed, runner_for
from taskd.config import AgentServer, AgentSettings, load_agent_settings
from taskd.errors import ErrorCode, TaskdError
from taskd.protocol import ResultVariant, TaskVariant, parse_task_event_type

logger = logging.getLogger(__name__)

BACKOFF_START_S = 1.0
BACKOFF_CAP_S = 60.0
JITTER = 0.2
RETRY_AFTER_JITTER = 0.25
"""A server's retry hint is waited out plus up to this fraction more, never less."""
CALL_TIMEOUT_S = 30.0
RETRY_SPOOL_S = 30.0
UNLIMITED_KINDS = frozenset({"web_shell"})
"""Kinds that hold a slot for as long as a person uses them do not count against the bound."""
REPORT_JOURNAL = "reports.journal"


def backoff_delays(start: float = BACKOFF_START_S, cap: float = BACKOFF_CAP_S) -> Any:
    """Reconnect delays: start, doubling up to cap, each with ±20% jitter."""
    delay = start
    while True:
        yield delay * random.uniform(1 - JITTER, 1 + JITTER)
        delay = min(delay * 2, cap)


def busy_hint(exc: websockets.InvalidStatus) -> float | None:
    """The seconds a refused handshake asks to wait (503 with ``Retry-After``), if it does."""
    response = exc.response
    if response.status_code != 503:
        return None
    return parse_retry_after(response.headers.get("Retry-After"))


def hinted_delay(hint: float) -> float:
    """How long to wait on a server's retry hint: the hint, jittered upwards only."""
    return min(hint, BACKOFF_CAP_S) * random.uniform(1, 1 + RETRY_AFTER_JITTER)


class RpcError(Exception):
    """The server answered a call with an error."""

    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(str(error.get("message", "")))
        self.code = error.get("code")


def _requests(ids: Any, calls: Sequence[tuple[str, list[Any]]]) -> tuple[list[Any], bytes]:
    """The ids and the JSON of a request (one call) or a batch (several)."""
    numbers = [next(ids) for _ in calls]
    bodies = [
        {"jsonrpc": "2.0", "method": method, "params": params, "id": number}
        for number, (method, params) in zip(numbers, calls, strict=True)
    ]
    return numbers, orjson.dumps(bodies if len(bodies) > 1 else bodies[0])


def _result(reply: dict[str, Any]) -> Any:
    if "error" in reply:
        raise RpcError(reply["error"])
    return reply.get("result")


class Rpc:
    """JSON-RPC over one WebSocket: calls matched to replies, notifications to a callback."""

    def __init__(
        self, ws: ClientConnection, on_notification: Callable[[dict[str, Any]], None]
    ) -> None:
        self.ws = ws
        self.on_notification = on_notification
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}

    async def call(self, method: str, params: list[Any]) -> Any:
        """Send a request and wait for its result; RpcError on an error reply."""
        return _result((await self.call_many([(method, params)]))[0])

    async def call_many(self, calls: Sequence[tuple[str, list[Any]]]) -> list[dict[str, Any]]:
        """Send the calls in one frame (a batch if several); their reply objects in order."""
        loop = asyncio.get_running_loop()
        ids, body = _requests(self._ids, calls)
        futures: list[asyncio.Future[dict[str, Any]]] = []
        for request_id in ids:
            futures.append(loop.create_future())
            self._pending[request_id] = futures[-1]
        try:
            await self.ws.send(body.decode())
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for drops a cancellation
            # that arrives together with the reply, and the link would never stop
            async with asyncio.timeout(CALL_TIMEOUT_S):
                return list(await asyncio.gather(*futures))
        finally:
            for request_id in ids:
                self._pending.pop(request_id, None)

    async def read(self) -> None:
        """Dispatch incoming messages until the connection closes."""
        try:
            async for message in self.ws:
                try:
                    data = orjson.loads(message)
                except orjson.JSONDecodeError:
                    logger.warning("server sent a message that is not JSON; ignored")
                    continue
                for item in data if isinstance(data, list) else [data]:
                    if not isinstance(item, dict):
                        continue
                    request_id = item.get("id")
                    future = self._pending.get(request_id) if isinstance(request_id, int) else None
                    if future is not None and not future.done():
                        future.set_result(item)
                    elif "method" in item:
                        self.on_notification(item)
        finally:
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(ConnectionError("connection closed"))


class HttpRpc:
    """JSON-RPC over HTTP POST: the fallback transport where no WebSocket gets through."""

    def __init__(self, url: str, verify: ssl.SSLContext | bool) -> None:
        self.url = url
        self.broken = asyncio.Event()
        self._ids = itertools.count(1)
        self._client = httpx.AsyncClient(
            verify=verify,
            timeout=CALL_TIMEOUT_S,
            trust_env=False,
            headers={"user-agent": "taskd-agent", "content-type": "application/json"},
        )

    async def __aenter__(self) -> HttpRpc:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self._client.aclose()

    async def call(self, method: str, params: list[Any]) -> Any:
        """Send a request and return its result; RpcError on an error reply."""
        return _result((await self.call_many([(method, params)]))[0])

    async def call_many(self, calls: Sequence[tuple[str, list[Any]]]) -> list[dict[str, Any]]:
        """POST the calls (a batch if several); their reply objects in order.

        ConnectionError when no JSON-RPC answer comes back; the transport is then broken.
        """
        ids, body = _requests(self._ids, calls)
        try:
            response = await self._client.post(self.url, content=body)
            data = orjson.loads(response.content)
        except (httpx.HTTPError, orjson.JSONDecodeError) as exc:
            self.broken.set()
            raise ConnectionError(f"HTTP POST to {self.url} failed: {exc}") from exc
        replies = {
            item.get("id"): item
            for item in (data if isinstance(data, list) else [data])
            if isinstance(item, dict)
        }
        if not any(request_id in replies for request_id in ids):
            self.broken.set()
            raise ConnectionError(f"HTTP {response.status_code} without a JSON-RPC reply")
        missing = {"error": {"code": -32603, "message": "no reply to this call in the batch"}}
        return [replies.get(request_id, missing) for request_id in ids]


def http_url(ws_url: str) -> str:
    """The HTTP twin of a WebSocket URL: ws→http, wss→https."""
    return "http" + ws_url[2:]


class ServerLink:
    """The agent's session with one server."""

    def __init__(self, agent: Agent, server: AgentServer, spool: Spool) -> None:
        self.agent = agent
        self.server = server
        self.spool = spool
        self.rpc: Rpc | HttpRpc | None = None
        self.subscription: int | None = None
        self.subscribed = asyncio.Event()
        self.upgrade_refused = False
        self.retry_hint: float | None = None
        """Seconds a busy server asked the last handshake to wait before the next one."""
        self.turn: int | None = None
        """The turn a busy server gave this agent, brought back with the next handshake."""
        self.on_http = False
        self.outbox: Outbox | None = None
        settings = agent.settings
        journal = spool.directory / REPORT_JOURNAL
        if settings.report_metrics:
            buffer = ReportBuffer(
                journal, settings.report_buffer_max_count, settings.report_buffer_max_age_ms
            )
            self.outbox = Outbox(server.name, server.token, settings, buffer, lambda: self.rpc)
        else:  # reports switched off: what an earlier run buffered will not be sent
            journal.unlink(missing_ok=True)

    @property
    def settings(self) -> AgentSettings:
        """The agent's current settings."""
        return self.agent.settings

    def _ssl(self) -> ssl.SSLContext | None:
        if not self.server.ws_url.startswith("wss://"):
            return None
        context = ssl.create_default_context()
        if self.server.ignore_cert:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    async def run_forever(self) -> None:
        """Stay connected and subscribed until cancelled."""
        reports = asyncio.create_task(self.outbox.run()) if self.outbox else None
        try:
            await self._connect_forever()
        finally:
            if reports is not None:
                reports.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reports
            if self.outbox is not None:
                self.outbox.buffer.close()

    async def _connect_forever(self) -> None:
        delays = backoff_delays()
        while True:
            self.upgrade_refused = False
            self.retry_hint = None
            reason = await self._session()
            if self.subscribed.is_set():
                delays = backoff_delays()  # it worked: start the backoff afresh
            self.subscribed.clear()
            if self.retry_hint is not None:
                # the server is busy taking a crowd in: come back when it says, not sooner
                delay = hinted_delay(self.retry_hint)
                logger.info(
                    "[%s] server busy (%s); reconnect in %.1f s", self.server.name, reason, delay
                )
                await asyncio.sleep(delay)
                continue
            if self.upgrade_refused and self.settings.http_fallback:
                self.on_http = await self._http_session(reason)
                if self.on_http:
                    delays = backoff_delays()
                    continue  # the fallback served its time: try the WebSocket again now
                reason += "; HTTP POST failed too"
            else:
                self.on_http = False
            delay = next(delays)
            logger.info(
                "[%s] disconnected (%s); reconnect in %.1f s", self.server.name, reason, delay
            )
            await asyncio.sleep(delay)

    async def _http_session(self, why: str) -> bool:
        """Report and upload results over HTTP POST for ``http_fallback_retry_ms``.

        Returns False at once if HTTP does not work either, or when it stops working.
        """
        url = http_url(self.server.ws_url)
        async with HttpRpc(url, self._ssl() or True) as rpc:
            try:
                await self._check_server_uuid(rpc)
            except RpcError as exc:
                if self.server.server_uuid is not None:
                    logger.warning("[%s] refused over HTTP: %s", self.server.name, exc)
                    return False
            except (ConnectionError, TimeoutError, OSError):
                return False
            logger.log(
                logging.DEBUG if self.on_http else logging.INFO,  # once, not every retry
                "[%s] no WebSocket (%s): reporting and uploading results over HTTP POST to %s; "
                "no tasks until the WebSocket works again",
                self.server.name,
                why,
                url,
            )
            self.rpc = rpc
            if self.outbox is not None:
                self.outbox.connected()
            try:
                await self.flush()
                deadline = time.monotonic() + self.settings.http_fallback_retry_ms / 1000
                while not rpc.broken.is_set() and (left := deadline - time.monotonic()) > 0:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(min(left, RETRY_SPOOL_S)):
                            await rpc.broken.wait()
                    if not rpc.broken.is_set() and len(self.spool):
                        await self.flush()
            finally:
                self.rpc = None
                if self.outbox is not None:
                    self.outbox.disconnected()
            return not rpc.broken.is_set()

    async def _session(self) -> str:
        """One connection: subscribe, deliver the spool, serve pushes. Returns why it ended."""
        ping_timeout = self.settings.ping_timeout_ms / 1000
        try:
            async with websockets.connect(
                self.server.ws_url,
                open_timeout=self.settings.connect_timeout_ms / 1000,
                ping_interval=self.settings.ping_interval_ms / 1000,
                ping_timeout=ping_timeout,
                # a peer that stopped answering pings will not answer a close either
                close_timeout=ping_timeout,
                max_size=64 * 1024 * 1024,
                ssl=self._ssl(),
                proxy=None,
                user_agent_header=AGENT_USER_AGENT,
                additional_headers={TURN_HEADER: str(self.turn)} if self.turn else None,
            ) as ws:
                self.turn = None
                logger.info("[%s] connected to %s", self.server.name, self.server.ws_url)
                rpc = Rpc(ws, self._on_push)
                reader = asyncio.create_task(rpc.read())
                try:
                    await self._subscribe(rpc)
                    self.rpc = rpc
                    self.subscribed.set()
                    self.on_http = False
                    if self.outbox is not None:
                        self.outbox.connected()
                    await self.flush()
                    while not reader.done():
                        done, _ = await asyncio.wait({reader}, timeout=RETRY_SPOOL_S)
                        if not done and len(self.spool):
                            await self.flush()
                finally:
                    self.rpc = None
                    if self.outbox is not None:
                        self.outbox.disconnected()
                    reader.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await reader
                if ws.protocol.close_rcvd is None:
                    sent = ws.protocol.close_sent
                    return (
                        f"connection lost ({sent.reason})"
                        if sent and sent.reason
                        else "connection lost"
                    )
                return f"closed: {ws.close_code} {ws.close_reason}".strip()
        except websockets.InvalidStatus as exc:
            if exc.response.status_code == 503:  # busy or down for now: not an HTTP-only proxy
                self.retry_hint = busy_hint(exc)
                self.turn = parse_turn(exc.response.headers.get(TURN_HEADER))
                hint = "" if self.retry_hint is None else f", Retry-After {self.retry_hint:g} s"
                return f"HTTP 503{hint}"
            self.upgrade_refused = True
            return f"upgrade refused: {exc}"
        except websockets.InvalidHeader as exc:
            # an HTTP answer, but no WebSocket: perhaps a proxy that passes plain HTTP only
            # (no answer at all, such as a reset, is InvalidMessage: an ordinary reconnect)
            self.upgrade_refused = True
            return f"upgrade refused: {exc}"
        except (OSError, TimeoutError, websockets.WebSocketException, ConnectionError) as exc:
            return f"{type(exc).__name__}: {exc}"
        except RpcError as exc:
            return f"refused: {exc}"

    async def _check_server_uuid(self, rpc: Rpc | HttpRpc) -> None:
        """RpcError unless the server is the pinned one (any JSON-RPC answer when none is)."""
        server_uuid = await rpc.call("server_uuid", [])
        if self.server.server_uuid is not None and server_uuid != self.server.server_uuid:
            raise RpcError(
                {"message": f"server_uuid is {server_uuid}, expected {self.server.server_uuid}"}
            )

    async def _subscribe(self, rpc: Rpc) -> None:
        if self.server.server_uuid is not None:
            await self._check_server_uuid(rpc)
        self.subscription = await rpc.call(
            "task_register_task", [self.server.token, self.settings.agent_uuid]
        )
        logger.info("[%s] subscribed as agent %s", self.server.name, self.settings.agent_uuid)

    # ------------------------------------------------------------------ tasks

    def _on_push(self, frame: dict[str, Any]) -> None:
        if frame.get("method") != "task_register_task":
            return
        params = frame.get("params")
        result = params.get("result") if isinstance(params, dict) else None
        if not isinstance(result, dict) or not isinstance(result.get("task_id"), int):
            logger.warning("[%s] push without a task id; cannot answer it", self.server.name)
            return
        self.agent.spawn(self._handle(result))

    async def _handle(self, push: dict[str, Any]) -> None:
        task_id: int = push["task_id"]
        task_token = str(push.get("task_token", ""))
        started = time.monotonic()
        outcome: ResultVariant | str
        kind = "?"
        try:
            task = parse_task_event_type(push.get("task_event_type"))
            kind = task.kind
            outcome = await self._run(
                task, TaskContext(self.settings, self.server, task_id, task_token)
            )
        except TaskdError as exc:
            outcome = f"unparseable task: {exc.message}"
        response: dict[str, Any] = {
            "task_id": task_id,
            "agent_uuid": self.settings.agent_uuid,
            "task_token": task_token,
            "timestamp": time.time_ns() // 1_000_000,
            "success": not isinstance(outcome, str),
        }
        if isinstance(outcome, str):
            response["error_message"] = outcome
        else:
            response["task_event_result"] = outcome.to_wire()
        logger.debug("task %d (%s) done in %.3f s", task_id, kind, time.monotonic() - started)
        try:
            await self.deliver(response)
        except OSError as exc:  # the spool is unwritable: the result can only be sent now
            logger.error(
                "[%s] cannot spool the result of task %d: %s", self.server.name, task_id, exc
            )
            if self.rpc is not None:
                await self._upload(self.rpc, response)
        await self.agent.after_task(kind, outcome)

    async def _run(self, task: TaskVariant, ctx: TaskContext) -> ResultVariant | str:
        if not self.server.allows(task.kind):
            return f"permission denied: task type {task.kind} is not allowed on this agent"
        bound = contextlib.nullcontext() if task.kind in UNLIMITED_KINDS else self.agent.slots
        limit = 0.0
        try:
            runner, limit = runner_for(task.kind, self.settings)
            async with bound, asyncio.timeout(limit):
                return await runner(task, ctx)
        except TaskFailed as exc:
            return str(exc) or "failed"
        except TimeoutError:
            return f"timed out after {limit:g} s"
        except Exception as exc:
            logger.exception("task %d (%s) crashed", ctx.task_id, task.kind)
            return f"internal error: {type(exc).__name__}: {exc}"

    # ------------------------------------------------------------------ results

    async def deliver(self, response: dict[str, Any]) -> None:
        """Spool a result, then try to upload it now."""
        self.spool.put(response)
        if self.rpc is not None:
            await self._upload(self.rpc, response)

    async def flush(self) -> None:
        """Upload every spooled result."""
        pending = self.spool.pending()
        if pending:
            logger.info("[%s] uploading %d spooled result(s)", self.server.name, len(pending))
        for response in pending:
            if self.rpc is None or not await self._upload(self.rpc, response):
                return

    async def _upload(self, rpc: Rpc | HttpRpc, response: dict[str, Any]) -> bool:
        """Upload one result; False if the connection failed (the result stays spooled)."""
        task_id = int(response["task_id"])
        try:
            await rpc.call("task_upload_task_result", [self.server.token, response])
        except RpcError as exc:
            if exc.code not in (
                ErrorCode.NOT_FOUND,
                ErrorCode.INVALID_INPUT,
                ErrorCode.INVALID_PARAMS,
            ):
                logger.warning(
                    "[%s] upload of task %d failed: %s; will retry", self.server.name, task_id, exc
                )
                return True
            # 108 "already has a result": an earlier attempt was stored but its reply lost.
            # Otherwise the server will never take this result: keeping it would retry forever.
            if "already" not in str(exc):
                logger.error(
                    "[%s] server refused the result of task %d: %s", self.server.name, task_id, exc
                )
        except (TimeoutError, ConnectionError, OSError, websockets.WebSocketException):
            return False
        self.spool.done(task_id)
        return True


class Agent:
    """One agent process: a link per server, a bound on concurrent tasks."""

    def __init__(self, settings: AgentSettings, state_dir: Path) -> None:
        self.settings = settings
        self.state_dir = state_dir
        self.slots = asyncio.Semaphore(settings.max_concurrency)
        self.links: list[ServerLink] = []
        self._link_tasks: list[asyncio.Task[None]] = []
        self._collector: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._restart = asyncio.Event()
        self._reexec = False

    def spawn(self, coro: Any) -> None:
        """Run a task handler in the background, keeping a reference."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _start_links(self) -> None:
        root = self.state_dir / "spool"
        self.links = []
        for server in self.settings.servers:
            link = link_id(server.ws_url, self.settings.agent_uuid)
            spool = Spool(root / link, link, server.ws_url)
            self.links.append(ServerLink(self, server, spool))
        _adopt_old_spools(root, self.links, self.settings.agent_uuid)
        self._link_tasks = [
            asyncio.create_task(link.run_forever(), name=f"link-{link.server.name}")
            for link in self.links
        ]
        outboxes = [link.outbox for link in self.links if link.outbox is not None]
        if outboxes:
            collector = Collector(self.settings, outboxes)
            self._collector = asyncio.create_task(collector.run(), name="host-reports")

    async def _stop_links(self) -> None:
        # the collector first: nothing may reach an outbox once its link has closed it
        for group in ([self._collector] if self._collector else [], self._link_tasks):
            for task in group:
                task.cancel()
            for task in group:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._collector = None

    async def run(self) -> None:
        """Serve every server until cancelled; reload after config edits, re-exec after updates."""
        try:
            while True:
                self._start_links()
                await self._restart.wait()
                self._restart.clear()
                await self._stop_links()
                if self._reexec:
                    from taskd.agent.tasks.self_update import reexec

                    logger.info("restarting into the updated version")
                    reexec()
                self._reload()
        finally:
            await self._stop_links()
            for task in list(self._tasks):
                task.cancel()

    def _reload(self) -> None:
        if self.settings.config_path is None:
            return
        try:
            settings = load_agent_settings(self.settings.config_path)
        except TaskdError as exc:
            logger.error("config reload failed, keeping the old one: %s", exc.message)
            return
        if settings.agent_uuid == "auto_gen":
            settings = settings.with_uuid(self.settings.agent_uuid)
        self.settings = settings
        logger.info("configuration reloaded")

    async def after_task(self, kind: str, outcome: ResultVariant | str) -> None:
        """React to tasks that change the agent itself."""
        if isinstance(outcome, str):
            return
        if kind == "edit_config":
            self._restart.set()
        elif kind == "self_update" and outcome.to_wire() == {"self_update": True}:
            self._reexec = True
            self._restart.set()


def _old_spool_name(name: str) -> str:
    """The spool directory an agent used to give a server: its name, made safe."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "server"


def _adopt_old_spools(root: Path, links: list[ServerLink], agent_uuid: str) -> None:
    """Hand results left in old-style, name-keyed spool directories to the link they belong to.

    Such a result does not say which server it was for: it is adopted by the server
    whose name the directory has or, when there is only one server, by that one.
    Anything that cannot be attributed stays on disk and is reported.
    """
    current = {link.spool.directory for link in links}
    for directory in sorted(p for p in root.iterdir() if p.is_dir() and p not in current):
        named = [link for link in links if _old_spool_name(link.server.name) == directory.name]
        owner = named[0] if len(named) == 1 else links[0] if len(links) == 1 else None
        if owner is not None:
            moved = owner.spool.adopt(directory, agent_uuid)
            if moved:
                logger.info(
                    "[%s] took over %d spooled result(s) from %s",
                    owner.server.name,
                    moved,
                    directory,
                )
        left = sum(1 for _ in directory.glob("*.json")) if directory.is_dir() else 0
        if left:
            logger.warning(
                "%d spooled result(s) in %s belong to no configured server; kept", left, directory
            )
