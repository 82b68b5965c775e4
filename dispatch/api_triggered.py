"""Triggered messages (``POST /v1/messages``): one message per request, through the same workers.

Design: each channel has one *triggered campaign* per UTC hour (``triggered-sms-2026112512``),
created on first use with a fixed manifest whose body template is ``$body``. A message becomes a
one-recipient batch of that campaign (batch number from ``INCR``), whose only attribute is the
rendered text, and is enqueued like any planned batch: the worker claims, rate-limits, sends,
retries and records it exactly like a campaign message, and receipts update it the same way.

Idempotency: the ``Idempotency-Key`` (scoped to the calling API key) maps, for 24 h, to the
request's fingerprint and the message it created. A repeat with the same body answers the same
message (``replayed: true``) and re-writes and re-enqueues its batch when the message was never
claimed (the snapshot write and the claim are idempotent, so this repairs a crash between
accepting and enqueueing without ever sending twice); a repeat with another body is a 409.

Checks before anything is written: the address is validated and normalized per channel, the
suppression lists (channel and global) are consulted (a suppressed recipient is answered
``state: suppressed`` and nothing is enqueued), and ``timezone`` holds the message until the
recipient's allowed window (08:00-21:00 local, ``dispatch.checks.QuietHours``) through the batch's
not-before time. A frequency cap needs a configured cap (not in Settings yet) and is not applied.
"""

from __future__ import annotations

import hashlib
import string
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, cast

import orjson
import redis.asyncio as aredis

from dispatch import keys
from dispatch.api_problems import ApiProblem, FieldError
from dispatch.checks import QuietHours, next_allowed, resolve_timezone
from dispatch.config import Settings
from dispatch.suppression import GLOBAL, AddressHasher
from dispatch.tracking import make_ref
from dispatch.validation import AddressValidator

__all__ = ["TRIGGERED_PREFIX", "AsyncEnqueue", "TriggeredSender", "sequence_key", "split_recipient"]

#: Campaign ids of triggered campaigns start with this.
TRIGGERED_PREFIX: Final = "triggered-"
#: How long an Idempotency-Key is remembered.
IDEMPOTENCY_TTL_S: Final = 24 * 3600
#: Separates the caller's recipient id from the message number in the snapshot row id (the row id
#: must be unique per message: the provider idempotency key is derived from it).
_RID_SEP: Final = "#"

AsyncEnqueue = Callable[[str, int, int], Awaitable[None]]


def sequence_key(campaign_id: str) -> str:
    """Counter of batch numbers handed out in a triggered campaign."""
    return f"{keys.PREFIX}:{{{campaign_id}}}:seq"


def split_recipient(row_id: str) -> str:
    """The caller's recipient id from a triggered snapshot row id."""
    return row_id.rsplit(_RID_SEP, 1)[0]


def _idempotency_key(owner: str, key: str) -> str:
    return f"{keys.PREFIX}:idem:" + hashlib.sha256(f"{owner}\0{key}".encode()).hexdigest()[:32]


def _manifest(campaign_id: str, channel: str, now: float) -> dict[str, Any]:
    return {
        "campaign_id": campaign_id,
        "kind": "triggered",
        "fingerprint": "triggered",
        "channel": channel,
        "body": "$body",
        "subject": None,
        "rate": None,
        "deadline": None,
        "total": 0,
        "accepted": 0,
        "rejected": {},
        "batches": 0,
        "batch_size": 1,
        "cost_units": 0,
        "checksum": "",
        "snapshot_bytes": 0,
        "created_at": now,
        "prediction": {
            "messages": 0,
            "cost_units": 0,
            "rate": 0.0,
            "bottleneck": "worker_capacity",
            "duration_s": 0.0,
            "start": now,
            "finish": now,
            "deadline": None,
            "verdict": "no_deadline",
            "required_rate": None,
            "advice": "triggered messages are sent as they arrive",
        },
        "rejected_file": None,
    }


@dataclass(frozen=True, slots=True)
class _Accepted:
    message_id: str
    campaign_id: str
    batch: int
    state: str
    not_before: float
    row: list[Any] | None

    def body(self, *, replayed: bool) -> dict[str, Any]:
        return {
            "message_id": self.message_id,
            "campaign_id": self.campaign_id,
            "state": self.state,
            "not_before": self.not_before,
            "replayed": replayed,
        }


class TriggeredSender:
    """Accepts one message: checks, writes its one-message batch, enqueues it."""

    def __init__(
        self,
        settings: Settings,
        client: aredis.Redis,
        enqueue: AsyncEnqueue,
        *,
        hasher: AddressHasher | None = None,
        suppression_prefix: str = "dispatch:suppress",
        quiet_hours: QuietHours | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._client = client
        self._enqueue = enqueue
        self._hasher = hasher or AddressHasher()
        self._suppression_prefix = suppression_prefix
        self._quiet = quiet_hours or QuietHours()
        self._clock = clock
        self._validator = AddressValidator()
        self._ready: set[str] = set()

    async def _campaign(self, channel: str, now: float) -> str:
        campaign_id = f"{TRIGGERED_PREFIX}{channel}-{datetime.fromtimestamp(now, UTC):%Y%m%d%H}"
        if campaign_id in self._ready:
            return campaign_id
        ttl = self._settings.retention_s + 3600
        pipe = self._client.pipeline(transaction=False)
        pipe.set(keys.manifest(campaign_id), orjson.dumps(_manifest(campaign_id, channel, now)), nx=True, ex=ttl)
        pipe.hsetnx(keys.control(campaign_id), "state", "running")
        pipe.hsetnx(keys.control(campaign_id), "started_at", f"{now:.3f}")
        pipe.expire(keys.control(campaign_id), ttl)
        pipe.zadd(keys.CAMPAIGNS, {campaign_id: now}, nx=True)
        await pipe.execute()
        if len(self._ready) > 64:
            self._ready.clear()
        self._ready.add(campaign_id)
        return campaign_id

    async def submit(self, owner: str, idempotency_key: str, message: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """(HTTP status, response body) for one validated ``TriggeredMessage``.

        Three Redis round trips: (idempotency record, suppression, next batch number) in one
        pipeline, then (idempotency record, batch) in another, then the enqueue. A batch number
        burned by a replay or a lost race is a gap; a batch written for a lost race is never
        enqueued and expires with the campaign.
        """
        fingerprint = hashlib.sha256(orjson.dumps(message, option=orjson.OPT_SORT_KEYS)).hexdigest()
        idem = _idempotency_key(owner, idempotency_key)
        channel = str(message["channel"])
        reason, address = self._validator.check(channel, str(message["to"]))
        template = string.Template(str(message["body"]))
        now = self._clock()
        campaign_id = await self._campaign(channel, now)
        pipe = self._client.pipeline(transaction=False)
        pipe.get(idem)
        pipe.incr(sequence_key(campaign_id))
        if reason is None:
            # the same two lookups as AsyncSuppressionStore.contains_many, inside this round trip
            digest = self._hasher(address)
            pipe.smismember(f"{self._suppression_prefix}:{channel}", [digest])
            pipe.smismember(f"{self._suppression_prefix}:{GLOBAL}", [digest])
        stored, number, *suppression = await pipe.execute()
        if stored is not None:
            return await self._replay(stored, fingerprint)
        if reason is not None:
            raise ApiProblem(422, "the recipient address is not usable", errors=[FieldError("to", str(reason))])
        if not template.is_valid():
            raise ApiProblem(
                422, "the body template is not valid", errors=[FieldError("body", "'$' not followed by a name")]
            )
        suppressed = any(suppression[0]) or any(suppression[1])
        text = template.safe_substitute(cast(dict[str, str], message.get("attributes") or {}))
        not_before = now
        zone_name = message.get("timezone")
        if zone_name:
            zone = resolve_timezone(str(zone_name))
            if zone is None:
                raise ApiProblem(422, "unknown timezone", errors=[FieldError("timezone", "not an IANA zone name")])
            not_before = next_allowed(datetime.fromtimestamp(now, UTC), zone, self._quiet).timestamp()
        recipient = str(message.get("recipient_id") or "")
        row = [f"{recipient}{_RID_SEP}{number}", address, {"body": text}]
        accepted = _Accepted(
            message_id=make_ref(campaign_id, int(number), 0),
            campaign_id=campaign_id,
            batch=int(number),
            state="suppressed" if suppressed else "queued",
            not_before=round(not_before, 3),
            row=row,
        )
        record = orjson.dumps(
            {
                "fingerprint": fingerprint,
                "message_id": accepted.message_id,
                "campaign_id": campaign_id,
                "batch": accepted.batch,
                "state": accepted.state,
                "not_before": accepted.not_before,
                "row": row,
            }
        )
        pipe = self._client.pipeline(transaction=False)
        pipe.set(idem, record, nx=True, ex=IDEMPOTENCY_TTL_S)
        if not suppressed:
            self._queue_batch(pipe, accepted)
        created, *_ = await pipe.execute()
        if not created:
            # the same key raced in from another request: answer what that one created
            stored = cast(bytes | None, await self._client.get(idem))
            if stored is None:
                raise ApiProblem(409, "this Idempotency-Key is being used by a request in progress; retry")
            return await self._replay(stored, fingerprint)
        if not suppressed:
            await self._enqueue_batch(accepted)
        return 202, accepted.body(replayed=False)

    def _queue_batch(self, pipe: Any, accepted: _Accepted) -> None:
        batch = orjson.dumps([accepted.not_before, [accepted.row]])
        ttl = self._settings.retention_s + 3600
        pipe.set(keys.batch(accepted.campaign_id, accepted.batch), batch, nx=True, ex=ttl)

    async def _enqueue_batch(self, accepted: _Accepted) -> None:
        delay_ms = max(0, int((accepted.not_before - self._clock()) * 1000))
        await self._enqueue(accepted.campaign_id, accepted.batch, delay_ms)

    async def _replay(self, raw: bytes, fingerprint: str) -> tuple[int, dict[str, Any]]:
        stored: dict[str, Any] = orjson.loads(raw)
        if stored["fingerprint"] != fingerprint:
            raise ApiProblem(
                409,
                "this Idempotency-Key was used with a different request body; use a new key",
                slug="idempotency-key-reuse",
            )
        accepted = _Accepted(
            message_id=stored["message_id"],
            campaign_id=stored["campaign_id"],
            batch=int(stored["batch"]),
            state=stored["state"],
            not_before=float(stored["not_before"]),
            row=stored["row"],
        )
        if accepted.state == "queued":
            claimed = await self._client.hexists(keys.records(accepted.campaign_id, accepted.batch), "0")
            if not claimed:
                # never claimed: maybe the first request died before enqueueing; both steps are idempotent
                pipe = self._client.pipeline(transaction=False)
                self._queue_batch(pipe, accepted)
                await pipe.execute()
                await self._enqueue_batch(accepted)
        return 200, accepted.body(replayed=True)
