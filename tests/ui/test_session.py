"""Dashboard sessions and the one API endpoint, over HTTP and WebSocket (no browser)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
import websockets

from taskd.roles import readonly_limits
from tests.helpers import Server, add_token, make_settings, running_server, scaled
from tests.ui.conftest import summary


def origin(server: Server) -> str:
    """The dashboard's own origin."""
    return server.url.rstrip("/")


class Browserish:
    """An HTTP client that behaves as the dashboard's page does (cookies, Origin, CSRF)."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.http = httpx.AsyncClient(base_url=server.url, timeout=scaled(30))
        self.csrf = ""

    async def login(self, token: str) -> httpx.Response:
        """POST /ui/login as the page does."""
        response = await self.http.post(
            "/ui/login", json={"token": token}, headers={"origin": origin(self.server)}
        )
        if response.status_code == 200:
            self.csrf = response.json()["csrf"]
        return response

    async def api(
        self, method: str, *params: Any, headers: dict[str, str] | None = None
    ) -> httpx.Response:
        """POST /ui/api with the session's CSRF token (unless ``headers`` replace it)."""
        sent = {"origin": origin(self.server), "x-csrf-token": self.csrf}
        return await self.http.post(
            "/ui/api",
            content=orjson.dumps(
                {"jsonrpc": "2.0", "method": method, "params": list(params), "id": 1}
            ),
            headers=sent if headers is None else headers,
        )

    def cookie_header(self) -> str:
        """The session cookie as a Cookie header."""
        return "; ".join(f"{k}={v}" for k, v in self.http.cookies.items())


@pytest.fixture
async def client(server: Server) -> AsyncIterator[Browserish]:
    """A page-like client of ``server``."""
    made = Browserish(server)
    try:
        yield made
    finally:
        await made.http.aclose()


async def test_login_sets_a_strict_httponly_cookie_and_never_returns_the_token(
    server: Server, client: Browserish
) -> None:
    """A login answers the key and a CSRF token, sets the session id in an HttpOnly,
    SameSite=Strict cookie limited to /ui (not Secure over plain http), and the token's
    secret appears nowhere in the answer."""
    response = await client.login(server.super_token)
    assert response.status_code == 200, response.text
    cookie = response.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/ui" in cookie
    assert "secure" not in cookie
    secret = server.super_token.split(":", 1)[1]
    assert secret not in response.text and secret not in response.headers["set-cookie"]
    assert response.json()["key"] == server.super_token.split(":")[0]
    whoami = await client.http.get("/ui/session")
    assert whoami.status_code == 200 and secret not in whoami.text


async def test_every_response_carries_the_security_headers(server: Server) -> None:
    """The page and its modules come with a CSP without inline script, nosniff, no
    referrer and no framing."""
    for path in ("/ui/", "/ui/static/js/main.js", "/ui/session"):
        response = await server.http.get(path)
        csp = response.headers["content-security-policy"]
        directives = {d.split()[0]: d.split()[1:] for d in csp.split("; ")}
        assert directives["script-src"] == ["'self'"], csp
        assert directives["object-src"] == ["'none'"] and directives["frame-ancestors"] == [
            "'none'"
        ]
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["referrer-policy"] == "no-referrer"
    page = await server.http.get("/ui/")
    assert page.status_code == 200 and "<script" in page.text
    assert "<script>" not in page.text  # module files only, no inline script


async def test_api_needs_the_csrf_token_and_this_origin(server: Server, client: Browserish) -> None:
    """POST /ui/api without the CSRF header, with a wrong one, from another origin or
    with no Origin is refused with 403; with both it answers the JSON-RPC call."""
    await client.login(server.super_token)
    own = origin(server)
    refusals = [
        {"origin": own},
        {"origin": own, "x-csrf-token": "wrong"},
        {"origin": "http://evil.example", "x-csrf-token": client.csrf},
        {"x-csrf-token": client.csrf},
    ]
    for headers in refusals:
        response = await client.api("server_uuid", headers=headers)
        assert response.status_code == 403, (headers, response.text)
    response = await client.api("agent_list")
    assert response.status_code == 200 and response.json()["result"] == []


async def test_login_from_another_origin_is_refused(server: Server, client: Browserish) -> None:
    """A login posted by another site's page (or with no Origin) opens no session."""
    for headers in ({"origin": "http://evil.example"}, {}):
        response = await client.http.post(
            "/ui/login", json={"token": server.super_token}, headers=headers
        )
        assert response.status_code == 403
        assert "set-cookie" not in response.headers


async def test_the_api_acts_with_exactly_the_sessions_token(
    server: Server, client: Browserish
) -> None:
    """A read-only session reads crons and tasks but a forged write is refused with the
    JSON-RPC permission error, exactly as the token would be over JSON-RPC."""
    await server.su("crontab_create", "probe", "0 0 * * * *", {"agent": [[], {"task": "version"}]})
    token = await add_token(server, readonly_limits())
    await client.login(token)
    listed = (await client.api("crontab_get")).json()["result"]
    assert [cron["name"] for cron in listed] == ["probe"]
    forged = (await client.api("crontab_set_enable", "probe", False)).json()
    assert forged["error"]["code"] == 102
    assert (await server.su("crontab_get"))[0]["enable"] is True
    created = (await client.api("task_create_task", str(uuid.uuid4()), "version")).json()
    assert created["error"]["code"] == 102


async def test_a_session_ends_when_its_token_is_revoked_or_rolled(
    server: Server, client: Browserish
) -> None:
    """Deleting the token ends its session at the next call (401); so does rolling the
    secret of another session's token."""
    token = await add_token(server, readonly_limits())
    await client.login(token)
    assert (await client.api("crontab_get")).status_code == 200
    await server.su("token_roll_token_secret", token.split(":")[0])
    assert (await client.api("crontab_get")).status_code == 401
    assert (await client.http.get("/ui/session")).status_code == 401
    other = await add_token(server, readonly_limits())
    await client.login(other)
    await server.su("token_delete", other.split(":")[0])
    assert (await client.api("crontab_get")).status_code == 401


async def test_logout_ends_the_session(server: Server, client: Browserish) -> None:
    """After logout the cookie no longer opens anything."""
    await client.login(server.super_token)
    session_id = client.http.cookies["taskd_session"]
    response = await client.http.post(
        "/ui/logout", headers={"origin": origin(server), "x-csrf-token": client.csrf}
    )
    assert response.status_code == 200
    client.http.cookies.set("taskd_session", session_id, path="/ui")
    assert (await client.http.get("/ui/session")).status_code == 401


async def test_login_is_rate_limited_like_token_auth(database_url: str) -> None:
    """Wrong tokens over JSON-RPC and wrong logins draw on one failure budget per address:
    once it is used up, even the right token cannot log in for a while."""
    settings = make_settings(database_url, auth_burst=4, auth_rate_per_s=0.01)
    async with running_server(settings) as server:
        client = Browserish(server)
        try:
            for _ in range(2):
                refused = await server.request("crontab_get", ["nobody:wrong"])
                assert refused["error"]["code"] == 102
            for _ in range(2):
                assert (await client.login("nobody:wrong")).status_code == 401
            response = await client.login(server.super_token)
            assert response.status_code == 401 and "Too many" in response.json()["error"]
        finally:
            await client.http.aclose()


async def live_frame(server: Server, cookie: str, origin_header: str | None) -> Any:
    """The first frame of /ui/live for this cookie and Origin, or the close code."""
    headers = {"cookie": cookie}
    if origin_header is not None:
        headers["origin"] = origin_header
    try:
        async with websockets.connect(
            f"{server.ws_url}ui/live", additional_headers=headers, open_timeout=scaled(10)
        ) as ws:
            return orjson.loads(await asyncio.wait_for(ws.recv(), scaled(10)))
    except websockets.ConnectionClosed as exc:
        return exc.rcvd.code if exc.rcvd else None
    except websockets.InvalidStatus as exc:
        return exc.response.status_code


async def test_live_feed_needs_a_session_and_this_origin(
    server: Server, client: Browserish
) -> None:
    """/ui/live refuses a connection without a session or from another origin, and
    pushes a full frame with each agent's latest figures to a logged-in page."""
    agent = str(uuid.uuid4())
    now = time.time_ns() // 1_000_000
    await server.su(
        "agent_report_dynamic_summary",
        summary(
            agent,
            now,
            cpu_usage=425,
            used_memory=1 << 30,
            total_memory=1 << 32,
            total_space=1000,
            available_space=50,
            receive_speed=7,
            transmit_speed=9,
        ),
    )
    await client.login(server.super_token)
    cookie = client.cookie_header()
    assert await live_frame(server, "", origin(server)) in (1008, 403)
    assert await live_frame(server, cookie, "http://evil.example") in (1008, 403)
    frame = await live_frame(server, cookie, origin(server))
    assert frame["type"] == "full"
    rows = [dict(zip(frame["fields"], row, strict=True)) for row in frame["rows"]]
    assert rows == [
        {
            "uuid": agent,
            "online": True,
            "name": None,
            "os": None,
            "cpu": 42.5,
            "used_memory": 1 << 30,
            "total_memory": 1 << 32,
            "used_space": 950,
            "total_space": 1000,
            "receive_speed": 7,
            "transmit_speed": 9,
            "time": now,
        }
    ]


async def test_live_feed_shows_only_what_the_token_may_see(
    server: Server, client: Browserish
) -> None:
    """A token that may list one agent and read its figures gets that agent only; one that
    may list every agent but read no figures gets them all without figures."""
    seen, hidden = str(uuid.uuid4()), str(uuid.uuid4())
    now = time.time_ns() // 1_000_000
    for agent in (seen, hidden):
        await server.su("agent_report_dynamic_summary", summary(agent, now, cpu_usage=100))
    narrow = await add_token(
        server,
        [
            {
                "scopes": [{"agent_uuid": seen}],
                "permissions": [{"agent": "list"}, {"dynamic_monitoring_summary": "read"}],
            }
        ],
    )
    await client.login(narrow)
    frame = await live_frame(server, client.cookie_header(), origin(server))
    assert [(row[0], row[4]) for row in frame["rows"]] == [(seen, 10.0)]
    listing = await add_token(server, [{"scopes": ["global"], "permissions": [{"agent": "list"}]}])
    await client.login(listing)
    frame = await live_frame(server, client.cookie_header(), origin(server))
    assert sorted((row[0], row[4]) for row in frame["rows"]) == sorted(
        [(seen, None), (hidden, None)]
    )


async def test_an_open_live_feed_ends_when_its_token_is_revoked(
    server: Server, client: Browserish
) -> None:
    """A page holding /ui/live is disconnected (4401) soon after its token is deleted."""
    token = await add_token(server, [{"scopes": ["global"], "permissions": [{"agent": "list"}]}])
    await client.login(token)
    headers = {"cookie": client.cookie_header(), "origin": origin(server)}
    async with websockets.connect(f"{server.ws_url}ui/live", additional_headers=headers) as ws:
        assert orjson.loads(await asyncio.wait_for(ws.recv(), scaled(10)))["type"] == "full"
        await server.su("token_delete", token.split(":")[0])
        with pytest.raises(websockets.ConnectionClosed) as closed:
            while True:
                await asyncio.wait_for(ws.recv(), scaled(10))
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401
