"""The rate-limiter contract shared by every backend.

A limit is a GCRA (generic cell rate algorithm) bucket: ``rate`` tokens per second with room for
``burst`` tokens at once, so over any window of ``w`` seconds at most ``burst + rate * w`` tokens
are granted. One acquisition names several keys (provider account, sender, campaign cap) and a
cost; it is granted on all of them or on none. Keys without a configured limit are unlimited.

Adaptive rate: ``penalize`` (a 429 from the provider) multiplies the key's *effective* rate by
``backoff`` (at most once per ``cooldown`` seconds, so a burst of 429s from many workers counts as
one signal); the rate then recovers additively by ``recovery * rate`` per second up to ``rate``.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from ratelimit.errors import CostTooLarge, InvalidCost, LimitConfigError

__all__ = ["Clock", "Limit", "RateLimiter", "Reservation", "Sleep", "check_cost", "normalize_keys"]

#: A monotonic clock in seconds (used only to measure local durations).
Clock = Callable[[], float]
#: An ``asyncio.sleep``-like coroutine function.
Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True, kw_only=True)
class Limit:
    """One limit key's configuration; ``configure`` it again with new values to re-rate live."""

    #: The key acquisitions name, e.g. ``"sms:AC123"`` (opaque ids, never a phone or email).
    key: str
    #: Tokens per second when no penalty is in force.
    rate: float
    #: Tokens that may be taken at once after an idle period (>= the largest cost you acquire).
    #: Workers poll each key set about every 20 ms; a burst below ``rate * 0.04`` makes them poll
    #: faster (down to one Redis call per token), so give fast keys ``rate / 10`` or so.
    burst: int = 1
    #: Factor applied to the effective rate by one ``penalize``.
    backoff: float = 0.5
    #: Additive recovery per second, as a fraction of ``rate`` (0.05: full rate back within 20 s).
    recovery: float = 0.05
    #: Lowest effective rate, as a fraction of ``rate``.
    floor: float = 0.01
    #: Penalties closer together than this many seconds lower the rate once.
    cooldown: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.key, str) or not self.key:
            raise LimitConfigError("key", "must be a non-empty string")
        _positive_finite("rate", self.rate)
        if isinstance(self.burst, bool) or not isinstance(self.burst, int) or self.burst < 1:
            raise LimitConfigError("burst", f"must be an integer >= 1, got {self.burst!r}")
        if not 0.0 < self.backoff < 1.0:
            raise LimitConfigError("backoff", f"must be in (0, 1), got {self.backoff!r}")
        _positive_finite("recovery", self.recovery)
        if not 0.0 < self.floor <= 1.0:
            raise LimitConfigError("floor", f"must be in (0, 1], got {self.floor!r}")
        if not (math.isfinite(self.cooldown) and self.cooldown >= 0.0):
            raise LimitConfigError("cooldown", f"must be a finite number >= 0, got {self.cooldown!r}")


def _positive_finite(field: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise LimitConfigError(field, f"must be a finite number > 0, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class Reservation:
    """Outcome of one atomic reservation for a FIFO queue of acquisitions.

    ``granted`` acquisitions from the head of the queue were granted (all their tokens taken from
    every limited key). If some remain, ``wait`` is the number of seconds until the first of them
    would fit (assuming nobody else takes tokens meanwhile), and ``too_large`` names a key whose
    burst that acquisition exceeds (it can never be granted). ``headroom`` is the smallest
    ``burst / effective rate`` over the limited keys (infinite when none is limited): a caller
    that polls less often than that loses capacity.
    """

    granted: int
    wait: float = 0.0
    headroom: float = math.inf
    too_large: tuple[str, int] | None = None


def check_cost(cost: int) -> None:
    if isinstance(cost, bool) or not isinstance(cost, int) or cost < 1:
        raise InvalidCost(cost)


def normalize_keys(keys: Sequence[str]) -> tuple[str, ...]:
    """Sorted, de-duplicated keys: acquisitions naming the same set share one queue."""
    if isinstance(keys, str):
        raise TypeError("keys must be a sequence of key strings, not one string")
    return tuple(sorted(set(keys)))


class RateLimiter(abc.ABC):
    """Distributed limiter contract; ``RedisRateLimiter`` and ``StubRateLimiter`` implement it."""

    @abc.abstractmethod
    async def configure(self, limit: Limit) -> None:
        """Create or change a limit; idempotent. Penalty and bucket state are kept."""

    @abc.abstractmethod
    async def remove(self, key: str) -> None:
        """Drop a limit and its state: the key becomes unlimited."""

    @abc.abstractmethod
    async def get_limit(self, key: str) -> Limit | None:
        """The configured limit, or ``None`` when the key is unlimited."""

    @abc.abstractmethod
    async def reserve(self, keys: Sequence[str], groups: Sequence[tuple[int, int]]) -> Reservation:
        """Atomically grant the longest prefix of a FIFO queue of acquisitions on ``keys``.

        ``groups`` is the queue run-length encoded as ``(cost, count)`` pairs. The building block
        of ``try_acquire`` and of the in-process smoother behind ``acquire``.
        """

    @abc.abstractmethod
    async def acquire(self, keys: Sequence[str], cost: int = 1) -> None:
        """Wait until ``cost`` tokens are granted on every limited key in ``keys``."""

    @abc.abstractmethod
    async def penalize(self, key: str, retry_after: float | None = None) -> None:
        """Provider pushback: lower the key's effective rate; pause it ``retry_after`` seconds."""

    @abc.abstractmethod
    async def effective_rate(self, key: str) -> float:
        """Current adaptive rate (``inf`` for an unlimited key)."""

    async def try_acquire(self, keys: Sequence[str], cost: int = 1) -> float:
        """0.0 when granted, else seconds to wait; a refusal consumes nothing.

        Raises ``CostTooLarge`` when ``cost`` exceeds the burst of one of the keys.
        """
        check_cost(cost)
        result = await self.reserve(normalize_keys(keys), [(cost, 1)])
        if result.granted:
            return 0.0
        if result.too_large is not None:
            key, burst = result.too_large
            raise CostTooLarge(cost, key=key, burst=burst)
        return max(result.wait, 0.0)
