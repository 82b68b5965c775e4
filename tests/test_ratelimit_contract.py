"""The rate-limiter contract, run against every backend (Redis on real Valkey, and the stub).

The stub runs on a ManualClock (``advance`` moves it); Redis runs on server time (``advance``
really sleeps). Assertions are on ``try_acquire``'s returned waits with bounds loose enough for
a loaded machine: rates of 10/s make one token 100 ms, far above scheduling noise.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest
import redis.asyncio as aredis

from ratelimit import (
    CostTooLarge,
    InvalidCost,
    Limit,
    LimitConfigError,
    ManualClock,
    RateLimiter,
    RedisRateLimiter,
    StubRateLimiter,
)


@dataclass
class Backend:
    limiter: RateLimiter
    #: Let time pass (fake for the stub, real for Redis).
    advance: Callable[[float], Awaitable[None]]
    #: The clock the limiter's own sleeps run on.
    clock: Callable[[], float]
    #: Slack for time that passes between calls on a real clock.
    slack: float


@pytest.fixture(params=["stub", "redis"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    if request.param == "stub":
        manual = ManualClock()
        yield Backend(StubRateLimiter(clock=manual, sleep=manual.sleep), manual.sleep, manual, 1e-9)
        return
    client = aredis.Redis.from_url(request.getfixturevalue("redis_url"))
    try:
        yield Backend(RedisRateLimiter(client), asyncio.sleep, time.monotonic, 0.03)
    finally:
        await client.aclose()


async def drain(limiter: RateLimiter, keys: list[str], limit: int = 1000) -> int:
    """Take tokens one by one until refused; returns how many were granted."""
    for taken in range(limit):
        if await limiter.try_acquire(keys) > 0:
            return taken
    raise AssertionError("never refused")


async def test_exhaustion_then_recovery(backend: Backend) -> None:
    lim = backend.limiter
    await lim.configure(Limit(key="acct", rate=10.0, burst=5))
    assert [await lim.try_acquire(["acct"]) for _ in range(5)] == [0.0] * 5
    wait = await lim.try_acquire(["acct"])
    assert 0.1 - backend.slack <= wait <= 0.1 + 1e-6
    again = await lim.try_acquire(["acct"])  # a refusal consumed nothing
    assert 0 < again <= wait
    await backend.advance(wait + 0.01)
    assert await lim.try_acquire(["acct"]) == 0.0
    assert await lim.try_acquire(["acct"]) > 0.05


async def test_idle_bucket_refills_to_burst_only(backend: Backend) -> None:
    lim = backend.limiter
    await lim.configure(Limit(key="acct", rate=100.0, burst=3))
    await backend.advance(0.2)  # 20 tokens' worth of idle time
    assert await drain(lim, ["acct"]) == 3


async def test_multi_key_is_all_or_nothing(backend: Backend) -> None:
    lim = backend.limiter
    await lim.configure(Limit(key="account", rate=10.0, burst=5))
    await lim.configure(Limit(key="sender", rate=10.0, burst=2))
    assert await lim.try_acquire(["account", "sender"]) == 0.0
    assert await lim.try_acquire(["account", "sender"]) == 0.0
    refused = await lim.try_acquire(["account", "sender"])
    assert refused > 0.05  # the sender is exhausted ...
    # ... and the account was not charged for the refused attempts: 3 of its 5 remain.
    assert await lim.try_acquire(["account"], cost=3) == 0.0
    assert await lim.try_acquire(["account"]) > 0.05


async def test_wait_is_for_the_most_exhausted_key(backend: Backend) -> None:
    lim = backend.limiter
    await lim.configure(Limit(key="fast", rate=100.0, burst=1))
    await lim.configure(Limit(key="slow", rate=4.0, burst=1))
    assert await lim.try_acquire(["fast", "slow"]) == 0.0
    wait = await lim.try_acquire(["fast", "slow"])
    assert 0.25 - backend.slack <= wait <= 0.25 + 1e-6


async def test_cost_counts_tokens(backend: Backend) -> None:
    lim = backend.limiter
    await lim.configure(Limit(key="sms", rate=10.0, burst=5))
    assert await lim.try_acquire(["sms"], cost=3) == 0.0
    wait = await lim.try_acquire(["sms"], cost=3)  # 2 left, one more token needed
    assert 0.1 - backend.slack <= wait <= 0.1 + 1e-6
    assert await lim.try_acquire(["sms"], cost=2) == 0.0
    wait = await lim.try_acquire(["sms"], cost=5)  # empty: five tokens needed
    assert 0.5 - backend.slack <= wait <= 0.5 + 1e-6


async def test_cost_above_burst_and_invalid_cost_raise(backend: Backend) -> None:
    lim = backend.limiter
    await lim.configure(Limit(key="sms", rate=10.0, burst=5))
    with pytest.raises(CostTooLarge) as info:
        await lim.try_acquire(["free", "sms"], cost=6)
    assert (info.value.key, info.value.burst, info.value.cost) == ("sms", 5, 6)
    with pytest.raises(CostTooLarge):
        await asyncio.wait_for(lim.acquire(["sms"], cost=6), timeout=5)
    with pytest.raises(InvalidCost):
        await lim.try_acquire(["sms"], cost=0)
    with pytest.raises(InvalidCost):
        await lim.acquire(["sms"], cost=-1)
    assert await lim.try_acquire(["sms"], cost=5) == 0.0  # nothing was consumed


async def test_unconfigured_keys_are_unlimited(backend: Backend) -> None:
    lim = backend.limiter
    assert await lim.get_limit("campaign:7") is None
    assert await lim.effective_rate("campaign:7") == math.inf
    assert [await lim.try_acquire(["campaign:7"], cost=1000) for _ in range(3)] == [0.0] * 3
    await lim.configure(Limit(key="account", rate=10.0, burst=2))
    # An optional campaign cap that is not configured does not limit the acquisition.
    assert await drain(lim, ["account", "campaign:7"]) == 2
    await lim.penalize("campaign:7", retry_after=5.0)  # no-op on an unlimited key
    assert await lim.try_acquire(["campaign:7"]) == 0.0


async def test_remove_makes_a_key_unlimited(backend: Backend) -> None:
    lim = backend.limiter
    await lim.configure(Limit(key="account", rate=10.0, burst=1))
    assert await drain(lim, ["account"]) == 1
    await lim.remove("account")
    assert await lim.get_limit("account") is None
    assert await lim.try_acquire(["account"]) == 0.0


async def test_configure_is_idempotent_and_readable(backend: Backend) -> None:
    lim = backend.limiter
    limit = Limit(key="account", rate=10.0, burst=2, backoff=0.25, recovery=0.5, floor=0.1, cooldown=2.0)
    await lim.configure(limit)
    assert await lim.get_limit("account") == limit
    assert await drain(lim, ["account"]) == 2
    await lim.configure(limit)  # a second worker starting up must not refill the bucket
    assert await lim.try_acquire(["account"]) > 0.05
    assert await lim.effective_rate("account") == 10.0


async def test_live_rerate_applies_to_the_next_acquisition(backend: Backend) -> None:
    lim = backend.limiter
    await lim.configure(Limit(key="account", rate=2.0, burst=1))
    assert await lim.try_acquire(["account"]) == 0.0
    slow = await lim.try_acquire(["account"])
    assert 0.5 - backend.slack <= slow <= 0.5 + 1e-6
    await lim.configure(Limit(key="account", rate=20.0, burst=1))
    fast = await lim.try_acquire(["account"])  # the bucket's fill level is kept, in tokens
    assert 0.05 - backend.slack <= fast <= 0.05 + 1e-6
    assert await lim.effective_rate("account") == 20.0
    await lim.configure(Limit(key="account", rate=1.0, burst=1))
    assert await lim.try_acquire(["account"]) > 0.5


async def test_rerate_up_takes_effect_at_once_not_after_the_old_backlog(backend: Backend) -> None:
    lim = backend.limiter
    await lim.configure(Limit(key="account", rate=0.5, burst=1))
    assert await lim.try_acquire(["account"]) == 0.0  # the next token is 2 s away at 0.5/s
    await lim.configure(Limit(key="account", rate=100.0, burst=1))
    await backend.advance(0.05)  # the backlog, one token, drains in 10 ms at the new rate
    assert await lim.try_acquire(["account"]) == 0.0


async def test_penalty_decreases_multiplicatively_once_per_cooldown(backend: Backend) -> None:
    lim = backend.limiter
    await lim.configure(Limit(key="account", rate=100.0, burst=10, recovery=0.001, cooldown=60.0))
    await lim.penalize("account")
    assert await lim.effective_rate("account") == pytest.approx(50.0, abs=0.5)
    await lim.penalize("account")  # 429s from many workers at once count as one signal
    assert await lim.effective_rate("account") == pytest.approx(50.0, abs=0.5)

    await lim.configure(Limit(key="other", rate=100.0, burst=10, recovery=0.001, cooldown=0.0))
    for _ in range(3):
        await lim.penalize("other")
    assert await lim.effective_rate("other") == pytest.approx(12.5, abs=0.5)
    for _ in range(10):
        await lim.penalize("other")
    assert await lim.effective_rate("other") == pytest.approx(1.0, abs=0.1)  # floor: 1% of rate


async def test_penalty_slows_grants(backend: Backend) -> None:
    lim = backend.limiter
    await lim.configure(Limit(key="account", rate=10.0, burst=1, recovery=0.001))
    assert await lim.try_acquire(["account"]) == 0.0
    await lim.penalize("account")  # 5/s now: the next token is 0.2 s away
    wait = await lim.try_acquire(["account"])
    assert 0.2 - backend.slack <= wait <= 0.2 + 1e-3


async def test_penalty_recovers_additively_to_the_configured_rate(backend: Backend) -> None:
    lim = backend.limiter
    # recovery=1.0: 100/s regained per second.
    await lim.configure(Limit(key="account", rate=100.0, burst=10, recovery=1.0, cooldown=0.0))
    await lim.penalize("account")
    before = await lim.effective_rate("account")
    assert 50.0 <= before <= 56.0
    await backend.advance(0.2)
    later = await lim.effective_rate("account")
    assert later >= before + 19.0
    assert later <= 100.0
    await backend.advance(0.6)
    assert await lim.effective_rate("account") == 100.0


async def test_retry_after_pauses_the_key(backend: Backend) -> None:
    lim = backend.limiter
    await lim.configure(Limit(key="account", rate=100.0, burst=20, recovery=0.001))
    await lim.penalize("account", retry_after=0.5)
    wait = await lim.try_acquire(["account"])
    assert 0.5 - backend.slack <= wait <= 0.5 + 1e-3
    await backend.advance(wait + 0.005)
    assert await lim.try_acquire(["account"]) == 0.0
    assert await lim.try_acquire(["account"]) > 0.0  # no burst right after the pause


async def test_acquire_waits_for_tokens(backend: Backend) -> None:
    lim = backend.limiter
    await lim.configure(Limit(key="account", rate=20.0, burst=2))
    start = backend.clock()
    await asyncio.wait_for(asyncio.gather(*(lim.acquire(["account"]) for _ in range(6))), timeout=10)
    elapsed = backend.clock() - start
    assert 0.2 - backend.slack <= elapsed <= 2.0  # 4 tokens beyond the burst at 20/s
    assert await lim.try_acquire(["account"]) > 0.0


async def test_acquire_with_cost_and_several_keys(backend: Backend) -> None:
    lim = backend.limiter
    await lim.configure(Limit(key="account", rate=50.0, burst=10))
    await lim.configure(Limit(key="sender", rate=20.0, burst=4))
    start = backend.clock()
    tasks = [lim.acquire(["sender", "account", "campaign"], cost=2) for _ in range(4)]
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=10)
    elapsed = backend.clock() - start
    assert 0.2 - backend.slack <= elapsed <= 2.0  # 8 tokens: 4 burst + 4 at 20/s on the sender
    assert await lim.try_acquire(["account"], cost=6) == 0.0  # account: 10 - 8 + refill >= 6


async def test_cancelled_acquire_does_not_block_others(backend: Backend) -> None:
    lim = backend.limiter
    await lim.configure(Limit(key="account", rate=10.0, burst=1))
    assert await lim.try_acquire(["account"]) == 0.0
    waiting = asyncio.ensure_future(lim.acquire(["account"]))
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await asyncio.wait_for(lim.acquire(["account"]), timeout=5)


def test_limit_validation() -> None:
    with pytest.raises(LimitConfigError, match="rate"):
        Limit(key="k", rate=0)
    with pytest.raises(LimitConfigError, match="burst"):
        Limit(key="k", rate=1.0, burst=0)
    with pytest.raises(LimitConfigError, match="backoff"):
        Limit(key="k", rate=1.0, backoff=1.0)
    with pytest.raises(LimitConfigError, match="key"):
        Limit(key="", rate=1.0)
    with pytest.raises(LimitConfigError, match="rate"):
        Limit(key="k", rate=math.inf)
