"""The JSON-RPC dispatcher: a thin adapter around jsonrpcserver.

jsonrpcserver resolves methods, binds named or positional params and calls
them. This adapter closes its gaps: orjson parsing, a cheap per-item request
check (so one bad item of a batch does not fail the others), a size limit,
exceptions answered without leaking their text, and notifications answered
with nothing. Both transports (HTTP and WebSocket) call ``handle``.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
from jsonrpcserver.async_dispatcher import call as jsonrpc_call
from jsonrpcserver.request import Request
from jsonrpcserver.result import Error, Success
from jsonrpcserver.sentinels import NODATA, NOID
from oslash.either import Left

from taskd.errors import InternalError, InvalidParams, TaskdError

if TYPE_CHECKING:
    from taskd.app import App

logger = logging.getLogger(__name__)

Method = Callable[..., Awaitable[Any]]
BATCH_WINDOW = 16
"""Items of one batch in progress at once."""


@dataclass
class MethodInfo:
    """A registered method: its function, public names and whether it needs a WebSocket."""

    name: str
    fn: Method
    aliases: tuple[str, ...] = ()
    websocket_only: bool = False
    summary: str = ""


REGISTRY: dict[str, MethodInfo] = {}


def method(name: str, *aliases: str, websocket_only: bool = False) -> Callable[[Method], Method]:
    """Register a JSON-RPC method under ``name`` (and aliases).

    The function takes the call context first, then the wire params by name.
    It returns a JSON-able value or raises a TaskdError.
    """

    def register(fn: Method) -> Method:
        signature = inspect.signature(fn)
        bind = _binder(signature)

        @functools.wraps(fn)
        async def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return Success(await fn(*bind(args, kwargs)))
            except TaskdError as exc:
                return Error(exc.code, exc.wire_message, exc.data)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("method %s failed", name)
                error = InternalError("Internal error")
                return Error(error.code, error.message)

        call.__signature__ = signature  # type: ignore[attr-defined]
        summary = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        info = MethodInfo(name, call, aliases, websocket_only, summary)
        for public in (name, *aliases):
            if public in REGISTRY:
                raise RuntimeError(f"method {public} registered twice")
            REGISTRY[public] = info
        return fn

    return register


def _binder(signature: inspect.Signature) -> Callable[[tuple[Any, ...], dict[str, Any]], list[Any]]:
    """A fast params check: positional or named params → the argument list, or InvalidParams.

    Unknown named params are ignored, as NodeGet's serde structs ignore unknown fields
    (NodeGet-board sends extras such as ``version``).
    """
    params = list(signature.parameters.values())
    names = [p.name for p in params[1:]]  # the first is the call context
    required = [p.name for p in params[1:] if p.default is inspect.Parameter.empty]
    defaults = {p.name: p.default for p in params[1:] if p.default is not inspect.Parameter.empty}

    def bind(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
        if kwargs:
            missing = [n for n in required if n not in kwargs]
            if missing:
                raise InvalidParams(f"Invalid params: missing a required argument: {missing[0]!r}")
            return [args[0], *(kwargs[n] if n in kwargs else defaults[n] for n in names)]
        given = len(args) - 1
        if given > len(names):
            raise InvalidParams(
                f"Invalid params: expected at most {len(names)} params, got {given}"
            )
        if given < len(required):
            raise InvalidParams(f"Invalid params: missing a required argument: {required[given]!r}")
        return list(args)

    return bind


@dataclass
class CallContext:
    """What a method knows about the call beyond its params."""

    app: App
    transport: str
    remote: str
    peer: Any = None
    after_reply: list[Callable[[], Awaitable[None]]] = field(default_factory=list)


def _error(code: int, message: str, request_id: Any = None) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "error": {"code": code, "message": message}, "id": request_id}


def _failed(
    context: CallContext, code: int, message: str, request_id: Any = None
) -> dict[str, Any]:
    """An error reply, counted in the ``taskd_rpc_errors`` metric."""
    context.app.metrics.rpc_errors.labels(str(code)).inc()
    return _error(code, message, request_id)


_ID_TYPES = (str, int, float, type(None))
_PARAM_TYPES = (list, dict)


def _check(item: Any) -> Request | dict[str, Any]:
    """Validate one request object; return the request, or the error reply to send."""
    if not isinstance(item, dict):
        return _error(-32600, "Invalid request: expected a JSON object")
    request_id = item.get("id", NOID)
    if request_id is not NOID and (
        isinstance(request_id, bool) or not isinstance(request_id, _ID_TYPES)
    ):
        return _error(-32600, "Invalid request: id must be a string, number or null")
    reply_id = None if request_id is NOID else request_id
    if item.get("jsonrpc") != "2.0":
        return _error(-32600, 'Invalid request: "jsonrpc" must be "2.0"', reply_id)
    name = item.get("method")
    if not isinstance(name, str):
        return _error(-32600, 'Invalid request: "method" must be a string', reply_id)
    params = item.get("params", [])
    if not isinstance(params, _PARAM_TYPES):
        return _error(-32600, 'Invalid request: "params" must be an array or object', reply_id)
    extra = set(item) - {"jsonrpc", "method", "params", "id"}
    if extra:
        return _error(
            -32600, f"Invalid request: unknown member(s) {', '.join(sorted(extra))}", reply_id
        )
    return Request(name, params, request_id)


async def _dispatch_one(request: Request, context: CallContext) -> dict[str, Any] | None:
    info = REGISTRY.get(request.method)
    if info is None:
        reply = _failed(context, -32601, f"Method not found: {request.method[:100]}")
    elif info.websocket_only and context.transport != "websocket":
        reply = _failed(
            context, -32601, f"Method {request.method} is only available over WebSocket"
        )
    else:
        # jsonrpcserver's own lookup and Signature.bind check cost more than most
        # methods; the registry lookup above and the method's precomputed binder
        # replace them, and jsonrpcserver calls the method and shapes its Result
        result = await jsonrpc_call(request, context, info.fn)
        if isinstance(result, Left):
            err = result._error
            message = err.message
            if err.code == InvalidParams.code and isinstance(err.data, str):
                message = f"Invalid params: {err.data}"  # jsonrpcserver's binding error
            reply = _failed(context, err.code, message)
            if (
                err.data not in (None, NODATA)
                and not isinstance(err.data, str)
                and err.code != -32602
            ):
                reply["error"]["data"] = err.data
        else:
            reply = {"jsonrpc": "2.0", "result": result._value.result}
    if request.id is NOID:
        return None
    reply["id"] = request.id
    return reply


def _dumps(reply: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(reply)
    except (TypeError, orjson.JSONEncodeError):
        logger.exception("reply could not be serialised")
        return orjson.dumps(_error(-32603, "Internal error", reply.get("id")))


async def handle(body: bytes | str, context: CallContext) -> bytes | None:
    """Answer one HTTP body or WebSocket message; None when nothing is to be sent back."""
    limit = context.app.settings.max_message_bytes
    if len(body) > limit:
        return _dumps(
            _failed(
                context,
                -32600,
                f"Invalid request: message of {len(body)} bytes exceeds the {limit}-byte limit",
            )
        )
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return _dumps(_failed(context, -32700, f"Parse error: {str(exc)[:200]}"))
    if isinstance(parsed, list):
        if not parsed:
            return _dumps(_failed(context, -32600, "Invalid request: empty batch"))
        max_items = context.app.settings.max_batch_items
        if len(parsed) > max_items:
            return _dumps(
                _failed(
                    context,
                    -32600,
                    f"Invalid request: batch of {len(parsed)} exceeds {max_items} items",
                )
            )
        replies = await _handle_batch(parsed, context)
        answered = [r for r in replies if r is not None]
        # each reply on its own, so one that cannot be serialised spoils only itself
        return b"[" + b",".join(map(_dumps, answered)) + b"]" if answered else None
    reply = await _handle_item(parsed, context)
    return None if reply is None else _dumps(reply)


async def _handle_batch(items: list[Any], context: CallContext) -> list[dict[str, Any] | None]:
    """Answer a batch's items concurrently, at most BATCH_WINDOW at a time.

    A bound keeps one large batch from queueing thousands of database reads
    (and as many tasks) ahead of every other client's calls.
    """
    if len(items) <= BATCH_WINDOW:
        return await asyncio.gather(*(_handle_item(item, context) for item in items))
    replies: list[dict[str, Any] | None] = [None] * len(items)
    pending = iter(enumerate(items))

    async def work() -> None:
        for index, item in pending:
            replies[index] = await _handle_item(item, context)

    await asyncio.gather(*(work() for _ in range(BATCH_WINDOW)))
    return replies


async def _handle_item(item: Any, context: CallContext) -> dict[str, Any] | None:
    checked = _check(item)
    if isinstance(checked, dict):
        context.app.metrics.rpc_errors.labels(str(checked["error"]["code"])).inc()
        return checked
    return await _dispatch_one(checked, context)
