"""http_ping and http_request against a real uvicorn server on loopback."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from taskd.agent.tasks import TaskContext, TaskFailed, runner_for
from taskd.agent.tasks.http import MAX_BODY_BYTES, TIMEOUT_S, run_http_ping, run_http_request
from taskd.config import parse_agent_config
from taskd.protocol import HttpPing, HttpRequest, HttpRequestSpec
from tests.helpers import has_ipv6_loopback, scaled

BINARY = bytes([0xFF, 0xFE, 0x00, 0x80, 0xC3, 0x28])
TEXT = "héllo, wörld ✓\n"


def _context(ignore_cert: bool = False) -> TaskContext:
    settings = parse_agent_config(
        '[[server]]\nws_url = "ws://127.0.0.1:1/"\ntoken = "t"\n'
        f"ignore_cert = {str(ignore_cert).lower()}\n"
    )
    return TaskContext(settings=settings, server=settings.servers[0], task_id=1, task_token="x")


HAS_IPV6 = has_ipv6_loopback()
needs_ipv6 = pytest.mark.skipif(not HAS_IPV6, reason="this machine has no IPv6 loopback")


def _app(release: asyncio.Event) -> Starlette:
    """The target: each route answers in one way the runners must handle."""

    async def cookies(request: Request) -> Response:
        response = Response("ok")
        response.raw_headers.extend(
            [(b"set-cookie", b"a=1"), (b"x-between", b"m"), (b"set-cookie", b"b=2")]
        )
        return response

    async def binary(request: Request) -> Response:
        return Response(BINARY, media_type="application/octet-stream")

    async def text(request: Request) -> Response:
        return Response(TEXT.encode(), media_type="text/plain; charset=utf-8")

    async def echo(request: Request) -> Response:
        assert request.client is not None
        return JSONResponse(
            {
                "method": request.method,
                "headers": request.headers.getlist("x-test"),
                "body_base64": base64.b64encode(await request.body()).decode(),
                "client": request.client.host,
            }
        )

    async def slow(request: Request) -> Response:
        await release.wait()
        return Response("late")

    async def endless(request: Request) -> Response:
        async def chunks() -> AsyncIterator[bytes]:
            yield b"first"
            await release.wait()

        return StreamingResponse(chunks())

    async def redirect(request: Request) -> Response:
        return RedirectResponse("/text", status_code=302)

    async def sized(request: Request) -> Response:
        return Response(b"a" * int(request.path_params["size"]))

    async def status(request: Request) -> Response:
        return Response("", status_code=int(request.path_params["code"]))

    return Starlette(
        routes=[
            Route("/cookies", cookies),
            Route("/binary", binary),
            Route("/text", text),
            Route("/echo", echo, methods=["GET", "POST", "PUT", "PATCH", "DELETE"]),
            Route("/slow", slow),
            Route("/endless", endless),
            Route("/redirect", redirect),
            Route("/sized/{size:int}", sized),
            Route("/status/{code:int}", status),
        ]
    )


@dataclass
class Target:
    """Where the test server listens."""

    v4: str
    v6: str | None


@contextlib.asynccontextmanager
async def _serve(sockets: list[socket.socket], **options: Any) -> AsyncIterator[None]:
    """Run the target app under uvicorn on already bound sockets until the block ends."""
    release = asyncio.Event()
    config = uvicorn.Config(
        _app(release),
        lifespan="off",
        ws="none",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=max(1, round(scaled(5))),
        **options,
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve(sockets=sockets))
    try:
        async with asyncio.timeout(scaled(20)):
            while not server.started:
                assert not serving.done(), "the test server stopped during start-up"
                await asyncio.sleep(0.01)
        yield
    finally:
        release.set()
        server.should_exit = True
        await serving
        for sock in sockets:
            sock.close()


def _bound(host: str) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((host, 0))
    return sock


@pytest.fixture
async def target() -> AsyncIterator[Target]:
    """The target app over plain HTTP on 127.0.0.1 and, where there is one, ::1."""
    sockets = [_bound("127.0.0.1")] + ([_bound("::1")] if HAS_IPV6 else [])
    async with _serve(sockets):
        ports = [sock.getsockname()[1] for sock in sockets]
        yield Target(
            v4=f"http://127.0.0.1:{ports[0]}",
            v6=f"http://[::1]:{ports[1]}" if HAS_IPV6 else None,
        )


def _request(url: str, method: str = "GET", **spec: Any) -> HttpRequest:
    return HttpRequest(http_request=HttpRequestSpec(url=url, method=method, **spec))


# --------------------------------------------------------------------------- interface


@pytest.mark.parametrize(
    ("kind", "runner", "limit"),
    [("http_ping", run_http_ping, TIMEOUT_S), ("http_request", run_http_request, TIMEOUT_S)],
)
def test_interface_finds_runners(kind: str, runner: object, limit: float) -> None:
    """The task-kind interface maps both kinds to their runners with a limit above 30 s."""
    found, timeout = runner_for(kind, _context().settings)
    assert found is runner
    assert timeout == limit > 30


# --------------------------------------------------------------------------- http_ping


async def test_ping_times_headers(target: Target) -> None:
    """An http_ping reports the time until the response headers arrived."""
    result = await run_http_ping(HttpPing(http_ping=f"{target.v4}/text"), _context())
    assert 0 < result.http_ping < 10_000
    assert result.to_wire() == {"http_ping": result.http_ping}


async def test_ping_counts_any_status(target: Target) -> None:
    """A 503 answer is still a successful http_ping."""
    result = await run_http_ping(HttpPing(http_ping=f"{target.v4}/status/503"), _context())
    assert result.http_ping > 0


async def test_ping_does_not_read_the_body(target: Target) -> None:
    """An http_ping returns once the headers are in, although the body never ends."""
    async with asyncio.timeout(scaled(5)):
        result = await run_http_ping(HttpPing(http_ping=f"{target.v4}/endless"), _context())
    assert result.http_ping > 0


async def test_ping_times_out(target: Target) -> None:
    """Headers that do not come within the limit fail the http_ping, naming the limit."""
    limit = scaled(0.3)
    with pytest.raises(
        TaskFailed, match=rf"^no response from {target.v4}/slow within {limit:g} s$"
    ):
        await run_http_ping(HttpPing(http_ping=f"{target.v4}/slow"), _context(), timeout_s=limit)


async def test_ping_refused() -> None:
    """A port nobody listens on fails the http_ping with a message saying it was refused."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{holder.getsockname()[1]}/"
        with pytest.raises(TaskFailed, match=rf"^connection to {url} refused$"):
            await run_http_ping(HttpPing(http_ping=url), _context())


async def test_ping_unresolvable_name() -> None:
    """A name in the reserved .invalid domain fails with a message saying it cannot be resolved."""
    with pytest.raises(TaskFailed, match=r"^cannot resolve nonexistent\.invalid: "):
        await run_http_ping(HttpPing(http_ping="http://nonexistent.invalid/"), _context())


# --------------------------------------------------------------------------- http_request


async def test_request_keeps_repeated_headers_in_order(target: Target) -> None:
    """Repeated response headers all come back, each as its own pair, in the order sent."""
    result = await run_http_request(_request(f"{target.v4}/cookies"), _context())
    response = result.http_request
    assert response.status == 200
    picked = [pair for pair in response.headers if next(iter(pair)) in ("set-cookie", "x-between")]
    assert picked == [{"set-cookie": "a=1"}, {"x-between": "m"}, {"set-cookie": "b=2"}]
    assert response.body == "ok"


async def test_request_binary_body_goes_to_base64(target: Target) -> None:
    """A body that is not UTF-8 comes back in body_base64 only, byte for byte."""
    result = await run_http_request(_request(f"{target.v4}/binary"), _context())
    wire = result.to_wire()["http_request"]
    assert "body" not in wire
    assert base64.b64decode(wire["body_base64"]) == BINARY


async def test_request_text_body_goes_to_body(target: Target) -> None:
    """A UTF-8 body comes back as text in body only."""
    result = await run_http_request(_request(f"{target.v4}/text"), _context())
    wire = result.to_wire()["http_request"]
    assert wire["body"] == TEXT
    assert "body_base64" not in wire
    assert {"content-type": "text/plain; charset=utf-8"} in wire["headers"]


async def test_request_sends_method_headers_and_text_body(target: Target) -> None:
    """The method, the headers and a text body arrive at the server exactly as given."""
    task = _request(
        f"{target.v4}/echo", "POST", headers={"X-Test": "one two"}, body="grüße {json}\r\n"
    )
    result = await run_http_request(task, _context())
    assert result.http_request.body is not None
    echoed = json.loads(result.http_request.body)
    assert echoed["method"] == "POST"
    assert echoed["headers"] == ["one two"]
    assert base64.b64decode(echoed["body_base64"]) == "grüße {json}\r\n".encode()


async def test_request_sends_base64_body_as_bytes(target: Target) -> None:
    """A body_base64 is decoded and sent as the exact bytes."""
    payload = bytes(range(256))
    task = _request(f"{target.v4}/echo", "PUT", body_base64=base64.b64encode(payload).decode())
    result = await run_http_request(task, _context())
    assert result.http_request.body is not None
    echoed = json.loads(result.http_request.body)
    assert echoed["method"] == "PUT"
    assert base64.b64decode(echoed["body_base64"]) == payload


async def test_request_returns_redirect_as_is(target: Target) -> None:
    """A redirect is not followed: the 3xx and its Location come back."""
    result = await run_http_request(_request(f"{target.v4}/redirect"), _context())
    assert result.http_request.status == 302
    assert {"location": "/text"} in result.http_request.headers
    assert result.http_request.body == ""


async def test_request_body_at_the_cap_is_returned(target: Target) -> None:
    """A body exactly as large as the cap comes back whole."""
    result = await run_http_request(
        _request(f"{target.v4}/sized/4096"), _context(), max_body_bytes=4096
    )
    assert result.http_request.body == "a" * 4096


async def test_request_body_over_the_cap_fails(target: Target) -> None:
    """A body one byte over the cap fails the task, naming the cap."""
    with pytest.raises(TaskFailed, match=r"^response body exceeds 4096 bytes$"):
        await run_http_request(_request(f"{target.v4}/sized/4097"), _context(), max_body_bytes=4096)


async def test_request_endless_body_stops_at_the_cap(target: Target) -> None:
    """A body that never ends fails at the cap instead of at the time limit."""
    async with asyncio.timeout(scaled(5)):
        with pytest.raises(TaskFailed, match=r"^response body exceeds 3 bytes$"):
            await run_http_request(_request(f"{target.v4}/endless"), _context(), max_body_bytes=3)


def test_default_cap_is_64_mib() -> None:
    """Without an override the response-size cap is 64 MiB."""
    assert MAX_BODY_BYTES == 67_108_864


async def test_request_times_out(target: Target) -> None:
    """A response that does not complete within the limit fails the task, naming the limit."""
    limit = scaled(0.3)
    with pytest.raises(TaskFailed, match=rf"^no complete response from .* within {limit:g} s$"):
        await run_http_request(_request(f"{target.v4}/slow"), _context(), timeout_s=limit)


async def test_request_refused() -> None:
    """A port nobody listens on fails the request with a message saying it was refused."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{holder.getsockname()[1]}/"
        with pytest.raises(TaskFailed, match=rf"^connection to {url} refused$"):
            await run_http_request(_request(url), _context())


@pytest.mark.parametrize("ip", ["127.0.0.1", "127.0.0.2", "ipv4 auto"])
async def test_request_binds_ipv4_source(target: Target, ip: str) -> None:
    """The request leaves from the given local IPv4 address (any loopback one for ipv4 auto)."""
    result = await run_http_request(_request(f"{target.v4}/echo", ip=ip), _context())
    assert result.http_request.body is not None
    client = json.loads(result.http_request.body)["client"]
    assert client == ("127.0.0.1" if ip == "ipv4 auto" else ip)


@needs_ipv6
@pytest.mark.parametrize("ip", ["::1", "ipv6 auto"])
async def test_request_binds_ipv6_source(target: Target, ip: str) -> None:
    """An IPv6 source address or ipv6 auto reaches an IPv6 target from ::1."""
    assert target.v6 is not None
    result = await run_http_request(_request(f"{target.v6}/echo", ip=ip), _context())
    assert result.http_request.body is not None
    assert json.loads(result.http_request.body)["client"] == "::1"


@needs_ipv6
async def test_request_ipv4_auto_cannot_reach_ipv6(target: Target) -> None:
    """ipv4 auto keeps the connection on IPv4, so an IPv6-only target fails."""
    assert target.v6 is not None
    with pytest.raises(TaskFailed, match=r"^cannot connect to http://\[::1\]"):
        await run_http_request(_request(f"{target.v6}/echo", ip="ipv4 auto"), _context())


# --------------------------------------------------------------------------- TLS


@pytest.fixture
async def tls_target(certificate: tuple[Path, Path]) -> AsyncIterator[str]:
    """The target app over HTTPS with the self-signed certificate."""
    cert, key = certificate
    sock = _bound("127.0.0.1")
    async with _serve([sock], ssl_certfile=str(cert), ssl_keyfile=str(key)):
        yield f"https://127.0.0.1:{sock.getsockname()[1]}"


async def test_untrusted_certificate_fails(tls_target: str) -> None:
    """A self-signed certificate fails both kinds unless the server entry ignores certificates."""
    with pytest.raises(TaskFailed, match="CERTIFICATE_VERIFY_FAILED"):
        await run_http_request(_request(f"{tls_target}/text"), _context())
    with pytest.raises(TaskFailed, match="CERTIFICATE_VERIFY_FAILED"):
        await run_http_ping(HttpPing(http_ping=f"{tls_target}/text"), _context())


async def test_ignore_cert_accepts_any_certificate(tls_target: str) -> None:
    """With ignore_cert the self-signed target answers both kinds."""
    result = await run_http_request(_request(f"{tls_target}/text"), _context(ignore_cert=True))
    assert result.http_request.body == TEXT
    ping = await run_http_ping(HttpPing(http_ping=f"{tls_target}/text"), _context(ignore_cert=True))
    assert ping.http_ping > 0
