"""Frequency cap across campaigns: at most ``limit`` messages per (address, channel) in a rolling
``window``.

Each (channel, address hash) has a sorted set of send times (ms) whose TTL is the window, so
memory is bounded by the addresses messaged within one window (about 100 bytes per address plus
~20 per recorded send). Addresses are hashed exactly as in ``dispatch.rules.suppression`` (never stored
raw).

- Plan time (sync, read-only): :meth:`FrequencyStore.capped_many` counts sends inside the window
  with pipelined ``ZCOUNT``; it records nothing, so planning twice changes nothing.
- Send time (async, atomic): :meth:`AsyncFrequencyStore.reserve_many` runs ``frequency.lua``
  per address (trim, check, record, refresh TTL in one step). The token (use the message id) makes
  a redelivered message idempotent: reserving the same token again is allowed and not counted
  twice. :meth:`AsyncFrequencyStore.release` undoes a reservation whose send failed permanently.
- Accept time (triggered messages, read-only): ``triggered/accept.lua`` counts the same key
  (:func:`frequency_key`) the way count mode does, inside its one call; it records nothing.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Final, cast

import redis
import redis.asyncio as aredis

from dispatch.rules.suppression import AddressHasher

__all__ = ["DEFAULT_PREFIX", "AsyncFrequencyStore", "FrequencyCap", "FrequencyStore", "frequency_key"]

#: Addresses per pipeline round trip.
DEFAULT_CHUNK: Final = 1_000
#: Key prefix of the per-address send-time sets (the workers' and the planner's default).
DEFAULT_PREFIX: Final = "dispatch:freq"


def frequency_key(channel: str, digest: bytes, *, prefix: str = DEFAULT_PREFIX) -> bytes:
    """The sorted set of one (channel, address hash): what every user of the cap reads or writes
    (``digest`` from the deployment's :class:`AddressHasher`)."""
    return f"{prefix}:{channel}:".encode() + digest


def _script() -> str:
    return Path(__file__).with_name("frequency.lua").read_text(encoding="utf-8")


@dataclass(frozen=True, slots=True, kw_only=True)
class FrequencyCap:
    limit: int
    window: timedelta

    def __post_init__(self) -> None:
        if self.limit < 1 or self.window <= timedelta(0):
            raise ValueError("a frequency cap needs limit >= 1 and a positive window")

    @property
    def window_ms(self) -> int:
        return int(self.window.total_seconds() * 1000)


class _Base:
    def __init__(self, cap: FrequencyCap, prefix: str, hasher: AddressHasher | None, chunk: int) -> None:
        self.cap, self._prefix, self._hasher, self._chunk = cap, prefix, hasher or AddressHasher(), chunk

    def _key(self, channel: str, address: str) -> bytes:
        return frequency_key(channel, self._hasher(address), prefix=self._prefix)


def _now_ms(now: float | None) -> int:
    return int((time.time() if now is None else now) * 1000)


class FrequencyStore:
    """Plan-time view (sync, read-only)."""

    def __init__(
        self,
        client: redis.Redis,
        cap: FrequencyCap,
        *,
        prefix: str = DEFAULT_PREFIX,
        hasher: AddressHasher | None = None,
        chunk: int = DEFAULT_CHUNK,
    ) -> None:
        self._client = client
        self._b = _Base(cap, prefix, hasher, chunk)
        self._count = client.register_script(_script())

    @property
    def cap(self) -> FrequencyCap:
        return self._b.cap

    @property
    def hasher(self) -> AddressHasher:
        return self._b._hasher

    def capped_many(self, channel: str, addresses: Sequence[str], *, now: float | None = None) -> list[bool]:
        """For each address: True when ``limit`` sends already fall inside the window ending now."""
        return self.capped_hashes(channel, [self._b._hasher(a) for a in addresses], now=now)

    def capped_hashes(self, channel: str, hashes: Sequence[bytes], *, now: float | None = None) -> list[bool]:
        """:meth:`capped_many` for addresses already hashed with :attr:`hasher`.

        One script call per chunk (``frequency.lua`` in count mode) instead of one ZCOUNT per
        address: the keys of a chunk span hash slots, so this needs a single Redis node.
        """
        low = _now_ms(now) - self._b.cap.window_ms
        limit = self._b.cap.limit
        prefix = frequency_key(channel, b"", prefix=self._b._prefix)
        out: list[bool] = []
        for start in range(0, len(hashes), self._b._chunk):
            part = [prefix + digest for digest in hashes[start : start + self._b._chunk]]
            flags = cast(bytes, self._count(keys=part, args=["count", low, limit]))
            out.extend(flag == 49 for flag in flags)  # b"1"
        return out


class AsyncFrequencyStore:
    """Send-time enforcement (async, atomic per address)."""

    def __init__(
        self,
        client: aredis.Redis,
        cap: FrequencyCap,
        *,
        prefix: str = DEFAULT_PREFIX,
        hasher: AddressHasher | None = None,
        chunk: int = DEFAULT_CHUNK,
    ) -> None:
        self._client = client
        self._b = _Base(cap, prefix, hasher, chunk)
        self._reserve = client.register_script(_script())

    async def reserve_many(
        self, channel: str, items: Sequence[tuple[str, str]], *, now: float | None = None
    ) -> list[bool]:
        """``items``: (address, token) pairs. True: send allowed and recorded; False: capped."""
        now_ms = _now_ms(now)
        cap = self._b.cap
        out: list[bool] = []
        for start in range(0, len(items), self._b._chunk):
            pipe = self._client.pipeline(transaction=False)
            for address, token in items[start : start + self._b._chunk]:
                await self._reserve(
                    keys=[self._b._key(channel, address)],
                    args=[now_ms, cap.window_ms, cap.limit, token],
                    client=pipe,
                )
            out.extend(bool(r) for r in await pipe.execute())
        return out

    async def reserve(self, channel: str, address: str, token: str, *, now: float | None = None) -> bool:
        return (await self.reserve_many(channel, [(address, token)], now=now))[0]

    async def release(self, channel: str, address: str, token: str) -> bool:
        """Forget a reservation (the message was not sent after all)."""
        return bool(await self._client.zrem(self._b._key(channel, address), token))
