"""The agent's connection to its servers: connect, subscribe, run tasks, upload results.

One ``ServerLink`` per ``[[server]]``, all running at once. A link reconnects
with exponential backoff (1 s doubling to 60 s, ±20% jitter), re-subscribes
after every reconnect and detects dead connections with WebSocket pings
(``ping_interval_ms``, ``ping_timeout_ms``). Every result goes to the link's
on-disk spool before the upload, and leaves it only when the server
acknowledged it (a 108 "already uploaded" counts).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import websockets
from websockets.asyncio.client import ClientConnection

from taskd.agent.spool import Spool, link_id
from taskd.agent.tasks import TaskContext, TaskFailed, runner_for
from taskd.config import AgentServer, AgentSettings, load_agent_settings
from taskd.errors import TaskdError
from taskd.protocol import ResultVariant, TaskVariant, parse_task_event_type

logger = logging.getLogger(__name__)

BACKOFF_START_S = 1.0
BACKOFF_CAP_S = 60.0
JITTER = 0.2
CALL_TIMEOUT_S = 30.0
RETRY_SPOOL_S = 30.0
UNLIMITED_KINDS = frozenset({"web_shell"})
"""Kinds that hold a slot for as long as a person uses them do not count against the bound."""


def backoff_delays(start: float = BACKOFF_START_S, cap: float = BACKOFF_CAP_S) -> Any:
    """Reconnect delays: start, doubling up to cap, each with ±20% jitter."""
    delay = start
    while True:
        yield delay * random.uniform(1 - JITTER, 1 + JITTER)
        delay = min(delay * 2, cap)


class RpcError(Exception):
    """The server answered a call with an error."""

    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(str(error.get("message", "")))
        self.code = error.get("code")


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
        request_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            body = {"jsonrpc": "2.0", "method": method, "params": params, "id": request_id}
            await self.ws.send(orjson.dumps(body).decode())
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for drops a cancellation
            # that arrives together with the reply, and the link would never stop
            async with asyncio.timeout(CALL_TIMEOUT_S):
                reply = await future
        finally:
            self._pending.pop(request_id, None)
        if "error" in reply:
            raise RpcError(reply["error"])
        return reply.get("result")

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


class ServerLink:
    """The agent's session with one server."""

    def __init__(self, agent: Agent, server: AgentServer, spool: Spool) -> None:
        self.agent = agent
        self.server = server
        self.spool = spool
        self.rpc: Rpc | None = None
        self.subscription: int | None = None
        self.subscribed = asyncio.Event()

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
        delays = backoff_delays()
        while True:
            reason = await self._session()
            if self.subscribed.is_set():
                delays = backoff_delays()  # it worked: start the backoff afresh
            self.subscribed.clear()
            delay = next(delays)
            logger.info(
                "[%s] disconnected (%s); reconnect in %.1f s", self.server.name, reason, delay
            )
            await asyncio.sleep(delay)

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
                user_agent_header="taskd-agent",
            ) as ws:
                logger.info("[%s] connected to %s", self.server.name, self.server.ws_url)
                rpc = Rpc(ws, self._on_push)
                reader = asyncio.create_task(rpc.read())
                try:
                    await self._subscribe(rpc)
                    self.rpc = rpc
                    self.subscribed.set()
                    await self.flush()
                    while not reader.done():
                        done, _ = await asyncio.wait({reader}, timeout=RETRY_SPOOL_S)
                        if not done and len(self.spool):
                            await self.flush()
                finally:
                    self.rpc = None
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
        except (OSError, TimeoutError, websockets.WebSocketException, ConnectionError) as exc:
            return f"{type(exc).__name__}: {exc}"
        except RpcError as exc:
            return f"refused: {exc}"

    async def _subscribe(self, rpc: Rpc) -> None:
        if self.server.server_uuid is not None:
            server_uuid = await rpc.call("server_uuid", [])
            if server_uuid != self.server.server_uuid:
                raise RpcError(
                    {"message": f"server_uuid is {server_uuid}, expected {self.server.server_uuid}"}
                )
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

    async def _upload(self, rpc: Rpc, response: dict[str, Any]) -> bool:
        """Upload one result; False if the connection failed (the result stays spooled)."""
        task_id = int(response["task_id"])
        try:
            await rpc.call("task_upload_task_result", [self.server.token, response])
        except RpcError as exc:
            if exc.code not in (105, 108, -32602):
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

    async def _stop_links(self) -> None:
        for task in self._link_tasks:
            task.cancel()
        for task in self._link_tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

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
