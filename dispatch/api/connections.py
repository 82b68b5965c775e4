"""Connection limits of the API server: a header timeout, an idle timeout and a connection cap.

Without them a client that opens many connections and sends each request head a byte at a time
(slowloris) holds every one of them: aiohttp closes a connection only when no complete request head
has arrived ``keepalive_timeout`` after it opened or answered (an hour by default), and it accepts
connections until the process runs out of file descriptors, after which nobody gets in.

:class:`GuardedAppRunner` (what ``dispatch.api.app.make_runner`` builds) wraps each connection's
protocol (aiohttp's request handler) in a :class:`ConnectionGuard`'s:

* **header timeout** (``api_header_timeout_s``): a request head (request line and headers) must be
  complete this long after its first byte arrived, and the first one this long after the
  connection opened; otherwise the connection is closed. Request bodies are not timed here.
* **idle timeout** (``api_keepalive_timeout_s``): aiohttp's keep-alive timer, which closes a
  connection that sent nothing this long after its last answer.
* **cap** (``api_max_connections``, lowered to what the open-file limit allows): at the cap, a new
  connection closes the one that has been waiting for a request the longest (silent or trickling:
  a request that is being handled is never cut), so a flood of slow connections cannot keep a real
  client out; when every connection is in a request, the new one is answered 503 and closed.

The guard learns that a request head is complete when aiohttp hands the request to the
application (it wraps the server's request handler), so it depends on nothing private of aiohttp.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, cast

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

__all__ = ["ConnectionGuard", "ConnectionLimits", "GuardedAppRunner", "GuardedServer", "connection_cap"]

log = logging.getLogger(__name__)

#: File descriptors kept for everything but client connections (Redis pools, uploads, logs).
FD_RESERVE: Final = 128
#: Written to a connection refused at the cap (every other one is in a request).
_BUSY: Final = b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"

_Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, kw_only=True)
class ConnectionLimits:
    header_timeout_s: float = 10.0
    keepalive_timeout_s: float = 75.0
    max_connections: int = 1000


def connection_cap(wanted: int) -> int:
    """``wanted``, lowered so that the open-file limit leaves :data:`FD_RESERVE` descriptors free
    (past it ``accept`` fails and no new client gets in, not even the health check)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft - FD_RESERVE >= wanted:
        return wanted
    cap = max(1, soft - FD_RESERVE)
    log.warning("API connections capped at %d (open-file limit %d; raise it with ulimit -n)", cap, soft)
    return cap


class _Connection(asyncio.Protocol):
    """One client connection: forwards everything to aiohttp's handler and times request heads."""

    __slots__ = ("_guard", "_made", "_timer", "busy", "handler", "transport")

    def __init__(self, guard: ConnectionGuard, handler: RequestHandler) -> None:
        self._guard = guard
        self.handler = handler
        self.transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._made = False
        #: a request of this connection is being handled
        self.busy = False

    # --- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no asyncio.Transport subclass
        if not self._guard.admit(self):
            self.transport.write(_BUSY)
            self.transport.close()
            return
        self._made = True
        self.handler.connection_made(self.transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if not self.busy and self._timer is None:
            self._arm()  # the first byte of a request head
        self.handler.data_received(data)

    def eof_received(self) -> None:
        if self._made:
            self.handler.eof_received()  # returns None: the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._guard.forget(self)
        if self._made:
            self.handler.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._made:
            self.handler.pause_writing()

    def resume_writing(self) -> None:
        if self._made:
            self.handler.resume_writing()

    # --- the guard -------------------------------------------------------------------------------

    def request_started(self) -> None:
        self.busy = True
        self._disarm()

    def request_finished(self) -> None:
        self.busy = False

    def close(self) -> None:
        self._disarm()
        if self.transport is not None:
            self.transport.abort()  # waiting for a request: nothing to flush

    def _arm(self) -> None:
        self._timer = asyncio.get_running_loop().call_later(self._guard.limits.header_timeout_s, self._expire)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        if not self.busy and self.transport is not None:
            self.transport.close()


class ConnectionGuard:
    """The open connections of one server, with the cap and the header timeout (see the module
    docstring)."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        #: open connections waiting for a request, the longest-waiting first
        self._waiting: dict[_Connection, None] = {}
        self._open: dict[RequestHandler, _Connection] = {}
        #: connections closed to make room, and connections refused (every one busy)
        self.evicted = 0
        self.refused = 0

    @property
    def open_connections(self) -> int:
        return len(self._open)

    def protocol(self, handler: RequestHandler) -> asyncio.Protocol:
        return _Connection(self, handler)

    def admit(self, conn: _Connection) -> bool:
        if len(self._open) >= self.limits.max_connections:
            if not self._waiting:
                self.refused += 1
                return False
            oldest = next(iter(self._waiting))
            self.forget(oldest)
            oldest.close()
            self.evicted += 1
        self._open[conn.handler] = conn
        self._waiting[conn] = None
        return True

    def forget(self, conn: _Connection) -> None:
        self._open.pop(conn.handler, None)
        self._waiting.pop(conn, None)

    def track(self, handler: _Handler) -> _Handler:
        """``handler`` (the server's request handler) telling the guard when each request starts
        (its head is complete) and ends."""

        async def handle(request: web.BaseRequest) -> web.StreamResponse:
            conn = self._open.get(request.protocol)
            if conn is None:
                return await handler(request)
            self._waiting.pop(conn, None)
            conn.request_started()
            try:
                return await handler(request)
            finally:
                conn.request_finished()
                if self._open.get(request.protocol) is conn:
                    self._waiting[conn] = None  # waits again, now the newest

        return handle


class GuardedServer(web.Server):
    """aiohttp's server (``inner``) whose connections a :class:`ConnectionGuard` watches."""

    def __init__(self, inner: web.Server, guard: ConnectionGuard) -> None:
        super().__init__(inner.request_handler, request_factory=inner.request_factory)
        self.inner = inner
        self.guard = guard
        # read by each new request handler when it is built, so every connection is tracked
        inner.request_handler = guard.track(inner.request_handler)

    # the listening socket's protocol factory: a guarded connection, not a bare request handler
    def __call__(self) -> Any:
        return self.guard.protocol(self.inner())

    @property
    def connections(self) -> list[RequestHandler]:
        return self.inner.connections

    def pre_shutdown(self) -> None:
        self.inner.pre_shutdown()

    async def shutdown(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 (aiohttp's signature)
        await self.inner.shutdown(timeout)


class GuardedAppRunner(web.AppRunner):
    """An ``AppRunner`` whose server applies ``limits`` (use it as usual with ``web.TCPSite``)."""

    def __init__(self, app: web.Application, *, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(app, keepalive_timeout=limits.keepalive_timeout_s, **kwargs)
        self.limits = limits

    async def _make_server(self) -> web.Server:
        return GuardedServer(await super()._make_server(), ConnectionGuard(self.limits))
