"""Distributed rate limiting: exact GCRA on Redis server time, hierarchical, adaptive, live.

limiter = RedisRateLimiter(client)  # client: redis.asyncio.Redis
await limiter.configure(Limit(key="sms:AC123", rate=500.0, burst=50))
await limiter.acquire(["sms:AC123", "sms:sender:42"], cost=segments)
await limiter.penalize("sms:AC123", retry_after=2.0)  # on a provider 429
"""

from ratelimit.base import Limit, RateLimiter, Reservation
from ratelimit.errors import (
    BackendUnavailable,
    CostTooLarge,
    InvalidCost,
    LimitConfigError,
    RateLimitError,
)
from ratelimit.redis_backend import RedisRateLimiter
from ratelimit.smoother import Smoother
from ratelimit.stub import ManualClock, StubRateLimiter

__all__ = [
    "BackendUnavailable",
    "CostTooLarge",
    "InvalidCost",
    "Limit",
    "LimitConfigError",
    "ManualClock",
    "RateLimitError",
    "RateLimiter",
    "RedisRateLimiter",
    "Reservation",
    "Smoother",
    "StubRateLimiter",
]
