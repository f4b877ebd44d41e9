"""A lean WebSocket client for load agents: the ``websockets`` library's sans-I/O
``ClientProtocol`` (handshake, framing, closing, answering pings) on a plain asyncio
transport.

The library's asyncio client keeps a connection object, a keepalive task, a message
assembler and a handshake timeout per connection; a load-agent process that opens
thousands of connections a second in a reconnect storm spent most of its CPU there,
CPU the server under test then lacked on a small machine. Here a connection is one
protocol object and a queue of received messages. The bytes on the wire are the
library's own.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Mapping
from typing import cast

from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosedError, ConnectionClosedOK
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.uri import parse_uri

Message = str | bytes


class Connection(asyncio.Protocol):
    """One client WebSocket: ``send``, ``recv``, ``async for``, ``close``."""

    def __init__(
        self, protocol: ClientProtocol, user_agent: str | None, headers: Mapping[str, str]
    ) -> None:
        self.protocol = protocol
        self.user_agent = user_agent
        self.headers = headers
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.opened: asyncio.Future[Response] = loop.create_future()
        self._messages: deque[Message] = deque()
        self._fragments: list[bytes] = []
        self._text = True
        self._waiter: asyncio.Future[None] | None = None
        self._lost = False

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's does not subclass it
        request = self.protocol.connect()
        if "User-Agent" in request.headers:
            del request.headers["User-Agent"]
        if self.user_agent is not None:
            request.headers["User-Agent"] = self.user_agent
        request.headers.update(self.headers)
        self.protocol.send_request(request)
        self._flush()

    def data_received(self, data: bytes) -> None:
        self.protocol.receive_data(data)
        self._take_events()

    def eof_received(self) -> bool | None:
        self.protocol.receive_eof()
        self._take_events()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if not self.opened.done():
            self.opened.set_exception(exc or ConnectionResetError("connection closed"))
        self._wake()

    # ------------------------------------------------------------------ the caller's side

    async def send(self, message: Message) -> None:
        """Send one text (str) or binary (bytes) message."""
        self._check_open()
        if isinstance(message, str):
            self.protocol.send_text(message.encode())
        else:
            self.protocol.send_binary(message)
        self._flush()

    async def recv(self) -> Message:
        """The next message; ConnectionClosed once the connection is gone."""
        while not self._messages:
            self._check_open()
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._messages.popleft()

    def __aiter__(self) -> AsyncIterator[Message]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Message]:
        with contextlib.suppress(ConnectionClosedOK):
            while True:
                yield await self.recv()

    async def close(self) -> None:
        """Send a close frame (if still open) and drop the TCP connection."""
        if self.protocol.state is State.OPEN:
            self.protocol.send_close()
            self._flush()
        if self.transport is not None:
            self.transport.close()

    # ------------------------------------------------------------------ inside

    def _check_open(self) -> None:
        if self._lost or self.protocol.state is not State.OPEN:
            rcvd, sent = self.protocol.close_rcvd, self.protocol.close_sent
            order = self.protocol.close_rcvd_then_sent  # set once both frames went
            if rcvd is not None and rcvd.code == 1000:
                raise ConnectionClosedOK(rcvd, sent, order)
            raise ConnectionClosedError(rcvd, sent, order)

    def _take_events(self) -> None:
        for event in self.protocol.events_received():
            if isinstance(event, Response):
                if self.protocol.handshake_exc is not None:
                    self.opened.set_exception(self.protocol.handshake_exc)
                else:
                    self.opened.set_result(event)
            elif isinstance(event, Frame):
                self._take_frame(event)
        self._flush()
        if self.protocol.close_expected() and self.transport is not None:
            self.transport.close()
        self._wake()

    def _take_frame(self, frame: Frame) -> None:
        if frame.opcode in (Opcode.TEXT, Opcode.BINARY):
            self._text = frame.opcode is Opcode.TEXT
            self._fragments = []
        elif frame.opcode is not Opcode.CONT:
            return  # control frames: the protocol answers pings and closes itself
        self._fragments.append(bytes(frame.data))
        if frame.fin:
            data = b"".join(self._fragments)
            self._fragments = []
            self._messages.append(data.decode() if self._text else data)

    def _flush(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        data = self.protocol.data_to_send()
        if data:
            chunks = [chunk for chunk in data if chunk]
            if chunks:
                self.transport.write(b"".join(chunks))
            if len(chunks) < len(data):  # an empty chunk: the protocol wants EOF sent
                with contextlib.suppress(OSError, RuntimeError):
                    self.transport.write_eof()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


@contextlib.asynccontextmanager
async def connect(
    url: str, user_agent: str | None = None, headers: Mapping[str, str] | None = None
) -> AsyncIterator[Connection]:
    """An open WebSocket to ``url`` (ws:// only), its handshake with ``headers`` added;
    InvalidStatus if the server refuses the handshake, OSError if it cannot be reached.
    Closed when the block ends."""
    uri = parse_uri(url)
    loop = asyncio.get_running_loop()
    _, connection = await loop.create_connection(
        lambda: Connection(ClientProtocol(uri, max_size=None), user_agent, headers or {}),
        uri.host,
        uri.port,
    )
    try:
        await connection.opened
        yield connection
    finally:
        await connection.close()
