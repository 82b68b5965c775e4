"""The engagement ledger: per message, the first time of each thing its recipient did.

Layout (``dispatch.store.keys``): one hash per batch, ``engagement(cid, n)``, field
``<index>.<event>`` -> first occurrence in epoch milliseconds, and one counters hash per campaign,
``engagement_counters(cid)``, event -> number of messages that had it. Both move in one Lua
script (``record.lua``), so an event delivered twice (providers deliver at least once, a link is
clicked again) is counted once, whatever the number of processes.

Events (:data:`EVENTS`): ``open`` a human open (an email pixel or an app-reported push open);
``machine_open`` an open by a machine (SendGrid ``sg_machine_open``, Apple Mail Privacy
Protection's prefetch), never counted as human; ``click`` the first click on a tracked link;
``bot_click`` a click by a link-preview bot or a prefetcher; ``reply`` an inbound reply that is
not an opt-out; ``optout`` an opt-out (a STOP/TD reply, an unsubscribe); ``spamreport`` a spam
complaint. Delivery (delivered, bounced) lives in the message records (``dispatch.send.tracking``),
not here.

A message is named by its ref (``<campaign>.<batch>.<index>``, ``dispatch.send.tracking.make_ref``);
the ledger never holds an address.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Final

import redis
import redis.asyncio as aredis

from dispatch.store import keys

__all__ = [
    "EVENTS",
    "EngagementLedger",
    "UnknownEvent",
    "batch_events",
    "engagement_counters",
    "split_ref",
]

#: Every event the ledger records, in report order.
EVENTS: Final = ("open", "machine_open", "click", "bot_click", "reply", "optout", "spamreport")
_EVENT_SET: Final = frozenset(EVENTS)


class UnknownEvent(ValueError):
    """An event name outside :data:`EVENTS`."""


def split_ref(ref: str) -> tuple[str, int, int]:
    """``<campaign>.<batch>.<index>`` -> its parts (ValueError when it is not a ref)."""
    campaign_id, batch, index = ref.rsplit(".", 2)
    if not campaign_id or not batch.isdigit() or not index.isdigit():
        raise ValueError("not a message ref")
    return campaign_id, int(batch), int(index)


@dataclass(frozen=True, slots=True)
class Recorded:
    """What recording one event did: ``first`` (counted now), ``duplicate``, or ``unknown``
    (no such campaign: nothing written)."""

    ref: str
    event: str
    outcome: str


class EngagementLedger:
    """Async writer of engagement events (webhooks, the redirect endpoint, the API)."""

    def __init__(self, client: aredis.Redis, *, ttl_s: int, clock: Callable[[], float] = time.time) -> None:
        self._client = client
        self._ttl = ttl_s
        self._clock = clock
        self._script = client.register_script(
            resources.files("dispatch.engage").joinpath("record.lua").read_text(encoding="utf-8")
        )

    async def record(self, ref: str, event: str, *, at: float | None = None) -> Recorded:
        """Record ``event`` for the message ``ref`` (its first occurrence only)."""
        if event not in _EVENT_SET:
            raise UnknownEvent(f"unknown engagement event {event!r}; one of {', '.join(EVENTS)}")
        campaign_id, batch, index = split_ref(ref)
        when = self._clock() if at is None else at
        result = int(
            await self._script(
                keys=[
                    keys.engagement(campaign_id, batch),
                    keys.engagement_counters(campaign_id),
                    keys.manifest(campaign_id),
                ],
                args=[index, event, int(when * 1000), self._ttl],
            )
        )
        outcome = {1: "first", 0: "duplicate"}.get(result, "unknown")
        return Recorded(ref, event, outcome)

    async def record_many(self, events: Iterable[tuple[str, str, float | None]]) -> list[Recorded]:
        """Record several ``(ref, event, at)`` in order."""
        return [await self.record(ref, event, at=at) for ref, event, at in events]

    async def record_pipelined(self, events: Sequence[tuple[str, str, float]]) -> list[Recorded]:
        """:meth:`record` for several ``(ref, event, at)`` in one round trip (EVALSHA without
        redis-py's per-pipeline SCRIPT EXISTS; loaded again if the server lost it). A malformed
        ref or an unknown event raises before anything is sent."""
        if not events:
            return []
        calls = []
        for ref, event, at in events:
            if event not in _EVENT_SET:
                raise UnknownEvent(f"unknown engagement event {event!r}; one of {', '.join(EVENTS)}")
            campaign_id, batch, index = split_ref(ref)
            calls.append(
                (
                    keys.engagement(campaign_id, batch),
                    keys.engagement_counters(campaign_id),
                    keys.manifest(campaign_id),
                    index,
                    event,
                    int(at * 1000),
                    self._ttl,
                )
            )
        try:
            results = await self._evalsha_all(calls)
        except redis.exceptions.NoScriptError:  # a restarted or flushed server: load it, once
            await self._client.script_load(self._script.script)
            results = await self._evalsha_all(calls)
        return [
            Recorded(ref, event, {1: "first", 0: "duplicate"}.get(result, "unknown"))
            for (ref, event, _), result in zip(events, results, strict=True)
        ]

    async def _evalsha_all(self, calls: Sequence[tuple[str | int, ...]]) -> list[int]:
        pipe = self._client.pipeline(transaction=False)
        for call in calls:
            pipe.evalsha(self._script.sha, 3, *call)
        return [int(result) for result in await pipe.execute()]


def batch_events(client: redis.Redis, campaign_id: str, batch: int) -> dict[int, dict[str, float]]:
    """Every engagement of batch ``batch``: index -> {event: first time (epoch s)}."""
    raw: dict[bytes, bytes] = client.hgetall(keys.engagement(campaign_id, batch))  # type: ignore[assignment]
    out: dict[int, dict[str, float]] = {}
    for field, value in raw.items():
        index, _, event = field.decode().partition(".")
        out.setdefault(int(index), {})[event] = int(value) / 1000
    return out


def engagement_counters(client: redis.Redis, campaign_id: str) -> dict[str, int]:
    """A campaign's engagement counts: event -> messages that had it (every event, 0 when none)."""
    raw: dict[bytes, bytes] = client.hgetall(keys.engagement_counters(campaign_id))  # type: ignore[assignment]
    counts = dict.fromkeys(EVENTS, 0)
    for name, value in raw.items():
        counts[name.decode()] = int(value)
    return counts
