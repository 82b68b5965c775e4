"""Triggered messages (``POST /v1/messages``): accepted in one Redis round trip, sent in micro-batches.

Design: each channel that has a provider (the registry's sendable channels: sms, email, push,
webhook) has one *triggered campaign* per UTC hour (``triggered:sms-2026112512``,
``triggered:email-2026112512``), created on first use with a fixed manifest whose body template is
``$body``. Its id holds a ``:``,
which no client-chosen campaign id may hold, so no campaign a client creates shares its keys (its
manifest, batches or records); client ids starting with the former prefix ``triggered-`` are
refused too (``dispatch.store.keys``). An accepted message
is one row ``[rid, address, {"body": text}]`` (plus ``"subject"`` when the message has one: the
engine gives a triggered message its own subject, :data:`dispatch.send.engine.SUBJECT_ATTRIBUTE`)
appended to the campaign's *open batch* (a Redis list,
:func:`open_key`) by ``triggered/accept.lua``; :class:`dispatch.triggered.sealer.TriggeredSealer` seals
open batches every 50 ms (or the script does, inline, when one reaches
:data:`SEAL_SIZE` rows) into the engine's snapshot format and enqueues each sealed batch once, so
the worker claims, rate-limits, sends, retries and records triggered messages exactly like campaign
messages, one broker message per batch instead of per recipient.

The message id is ``make_ref(campaign, batch, index)``; the row id ``<recipient_id>#<batch>.<index>``
is unique per message (the provider idempotency key is derived from it). A suppressed message is
answered with an id ``<campaign>.s.<k>`` that has no record (``GET`` answers 404, as it always did);
a message refused by the frequency cap likewise with ``<campaign>.f.<k>`` and state
``frequency_capped``. Both are counted in the campaign's state hash (``suppressed``,
``frequency_capped``).

Before the script, the request is checked against its channel: the address with the planner's
:class:`AddressValidator` (normalized as the planner normalizes it, so suppression and frequency
keys match), and the rendered body against the channel's ``BodyLimits`` (SMS 1,600 characters,
push 4,096 bytes: a longer one is a 422 on ``body``, as the planner rejects such a row with
``body_too_long``); the subject an email needs is required by the request model.

One round trip per request (after auth), all in the script: the ``Idempotency-Key`` (scoped to the
calling API key, kept 24 h) is checked and recorded with the request's fingerprint (a repeat with
the same body answers the same message, ``replayed: true``; with another body it is a 409), the
suppression lists (channel and global; address hashes computed here with the planner's
:class:`AddressHasher`, keyed with ``settings.suppression_key``) are consulted, then the frequency
cap when ``settings.frequency_limit`` is set (the address's send-time set of
``dispatch.rules.frequency``, same hash, read as the planner reads it: sends recorded inside the window
ending now; nothing is recorded at accept), and the row is appended. Recording the key and
appending the row are one atomic step, so a replay never needs to repair anything: a batch sealed
but never enqueued (a crash) is re-enqueued by the sealer's sweep.

Lifecycle: a campaign's manifest counts follow its batches (``dispatch status`` and ``export`` work
on it), except that its ``accepted`` stays one above the real count while the campaign can still
get messages, so the workers (which finalize a campaign once everything accepted is done) never
mark it completed under a message being accepted. The sealer *closes* it a few minutes after its
hour ends (with nothing open): ``accepted`` becomes exact and the workers finalize it once its
last (possibly held) message is done.

``timezone`` holds the message until the recipient's allowed window (08:00-21:00 local,
``dispatch.rules.checks.QuietHours``): a held message gets a batch of its own whose not-before time is
that instant, written and queued at once (rare, and it never delays anybody else). The frequency cap
is checked at accept against the sends already recorded; the workers record each send and check
the cap again at send time, as for campaign messages, so messages accepted together for one address
before any of them is sent are capped there (recorded ``skipped``, code ``frequency_capped``).

Keys: every key of a triggered campaign carries its id in a hash tag; the idempotency records, the
suppression sets and the two shared sorted sets (:data:`TO_ENQUEUE`, :data:`REGISTRY`) do not, so
on a Redis Cluster the script would need them co-located (one node is what we run).
"""

from __future__ import annotations

import hashlib
import string
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from importlib import resources
from typing import Any, Final, NoReturn, Protocol, cast

import orjson
import redis.asyncio as aredis

from channels import default_registry
from channels.registry import BodyLimits
from dispatch.api.pipelined import PipelinedRedis
from dispatch.api.problems import ApiProblem, FieldError
from dispatch.config import Settings
from dispatch.plan.manifest import TRIGGERED, Manifest
from dispatch.rules.checks import QuietHours, next_allowed, resolve_timezone
from dispatch.rules.frequency import DEFAULT_PREFIX as FREQUENCY_PREFIX
from dispatch.rules.frequency import frequency_key
from dispatch.rules.suppression import GLOBAL, AddressHasher, hasher_for
from dispatch.rules.validation import AddressValidator
from dispatch.send.engine import SUBJECT_ATTRIBUTE
from dispatch.store import keys

__all__ = [
    "REGISTRY",
    "SEAL_SIZE",
    "TO_ENQUEUE",
    "TRIGGERED_PREFIX",
    "AsyncEnqueue",
    "SealNotifier",
    "TriggeredSender",
    "batch_prefix",
    "closes_at",
    "open_key",
    "open_prefix",
    "parse_member",
    "split_recipient",
    "state_key",
    "triggered_counts",
]

#: Campaign ids of triggered campaigns start with this (outside the client id alphabet).
TRIGGERED_PREFIX: Final = keys.TRIGGERED_PREFIX
#: How long an Idempotency-Key is remembered.
IDEMPOTENCY_TTL_S: Final = 24 * 3600
#: An open batch is sealed at once when it reaches this many rows.
SEAL_SIZE: Final = 100
#: Sealed batches not yet known to be enqueued: member ``cid|n|not_before``, score = sealed at.
TO_ENQUEUE: Final = f"{keys.PREFIX}:triggered:to-enqueue"
#: Triggered campaigns that may have an open batch: member = campaign id, score = last batch opened.
REGISTRY: Final = f"{keys.PREFIX}:triggered:campaigns"
#: A not-before closer than this to now is sent now (no batch of its own).
_HOLD_MIN_S: Final = 1.0
#: Separates the caller's recipient id from the message's position in the row id.
_RID_SEP: Final = "#"

AsyncEnqueue = Callable[[str, int, int], Awaitable[None]]


class SealNotifier(Protocol):
    """What the sender tells the sealer (``dispatch.triggered.sealer.TriggeredSealer``)."""

    def note_open(self, campaign_id: str) -> None: ...

    def note_sealed(self, member: str) -> None: ...


def state_key(campaign_id: str) -> str:
    """Hash of a triggered campaign: ``next`` batch number, ``open`` batch, ``accepted``,
    ``suppressed`` and ``frequency_capped`` counts."""
    return f"{keys.PREFIX}:{{{campaign_id}}}:triggered"


def open_prefix(campaign_id: str) -> str:
    return f"{keys.PREFIX}:{{{campaign_id}}}:open:"


def open_key(campaign_id: str, n: int) -> str:
    """The list of encoded rows of an open (not yet sealed) batch."""
    return f"{open_prefix(campaign_id)}{n}"


def batch_prefix(campaign_id: str) -> str:
    return keys.batch(campaign_id, 0)[:-1]


def parse_member(member: str) -> tuple[str, int, float]:
    """(campaign id, batch, not_before) of a :data:`TO_ENQUEUE` member."""
    cid, n, not_before = member.rsplit("|", 2)
    return cid, int(n), float(not_before)


def closes_at(campaign_id: str) -> float:
    """When a triggered campaign stops getting messages: the end of its UTC hour."""
    hour = datetime.strptime(campaign_id.rsplit("-", 1)[1], "%Y%m%d%H").replace(tzinfo=UTC)
    return hour.timestamp() + 3600


def split_recipient(row_id: str) -> str:
    """The caller's recipient id from a triggered snapshot row id."""
    return row_id.rsplit(_RID_SEP, 1)[0]


def triggered_counts(raw: dict[bytes, bytes]) -> tuple[int, int]:
    """(accepted messages, batch numbers handed out) from a :func:`state_key` hash."""
    return int(raw.get(b"accepted", 0)), int(raw.get(b"next", 0))


def _script(name: str) -> str:
    return resources.files("dispatch.triggered").joinpath(name).read_text(encoding="utf-8")


def _idempotency_key(owner: str, key: str) -> str:
    return f"{keys.PREFIX}:idem:" + hashlib.sha256(f"{owner}\0{key}".encode()).hexdigest()[:32]


def _manifest(campaign_id: str, channel: str, now: float) -> Manifest:
    return Manifest(
        campaign_id=campaign_id,
        kind=TRIGGERED,
        fingerprint=TRIGGERED,
        channel=channel,
        body="$body",
        subject=None,
        rate=None,
        deadline=None,
        total=0,
        accepted=1,  # one more than accepted until the campaign closes (see the module docstring)
        rejected={},
        batches=0,
        batch_size=SEAL_SIZE,
        cost_units=0,
        checksum="",
        snapshot_bytes=0,
        created_at=now,
        prediction={
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
        rejected_file=None,
    )


def _over_limits(limits: BodyLimits, text: str) -> str | None:
    """Why the rendered ``text`` does not fit the channel's limits, or None when it does."""
    if limits.max_chars is not None and len(text) > limits.max_chars:
        return f"longer than {limits.max_chars} characters once rendered (the channel's limit)"
    if limits.max_bytes is not None and len(text.encode()) > limits.max_bytes:
        return f"larger than {limits.max_bytes} bytes (UTF-8) once rendered (the channel's limit)"
    return None


def _answer(message_id: str, state: str, not_before: float, *, replayed: bool) -> dict[str, Any]:
    return {
        "message_id": message_id,
        "campaign_id": message_id.rsplit(".", 2)[0],
        "state": state,
        "not_before": not_before,
        "replayed": replayed,
    }


class TriggeredSender:
    """Accepts one message: checks it, then one script call records and queues it."""

    def __init__(
        self,
        settings: Settings,
        client: aredis.Redis,
        sealer: SealNotifier,
        *,
        hasher: AddressHasher | None = None,
        suppression_prefix: str = "dispatch:suppress",
        frequency_prefix: str = FREQUENCY_PREFIX,
        quiet_hours: QuietHours | None = None,
        seal_size: int = SEAL_SIZE,
        clock: Callable[[], float] = time.time,
        pipelined: PipelinedRedis | None = None,
    ) -> None:
        """``pipelined``: when given, the accept script runs on it (the hot path's connection)
        instead of on ``client``."""
        self._settings = settings
        self._client = client
        self._sealer = sealer
        self._hasher = hasher or hasher_for(settings)
        self._suppression_prefix = suppression_prefix
        self._frequency_prefix = frequency_prefix
        #: (limit, window ms); limit 0: no cap (the key is still passed, never read)
        self._frequency = (settings.frequency_limit, settings.frequency_window_s * 1000)
        self._quiet = quiet_hours or QuietHours()
        self._seal_size = str(seal_size)
        self._ttl = settings.retention_s + 3600
        self._clock = clock
        self._validator = AddressValidator()
        #: channel -> its message limits (the registry's)
        self._limits = {spec.name: spec.limits for spec in default_registry().channels()}
        self._source = _script("accept.lua")
        self._accept = client.register_script(self._source)
        self._pipelined = pipelined
        #: (channel, hour number) -> campaign id whose manifest exists
        self._ready: dict[tuple[str, int], str] = {}

    async def _campaign(self, channel: str, now: float) -> str:
        ready = self._ready.get((channel, int(now // 3600)))
        if ready is not None:
            return ready
        campaign_id = f"{TRIGGERED_PREFIX}{channel}-{datetime.fromtimestamp(now, UTC):%Y%m%d%H}"
        pipe = self._client.pipeline(transaction=False)
        manifest = _manifest(campaign_id, channel, now).encode()
        pipe.set(keys.manifest(campaign_id), manifest, nx=True, ex=self._ttl)
        pipe.hsetnx(keys.control(campaign_id), "state", "running")
        pipe.hsetnx(keys.control(campaign_id), "started_at", f"{now:.3f}")
        pipe.expire(keys.control(campaign_id), self._ttl)
        pipe.zadd(keys.CAMPAIGNS, {campaign_id: now}, nx=True)
        await pipe.execute()
        if len(self._ready) > 64:
            self._ready.clear()
        self._ready[channel, int(now // 3600)] = campaign_id
        return campaign_id

    async def submit(self, owner: str, idempotency_key: str, message: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """(HTTP status, response body) for one validated ``TriggeredMessage``."""
        fingerprint = hashlib.sha256(orjson.dumps(message, option=orjson.OPT_SORT_KEYS)).hexdigest()
        idem = _idempotency_key(owner, idempotency_key)
        channel = str(message["channel"])
        reason, address = self._validator.check(channel, str(message["to"]))
        if reason is not None:
            await self._refuse(idem, fingerprint, "to", str(reason), "the recipient address is not usable")
        template = string.Template(str(message["body"]))
        if not template.is_valid():
            await self._refuse(idem, fingerprint, "body", "'$' not followed by a name", "the body template is invalid")
        now = self._clock()
        not_before, held = now, False
        zone_name = message.get("timezone")
        if zone_name:
            zone = resolve_timezone(str(zone_name))
            if zone is None:
                await self._refuse(idem, fingerprint, "timezone", "not an IANA zone name", "unknown timezone")
            not_before = next_allowed(datetime.fromtimestamp(now, UTC), zone, self._quiet).timestamp()
            held = not_before - now >= _HOLD_MIN_S
        text = template.safe_substitute(cast(dict[str, str], message.get("attributes") or {}))
        too_long = _over_limits(self._limits[channel], text)
        if too_long is not None:
            await self._refuse(idem, fingerprint, "body", too_long, "the message body is over the channel's limit")
        attrs = {"body": text}
        if message.get("subject"):
            attrs[SUBJECT_ATTRIBUTE] = str(message["subject"])
        recipient = str(message.get("recipient_id") or "")
        campaign_id = await self._campaign(channel, now)
        head = b"[" + orjson.dumps(recipient + _RID_SEP)[:-1]
        tail = b'",' + orjson.dumps(address) + b"," + orjson.dumps(attrs) + b"]"
        answered = round(not_before, 3)
        digest = self._hasher(address)
        limit, window_ms = self._frequency
        script_keys: list[Any] = [
            idem,
            f"{self._suppression_prefix}:{channel}",
            f"{self._suppression_prefix}:{GLOBAL}",
            state_key(campaign_id),
            keys.manifest(campaign_id),
            TO_ENQUEUE,
            REGISTRY,
            frequency_key(channel, digest, prefix=self._frequency_prefix),
        ]
        script_args: list[Any] = [
            fingerprint,
            digest,
            campaign_id,
            batch_prefix(campaign_id),
            open_prefix(campaign_id),
            head,
            tail,
            f"{answered:.3f}" if held else "0",
            self._seal_size,
            self._ttl,
            IDEMPOTENCY_TTL_S,
            f"{now:.3f}",
            f"{answered:.3f}",
            limit,
            int(now * 1000) - window_ms,  # as frequency.py: sends after now - window count
        ]
        if self._pipelined is not None:
            raw = await self._pipelined.evalsha(self._source, script_keys, script_args)
        else:
            raw = await self._accept(keys=script_keys, args=script_args)
        if int(raw[0]) == 0:
            return self._replay(bytes(raw[1]), fingerprint)
        message_id, state, sealed = (bytes(part).decode() for part in raw[1:4])
        if sealed:
            self._sealer.note_sealed(sealed)
        elif state == "queued":
            self._sealer.note_open(campaign_id)
        return 202, _answer(message_id, state, answered, replayed=False)

    async def _refuse(self, idem: str, fingerprint: str, field: str, reason: str, title: str) -> NoReturn:
        """422, unless the key already answers a request (then that answer's 409/replay rule)."""
        stored = cast(bytes | None, await self._client.get(idem))
        if stored is not None:
            self._replay(stored, fingerprint)  # a different body: 409 (the same body was accepted once)
        raise ApiProblem(422, title, errors=[FieldError(field, reason)])

    def _replay(self, stored: bytes, fingerprint: str) -> tuple[int, dict[str, Any]]:
        known, state, not_before, message_id = stored.decode().split("|", 3)
        if known != fingerprint:
            raise ApiProblem(
                409,
                "this Idempotency-Key was used with a different request body; use a new key",
                slug="idempotency-key-reuse",
            )
        return 200, _answer(message_id, state, float(not_before), replayed=True)
