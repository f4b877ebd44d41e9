"""A scripted NodeGet agent: a test client that speaks on the wire exactly as NodeGet's agent does.

Learnt from NodeGet's ``agent/src/rpc/multi_server.rs``, ``agent/src/rpc/mod.rs``,
``agent/src/tasks/mod.rs``, ``agent/src/tasks/pty.rs`` and the serde types in
``crates/ng-task/src/types/mod.rs``:

- One WebSocket to the configured ``ws_url``. Every request it sends carries the
  JSON-RPC id ``1`` and positional params; it never matches replies by id.
- On connect it first sends ``nodeget-server_uuid`` with ``[]`` and reads the next
  text frame: its ``result`` must equal the configured server UUID.
- Then ``task_register_task`` with ``[token, agent_uuid]``; the next text frame must
  be a reply with id 1, no ``error`` and a ``result``.
- On the same socket it sends ``task_register_task`` again every 60 s without
  waiting for the reply (tests shorten the interval).
- Every later frame is one downlink: a frame with method ``task_register_task`` and
  ``params.result`` is a task (the subscription id is not checked); a frame with an
  ``error`` is only logged.
- Each task is answered with ``task_upload_task_result`` ``[token, TaskEventResponse]``,
  all seven fields present (serde writes ``None`` as ``null``): ``error_message`` null
  on success, ``task_event_result`` null on failure, ``timestamp`` in local
  milliseconds. A task type the agent does not allow fails with NodeGet's message.
- ``web_shell``: an ``/auto_gen`` URL is rewritten to the server's
  ``/terminal?agent_uuid=..&task_id=..&task_token=..&terminal_id=..`` and the agent
  connects there; the result ``{"web_shell": true}`` comes when the session ends.

The agent does no real work: it answers every kind with a well-formed result in
NodeGet's shapes (``{"tcp_ping": ms}``, ``{"ip": [v4, null]}`` ...).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Collection
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import orjson
import websockets

from tests.helpers import WsClient, add_token, agent_token_limits, scaled

if TYPE_CHECKING:
    from tests.helpers import Server

logger = logging.getLogger(__name__)

RESUBSCRIBE_EVERY_S = 60.0
"""NodeGet's re-subscription interval."""
NOT_ALLOWED = "Permission denied: Permission Denied: Task not allowed"
"""What NodeGet's agent uploads as error_message for a task type it does not allow."""

NODEGET_AGENT_VERSION: dict[str, str] = {
    "binary_type": "Agent",
    "cargo_version": "0.3.5",
    "git_branch": "main",
    "git_commit_sha": "cc1fa46",
    "git_commit_date": "2026-06-01T08:00:00.000000000Z",
    "git_commit_message": "Merge pull request #170 from NodeSeekDev/dev",
    "build_time": "2026-06-01T08:10:00.000000000Z",
    "cargo_target_triple": "x86_64-unknown-linux-musl",
    "rustc_channel": "stable",
    "rustc_version": "1.90.0",
    "rustc_commit_date": "2026-05-20",
    "rustc_commit_hash": "1159e78c4747b02ef996e55082b704c09b970588",
    "rustc_llvm_version": "20.1",
}
"""A NodeGetVersion as the agent reports it (every field a string)."""


def nodeget_agent_config(agent_uuid: str, server_uuid: str, token: str, ws_url: str) -> str:
    """A NodeGet agent config.toml, as NodeGet's agent reads it and its config page shows it."""
    return f"""log_level = "info"
dynamic_report_interval_ms = 1000
static_report_interval_ms = 300000
agent_uuid = "{agent_uuid}"
connect_timeout_ms = 1000
terminal_shell = "bash"
exec_max_character = 10000
ip_provider = "cloudflare"
ntp_server = "pool.ntp.org"

[[server]]
name = "main"
server_uuid = "{server_uuid}"
token = "{token}"
ws_url = "{ws_url}"
allow_task = true
allow_icmp_ping = true
allow_tcp_ping = true
allow_execute = true
ignore_cert = false
"""


class NodeGetHandshakeError(Exception):
    """The server did not answer the connect handshake as NodeGet's agent requires."""


def rpc_text(method: str, params: list[Any]) -> str:
    """A request as NodeGet's agent writes it: id 1, positional params, compact JSON."""
    return orjson.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).decode()


def task_kind(task_event_type: Any) -> str:
    """The variant name of a TaskEventType (bare string or one-key object)."""
    if isinstance(task_event_type, str):
        return task_event_type
    [kind] = task_event_type
    return str(kind)


def _dns_data(record_type: str, domain: str) -> str:
    return {
        "a": "93.184.215.14",
        "aaaa": "2606:2800:21f:cb07:6820:80da:af6b:8b2c",
        "cname": f"www.{domain}.",
        "mx": f"10 mail.{domain}.",
        "txt": '"v=spf1 -all"',
        "ns": f"ns1.{domain}.",
        "srv": f"10 5 443 svc.{domain}.",
        "ptr": "host.example.net.",
        "soa": f"ns1.{domain}. hostmaster.{domain}. 1 7200 3600 1209600 3600",
        "caa": '0 issue "letsencrypt.org"',
    }[record_type]


class NodeGetAgent(WsClient):
    """One connection of NodeGet's agent to one server, answering every pushed task."""

    def __init__(
        self,
        url: str,
        token: str,
        server_uuid: str,
        agent_uuid: str | None = None,
        *,
        resubscribe_every: float = RESUBSCRIBE_EVERY_S,
        allow: Collection[str] | None = None,
        config_text: str = "",
    ) -> None:
        super().__init__(url)
        self.token = token
        self.server_uuid = server_uuid
        self.uuid = agent_uuid or str(uuid.uuid4())
        self.resubscribe_every = resubscribe_every
        self.allow = None if allow is None else frozenset(allow)
        self.config_text = config_text
        self.subscription: int | None = None
        self.tasks: list[dict[str, Any]] = []
        """Every pushed task (the push frame's ``result``), in arrival order."""
        self.uploads: dict[int, dict[str, Any]] = {}
        """The TaskEventResponse uploaded for each task id."""
        self.resubscriptions = 0
        """How many times task_register_task was sent again on this socket."""
        self.subscription_acks: list[int] = []
        """Subscription ids the server answered after the first one."""
        self.upload_acks: list[dict[str, Any]] = []
        """Results of the server's replies to uploads."""
        self.errors: list[dict[str, Any]] = []
        """Every JSON-RPC error the server sent on this socket."""
        self.terminal_urls: list[str] = []
        """Where web_shell tasks made the agent connect."""
        self._loops: list[asyncio.Task[None]] = []
        self._work: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> NodeGetAgent:
        await super().__aenter__()
        try:
            await self._handshake()
        except BaseException:
            await super().__aexit__(None, None, None)
            raise
        self._loops = [
            asyncio.create_task(self._downlink()),
            asyncio.create_task(self._resubscribe()),
        ]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in (*self._loops, *self._work):
            task.cancel()
        for task in (*self._loops, *self._work):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await super().__aexit__(*exc)

    async def _next_frame(self) -> dict[str, Any]:
        """The next frame from the server; NodeGet waits 5 s for handshake replies."""
        try:
            return await asyncio.wait_for(self.notifications.get(), scaled(5))
        except TimeoutError:
            raise NodeGetHandshakeError("no reply within 5 s") from None

    async def _handshake(self) -> None:
        await self.ws.send(rpc_text("nodeget-server_uuid", []))
        reply = await self._next_frame()
        if reply.get("result") != self.server_uuid:
            raise NodeGetHandshakeError(f"server uuid check failed: {reply}")
        # NodeGet embeds the agent UUID as a raw JSON string after the token
        await self.ws.send(rpc_text("task_register_task", [self.token, self.uuid]))
        reply = await self._next_frame()
        if reply.get("id") != 1 or "error" in reply or "result" not in reply:
            raise NodeGetHandshakeError(f"task subscription refused: {reply}")
        self.subscription = reply["result"]

    async def _resubscribe(self) -> None:
        while True:
            await asyncio.sleep(self.resubscribe_every)
            await self.ws.send(rpc_text("task_register_task", [self.token, self.uuid]))
            self.resubscriptions += 1

    async def _downlink(self) -> None:
        while True:
            frame = await self.notifications.get()
            if "error" in frame:
                logger.warning("NodeGet agent got an error: %s", frame["error"])
                self.errors.append(frame)
                continue
            params = frame.get("params")
            if frame.get("method") == "task_register_task" and isinstance(params, dict):
                task = params.get("result")
                if isinstance(task, dict):
                    self.tasks.append(task)
                    work = asyncio.create_task(self._answer(task))
                    self._work.add(work)
                    work.add_done_callback(self._work.discard)
                continue
            result = frame.get("result")
            if isinstance(result, int) and not isinstance(result, bool):
                self.subscription_acks.append(result)
            elif isinstance(result, dict):
                self.upload_acks.append(result)

    async def _answer(self, task: dict[str, Any]) -> None:
        """Run one task and upload its TaskEventResponse, as NodeGet's handle_task does."""
        task_type = task["task_event_type"]
        success, error_message, result = True, None, None
        if self.allow is not None and task_kind(task_type) not in self.allow:
            success, error_message = False, NOT_ALLOWED
        else:
            try:
                result = await self.run(task_type, task["task_id"], task["task_token"])
            except Exception as exc:  # NodeGet reports every task error as a failed result
                success, error_message = False, str(exc)
        response = {
            "task_id": task["task_id"],
            "agent_uuid": self.uuid,
            "task_token": task["task_token"],
            "timestamp": time.time_ns() // 1_000_000,
            "success": success,
            "error_message": error_message,
            "task_event_result": result,
        }
        self.uploads[task["task_id"]] = response
        await self.ws.send(rpc_text("task_upload_task_result", [self.token, response]))

    async def run(self, task_type: Any, task_id: int, task_token: str) -> Any:
        """The TaskEventResult NodeGet's agent would produce for ``task_type``."""
        kind = task_kind(task_type)
        spec: Any = None if isinstance(task_type, str) else task_type[kind]
        if kind in ("ping", "tcp_ping", "http_ping"):
            # Duration::as_secs_f64() * 1000.0: fractional milliseconds
            return {kind: 12.345678}
        if kind == "http_request":
            return {
                "http_request": {
                    "status": 200,
                    "headers": [
                        {"content-type": "text/html; charset=utf-8"},
                        {"set-cookie": "a=1"},
                        {"set-cookie": "b=2"},
                    ],
                    "body": "<html>ok</html>",
                    "body_base64": None,
                }
            }
        if kind == "dns":
            return {
                "dns": [
                    {"record_type": rt, "time": 15.5, "data": _dns_data(rt, spec["domain"])}
                    for rt in spec["record_types"]
                ]
            }
        if kind == "execute":
            output = " ".join(spec["args"]) + "\n" if spec["cmd"] == "echo" else "(No Output)"
            return {"execute": output}
        if kind == "web_shell":
            await self._web_shell(spec, task_id, task_token)
            return {"web_shell": True}
        if kind == "read_config":
            return {"read_config": self.config_text}
        if kind == "edit_config":
            return {"edit_config": True}
        if kind == "ip":
            return {"ip": ["203.0.113.7", None]}
        if kind == "version":
            return {"version": dict(NODEGET_AGENT_VERSION)}
        if kind == "self_update":
            return {"self_update": False}
        raise ValueError(f"unknown task type {kind}")

    async def _web_shell(self, spec: dict[str, Any], task_id: int, task_token: str) -> None:
        """Open the terminal connection NodeGet's agent opens; the shell exits at once."""
        parts = urlsplit(spec["url"])
        if parts.scheme not in ("ws", "wss"):
            raise ValueError(f"Other error: Invalid scheme: {parts.scheme}")
        query = [(k, v) for k, v in parse_qsl(parts.query) if k != "terminal_id"]
        if parts.path == "/auto_gen":
            port = parts.port or (443 if parts.scheme == "wss" else 80)
            netloc = f"{parts.hostname}:{port}"
            path = "/terminal"
            query = [
                ("agent_uuid", self.uuid),
                ("task_id", str(task_id)),
                ("task_token", task_token),
            ]
        else:
            netloc, path = parts.netloc, parts.path
        query.append(("terminal_id", spec["terminal_id"]))
        url = urlunsplit((parts.scheme, netloc, path, urlencode(query), ""))
        self.terminal_urls.append(url)
        async with websockets.connect(url, open_timeout=scaled(10)) as terminal:
            # a refused slot is one error frame then a close; an accepted one stays quiet
            with contextlib.suppress(TimeoutError, websockets.ConnectionClosedOK):
                frame = await asyncio.wait_for(terminal.recv(), scaled(0.3))
                if isinstance(frame, str) and "error_id" in frame:
                    raise RuntimeError(f"Unable to connect agent: terminal refused: {frame}")


@contextlib.asynccontextmanager
async def nodeget_agent(server: Server, **options: Any) -> AsyncIterator[NodeGetAgent]:
    """A NodeGet agent connected to ``server`` with its own agent token."""
    agent_uuid = str(options.pop("agent_uuid", None) or uuid.uuid4())
    token = await add_token(server, agent_token_limits(agent_uuid))
    options.setdefault(
        "config_text",
        nodeget_agent_config(agent_uuid, server.settings.server_uuid, token, server.ws_url),
    )
    async with NodeGetAgent(
        server.ws_url, token, server.settings.server_uuid, agent_uuid, **options
    ) as agent:
        yield agent
