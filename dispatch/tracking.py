"""Per-message records and per-campaign counters in Redis (dedup and track steps).

A batch's records live in one hash (``keys.records``), field = message index, value =
``state|attempts|owner|provider_id|code|ts``. The same record is the idempotency claim: a message
is *claimed* (state ``sending`` with the worker's id) before the provider call and *confirmed*
after (``sent``, ``failed``, ...). Both transitions are Lua scripts, so counters move exactly once
per message whatever the number of workers, redeliveries or duplicate enqueues.

In-flight policy after a crash: a record left ``sending`` by a worker whose liveness key has
expired is *reclaimed*. If the channel honours idempotency keys the message is sent again with
the same key (the provider answers with the original message); otherwise it is marked failed with
code ``inflight_unknown`` and dead-lettered, because it may or may not have gone out: an operator
decides with ``dispatch retry-failed``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis
import redis.asyncio as aredis

from dispatch import keys

__all__ = [
    "CLAIM_BUSY",
    "CLAIM_DONE",
    "CLAIM_FRESH",
    "CLAIM_RECLAIMED",
    "COUNTERS",
    "Outcome",
    "Record",
    "Tracker",
    "campaign_counters",
    "iter_outcomes",
    "iter_records",
    "parse_ref",
]

CLAIM_DONE, CLAIM_FRESH, CLAIM_RECLAIMED, CLAIM_BUSY = 0, 1, 2, 3
#: Counter names of a campaign (a hash; absent = 0).
COUNTERS = (
    "sent",
    "delivered",
    "undelivered",
    "bounced",
    "failed",
    "dead_letters",
    "suppressed",
    "skipped",
    "retries",
)


def _script(name: str) -> str:
    return resources.files("dispatch").joinpath(name).read_text(encoding="utf-8")


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to one claimed message, for the ``finish`` script."""

    index: int
    state: str  # sent | failed | suppressed | skipped | retry | dead
    attempts: int
    provider_id: str = ""
    code: str = ""


@dataclass(frozen=True, slots=True)
class Record:
    batch: int
    index: int
    state: str
    attempts: int
    provider_id: str
    code: str
    ts: float | None
    recipient_id: str = ""


def make_ref(campaign_id: str, batch: int, index: int) -> str:
    """Opaque message reference carried by providers back to us (no address in it)."""
    return f"{campaign_id}.{batch}.{index}"


def parse_ref(ref: str) -> tuple[str, int, int]:
    campaign_id, batch, index = ref.rsplit(".", 2)
    return campaign_id, int(batch), int(index)


class Tracker:
    """Async access to records and counters for the send path and receipts."""

    def __init__(self, client: aredis.Redis, *, ttl_s: int) -> None:
        self._client = client
        self._ttl = ttl_s
        self._claim = client.register_script(_script("claim.lua"))
        self._finish = client.register_script(_script("finish.lua"))
        self._receipt = client.register_script(_script("receipt.lua"))

    async def claim(
        self, campaign_id: str, batch: int, owner: str, indices: Sequence[int]
    ) -> list[tuple[int, int]] | None:
        """Claim messages; ``None`` when the campaign is not running, else (code, attempts) each."""
        raw = await self._claim(
            keys=[keys.records(campaign_id, batch), keys.control(campaign_id)],
            args=[owner, f"{time.time():.3f}", keys.worker_alive(""), self._ttl, *indices],
        )
        if raw and raw[0] == -1:
            return None
        return [(int(raw[i]), int(raw[i + 1])) for i in range(0, len(raw), 2)]

    async def finish(
        self, campaign_id: str, batch: int, owner: str, outcomes: Sequence[Outcome], *, retries: int = 0
    ) -> int:
        args: list[Any] = [owner, f"{time.time():.3f}", batch, retries]
        for o in outcomes:
            args.extend((o.index, o.state, o.attempts, o.provider_id, o.code))
        applied = await self._finish(
            keys=[keys.records(campaign_id, batch), keys.counters(campaign_id), keys.dead_letters(campaign_id)],
            args=args,
        )
        return int(applied)

    async def apply_receipt(self, ref: str, state: str, code: str | None) -> int:
        """Move a sent message to delivered/failed/bounced; see receipt.lua for return codes."""
        campaign_id, batch, index = parse_ref(ref)
        result = await self._receipt(
            keys=[keys.records(campaign_id, batch), keys.counters(campaign_id)],
            args=[index, state, code or "", f"{time.time():.3f}"],
        )
        return int(result)


def campaign_counters(client: redis.Redis, campaign_id: str) -> dict[str, int]:
    raw: dict[bytes, bytes] = client.hgetall(keys.counters(campaign_id))  # type: ignore[assignment]
    counts = dict.fromkeys(COUNTERS, 0)
    for name, value in raw.items():
        counts[name.decode()] = int(value)
    return counts


def iter_outcomes(client: redis.Redis, campaign_id: str, batches: int, *, cancelled: bool = False) -> Iterator[Record]:
    """Every message of the snapshot with its outcome, in snapshot order (for exports).

    A message never claimed is ``queued`` (``skipped`` once the campaign is cancelled); the
    recipient id comes from the snapshot, the address is never included.
    """
    from dispatch.snapshot import iter_batches

    unclaimed = "skipped" if cancelled else "queued"
    for snapshot in iter_batches(client, campaign_id, batches):
        found = {record.index: record for record in _batch_records(client, campaign_id, snapshot.number)}
        for index, row in enumerate(snapshot.rows):
            record = found.get(index)
            if record is None:
                record = Record(snapshot.number, index, unclaimed, 0, "", "", None)
            yield Record(
                record.batch, index, record.state, record.attempts, record.provider_id, record.code, record.ts, row[0]
            )


def iter_records(client: redis.Redis, campaign_id: str, batches: int) -> Iterator[Record]:
    """Every message's record, batch by batch; messages never claimed are absent."""
    for batch in range(batches):
        yield from _batch_records(client, campaign_id, batch)


def _batch_records(client: redis.Redis, campaign_id: str, batch: int) -> Iterator[Record]:
    raw: dict[bytes, bytes] = client.hgetall(keys.records(campaign_id, batch))  # type: ignore[assignment]
    for field, value in sorted(raw.items(), key=lambda kv: int(kv[0]) if kv[0].isdigit() else -1):
        if not field.isdigit():
            continue
        state, attempts, _owner, provider_id, code, ts = value.decode().split("|", 5)
        yield Record(
            batch=batch,
            index=int(field),
            state=state,
            attempts=int(attempts or 0),
            provider_id=provider_id,
            code=code,
            ts=float(ts) if ts else None,
        )
