"""Redis/Valkey backend: every decision is one run of ``gcra.lua`` on the server's clock.

State lives in one hash per limit key (``<prefix><key>``): configuration fields written by
``configure`` plus the GCRA/penalty fields the script owns (see the header of ``gcra.lua``).
Worker clocks never reach the server: the script reads ``TIME`` itself, and the local clock only
times the smoother's sleeps. All keys of one acquisition must live on one server (with Redis
Cluster, give them a common ``{hash tag}`` through ``prefix`` or the key names).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence
from importlib import resources
from typing import Any

import redis.asyncio as aredis
from redis.exceptions import RedisError

from ratelimit.base import Clock, Limit, RateLimiter, Reservation, Sleep, check_cost, normalize_keys
from ratelimit.errors import BackendUnavailable
from ratelimit.smoother import DEFAULT_FLUSH_INTERVAL, DEFAULT_MAX_WAIT, Smoother

__all__ = ["DEFAULT_PREFIX", "RedisRateLimiter"]

#: Prefix of the hashes that hold limits and bucket state.
DEFAULT_PREFIX = "ratelimit:"

_CONFIG_FIELDS = ("rate", "burst", "backoff", "recovery", "floor", "cooldown")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisRateLimiter(RateLimiter):
    """Distributed limiter shared by every process that talks to the same Redis database.

    One instance per process and event loop; ``acquire`` goes through an in-process
    :class:`~ratelimit.smoother.Smoother`. ``script_calls`` counts round trips to the script.
    """

    def __init__(
        self,
        client: aredis.Redis,
        *,
        prefix: str = DEFAULT_PREFIX,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
        max_wait: float = DEFAULT_MAX_WAIT,
        clock: Clock | None = None,
        sleep: Sleep | None = None,
    ) -> None:
        self._client = client
        self._prefix = prefix
        source = resources.files("ratelimit").joinpath("gcra.lua").read_text(encoding="utf-8")
        self._script = client.register_script(source)
        #: Number of script round trips made by this instance.
        self.script_calls = 0
        self._smoother = Smoother(
            self.reserve,
            clock=clock or time.monotonic,
            sleep=sleep or asyncio.sleep,
            flush_interval=flush_interval,
            max_wait=max_wait,
        )

    def _name(self, key: str) -> str:
        return self._prefix + key

    async def _run(self, keys: Sequence[str], args: Sequence[str | int | float]) -> Any:
        self.script_calls += 1
        try:
            return await self._script(keys=[self._name(k) for k in keys], args=list(args))
        except RedisError as exc:
            raise BackendUnavailable(f"rate-limit script failed: {exc}") from exc

    async def configure(self, limit: Limit) -> None:
        # Through the script, so a re-rate re-anchors the bucket at the moment it happens.
        await self._run([limit.key], ["configure", *(repr(getattr(limit, f)) for f in _CONFIG_FIELDS)])

    async def remove(self, key: str) -> None:
        try:
            await self._client.delete(self._name(key))
        except RedisError as exc:
            raise BackendUnavailable(f"cannot remove limit: {exc}") from exc

    async def get_limit(self, key: str) -> Limit | None:
        try:
            values = await self._client.hmget(self._name(key), list(_CONFIG_FIELDS))
        except RedisError as exc:
            raise BackendUnavailable(f"cannot read limit: {exc}") from exc
        if values[0] is None:
            return None
        fields = dict(zip(_CONFIG_FIELDS, (_text(v) for v in values), strict=True))
        return Limit(
            key=key,
            rate=float(fields["rate"]),
            burst=int(fields["burst"]),
            backoff=float(fields["backoff"]),
            recovery=float(fields["recovery"]),
            floor=float(fields["floor"]),
            cooldown=float(fields["cooldown"]),
        )

    async def reserve(self, keys: Sequence[str], groups: Sequence[tuple[int, int]]) -> Reservation:
        args: list[str | int | float] = ["acquire"]
        for cost, count in groups:
            check_cost(cost)
            args += [cost, count]
        raw = await self._run(normalize_keys(keys), args)
        granted, wait, headroom, big_key, big_burst = (_text(v) for v in raw)
        too_large = None
        if big_key:
            too_large = (big_key.removeprefix(self._prefix), int(big_burst))
        return Reservation(granted=int(granted), wait=float(wait), headroom=float(headroom), too_large=too_large)

    async def acquire(self, keys: Sequence[str], cost: int = 1) -> None:
        await self._smoother.acquire(keys, cost)

    async def penalize(self, key: str, retry_after: float | None = None) -> None:
        pause = -1.0 if retry_after is None or not math.isfinite(retry_after) else float(retry_after)
        await self._run([key], ["penalize", pause])

    async def effective_rate(self, key: str) -> float:
        (raw,) = await self._run([key], ["rate"])
        text = _text(raw)
        return float(text) if text else math.inf
