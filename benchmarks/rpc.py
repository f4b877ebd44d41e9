"""The harness's JSON-RPC client: HTTP keep-alive to one taskd server, with one token.

The load generators (``caller.py``, ``loadagent.py``) speak their own
pipelined WebSocket JSON-RPC: they are what is measured. This client is what
the harness itself uses to set up, watch and check.
"""

from __future__ import annotations

from typing import Any

import httpx
import orjson

from benchmarks.procs import BenchError


class RpcFailure(BenchError):
    """A JSON-RPC error reply."""

    def __init__(self, method: str, error: dict[str, Any]) -> None:
        super().__init__(f"{method} failed: {error.get('code')}: {error.get('message')}")
        self.code = error.get("code")
        self.error = error


class Rpc:
    """JSON-RPC over HTTP keep-alive to one server, with one token."""

    def __init__(
        self, url: str, token: str = "", timeout: float = 30.0, local_address: str | None = None
    ) -> None:
        transport = httpx.AsyncHTTPTransport(local_address=local_address)
        self.token = token
        self.http = httpx.AsyncClient(base_url=url, timeout=timeout, transport=transport)
        self._ids = 0

    async def __aenter__(self) -> Rpc:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.aclose()

    async def request(self, method: str, params: Any = None) -> dict[str, Any]:
        """One request; the whole reply object."""
        self._ids += 1
        body: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": self._ids}
        if params is not None:
            body["params"] = params
        response = await self.http.post("/", content=orjson.dumps(body))
        reply: dict[str, Any] = orjson.loads(response.content)
        return reply

    async def call(self, method: str, *params: Any) -> Any:
        """The result of a call, or RpcFailure."""
        reply = await self.request(method, list(params))
        if "error" in reply:
            raise RpcFailure(method, reply["error"])
        return reply["result"]

    async def su(self, method: str, *params: Any) -> Any:
        """A call with this client's token as the first param."""
        return await self.call(method, self.token, *params)
