"""The floor: a bare Starlette app under uvicorn with taskd's own server settings.

``POST /`` answers with the parsed-and-dumped JSON body; ``WS /`` echoes every
text message the same way. Whatever taskd does on top of parsing and
serializing JSON shows up as the gap between this and taskd. ``POST /file``
answers the bytes of the file whose path is the body (read once): a large
reply's cost of transfer alone.

    python -m benchmarks.floor --port 2299
"""

from __future__ import annotations

import argparse
import asyncio
import uuid
from pathlib import Path

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from taskd.config import ServerSettings
from taskd.server import uvicorn_config


async def echo(request: Request) -> Response:
    """The JSON body, parsed and dumped again."""
    return Response(orjson.dumps(orjson.loads(await request.body())), media_type="application/json")


async def ws_echo(websocket: WebSocket) -> None:
    """Every text message, parsed and dumped again."""
    await websocket.accept()
    try:
        while True:
            message = await websocket.receive_text()
            await websocket.send_text(orjson.dumps(orjson.loads(message)).decode())
    except WebSocketDisconnect:
        pass


_FILES: dict[str, bytes] = {}


async def file(request: Request) -> Response:
    """The bytes of the file named by the body, read the first time only."""
    path = (await request.body()).decode()
    if path not in _FILES:
        _FILES[path] = await asyncio.to_thread(Path(path).read_bytes)
    return Response(_FILES[path], media_type="application/json")


def create_app() -> Starlette:
    """The echo application."""
    return Starlette(
        routes=[
            Route("/", echo, methods=["POST"]),
            Route("/file", file, methods=["POST"]),
            WebSocketRoute("/", ws_echo),
        ]
    )


def main() -> None:
    """Serve the echo app until a signal."""
    import uvicorn

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()
    # the same uvicorn settings taskd serves with (httptools, websockets-sansio, uvloop)
    settings = ServerSettings(
        server_uuid=str(uuid.uuid4()),
        database_url="sqlite+aiosqlite:///:memory:",
        host=args.host,
        port=args.port,
        log_level="warning",
    )
    app = create_app()
    uvicorn.Server(uvicorn_config(app, settings, loop="uvloop")).run()


if __name__ == "__main__":
    main()
