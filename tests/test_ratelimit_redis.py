"""Redis-only properties: server time only, many connections, coalescing, errors."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as aredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ratelimit import BackendUnavailable, Limit, RedisRateLimiter

#: gcra.lua keeps times relative to this epoch.
EPOCH = 1_600_000_000


@pytest.fixture
async def clients(redis_url: str) -> AsyncIterator[list[aredis.Redis]]:
    """Four clients with their own connection pools, like four worker processes."""
    made = [aredis.Redis.from_url(redis_url) for _ in range(4)]
    try:
        yield made
    finally:
        for client in made:
            await client.aclose()


def skewed(offset: float) -> Callable[[], float]:
    return lambda: time.monotonic() + offset


async def server_now(client: aredis.Redis) -> float:
    seconds, micros = await client.time()
    return seconds + micros / 1e6


async def test_workers_with_disagreeing_clocks_see_one_bucket(clients: list[aredis.Redis]) -> None:
    # Worker clocks an hour ahead and two hours behind: they only time local sleeps.
    ahead = RedisRateLimiter(clients[0], clock=skewed(3600.0))
    behind = RedisRateLimiter(clients[1], clock=skewed(-7200.0))
    await ahead.configure(Limit(key="acct", rate=10.0, burst=4))
    granted = 0
    for limiter in (ahead, behind, ahead, behind, ahead):
        granted += await limiter.try_acquire(["acct"]) == 0.0
    assert granted == 4
    wait_ahead = await ahead.try_acquire(["acct"])
    wait_behind = await behind.try_acquire(["acct"])
    assert 0.05 < wait_behind <= wait_ahead <= 0.1 + 1e-6
    assert wait_ahead - wait_behind < 0.02  # same bucket, same clock: the server's
    # The bucket's theoretical arrival time is on the server clock, not on either worker's.
    raw = await clients[2].hget("ratelimit:acct", "tat")
    assert raw is not None
    tat = float(raw) + EPOCH
    now = await server_now(clients[2])
    assert now - 0.5 < tat < now + 1.0


async def test_skewed_workers_acquiring_together_respect_the_rate(clients: list[aredis.Redis]) -> None:
    limiters = [
        RedisRateLimiter(client, clock=skewed(offset))
        for client, offset in zip(clients, (0.0, 3600.0, -3600.0, 86400.0), strict=True)
    ]
    await limiters[0].configure(Limit(key="acct", rate=100.0, burst=10))
    counts = [0] * len(limiters)
    stop = time.monotonic() + 0.6

    async def worker(index: int) -> None:
        while time.monotonic() < stop:
            await limiters[index].acquire(["acct"])
            counts[index] += 1

    start = await server_now(clients[0])
    await asyncio.wait_for(asyncio.gather(*(worker(i) for i in range(4) for _ in range(20))), timeout=10)
    elapsed = await server_now(clients[0]) - start
    total = sum(counts)
    assert total <= 10 + 100.0 * elapsed + 1
    assert total >= 0.6 * 100.0 * 0.6  # every worker made progress overall
    assert min(counts) > 0


async def test_concurrent_try_acquire_from_many_connections_never_overgrants(
    clients: list[aredis.Redis],
) -> None:
    limiters = [RedisRateLimiter(client) for client in clients]
    await limiters[0].configure(Limit(key="acct", rate=200.0, burst=20))
    await limiters[0].configure(Limit(key="sender", rate=150.0, burst=5))
    granted = 0
    stop = time.monotonic() + 0.5

    async def hammer(limiter: RedisRateLimiter) -> None:
        nonlocal granted
        while time.monotonic() < stop:
            if await limiter.try_acquire(["acct", "sender"]) == 0.0:
                granted += 1

    start = await server_now(clients[0])
    await asyncio.gather(*(hammer(lim) for lim in limiters for _ in range(10)))
    elapsed = await server_now(clients[0]) - start
    assert granted <= 5 + 150.0 * elapsed + 1  # the tighter key bounds the pair
    assert granted >= 0.5 * 150.0 * 0.5


async def test_smoother_coalesces_concurrent_acquisitions(aredis_client: aredis.Redis) -> None:
    limiter = RedisRateLimiter(aredis_client)
    await limiter.configure(Limit(key="fcm", rate=10_000.0, burst=1_000))
    await asyncio.wait_for(asyncio.gather(*(limiter.acquire(["fcm"]) for _ in range(500))), timeout=10)
    assert limiter.script_calls <= 2
    calls = limiter.script_calls
    await asyncio.wait_for(asyncio.gather(*(limiter.acquire(["nolimit"]) for _ in range(500))), timeout=10)
    assert limiter.script_calls - calls <= 2


async def test_smoother_chunks_scale_with_rate(aredis_client: aredis.Redis) -> None:
    limiter = RedisRateLimiter(aredis_client, flush_interval=0.02)
    await limiter.configure(Limit(key="fast", rate=2_000.0, burst=100))
    start = time.monotonic()
    await asyncio.wait_for(asyncio.gather(*(limiter.acquire(["fast"]) for _ in range(700))), timeout=10)
    elapsed = time.monotonic() - start
    assert elapsed >= 0.29  # 600 tokens beyond the burst at 2,000/s
    # Calls are >= 20 ms apart, so each carried ~40 tokens: far fewer calls than messages.
    assert limiter.script_calls <= elapsed / 0.02 + 3
    assert limiter.script_calls < 700 / 10


async def test_rerate_and_penalty_reach_every_worker(clients: list[aredis.Redis]) -> None:
    a, b = RedisRateLimiter(clients[0]), RedisRateLimiter(clients[1])
    await a.configure(Limit(key="acct", rate=10.0, burst=1, recovery=0.001))
    assert await b.get_limit("acct") == Limit(key="acct", rate=10.0, burst=1, recovery=0.001)
    await a.penalize("acct")
    assert 5.0 <= await b.effective_rate("acct") < 5.1
    await b.configure(Limit(key="acct", rate=2.0, burst=1, recovery=0.001))
    assert await a.effective_rate("acct") == 2.0  # re-rated below the penalized rate


async def test_waiting_acquire_notices_a_rerate(aredis_client: aredis.Redis) -> None:
    limiter = RedisRateLimiter(aredis_client, max_wait=0.1)
    await limiter.configure(Limit(key="acct", rate=0.5, burst=1))
    assert await limiter.try_acquire(["acct"]) == 0.0
    waiting = asyncio.ensure_future(limiter.acquire(["acct"]))  # 2 s away at 0.5/s
    await asyncio.sleep(0.05)
    start = time.monotonic()
    other = RedisRateLimiter(aredis_client)
    await other.configure(Limit(key="acct", rate=100.0, burst=1))
    await asyncio.wait_for(waiting, timeout=1.0)
    assert time.monotonic() - start < 0.5


async def test_decoded_responses_client(redis_url: str) -> None:
    client = aredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        limiter = RedisRateLimiter(client)
        await limiter.configure(Limit(key="acct", rate=10.0, burst=1))
        assert await limiter.get_limit("acct") == Limit(key="acct", rate=10.0, burst=1)
        assert await limiter.try_acquire(["acct"]) == 0.0
        assert await limiter.try_acquire(["acct"]) > 0.05
        assert await limiter.effective_rate("acct") == 10.0
    finally:
        await client.aclose()


async def test_server_failure_is_translated() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # No client-side retries: redis-py's default backoff would take seconds per call.
    client = aredis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
    try:
        limiter = RedisRateLimiter(client)
        with pytest.raises(BackendUnavailable):
            await limiter.try_acquire(["acct"])
        with pytest.raises(BackendUnavailable):
            await asyncio.wait_for(limiter.acquire(["acct"]), timeout=5)
        with pytest.raises(BackendUnavailable):
            await limiter.configure(Limit(key="acct", rate=1.0))
    finally:
        await client.aclose()
