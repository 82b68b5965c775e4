"""Slow clients against the real API server on a real socket: request heads trickled a header at a
time are cut at the header timeout, a flood of them over the connection cap closes the oldest
waiting ones instead of keeping new clients out, and /healthz answers throughout."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import redis
import redis.asyncio as aredis
import uvloop
from aiohttp import web
from test_api_support import Api, api_settings, running_api
from yarl import URL

from dispatch.api.connections import ConnectionLimits, GuardedAppRunner

#: Trickling clients at once: enough to show the effect, modest for a 2-core machine.
SLOW_CLIENTS = 300


class Trickler:
    """A raw connection sending a request line, then one header every ``every_s``, never the end
    of the head; ``closed_after`` is set when the server closes it (seconds after it opened)."""

    def __init__(self, changed: asyncio.Condition) -> None:
        self.changed = changed
        self.closed_after: float | None = None
        self.opened = asyncio.Event()
        self.answer = b""

    async def run(self, host: str, port: int, every_s: float, stop: asyncio.Event) -> None:
        reader, writer = await asyncio.open_connection(host, port)
        started = time.monotonic()
        self.opened.set()
        closed = asyncio.ensure_future(reader.read())  # returns at EOF: the server closed it
        stopped = asyncio.ensure_future(stop.wait())
        try:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: api\r\n")
            while not closed.done() and not stopped.done():
                await asyncio.wait({closed, stopped}, timeout=every_s, return_when=asyncio.FIRST_COMPLETED)
                if not closed.done():
                    writer.write(b"X-Slow: 1\r\n")
            if closed.done():
                self.closed_after = time.monotonic() - started
                self.answer = closed.result() if closed.exception() is None else b""
        except (ConnectionError, OSError):
            self.closed_after = time.monotonic() - started
        finally:
            closed.cancel()
            stopped.cancel()
            writer.close()
            async with self.changed:
                self.changed.notify_all()


@asynccontextmanager
async def tricklers(api: Api, count: int, every_s: float) -> AsyncIterator[list[Trickler]]:
    """``count`` tricklers, all connected."""
    url = URL(api.base)
    assert url.host is not None and url.port is not None
    stop = asyncio.Event()
    changed = asyncio.Condition()
    slow = [Trickler(changed) for _ in range(count)]
    tasks = [asyncio.create_task(t.run(url.host, url.port, every_s, stop)) for t in slow]
    try:
        async with asyncio.timeout(60):
            await asyncio.gather(*(t.opened.wait() for t in slow))
        yield slow
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _healthz_within(api: Api, seconds: float) -> float:
    started = time.monotonic()
    async with asyncio.timeout(seconds):
        reply = await api.call("GET", "/healthz", token=None)
    assert reply.status == 200
    return time.monotonic() - started


async def _until(slow: list[Trickler], closed: Callable[[int], bool], seconds: float) -> bool:
    """Wait (at most ``seconds``) until ``closed(number of tricklers the server closed)``."""
    changed = slow[0].changed

    def done() -> bool:
        return closed(sum(t.closed_after is not None for t in slow))

    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds), changed:
            await changed.wait_for(done)
    return done()


async def test_trickled_request_heads_are_cut_at_the_header_timeout(
    redis_url: str, tmp_path: Path, aredis_client: aredis.Redis, redis_client: redis.Redis
) -> None:
    timeout_s = 2.0
    settings = api_settings(redis_url, tmp_path, DISPATCH_API_HEADER_TIMEOUT_S=str(timeout_s))
    async with running_api(settings, aredis_client, redis_client) as api, tricklers(api, SLOW_CLIENTS, 0.5) as slow:
        await _healthz_within(api, 5.0)  # while all of them trickle
        # every one is cut (well before the idle timeout of 75 s), none before its time
        assert await _until(slow, lambda closed: closed == SLOW_CLIENTS, timeout_s + 30)
        await _healthz_within(api, 5.0)
    times = sorted(t.closed_after for t in slow if t.closed_after is not None)
    assert len(times) == SLOW_CLIENTS
    assert times[0] >= timeout_s * 0.9, times[:5]
    assert not any(t.answer.startswith(b"HTTP/1.1 200") for t in slow)  # no head was ever complete


async def test_over_the_cap_the_longest_waiting_connections_make_room(
    redis_url: str, tmp_path: Path, aredis_client: aredis.Redis, redis_client: redis.Redis
) -> None:
    cap = 50
    settings = api_settings(
        redis_url, tmp_path, DISPATCH_API_HEADER_TIMEOUT_S="120", DISPATCH_API_MAX_CONNECTIONS=str(cap)
    )
    async with running_api(settings, aredis_client, redis_client) as api, tricklers(api, SLOW_CLIENTS, 0.5) as slow:
        # all but the newest `cap` are closed at once (not at the header timeout, minutes away)
        assert await _until(slow, lambda closed: closed >= SLOW_CLIENTS - cap, 20)
        for _ in range(5):  # a real client gets in every time, though the flood fills the cap
            await _healthz_within(api, 5.0)
        closed = [t for t in slow if t.closed_after is not None]
    assert SLOW_CLIENTS - cap <= len(closed) <= SLOW_CLIENTS
    assert max(t.closed_after for t in closed if t.closed_after is not None) < 60


def test_the_guard_runs_on_uvloop_as_dispatch_serve_does() -> None:
    """uvloop's transports are not asyncio.Transport subclasses: the same limits hold there."""

    async def scenario() -> tuple[int, int]:
        app = web.Application()

        async def ok(request: web.Request) -> web.Response:
            return web.json_response({"status": "ok"})

        app.router.add_get("/healthz", ok)
        runner = GuardedAppRunner(app, limits=ConnectionLimits(header_timeout_s=1.0, max_connections=20))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port = runner.addresses[0][1]
        try:
            slow = []
            for _ in range(40):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: api\r\n")
                slow.append((reader, writer))
            async with aiohttp.ClientSession() as session:
                for _ in range(3):
                    async with asyncio.timeout(5), session.get(f"http://127.0.0.1:{port}/healthz") as reply:
                        assert reply.status == 200
            async with asyncio.timeout(30):
                ends = await asyncio.gather(*(reader.read() for reader, _ in slow))
            for _, writer in slow:
                writer.close()
            return sum(end == b"" for end in ends), len(slow)
        finally:
            await runner.cleanup()

    closed, opened = uvloop.run(scenario())
    assert closed == opened
