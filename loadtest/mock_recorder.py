"""A scripted HTTP server that records every request: for wire-format tests and callback sinks.

    async with RecordingServer() as sink:                  # answers 200 {} by default
        ... point a client or the mock's callbacks at sink.url ...
        sink.requests[0].headers["X-Twilio-Signature"]

``reply`` scripts the answer (a status that a provider twin never gives, an HTML error page).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from aiohttp import web
from multidict import CIMultiDict

__all__ = ["Recorded", "RecordingServer", "Reply"]


@dataclass(frozen=True, slots=True)
class Recorded:
    method: str
    path: str
    #: The full URL as the client asked for it (scheme, host, port, path, query).
    url: str
    headers: CIMultiDict[str]
    body: bytes


Reply = Callable[[Recorded], Awaitable[web.StreamResponse]]


async def _ok(recorded: Recorded) -> web.StreamResponse:
    return web.json_response({})


class RecordingServer:
    """Records requests on 127.0.0.1 (port 0) and answers them with ``reply``."""

    def __init__(self, reply: Reply = _ok) -> None:
        self.reply = reply
        self.requests: list[Recorded] = []
        self._arrived = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self._url: str | None = None

    @property
    def url(self) -> str:
        if self._url is None:
            raise RuntimeError("RecordingServer is not running")
        return self._url

    async def wait_for(self, count: int) -> list[Recorded]:
        """Wait until ``count`` requests have arrived (bound it with ``asyncio.timeout``)."""
        async with self._arrived:
            await self._arrived.wait_for(lambda: len(self.requests) >= count)
        return list(self.requests)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        recorded = Recorded(
            request.method,
            request.path,
            str(request.url),
            CIMultiDict(request.headers),
            await request.read(),
        )
        async with self._arrived:
            self.requests.append(recorded)
            self._arrived.notify_all()
        return await self.reply(recorded)

    async def __aenter__(self) -> Self:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        self._runner = runner
        host, port = runner.addresses[0][:2]
        self._url = f"http://{host}:{port}"
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
