"""In-process backend with the same contract as Redis, on an injectable clock.

For unit tests of other components: no server, deterministic when given a fake clock (see
:class:`ManualClock`). It mirrors ``gcra.lua`` line for line; the contract suite runs both.
It limits one process only, so it must never guard a real provider.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

from ratelimit.base import Clock, Limit, RateLimiter, Reservation, Sleep, check_cost
from ratelimit.smoother import DEFAULT_FLUSH_INTERVAL, DEFAULT_MAX_WAIT, Smoother

__all__ = ["ManualClock", "StubRateLimiter"]

#: Absorbs float rounding when counting whole tokens (same as gcra.lua).
_EPS = 1e-9


class ManualClock:
    """A fake monotonic clock: ``sleep`` advances it instead of waiting."""

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start

    def __call__(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += max(seconds, 0.0)

    async def sleep(self, seconds: float) -> None:
        # Let tasks woken before this sleep run at the current time, then jump.
        await asyncio.sleep(0)
        self.advance(seconds)
        await asyncio.sleep(0)


@dataclass
class _State:
    limit: Limit
    tat: float | None = None
    effl: float | None = None
    eff0: float | None = None
    t0: float | None = None


@dataclass
class _View:
    """A key's state seen at one instant: effective rate and tat anchored to it."""

    state: _State
    eff: float
    tat: float
    dirty: bool = False

    def anchor(self, eff: float, now: float) -> None:
        """Keep the fill level in tokens at ``now`` while the rate becomes ``eff``."""
        if self.tat <= now:
            self.tat = now
        elif self.eff != eff:
            self.tat = now + (self.tat - now) * self.eff / eff
            self.dirty = True
        self.eff = eff


def _effective(state: _State, now: float) -> float:
    limit = state.limit
    if state.eff0 is None or state.t0 is None:
        return limit.rate
    start = max(state.eff0, limit.floor * limit.rate)
    return min(limit.rate, start + limit.recovery * limit.rate * max(0.0, now - state.t0))


def _view(state: _State, now: float) -> _View:
    tat = now if state.tat is None else state.tat
    view = _View(state, state.effl if state.effl is not None else state.limit.rate, tat)
    view.anchor(_effective(state, now), now)
    return view


def _save(view: _View) -> None:
    state = view.state
    if state.eff0 is not None and view.eff >= state.limit.rate:
        state.eff0 = state.t0 = None
    state.tat = view.tat
    state.effl = view.eff


class StubRateLimiter(RateLimiter):
    """Process-local limiter implementing the full contract (GCRA, AIMD, hierarchy)."""

    def __init__(
        self,
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
        max_wait: float = DEFAULT_MAX_WAIT,
    ) -> None:
        self._clock = clock
        self._states: dict[str, _State] = {}
        #: Number of reservations made (the Redis backend's ``script_calls`` equivalent).
        self.script_calls = 0
        self._smoother = Smoother(
            self.reserve, clock=clock, sleep=sleep, flush_interval=flush_interval, max_wait=max_wait
        )

    async def configure(self, limit: Limit) -> None:
        state = self._states.get(limit.key)
        if state is None:
            self._states[limit.key] = _State(limit)
            return
        now = self._clock()
        view = _view(state, now)
        state.limit = limit
        view.anchor(_effective(state, now), now)
        _save(view)

    async def remove(self, key: str) -> None:
        self._states.pop(key, None)

    async def get_limit(self, key: str) -> Limit | None:
        state = self._states.get(key)
        return None if state is None else state.limit

    async def reserve(self, keys: Sequence[str], groups: Sequence[tuple[int, int]]) -> Reservation:
        self.script_calls += 1
        now = self._clock()
        views = [_view(self._states[k], now) for k in dict.fromkeys(keys) if k in self._states]
        avail = min((v.state.limit.burst - (v.tat - now) * v.eff for v in views), default=math.inf)
        headroom = min((v.state.limit.burst / v.eff for v in views), default=math.inf)
        granted, tokens, refused_cost = 0, 0, None
        for cost, count in groups:
            check_cost(cost)
            fit = count
            if avail != math.inf:
                fit = max(0, min(count, math.floor((avail - tokens) / cost + _EPS)))
            granted += fit
            tokens += fit * cost
            if fit < count:
                refused_cost = cost
                break
        for view in views:
            if tokens > 0:
                view.tat += tokens / view.eff
                _save(view)
            elif view.dirty:
                _save(view)
        wait, too_large = 0.0, None
        if refused_cost is not None:
            for view in views:
                burst = view.state.limit.burst
                wait = max(wait, (view.tat - now) - (burst - refused_cost) / view.eff)
                if refused_cost > burst and too_large is None:
                    too_large = (view.state.limit.key, burst)
        return Reservation(granted=granted, wait=wait, headroom=headroom, too_large=too_large)

    async def acquire(self, keys: Sequence[str], cost: int = 1) -> None:
        await self._smoother.acquire(keys, cost)

    async def penalize(self, key: str, retry_after: float | None = None) -> None:
        state = self._states.get(key)
        if state is None:
            return
        now = self._clock()
        view = _view(state, now)
        limit = state.limit
        if state.eff0 is None or state.t0 is None or now - state.t0 >= limit.cooldown:
            lowered = max(limit.floor * limit.rate, view.eff * limit.backoff)
            view.anchor(lowered, now)
            state.eff0, state.t0 = lowered, now
        if retry_after is not None and math.isfinite(retry_after) and retry_after > 0:
            view.tat = max(view.tat, now + retry_after + (limit.burst - 1) / view.eff)
        _save(view)

    async def effective_rate(self, key: str) -> float:
        state = self._states.get(key)
        return math.inf if state is None else _view(state, self._clock()).eff
