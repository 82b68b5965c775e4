"""Benchmark: accuracy, utilization and Redis cost of ``ratelimit`` across worker processes.

    .venv/bin/python -m loadtest.bench_ratelimit [--seconds 30] [--rate 500] [--processes 4]
        [--coroutines 200] [--burst N] [--high-rate 5000] [--high-seconds 10]

N spawned processes x C coroutines loop ``await limiter.acquire([key]); await session.post(...)``
against a small receiver (an aiohttp server on 127.0.0.1, port 0, in this process) that time-stamps
every request. Three runs:

1. baseline: no limiter, a few seconds: what the senders and receiver can do on this machine;
2. the accuracy run at ``--rate``: max requests in any 1-second window (fixed and sliding) vs
   ``rate * 1.02 + burst``, and utilization over the run (initial burst excluded) vs 97%;
3. the cost run at ``--high-rate``: script calls per message vs 0.05 (also limiter-only, no HTTP,
   so the figure does not depend on how fast this machine can post).

Redis: ``DISPATCH_REDIS_URL`` if set, else an embedded Valkey in a temporary directory.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import multiprocessing
import os
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.queues import Queue
from pathlib import Path

import aiohttp
import redis.asyncio as aredis
from aiohttp import web

from ratelimit import Limit, RedisRateLimiter

__all__ = ["RunResult", "main"]

#: Accuracy allowance on top of the declared burst.
ACCURACY = 1.02
#: Minimum share of the limit the senders must use.
UTILIZATION = 0.97
#: Maximum Redis script calls per message at the high rate.
CALLS_PER_MESSAGE = 0.05
#: Seconds between spawning the workers and the common start (lets them import and connect).
START_DELAY = 3.0


@dataclass(frozen=True, kw_only=True)
class WorkerPlan:
    redis_url: str
    target: str | None  # receiver URL; None = limiter only
    key: str | None  # None = no limiter (baseline)
    coroutines: int
    start_at: float  # wall clock (same machine): only synchronizes the benchmark's workers
    seconds: float


@dataclass(frozen=True, kw_only=True)
class RunResult:
    sent: int
    script_calls: int  # counted by the clients
    server_calls: int  # EVAL/EVALSHA calls by INFO commandstats (includes configure and cleanup)
    timestamps: list[float]  # receiver monotonic times, relative to the common start


def _worker(plan: WorkerPlan, results: Queue[tuple[int, int]]) -> None:
    try:
        import uvloop

        uvloop.run(_work(plan, results))
    except ImportError:  # pragma: no cover - uvloop is a dependency
        asyncio.run(_work(plan, results))


async def _work(plan: WorkerPlan, results: Queue[tuple[int, int]]) -> None:
    client = aredis.Redis.from_url(plan.redis_url, max_connections=64)
    limiter = RedisRateLimiter(client)
    connector = aiohttp.TCPConnector(limit=plan.coroutines)
    sent = 0
    async with aiohttp.ClientSession(connector=connector) as session:
        if plan.target is not None:
            warm_url = plan.target + "warmup"

            # Open the pool's connections before the start: connection set-up would otherwise
            # delay the first sends and compress them into the receiver's first window.
            async def warm() -> None:
                async with session.post(warm_url, data=b"w") as response:
                    await response.read()

            await asyncio.gather(*(warm() for _ in range(plan.coroutines)))
        await asyncio.sleep(max(0.0, plan.start_at - time.time()))
        deadline = time.monotonic() + plan.seconds

        async def sender() -> None:
            nonlocal sent
            while True:
                if plan.key is not None:
                    await limiter.acquire([plan.key])
                if time.monotonic() >= deadline:
                    return
                if plan.target is not None:
                    async with session.post(plan.target, data=b"m") as response:
                        await response.read()
                sent += 1

        await asyncio.gather(*(sender() for _ in range(plan.coroutines)))
    await client.aclose()
    results.put((sent, limiter.script_calls))


class Receiver:
    """Counts POSTs with their arrival time."""

    def __init__(self) -> None:
        self.times: list[float] = []

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        self.times.append(time.monotonic())
        return web.Response(text="ok")

    async def warmup(self, request: web.Request) -> web.Response:
        await request.read()
        return web.Response(text="ok")


async def _commandstats_calls(client: aredis.Redis) -> int:
    stats = await client.info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items() if k in ("cmdstat_evalsha", "cmdstat_eval"))


async def run(
    *,
    redis_url: str,
    rate: float | None,
    burst: int,
    processes: int,
    coroutines: int,
    seconds: float,
    post: bool = True,
) -> RunResult:
    """One run: configure the limit, spawn workers, collect the receiver's time stamps."""
    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/", receiver.handle)
    app.router.add_post("/warmup", receiver.warmup)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    client = aredis.Redis.from_url(redis_url)
    key = None
    if rate is not None:
        key = f"bench:{uuid.uuid4().hex[:12]}"
        await RedisRateLimiter(client).configure(Limit(key=key, rate=rate, burst=burst))
    try:
        ctx = multiprocessing.get_context("spawn")
        results: Queue[tuple[int, int]] = ctx.Queue()
        start_at = time.time() + START_DELAY
        start_mono = time.monotonic() + START_DELAY
        plan = WorkerPlan(
            redis_url=redis_url,
            target=f"http://127.0.0.1:{port}/" if post else None,
            key=key,
            coroutines=coroutines,
            start_at=start_at,
            seconds=seconds,
        )
        workers = [ctx.Process(target=_worker, args=(plan, results)) for _ in range(processes)]
        for proc in workers:
            proc.start()
        loop = asyncio.get_running_loop()
        before = await _commandstats_calls(client)
        collected = [await loop.run_in_executor(None, results.get) for _ in workers]
        for proc in workers:
            await loop.run_in_executor(None, proc.join)
        server_calls = await _commandstats_calls(client) - before
        sent = sum(s for s, _ in collected)
        calls = sum(c for _, c in collected)
        return RunResult(
            sent=sent,
            script_calls=calls,
            server_calls=server_calls,
            timestamps=[t - start_mono for t in receiver.times],
        )
    finally:
        if key is not None:
            await client.delete(f"ratelimit:{key}")
        await client.aclose()
        await runner.cleanup()


def fixed_windows(times: Sequence[float], seconds: float) -> list[int]:
    counts = [0] * max(1, int(seconds))
    for t in times:
        index = int(t)
        if 0 <= index < len(counts):
            counts[index] += 1
    return counts


def sliding_max(times: Sequence[float], width: float = 1.0) -> tuple[int, float]:
    """Most requests in any window [t, t + width) and where that window starts."""
    ordered = sorted(times)
    best, at = 0, 0.0
    for i, t in enumerate(ordered):
        count = bisect.bisect_left(ordered, t + width, lo=i) - i
        if count > best:
            best, at = count, t
    return best, at


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


async def _bench(args: argparse.Namespace, redis_url: str) -> bool:
    burst = args.burst if args.burst is not None else max(1, round(args.rate * 0.1))
    shape = f"{args.processes} processes x {args.coroutines} coroutines"
    print(f"ratelimit benchmark on {os.cpu_count()} cores, Redis {redis_url}, {shape}")

    base = await run(
        redis_url=redis_url, rate=None, burst=1, processes=args.processes,
        coroutines=args.coroutines, seconds=args.baseline_seconds,
    )  # fmt: skip
    base_rate = base.sent / args.baseline_seconds
    print(f"baseline, no limiter, {args.baseline_seconds:g} s: {base_rate:,.0f} requests/s")

    res = await run(
        redis_url=redis_url, rate=args.rate, burst=burst, processes=args.processes,
        coroutines=args.coroutines, seconds=args.seconds,
    )  # fmt: skip
    windows = fixed_windows(res.timestamps, args.seconds)
    slide, slide_at = sliding_max(res.timestamps)
    steady, steady_at = sliding_max([t for t in res.timestamps if t >= 1.0])
    bound = args.rate * ACCURACY + burst
    received = sum(windows)
    utilization = (received - burst) / (args.rate * args.seconds)
    print(f"\nlimit {args.rate:g}/s burst {burst}, {args.seconds:g} s: sent {res.sent}, received {received}")
    print(f"  fixed 1-s windows: max {max(windows)}, min {min(windows)}, mean {received / len(windows):.1f}")
    print(
        f"  sliding 1-s window max: {slide} (from t={slide_at:.2f} s)   bound rate*{ACCURACY}+burst = {bound:g};"
        f" after the first second: {steady} (t={steady_at:.2f} s)"
    )
    print(f"  utilization (initial burst excluded): {utilization:.2%}")
    per_msg = res.script_calls / max(res.sent, 1)
    print(
        f"  script calls: {res.script_calls} ({per_msg:.4f} per message); server INFO commandstats: {res.server_calls}"
    )
    ok_windows = max(windows) <= bound and slide <= bound
    ok_util = utilization >= UTILIZATION
    print(f"{_verdict(ok_windows)}: every 1-s window <= {bound:g} (fixed max {max(windows)}, sliding {slide})")
    print(f"{_verdict(ok_util)}: utilization {utilization:.2%} >= {UTILIZATION:.0%}")

    high_burst = max(1, round(args.high_rate * 0.1))
    ok_high = True
    for post in (True, False):
        label = "with HTTP posts" if post else "limiter only, no HTTP"
        high = await run(
            redis_url=redis_url, rate=args.high_rate, burst=high_burst, processes=args.processes,
            coroutines=args.coroutines, seconds=args.high_seconds, post=post,
        )  # fmt: skip
        per = high.script_calls / max(high.sent, 1)
        achieved = high.sent / args.high_seconds
        print(
            f"\nlimit {args.high_rate:g}/s burst {high_burst}, {args.high_seconds:g} s, {label}: "
            f"{achieved:,.0f} messages/s ({achieved / args.high_rate:.1%} of the limit), "
            f"{high.script_calls} script calls (server: {high.server_calls})"
        )
        if post:
            hw = fixed_windows(high.timestamps, args.high_seconds)
            print(f"  fixed 1-s windows max {max(hw)} (bound {args.high_rate * ACCURACY + high_burst:g})")
        print(f"{_verdict(per <= CALLS_PER_MESSAGE)}: Redis calls per message {per:.4f} <= {CALLS_PER_MESSAGE}")
        ok_high = ok_high and per <= CALLS_PER_MESSAGE
    return ok_windows and ok_util and ok_high


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench_ratelimit", description=__doc__)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=500.0)
    parser.add_argument("--burst", type=int, default=None, help="default: rate / 10")
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--coroutines", type=int, default=200)
    parser.add_argument("--high-rate", type=float, default=5000.0)
    parser.add_argument("--high-seconds", type=float, default=10.0)
    parser.add_argument("--baseline-seconds", type=float, default=3.0)
    args = parser.parse_args(argv)
    env_url = os.environ.get("DISPATCH_REDIS_URL")
    if env_url:
        return 0 if asyncio.run(_bench(args, env_url)) else 1
    from dispatch.store.embedded import ensure_embedded, stop_embedded

    with tempfile.TemporaryDirectory(prefix="bench-ratelimit-") as tmp:
        home = Path(tmp)
        server, _ = ensure_embedded(home)
        try:
            return 0 if asyncio.run(_bench(args, server.url)) else 1
        finally:
            with contextlib.suppress(Exception):
                stop_embedded(home)


if __name__ == "__main__":
    raise SystemExit(main())
