"""Invariants checked on the stub (fake clock, so exact) and the smoother's coalescing."""

from __future__ import annotations

import asyncio
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ratelimit import CostTooLarge, Limit, ManualClock, Reservation, Smoother, StubRateLimiter


def max_in_window(grants: list[tuple[float, int]], width: float) -> int:
    """Most tokens granted within any closed window of ``width`` seconds."""
    best = 0
    for i, (start, _) in enumerate(grants):
        best = max(best, sum(c for t, c in grants[i:] if t <= start + width + 1e-12))
    return best


steps = st.lists(
    st.tuples(st.floats(min_value=0.0, max_value=0.3), st.integers(min_value=1, max_value=4)),
    min_size=1,
    max_size=60,
)


@settings(max_examples=60, deadline=None)
@given(steps=steps, rate=st.sampled_from([5.0, 20.0, 100.0]), burst=st.integers(min_value=4, max_value=10))
async def test_grants_never_exceed_burst_plus_rate_times_window(
    steps: list[tuple[float, int]], rate: float, burst: int
) -> None:
    clock = ManualClock()
    limiter = StubRateLimiter(clock=clock, sleep=clock.sleep)
    await limiter.configure(Limit(key="k", rate=rate, burst=burst))
    grants: list[tuple[float, int]] = []
    for gap, cost in steps:
        clock.advance(gap)
        wait = await limiter.try_acquire(["k"], cost)
        if wait == 0.0:
            grants.append((clock(), cost))
        else:
            # The promised wait is exact: just before it the cost still does not fit.
            clock.advance(wait * 0.999)
            assert await limiter.try_acquire(["k"], cost) > 0.0
            clock.advance(wait * 0.002)
            assert await limiter.try_acquire(["k"], cost) == 0.0
            grants.append((clock(), cost))
    for width in (0.0, 0.5, 1.0, 2.0):
        assert max_in_window(grants, width) <= burst + rate * width + 1e-6


async def test_acquire_paces_exactly_on_a_fake_clock() -> None:
    clock = ManualClock()
    limiter = StubRateLimiter(clock=clock, sleep=clock.sleep, flush_interval=0.0)
    await limiter.configure(Limit(key="k", rate=10.0, burst=1))
    start = clock()
    done: list[float] = []

    async def one() -> None:
        await limiter.acquire(["k"])
        done.append(clock() - start)

    await asyncio.gather(*(one() for _ in range(5)))
    assert done == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4], abs=1e-6)


async def test_smoother_sends_the_whole_queue_in_one_reservation() -> None:
    calls: list[list[tuple[int, int]]] = []

    async def reserve(keys: object, groups: list[tuple[int, int]]) -> Reservation:
        calls.append(list(groups))
        return Reservation(granted=sum(n for _, n in groups))

    clock = ManualClock()
    smoother = Smoother(reserve, clock=clock, sleep=clock.sleep)  # type: ignore[arg-type]
    costs = [1, 1, 2, 2, 2, 1]
    await asyncio.gather(*(smoother.acquire(["a", "b"], c) for c in costs))
    assert calls == [[(1, 2), (2, 3), (1, 1)]]
    # A second wave within the flush interval waits for it: one more call for all of them.
    await asyncio.gather(*(smoother.acquire(["b", "a"]) for _ in range(10)))
    assert calls[1:] == [[(1, 10)]]
    assert clock() >= 1000.0 + 0.02


async def test_smoother_fails_only_the_acquisition_that_can_never_fit() -> None:
    clock = ManualClock()
    limiter = StubRateLimiter(clock=clock, sleep=clock.sleep)
    await limiter.configure(Limit(key="k", rate=10.0, burst=3))
    results = await asyncio.gather(
        limiter.acquire(["k"], 1), limiter.acquire(["k"], 5), limiter.acquire(["k"], 2),
        return_exceptions=True,
    )  # fmt: skip
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], CostTooLarge)


async def test_effective_rate_of_unknown_key_is_infinite() -> None:
    limiter = StubRateLimiter()
    assert await limiter.effective_rate("nothing") == math.inf
