"""A minimal HTTP/1.1 keep-alive client for load generation.

The API benchmark measures the server, but its load generator shares the same 2 cores: an aiohttp
client spends ~150-180 us of CPU per request, as much as half of what the server spends, and its own
event-loop stalls show up as server latency in an open-loop measurement. This client does only what
a load generator needs (one request at a time per keep-alive connection, ``Content-Length`` bodies,
no redirects, no cookies, no chunked encoding) in a few microseconds of Python per request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import cast


class LiteHttpError(Exception):
    """The server answered something this client does not speak, or closed the connection."""


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self._need = -1  # bytes of the whole response once its head is parsed
        self._body_at = 0
        self._status = 0
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's TCPTransport is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(LiteHttpError(f"connection closed: {exc}"))

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self._need < 0:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self._buffer[:end]).split(b"\r\n")
            try:
                self._status = int(head[0].split(b" ", 2)[1])
                length = next(int(line[15:]) for line in head[1:] if line[:15].lower() == b"content-length:")
            except (IndexError, ValueError, StopIteration):
                self._fail("a response without a status or a Content-Length")
                return
            self._body_at = end + 4
            self._need = self._body_at + length
        if len(self._buffer) >= self._need:
            body = bytes(self._buffer[self._body_at : self._need])
            del self._buffer[: self._need]
            self._need = -1
            if self._waiter is not None and not self._waiter.done():
                self._waiter.set_result((self._status, body))

    def _fail(self, why: str) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(LiteHttpError(why))
        if self.transport is not None:
            self.transport.close()

    def send(self, request: bytes) -> asyncio.Future[tuple[int, bytes]]:
        assert self.transport is not None
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return self._waiter


class LiteHttp:
    """Keep-alive connections to one ``host:port``, opened on demand and reused."""

    def __init__(self, host: str, port: int) -> None:
        self._host, self._port = host, port
        self._idle: list[_Connection] = []
        self._all: list[_Connection] = []

    async def request(
        self, method: str, path: str, headers: Mapping[str, str] | None = None, body: bytes = b""
    ) -> tuple[int, bytes]:
        """(status, body) of one request."""
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self._host}:{self._port}", f"Content-Length: {len(body)}"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        raw = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
        connection = await self._connection()
        try:
            answer = await connection.send(raw)
        except BaseException:
            if connection.transport is not None:
                connection.transport.close()
            raise
        if not connection.closed:
            self._idle.append(connection)
        return answer

    async def _connection(self) -> _Connection:
        while self._idle:
            connection = self._idle.pop()
            if not connection.closed:
                return connection
        _, connection = await asyncio.get_running_loop().create_connection(_Connection, self._host, self._port)
        self._all.append(connection)
        return connection

    def close(self) -> None:
        for connection in self._all:
            if connection.transport is not None:
                connection.transport.close()
        self._idle.clear()
        self._all.clear()
