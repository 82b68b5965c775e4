"""The last suppression check, at the moment a request is issued.

A batch's messages are checked against the suppression list once, when its run starts; a batch
takes seconds to minutes to send. An opt-out that arrives meanwhile must still stop the messages
that have not left. Checking the list again per request would cost a round trip per request;
instead every worker polls the list of *recent* additions (``dispatch.rules.suppression``,
kept :data:`~dispatch.rules.suppression.RECENT_KEEP_S`) at most every ``every_s`` and checks each
request against that small set in memory; a hit is confirmed against the list itself (an address
removed again is not stopped). So an opt-out stops every message not yet issued within about
``every_s`` (0.5 s) of being added, at no cost while nobody opts out.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from dispatch.rules.suppression import GLOBAL, RECENT_KEEP_S, AsyncSuppressionStore

__all__ = ["RecentFence"]


class RecentFence:
    """Recent opt-outs, polled; ``stopped`` tells which addresses may no longer be sent to."""

    def __init__(
        self,
        store: AsyncSuppressionStore,
        *,
        every_s: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._every_s = every_s
        self._clock = clock
        self._wall = wall
        self._read_at = -float("inf")
        #: The newest addition seen (epoch s); the next poll asks for later ones.
        self._since = wall() - RECENT_KEEP_S
        #: (channel, address hash) -> when added (epoch s).
        self._recent: dict[tuple[str, bytes], float] = {}

    async def stopped(self, channel: str, addresses: Sequence[str]) -> list[bool]:
        await self._refresh()
        if not self._recent:
            return [False] * len(addresses)
        hasher = self._store.hasher
        recent = self._recent
        hits = []
        for address in addresses:
            digest = hasher(address)
            hits.append((channel, digest) in recent or (GLOBAL, digest) in recent)
        if not any(hits):
            return hits
        # confirm against the list itself: an address removed again may be sent to
        suspects = [address for address, hit in zip(addresses, hits, strict=True) if hit]
        confirmed = iter(await self._store.contains_many(channel, suspects))
        return [next(confirmed) if hit else False for hit in hits]

    async def _refresh(self) -> None:
        now = self._clock()
        if now - self._read_at < self._every_s:
            return
        self._read_at = now
        for channel, digest, added in await self._store.recent_since(self._since):
            self._recent[(channel, digest)] = added
            self._since = max(self._since, added)
        horizon = self._wall() - RECENT_KEEP_S
        if self._recent and min(self._recent.values()) < horizon:
            self._recent = {key: added for key, added in self._recent.items() if added >= horizon}
