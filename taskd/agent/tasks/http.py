"""http_ping and http_request: HTTP probes made with httpx.

Both verify TLS certificates unless the server entry that sent the task sets
``ignore_cert``.
"""

from __future__ import annotations

import asyncio
import base64
import socket
import time

import httpx

from taskd.agent.tasks import TaskContext, TaskFailed
from taskd.protocol import (
    HttpPing,
    HttpPingResult,
    HttpRequest,
    HttpRequestResult,
    HttpRequestSpec,
    HttpResponse,
)

PING_TIMEOUT_S = 10.0
REQUEST_TIMEOUT_S = 30.0
TIMEOUT_S = REQUEST_TIMEOUT_S + 5.0
MAX_BODY_BYTES = 64 << 20
AUTO_ADDRESSES = {"ipv4 auto": "0.0.0.0", "ipv6 auto": "::"}
"""Binding the wildcard address of one family makes the connection use that family."""


def _client(
    ctx: TaskContext, timeout_s: float, local_address: str | None = None
) -> httpx.AsyncClient:
    transport = httpx.AsyncHTTPTransport(
        verify=not ctx.server.ignore_cert, local_address=local_address
    )
    # Redirects are returned as they are: the caller asked for exactly this request
    # and sees the 3xx with its Location. Environment proxies do not apply either,
    # so the time and the source address are those of the agent's own path.
    return httpx.AsyncClient(
        transport=transport,
        timeout=timeout_s,
        follow_redirects=False,
        trust_env=False,
    )


async def run_http_ping(
    task: HttpPing, ctx: TaskContext, *, timeout_s: float = PING_TIMEOUT_S
) -> HttpPingResult:
    """GET the URL and time until the response headers arrive; any status counts."""
    url = task.http_ping
    async with _client(ctx, timeout_s) as client:
        started = time.perf_counter()
        try:
            async with asyncio.timeout(timeout_s), client.stream("GET", url):
                elapsed_ms = (time.perf_counter() - started) * 1000
        except (TimeoutError, httpx.TimeoutException):
            raise TaskFailed(f"no response from {url} within {timeout_s:g} s") from None
        except httpx.HTTPError as exc:
            raise TaskFailed(_reason("GET", url, exc)) from None
    return HttpPingResult(http_ping=elapsed_ms)


async def run_http_request(
    task: HttpRequest,
    ctx: TaskContext,
    *,
    timeout_s: float = REQUEST_TIMEOUT_S,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> HttpRequestResult:
    """Make the request and return status, headers in order and body (text or base64)."""
    spec = task.http_request
    local_address = AUTO_ADDRESSES.get(spec.ip, spec.ip) if spec.ip is not None else None
    async with _client(ctx, timeout_s, local_address) as client:
        try:
            async with asyncio.timeout(timeout_s):
                return await _exchange(client, spec, max_body_bytes)
        except (TimeoutError, httpx.TimeoutException):
            raise TaskFailed(
                f"no complete response from {spec.url} within {timeout_s:g} s"
            ) from None
        except httpx.HTTPError as exc:
            raise TaskFailed(_reason(spec.method, spec.url, exc)) from None


async def _exchange(
    client: httpx.AsyncClient, spec: HttpRequestSpec, max_body_bytes: int
) -> HttpRequestResult:
    if spec.body_base64 is not None:
        content: bytes | None = base64.b64decode(spec.body_base64)
    elif spec.body is not None:
        content = spec.body.encode()
    else:
        content = None
    request = client.build_request(spec.method, spec.url, headers=spec.headers, content=content)
    response = await client.send(request, stream=True)
    try:
        # The limit counts decoded bytes, so a small compressed body cannot
        # expand past it either.
        body = bytearray()
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > max_body_bytes:
                raise TaskFailed(f"response body exceeds {max_body_bytes} bytes")
    finally:
        await response.aclose()
    headers = [
        {name.decode("latin-1"): value.decode("latin-1")} for name, value in response.headers.raw
    ]
    try:
        text = body.decode()
    except UnicodeDecodeError:
        return HttpRequestResult(
            http_request=HttpResponse(
                status=response.status_code,
                headers=headers,
                body_base64=base64.b64encode(body).decode("ascii"),
            )
        )
    return HttpRequestResult(
        http_request=HttpResponse(status=response.status_code, headers=headers, body=text)
    )


def _reason(method: str, url: str, exc: httpx.HTTPError) -> str:
    # httpx and anyio wrap the exception that says what went wrong; report that one.
    cause: BaseException = exc
    while (inner := cause.__cause__ or cause.__context__) is not None:
        cause = inner
    if isinstance(cause, socket.gaierror):
        return f"cannot resolve {httpx.URL(url).host}: {cause.strerror}"
    if isinstance(cause, ConnectionRefusedError):
        return f"connection to {url} refused"
    if isinstance(cause, OSError):
        return f"cannot connect to {url}: {cause.strerror or cause}"
    return f"{method} {url} failed: {cause or type(cause).__name__}"
