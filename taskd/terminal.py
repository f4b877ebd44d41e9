"""The ``WS /terminal`` relay: pairs an agent's PTY connection with one user's connection.

The agent connects first, proving an unanswered ``web_shell`` task with its
task_token; that opens the slot (agent_uuid, terminal_id). One user holding
``terminal.connect`` on that agent then attaches, and frames flow verbatim
both ways until either side closes, which closes the other and frees the slot.
A side also ends when the token it holds the session with (the user's, or the
one the agent subscribed with) is revoked or expires.

Each direction forwards one message at a time and awaits the send, so a side
that stops reading stalls the other side's reads (uvicorn stops reading a
socket while a message waits for the application) instead of growing a
buffer. Before a user attaches, a little agent output (the shell prompt) is
held in a bounded buffer.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
import websockets
from starlette.datastructures import QueryParams
from starlette.types import Message
from starlette.websockets import WebSocket, WebSocketDisconnect

from taskd.auth import Need, Principal, authorize, client_address, origin_allowed
from taskd.clock import now_ms
from taskd.cluster import Cluster
from taskd.config import ServerSettings
from taskd.errors import (
    InternalError,
    InvalidInput,
    NotFound,
    PermissionDenied,
    TaskdError,
    TaskTimeout,
)
from taskd.hub import Hub
from taskd.models import TaskState
from taskd.protocol import canonical_uuid
from taskd.store import Store

logger = logging.getLogger(__name__)

MAX_FRAME_BYTES = 1 << 20
"""Largest message relayed in either direction."""
USER_WAIT_S = 10.0
"""How long a user waits for the agent to open the slot."""
ATTACH_WAIT_S = 300.0
"""How long an agent's open slot waits for a user before it is closed."""
PENDING_BYTES = 64 * 1024
"""Agent output held while no user is attached; beyond it the agent is not read."""
CLOSE_WAIT_S = 2.0

Side = Literal["agent", "user"]
SlotKey = tuple[str, str]
Authenticate = Callable[[Any, str], Awaitable[Principal]]


@dataclass(eq=False)
class Slot:
    """One open terminal: the agent's socket, and the user's once one attaches."""

    agent_uuid: str
    terminal_id: str
    task_id: int
    agent: WebSocket
    user: WebSocket | None = None
    claimed: bool = False
    pending: list[Message] = field(default_factory=list)
    pending_bytes: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    settled: asyncio.Event = field(default_factory=asyncio.Event)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    ended_by: Side | None = None
    errors: dict[Side, TaskdError] = field(default_factory=dict)
    tokens: dict[Side, str] = field(default_factory=dict)
    """The key of the token each side holds the session with."""
    timers: list[asyncio.TimerHandle] = field(default_factory=list)

    @property
    def key(self) -> SlotKey:
        """(agent_uuid, terminal_id)."""
        return (self.agent_uuid, self.terminal_id)

    def end(self, side: Side, error: TaskdError | None = None) -> None:
        """End the session; ``side`` closed it, and ``error`` is reported to that side."""
        if error is not None:
            self.errors.setdefault(side, error)
        if self.ended_by is None:
            self.ended_by = side
        for timer in self.timers:
            timer.cancel()
        self.ended.set()
        self.settled.set()

    def hold(self, side: Side, key: str, expires_at: int | None) -> None:
        """Tie ``side`` to token ``key``: the session ends when the token is revoked or expires."""
        self.tokens[side] = key
        if expires_at is not None:
            delay = max(0.0, (expires_at + 1 - now_ms()) / 1000)
            expired = PermissionDenied(f"Token {key} has expired")
            self.timers.append(
                asyncio.get_running_loop().call_later(delay, self.end, side, expired)
            )


class TerminalRelay:
    """Every open terminal slot of this server, and the ``/terminal`` endpoint."""

    def __init__(
        self,
        settings: ServerSettings,
        store: Store,
        hub: Hub,
        cluster: Cluster,
        authenticate: Authenticate,
    ) -> None:
        self.settings = settings
        self.store = store
        self.hub = hub
        self.cluster = cluster
        self.authenticate = authenticate
        self.max_frame_bytes = min(MAX_FRAME_BYTES, settings.max_message_bytes)
        self.user_wait_s = USER_WAIT_S
        self.attach_wait_s = ATTACH_WAIT_S
        self._slots: dict[SlotKey, Slot] = {}
        self._opened = asyncio.Condition()
        self._revocations = 0

    def slot(self, agent_uuid: str, terminal_id: str) -> Slot | None:
        """The open slot for (agent_uuid, terminal_id) on this server, if any."""
        return self._slots.get((agent_uuid, terminal_id))

    def revoke(self, key: str) -> None:
        """Token ``key`` was revoked: end the sessions a side holds with it (that side gets 102)."""
        self._revocations += 1
        for slot in list(self._slots.values()):
            for side, held in list(slot.tokens.items()):
                if held == key:
                    slot.end(side, PermissionDenied(f"Token {key} was revoked"))
                    logger.info(
                        "terminal %s of agent %s closed: the %s's token %s was revoked",
                        slot.terminal_id,
                        slot.agent_uuid,
                        side,
                        key,
                    )

    async def serve(self, websocket: WebSocket) -> None:
        """Handle one ``/terminal`` connection: an agent opening a slot or a user attaching."""
        await websocket.accept()
        try:
            origin = websocket.headers.get("origin")
            if not origin_allowed(origin, self.settings.allowed_origins):
                raise PermissionDenied(f"Origin {origin} is not allowed to open terminals")
            params = websocket.query_params
            if "task_token" in params:
                await self._agent(websocket, params)
            elif "token" in params:
                await self._user(websocket, params)
            else:
                raise InvalidInput("/terminal needs task_token (agent side) or token (user side)")
        except TaskdError as exc:
            await _refuse(websocket, exc)
        except Exception:
            logger.exception("terminal relay failed")
            await _refuse(websocket, InternalError("Internal error in the terminal relay"))

    # ------------------------------------------------------------------ agent side

    async def _agent(self, websocket: WebSocket, params: QueryParams) -> None:
        agent_uuid = _uuid_param(params, "agent_uuid")
        terminal_id = _uuid_param(params, "terminal_id")
        task_id = _task_id_param(params)
        await self._check_task(task_id, agent_uuid, params["task_token"], terminal_id)
        if self.slot(agent_uuid, terminal_id) is not None:
            raise InvalidInput(f"Terminal {terminal_id} of agent {agent_uuid} is already open")
        slot = Slot(agent_uuid, terminal_id, task_id, websocket)
        # the shell runs on behalf of the agent's subscription: it ends with that token
        sub = self.hub.connected_agents().get(agent_uuid)
        if sub is not None and sub.token_key is not None:
            slot.hold("agent", sub.token_key, sub.expires_at)
        self._slots[slot.key] = slot
        async with self._opened:
            self._opened.notify_all()
        logger.info("terminal %s of agent %s opened (task %d)", terminal_id, agent_uuid, task_id)
        cluster = self.cluster
        await cluster.announce_terminal(agent_uuid, terminal_id, True)
        try:
            await self._session(slot, "agent", self._to_user(slot))
        finally:
            if self._slots.get(slot.key) is slot:
                del self._slots[slot.key]
            with contextlib.suppress(Exception):
                await cluster.announce_terminal(agent_uuid, terminal_id, False)
        logger.info(
            "terminal %s of agent %s closed by the %s", terminal_id, agent_uuid, slot.ended_by
        )

    async def _check_task(
        self, task_id: int, agent_uuid: str, task_token: str, terminal_id: str
    ) -> None:
        row = await self.store.terminal_task(task_id)
        if (
            row is None
            or row.uuid != agent_uuid
            or not hmac.compare_digest(row.task_token.encode(), task_token.encode())
        ):
            raise NotFound(f"No task {task_id} for agent {agent_uuid} with that task_token")
        if row.type != "web_shell":
            raise InvalidInput(f"Task {task_id} is a {row.type} task, not web_shell")
        if row.state >= TaskState.DONE:
            raise InvalidInput(f"Task {task_id} already has a result")
        spec = (
            row.task_event_type.get("web_shell") if isinstance(row.task_event_type, dict) else None
        )
        stored = spec.get("terminal_id") if isinstance(spec, dict) else None
        if not isinstance(stored, str) or _canonical(stored) != terminal_id:
            raise NotFound(f"Task {task_id} is not for terminal {terminal_id}")

    def _to_user(self, slot: Slot) -> Callable[[Message, int], Awaitable[None]]:
        async def forward(message: Message, size: int) -> None:
            async with slot.lock:
                if slot.user is None and slot.pending_bytes + size <= PENDING_BYTES:
                    slot.pending.append(message)
                    slot.pending_bytes += size
                    return
            await slot.settled.wait()
            if slot.user is None:
                raise WebSocketDisconnect(1000)
            await slot.user.send(message)

        return forward

    # ------------------------------------------------------------------ user side

    async def _user(self, websocket: WebSocket, params: QueryParams) -> None:
        agent_uuid = _uuid_param(params, "agent_uuid")
        terminal_id = _uuid_param(params, "terminal_id")
        remote = client_address(
            websocket.scope, websocket.headers, self.settings.trust_forwarded_for
        )
        principal = await self.authenticate(params["token"], remote)
        authorize(principal, Need("terminal", "connect"), agent_uuid)
        revocations = self._revocations
        slot = await self._wait_for_slot(agent_uuid, terminal_id)
        while revocations != self._revocations:
            # a token was revoked while this user waited: it may have been this user's
            revocations = self._revocations
            principal = await self.authenticate(params["token"], remote)
            authorize(principal, Need("terminal", "connect"), agent_uuid)
        elsewhere = self.cluster.terminal_node(agent_uuid, terminal_id)
        if slot is None and elsewhere is not None:
            await self._proxy(websocket, elsewhere, agent_uuid, terminal_id)
            return
        if slot is None or slot.ended.is_set():
            raise NotFound(f"Terminal {terminal_id} of agent {agent_uuid} is not open")
        if slot.claimed:
            raise InvalidInput(f"Terminal {terminal_id} of agent {agent_uuid} already has a user")
        slot.claimed = True
        slot.hold("user", principal.key, principal.timestamp_to)
        try:
            async with slot.lock:
                for message in slot.pending:
                    await websocket.send(message)
                slot.pending.clear()
                slot.user = websocket
                slot.settled.set()
        except (WebSocketDisconnect, RuntimeError, OSError):
            slot.end("user")
            return
        logger.info(
            "user %s (%s) attached to terminal %s of agent %s",
            principal.key,
            remote,
            terminal_id,
            agent_uuid,
        )
        await self._session(slot, "user", self._to_agent(slot))

    async def _wait_for_slot(self, agent_uuid: str, terminal_id: str) -> Slot | None:
        """The local slot once it opens; None when the wait ends or the slot is on another node."""
        cluster = self.cluster

        def ready() -> bool:
            found = self.slot(agent_uuid, terminal_id) is not None
            return found or cluster.terminal_node(agent_uuid, terminal_id) is not None

        deadline = asyncio.get_running_loop().time() + self.user_wait_s
        async with self._opened:
            while not ready():
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    break
                # other nodes announce their slots by notification, not through this condition
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self._opened.wait_for(ready),
                        min(remaining, 0.1 if cluster.enabled else remaining),
                    )
        return self.slot(agent_uuid, terminal_id)

    async def _proxy(
        self, websocket: WebSocket, node: str, agent_uuid: str, terminal_id: str
    ) -> None:
        """Relay a user to the node holding the slot (nodes publish their internal address)."""
        address = await self.cluster.address_of(node)
        if not address:
            raise NotFound(
                f"Terminal {terminal_id} of agent {agent_uuid} is on an unreachable node"
            )
        target = address.replace("http://", "ws://", 1).replace("https://", "wss://", 1)
        query = websocket.scope.get("query_string", b"").decode("latin-1")
        url = f"{target.rstrip('/')}/terminal?{query}"
        logger.info(
            "terminal %s of agent %s is on node %s; relaying", terminal_id, agent_uuid, node
        )
        async with websockets.connect(
            url, max_size=self.max_frame_bytes, proxy=None, compression=None, ping_interval=None
        ) as upstream:

            async def down() -> None:
                async for data in upstream:
                    key = "text" if isinstance(data, str) else "bytes"
                    await websocket.send({"type": "websocket.send", key: data})

            async def up() -> None:
                while True:
                    message = await websocket.receive()
                    if message["type"] == "websocket.disconnect":
                        return
                    outgoing, _ = self._outgoing(message)
                    await upstream.send(outgoing.get("text") or outgoing.get("bytes") or b"")

            pumps = [asyncio.create_task(down()), asyncio.create_task(up())]
            try:
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for pump in pumps:
                    pump.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
            code = upstream.close_code or 1000
        await _close(websocket, code if code != 1006 else 1011, "terminal closed")

    @staticmethod
    def _to_agent(slot: Slot) -> Callable[[Message, int], Awaitable[None]]:
        async def forward(message: Message, size: int) -> None:
            await slot.agent.send(message)

        return forward

    # ------------------------------------------------------------------ both sides

    async def _session(
        self, slot: Slot, side: Side, forward: Callable[[Message, int], Awaitable[None]]
    ) -> None:
        """Relay this side's messages until either side ends; then close this side."""
        source = slot.agent if side == "agent" else slot.user
        assert source is not None
        pump = asyncio.create_task(self._pump(slot, side, source, forward))
        try:
            if side == "agent":
                try:
                    await asyncio.wait_for(slot.settled.wait(), self.attach_wait_s)
                except TimeoutError:
                    slot.end(
                        "agent",
                        TaskTimeout(f"No user attached within {self.attach_wait_s:g} s"),
                    )
            await slot.ended.wait()
        finally:
            slot.end(side)
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump
        error = slot.errors.get(side)
        if error is not None:
            await _refuse(source, error)
        else:
            other = "user" if side == "agent" else "agent"
            await _close(source, 1000, f"the {other} closed the terminal")

    async def _pump(
        self,
        slot: Slot,
        side: Side,
        source: WebSocket,
        forward: Callable[[Message, int], Awaitable[None]],
    ) -> None:
        error: TaskdError | None = None
        try:
            while True:
                message = await source.receive()
                if message["type"] == "websocket.disconnect":
                    break
                outgoing, size = self._outgoing(message)
                await forward(outgoing, size)
        except TaskdError as exc:
            error = exc
        except (WebSocketDisconnect, RuntimeError, OSError):
            pass  # a socket went away mid-relay: the session is over
        finally:
            slot.end(side, error)

    def _outgoing(self, message: Message) -> tuple[Message, int]:
        text = message.get("text")
        if text is not None:
            size = len(text) if len(text) * 4 <= self.max_frame_bytes else len(text.encode())
            outgoing: Message = {"type": "websocket.send", "text": text}
        else:
            data = message.get("bytes") or b""
            size = len(data)
            outgoing = {"type": "websocket.send", "bytes": data}
        if size > self.max_frame_bytes:
            raise InvalidInput(
                f"Terminal messages are limited to {self.max_frame_bytes} bytes; got {size}"
            )
        return outgoing, size


def _uuid_param(params: QueryParams, name: str) -> str:
    value = params.get(name)
    if value is None:
        raise InvalidInput(f"/terminal needs the query parameter {name}")
    try:
        return canonical_uuid(value)
    except ValueError as exc:
        raise InvalidInput(f"{name}: {exc}") from None


def _task_id_param(params: QueryParams) -> int:
    value = params.get("task_id", "")
    if not value.isdigit() or not 0 < int(value) < 1 << 63:
        raise InvalidInput("task_id: expected a positive integer")
    return int(value)


def _canonical(value: str) -> str | None:
    try:
        return canonical_uuid(value)
    except ValueError:
        return None


async def _refuse(websocket: WebSocket, error: TaskdError) -> None:
    """Send one error frame, then close with 1008 (1011 for internal errors)."""
    frame = orjson.dumps({"error_id": error.code, "error_message": error.wire_message}).decode()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(websocket.send_text(frame), CLOSE_WAIT_S)
    code = 1011 if isinstance(error, InternalError) else 1008
    await _close(websocket, code, error.message)


async def _close(websocket: WebSocket, code: int, reason: str) -> None:
    # a close reason is limited to 123 bytes; a peer that stopped reading gets no more time
    short = reason.encode()[:120].decode(errors="ignore")
    with contextlib.suppress(Exception):
        await asyncio.wait_for(websocket.close(code, short), CLOSE_WAIT_S)
