"""Benchmark of the tracked-link redirect ``GET /r/<token>``: open-loop latency percentiles.

    .venv/bin/python -m loadtest.bench_redirect [--rate 1000] [--seconds 10] [--messages 100000]

Runs the redirect route (``dispatch.engage.links.mount_links``, the ledger in Redis) in its own
process under uvloop, as ``dispatch serve`` would, and measures at ``--rate`` requests/s for
``--seconds`` each (``loadtest.bench_api.run_phase``: open loop, latency from the due time):

1. baseline: ``GET /static`` on the same server, a 302 with no MAC and no Redis (HTTP and the
   event loop only);
2. redirect: ``GET /r/<token>`` over ``--messages`` distinct messages (first clicks, then repeats
   once every message was clicked), each a MAC check and one ledger script call.

The issue's target is p99 <= 5 ms at 1,000 requests/s on an idle machine: read the figures next
to the baseline and the load average printed (the machine is shared). Redis:
``DISPATCH_REDIS_URL`` if set, else an embedded Valkey in a temporary directory. Asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import socket
import tempfile
from collections.abc import Sequence
from pathlib import Path

import redis

from dispatch.config import load_settings
from dispatch.engage.ledger import engagement_counters
from dispatch.engage.links import LinkSigner
from dispatch.plan.manifest import Manifest
from dispatch.store import keys
from loadtest.bench_api import run_phase
from loadtest.http_lite import LiteHttp

__all__ = ["main"]

CAMPAIGN = "bench-redirect"
LINK = "https://shop.example/offer"


def _serve(redis_url: str, home: str, sock: socket.socket) -> None:
    """The server process: the redirect route and a static baseline route."""
    import redis.asyncio as aredis
    import uvloop
    from aiohttp import web

    from dispatch.engage.ledger import EngagementLedger
    from dispatch.engage.links import mount_links

    async def run() -> None:
        settings = load_settings({"DISPATCH_HOME": home, "DISPATCH_LINK_BASE_URL": "http://bench.invalid"})
        client = aredis.Redis.from_url(redis_url)
        signer = LinkSigner.from_settings(settings)
        assert signer is not None

        async def static(request: web.Request) -> web.Response:
            return web.Response(status=302, headers={"Location": LINK})

        app = web.Application()
        app.add_routes([web.get("/static", static)])
        mount_links(app, signer, EngagementLedger(client, ttl_s=3600), client)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.SockSite(runner, sock).start()
        await asyncio.Event().wait()

    uvloop.run(run())


def _manifest() -> Manifest:
    return Manifest(
        campaign_id=CAMPAIGN,
        fingerprint="bench",
        channel="sms",
        body=f"$link({LINK})",
        total=0,
        accepted=0,
        rejected={},
        batches=1,
        batch_size=0,
        cost_units=0,
        checksum="",
        snapshot_bytes=0,
        created_at=0.0,
        prediction={"duration_s": 0.0, "verdict": "no_deadline"},
        links=[LINK],
    )


async def _bench(args: argparse.Namespace, redis_url: str, home: Path) -> None:
    sync = redis.Redis.from_url(redis_url)
    sync.delete(keys.engagement_counters(CAMPAIGN), *(keys.engagement(CAMPAIGN, b) for b in range(64)))
    sync.set(keys.manifest(CAMPAIGN), _manifest().encode())
    settings = load_settings({"DISPATCH_HOME": str(home), "DISPATCH_LINK_BASE_URL": "http://bench.invalid"})
    signer = LinkSigner.from_settings(settings)  # generates $home/link.key before the server reads it
    assert signer is not None
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    port = sock.getsockname()[1]
    server = multiprocessing.get_context("spawn").Process(target=_serve, args=(redis_url, str(home), sock))
    server.start()
    sock.close()
    http = LiteHttp("127.0.0.1", port)
    try:
        for _ in range(200):  # wait for the server to answer
            with contextlib.suppress(OSError):
                await http.request("GET", "/static")
                break
            await asyncio.sleep(0.05)
        paths = [
            f"/r/{signer.token(CAMPAIGN, i // 10_000, i % 10_000, 0)}" for i in range(args.messages)
        ]  # batches of 10,000 as the planner's largest
        headers = {"User-Agent": "Mozilla/5.0 (iPhone) Mobile/15E148 Safari/604.1"}

        async def send(method: str, path: str, hdrs: dict[str, str], body: bytes) -> tuple[int, bytes]:
            return await http.request(method, path, hdrs, body)

        print(
            f"redirect benchmark: {args.rate:.0f} req/s for {args.seconds:.0f} s per phase, open loop; "
            f"load average before {os.getloadavg()[0]:.2f}",
            flush=True,
        )
        baseline = await run_phase(
            "baseline GET /static",
            send,
            lambda i: ("GET", "/static", headers, b""),
            rate=args.rate,
            seconds=args.seconds,
            server_pid=server.pid,
        )
        print(baseline.line(), flush=True)
        redirect = await run_phase(
            "GET /r/<token>",
            send,
            lambda i: ("GET", paths[i % len(paths)], headers, b""),
            rate=args.rate,
            seconds=args.seconds,
            server_pid=server.pid,
        )
        print(redirect.line(), flush=True)
        expected = min(redirect.sent, len(paths))
        for _ in range(100):  # the server writes clicks within ~10 ms of answering them
            clicks = engagement_counters(sync, CAMPAIGN)["click"]
            if clicks >= expected:
                break
            await asyncio.sleep(0.02)
        print(
            f"ledger: {clicks} first clicks for {expected} distinct messages requested; "
            f"load average after {os.getloadavg()[0]:.2f}",
            flush=True,
        )
    finally:
        http.close()
        server.terminate()
        server.join(5)
        sync.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench_redirect", description=__doc__)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--messages", type=int, default=100_000)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-redirect-") as tmp:
        home = Path(tmp)
        env_url = os.environ.get("DISPATCH_REDIS_URL")
        if env_url:
            asyncio.run(_bench(args, env_url, home))
            return 0
        from dispatch.store.embedded import ensure_embedded, stop_embedded

        server, _ = ensure_embedded(home)
        try:
            asyncio.run(_bench(args, server.url, home))
        finally:
            with contextlib.suppress(Exception):
                stop_embedded(home)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
