"""In-process smoother: coalesces concurrent ``acquire`` calls into few shared reservations.

Acquisitions naming the same key set queue up in one FIFO *lane*. One driver task per busy lane
sends the whole queue to the backend in one call (``reserve``), which atomically grants the
longest prefix that fits; the granted waiters are released at once, so tokens are never held
locally and the shared bucket's bound (``burst + rate * window``) holds for what is sent.

Calls on a lane are at least ``flush_interval`` apart (capped at half the tightest key's
``burst / rate``, so the bucket never overflows between calls). Under load each call therefore
carries everything that queued up in the interval: about ``rate * flush_interval`` tokens at
saturation, a few hundred coroutines cost one round trip, and a process makes at most
``1 / flush_interval`` calls per second per lane whatever the rate. A refused queue sleeps until
the server says its head fits, but never longer than ``max_wait`` so a re-rate or a removed
limit is noticed promptly.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from ratelimit.base import Clock, Reservation, Sleep, check_cost, normalize_keys
from ratelimit.errors import CostTooLarge

__all__ = ["DEFAULT_FLUSH_INTERVAL", "DEFAULT_MAX_WAIT", "Reserve", "Smoother"]

#: Shortest gap between two reservations of one lane in one process (seconds).
DEFAULT_FLUSH_INTERVAL = 0.02
#: Longest sleep before asking the backend again (bounds how stale a re-rate can be).
DEFAULT_MAX_WAIT = 1.0
#: Idle lanes are swept when this many exist.
_SWEEP_AT = 256

#: ``RateLimiter.reserve``: (keys, run-length encoded FIFO queue of costs) -> Reservation.
Reserve = Callable[[Sequence[str], Sequence[tuple[int, int]]], Awaitable[Reservation]]


@dataclass(eq=False)
class _Waiter:
    cost: int
    future: asyncio.Future[None]


@dataclass(eq=False)
class _Lane:
    keys: tuple[str, ...]
    waiters: deque[_Waiter] = field(default_factory=deque)
    task: asyncio.Task[None] | None = None
    next_call_at: float = float("-inf")


class Smoother:
    """Queues acquisitions per key set and serves each queue with one reservation at a time."""

    def __init__(
        self,
        reserve: Reserve,
        *,
        clock: Clock,
        sleep: Sleep,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
        max_wait: float = DEFAULT_MAX_WAIT,
    ) -> None:
        if flush_interval < 0 or max_wait <= 0:
            raise ValueError("flush_interval must be >= 0 and max_wait > 0")
        self._reserve = reserve
        self._clock = clock
        self._sleep = sleep
        self._flush_interval = flush_interval
        self._max_wait = max_wait
        self._lanes: dict[tuple[str, ...], _Lane] = {}

    async def acquire(self, keys: Sequence[str], cost: int = 1) -> None:
        """Wait in the key set's queue until the backend grants ``cost`` tokens."""
        check_cost(cost)
        normalized = normalize_keys(keys)
        lane = self._lanes.get(normalized)
        if lane is None:
            if len(self._lanes) >= _SWEEP_AT:
                self._sweep()
            lane = self._lanes[normalized] = _Lane(keys=normalized)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # A cancelled waiter stays queued: the driver drops it, so the queue it sent to the
        # backend and the one it pops from never disagree.
        lane.waiters.append(_Waiter(cost, future))
        if lane.task is None:
            lane.task = asyncio.create_task(self._drive(lane), name=f"ratelimit-lane-{len(normalized)}")
        await future

    @property
    def lanes(self) -> int:
        """Number of key sets with queued acquisitions or a pending interval."""
        return len(self._lanes)

    def _sweep(self) -> None:
        now = self._clock()
        for keys, lane in list(self._lanes.items()):
            if lane.task is None and lane.next_call_at <= now:
                del self._lanes[keys]

    async def _drive(self, lane: _Lane) -> None:
        try:
            await self._serve(lane)
        except BaseException as exc:
            _fail_all(lane, exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            lane.task = None
            # An idle lane is kept until its next call is due, so a steady trickle of
            # acquisitions still shares one reservation per interval.
            if lane.next_call_at <= self._clock():
                self._lanes.pop(lane.keys, None)

    async def _serve(self, lane: _Lane) -> None:
        while True:
            if any(waiter.future.done() for waiter in lane.waiters):
                lane.waiters = deque(w for w in lane.waiters if not w.future.done())
            if not lane.waiters:
                return
            gap = lane.next_call_at - self._clock()
            if gap > 0:
                await self._sleep(gap)
                continue
            started = self._clock()
            result = await self._reserve(lane.keys, _run_lengths(lane.waiters))
            for _ in range(result.granted):
                waiter = lane.waiters.popleft()
                if not waiter.future.done():
                    waiter.future.set_result(None)
            if result.granted == 0 and result.too_large is not None and lane.waiters:
                waiter = lane.waiters.popleft()
                key, burst = result.too_large
                if not waiter.future.done():
                    waiter.future.set_exception(CostTooLarge(waiter.cost, key=key, burst=burst))
                continue
            interval = min(self._flush_interval, result.headroom / 2)
            lane.next_call_at = started + interval
            if result.too_large is None and lane.waiters:
                pause = min(max(result.wait, 0.0), self._max_wait)
                lane.next_call_at = max(lane.next_call_at, self._clock() + pause)


def _run_lengths(waiters: deque[_Waiter]) -> list[tuple[int, int]]:
    groups: list[tuple[int, int]] = []
    for waiter in waiters:
        if groups and groups[-1][0] == waiter.cost:
            groups[-1] = (waiter.cost, groups[-1][1] + 1)
        else:
            groups.append((waiter.cost, 1))
    return groups


def _fail_all(lane: _Lane, exc: BaseException) -> None:
    while lane.waiters:
        waiter = lane.waiters.popleft()
        if waiter.future.done():
            continue
        if isinstance(exc, Exception):
            waiter.future.set_exception(exc)
        else:
            waiter.future.cancel()
