"""What every command that calls a server shares: options, the call, errors, output."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

DEFAULT_URL = "http://127.0.0.1:2211/"


class CallFailed(Exception):
    """A server call failed; the message is printed and ``code`` is the exit status."""

    def __init__(self, message: str, code: int, error: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.error = error


def server_url(args: argparse.Namespace) -> str:
    url = args.url or os.environ.get("TASKD_URL") or DEFAULT_URL
    return str(url).replace("ws://", "http://", 1).replace("wss://", "https://", 1)


def rpc(
    args: argparse.Namespace, method: str, params: dict[str, Any], *, as_param: str = "token"
) -> Any:
    """One JSON-RPC call with the token (as the param ``as_param``); the result, or CallFailed."""
    token = args.token or os.environ.get("TASKD_TOKEN")
    if not token:
        raise CallFailed("no token: pass --token or set TASKD_TOKEN", 2)
    return post_rpc(server_url(args), method, {as_param: token, **params}, args.timeout)


def json_arg(text: str, flag: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CallFailed(f"{flag} is not valid JSON: {exc}", 2) from None


def agents_arg(text: str) -> list[str]:
    agents = [part.strip() for part in text.split(",") if part.strip()]
    if not agents:
        raise CallFailed("--agents needs at least one agent UUID", 2)
    return agents


def ms_time(value: int | None) -> str:
    import datetime

    if value is None:
        return "-"
    moment = datetime.datetime.fromtimestamp(value / 1000, datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%SZ")


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    for line in (headers, *rows):
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        )


def emit(args: argparse.Namespace, result: Any, text: str) -> int:
    print(json.dumps(result) if args.json else text)
    return 0


def client_command(prefix: str, handler: Any) -> Any:
    """``handler`` as a command: a failed call prints ``prefix: message`` and sets the status."""

    def run(args: argparse.Namespace) -> int:
        try:
            code: int = handler(args)
        except CallFailed as exc:
            print(f"{prefix}: {exc.message}", file=sys.stderr)
            return exc.code
        return code

    return run


def client_options() -> argparse.ArgumentParser:
    """The options of every command that calls a server."""
    client = argparse.ArgumentParser(add_help=False)
    client.add_argument("--url", help=f"server URL (default $TASKD_URL or {DEFAULT_URL})")
    client.add_argument("--token", help="token (default $TASKD_TOKEN)")
    client.add_argument("--timeout", type=float, default=30.0)
    client.add_argument("--json", action="store_true", help="print JSON for scripts")
    return client


def server_urls(server: str) -> tuple[str, str]:
    """The HTTP form (for calls) and the WebSocket form (for the agent) of a server URL."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(server if "://" in server else f"http://{server}")
    if parts.scheme not in ("http", "https", "ws", "wss") or not parts.hostname:
        raise CallFailed(f"--server {server!r} is not an http(s):// or ws(s):// URL", 2)
    secure = parts.scheme in ("https", "wss")
    rest = (parts.netloc, parts.path or "/", parts.query, "")
    return urlunsplit(("https" if secure else "http", *rest)), urlunsplit(
        ("wss" if secure else "ws", *rest)
    )


def post_rpc(url: str, method: str, params: Any, timeout: float = 30.0) -> Any:
    """One JSON-RPC call over HTTP; the result, or CallFailed (exit 1 error, 3 unreachable)."""
    import httpx

    request = {"jsonrpc": "2.0", "method": method, "params": params, "id": 1}
    try:
        body = httpx.post(url, json=request, timeout=timeout).json()
    except httpx.HTTPError as exc:
        raise CallFailed(f"cannot reach {url}: {exc}", 3) from None
    except ValueError:
        raise CallFailed(f"{url} did not answer with JSON", 3) from None
    if not isinstance(body, dict):
        raise CallFailed(f"unexpected reply from {url}", 3)
    if "error" in body:
        error = body["error"]
        raise CallFailed(f"error {error.get('code')}: {error.get('message')}", 1, error)
    return body.get("result")
