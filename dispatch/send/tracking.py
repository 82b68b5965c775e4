"""Per-message records and per-campaign counters in Redis (dedup and track steps).

A batch's records live in one hash (``keys.records``), field = message index, value =
``state|attempts|owner|provider_id|code|ts``. The same record is the idempotency claim: a message
is *claimed* (state ``sending`` with the worker's id) before the provider call and *confirmed*
after (``sent``, ``failed``, ...). Both transitions are Lua scripts, so counters move exactly once
per message whatever the number of workers, redeliveries or duplicate enqueues.

Batch channels (one provider request carries many messages) use a *group record* instead of one
record per message: field ``g`` of the same hash, ``state|attempts|owner|provider_id_prefix|code|
ts|first|last|members``, stands for every index ``first..last`` that has no record of its own. It
is claimed (``claim_group.lua``) and confirmed (``finish_group.lua``) in one step per run, and the
counters move by ``members``. Messages whose fate differs from the request's (a rejected
recipient, a retry, a dead letter, a delivery receipt) get a record of their own, which wins over
the group's: a message's state is *its own record, else its group's*. A member's provider id is the
group's prefix followed by the message's ref (``<X-Message-Id>:<ref>`` for SendGrid).
:func:`record_value` resolves one message that way for readers of the raw hash. A delivery receipt
(``receipt.lua``) changes a message only when the receipt's channel is the campaign's (its
manifest's ``channel``): one provider's callback never touches another channel's message.

Python reads and writes both formats through one codec each, :class:`MessageRecord` and
:class:`GroupRecord` (``encode``/``decode``); no other module splits a record. The Lua scripts
beside this module (``claim.lua``, ``claim_group.lua``, ``finish_group.lua``, ``receipt.lua``,
``requeue_dead.lua``) write and parse the same text; ``ts`` is epoch seconds with three decimals
(``%.3f``), empty when unknown.

A message becomes ``sending`` only as its request is issued (``issue.lua``, a compare-and-set
that also names the provider, record field 7): a batch's run holds a *lease* (field ``L``) instead
of claiming every message up front, so a message it never issued stays claimable. After a crash
the in-doubt set is exactly the records left ``sending`` by a run that is gone: the requests that
were on the wire. ``claim.lua`` reports them (code :data:`CLAIM_IN_DOUBT`, with the time they were
issued) and re-owns them; the engine reconciles them (``dispatch.send.reconcile``) before anything
is sent again.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis
import redis.asyncio as aredis
from redis.exceptions import NoScriptError

from dispatch.store import keys

__all__ = [
    "BATCH_BUSY",
    "CLAIM_BUSY",
    "CLAIM_DONE",
    "CLAIM_FRESH",
    "CLAIM_IN_DOUBT",
    "CLAIM_RECLAIMED",
    "COUNTERS",
    "GROUP_STATES",
    "Claim",
    "GroupClaim",
    "GroupOutcome",
    "GroupRecord",
    "MessageRecord",
    "Outcome",
    "Record",
    "Tracker",
    "campaign_counters",
    "iter_outcomes",
    "iter_records",
    "parse_ref",
    "record_value",
]

CLAIM_DONE, CLAIM_FRESH, CLAIM_IN_DOUBT, CLAIM_BUSY = 0, 1, 2, 3
#: The old name of :data:`CLAIM_IN_DOUBT`.
CLAIM_RECLAIMED = CLAIM_IN_DOUBT
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
    "in_doubt",
)


#: States a whole group record can take (a dead letter is always a record of its own).
GROUP_STATES = frozenset({"sent", "retry", "failed", "suppressed", "skipped"})
#: Field of a batch's records hash holding its group record.
GROUP_FIELD = "g"


def _script(name: str) -> str:
    return resources.files("dispatch.send").joinpath(name).read_text(encoding="utf-8")


@dataclass(slots=True)
class Outcome:
    """What happened to one claimed message, for the ``finish_group.lua`` script (one per message on the
    send path: not frozen, whose ``__init__`` costs several times more)."""

    index: int
    state: str  # sent | failed | suppressed | skipped | retry | dead
    attempts: int
    provider_id: str = ""
    code: str = ""


@dataclass(frozen=True, slots=True)
class GroupOutcome:
    """One outcome for every remaining member of a batch's group record (``finish_group``).

    A member's provider id is ``provider_prefix`` followed by its ref (none when the prefix is
    empty).
    """

    state: str  # one of GROUP_STATES
    attempts: int
    provider_prefix: str = ""
    code: str = ""


@dataclass(frozen=True, slots=True)
class Claim:
    """What ``claim`` answered for one message: its claim code and attempts; for an in-doubt one
    (:data:`CLAIM_IN_DOUBT`) when its request was issued and to which provider."""

    code: int
    attempts: int
    issued_at: float | None = None
    provider: str = ""
    #: A claimable message with a ``retry`` record (not one without any).
    retry: bool = False


#: ``Tracker.claim``'s answer when a live worker holds the batch's lease.
BATCH_BUSY: list[Claim] = []


def _in_doubt_fields(raw: bytes | str) -> tuple[float | None, str]:
    text = raw.decode() if isinstance(raw, bytes) else raw
    ts, _, provider = text.partition("|")
    return (float(ts) if ts else None), provider


@dataclass(frozen=True, slots=True)
class GroupClaim:
    """What ``claim_group`` answered: the group's claim code, and the codes of the other messages.

    Members are the indices ``first..last`` absent from ``others``; ``members`` counts them.
    """

    code: int
    attempts: int
    first: int
    last: int
    members: int
    #: index -> (claim code, attempts) of every message that is not a group member.
    others: dict[int, tuple[int, int]]
    #: When an in-doubt group's request was issued (None otherwise).
    issued_at: float | None = None
    #: index -> when an in-doubt non-member's request was issued.
    others_issued: dict[int, float] = dataclasses.field(default_factory=dict)
    #: A live worker holds the batch's lease: nothing was claimed.
    busy: bool = False


@dataclass(frozen=True, slots=True)
class MessageRecord:
    """One message's stored record, the hash value ``state|attempts|owner|provider_id|code|ts``
    and, once its request was issued, ``|provider`` (the provider it went to)."""

    state: str
    attempts: int
    #: The worker that issued it last (``sending``: the one whose request is on the wire).
    owner: str
    provider_id: str
    code: str
    ts: float | None
    provider: str = ""

    def encode(self) -> bytes:
        ts = "" if self.ts is None else f"{self.ts:.3f}"
        tail = f"|{self.provider}" if self.provider else ""
        return f"{self.state}|{self.attempts}|{self.owner}|{self.provider_id}|{self.code}|{ts}{tail}".encode()

    @classmethod
    def decode(cls, raw: bytes) -> MessageRecord:
        state, attempts, owner, provider_id, code, rest = raw.decode().split("|", 5)
        ts, _, provider = rest.partition("|")
        return cls(state, int(attempts or 0), owner, provider_id, code, float(ts) if ts else None, provider)


@dataclass(frozen=True, slots=True)
class GroupRecord:
    """A batch's group record, field ``g``: ``state|attempts|owner|provider_id_prefix|code|ts|first|
    last|members``, standing for every index ``first..last`` without a record of its own."""

    state: str
    attempts: int
    owner: str
    #: A member's provider id is this followed by its ref; empty: members have none.
    prefix: str
    code: str
    ts: float | None
    first: int
    last: int
    #: How many of ``first..last`` the group still stands for (the counters moved by this).
    members: int

    def encode(self) -> bytes:
        ts = "" if self.ts is None else f"{self.ts:.3f}"
        return (
            f"{self.state}|{self.attempts}|{self.owner}|{self.prefix}|{self.code}|{ts}|"
            f"{self.first}|{self.last}|{self.members}"
        ).encode()

    @classmethod
    def decode(cls, raw: bytes) -> GroupRecord:
        state, attempts, owner, prefix, code, ts, first, last, members = raw.decode().split("|")
        return cls(
            state,
            int(attempts or 0),
            owner,
            prefix,
            code,
            float(ts) if ts else None,
            int(first),
            int(last),
            int(members or 0),
        )

    def provider_id(self, ref: str) -> str:
        return self.prefix + ref if self.prefix else ""

    def member(self, ref: str) -> MessageRecord:
        """The record of the member whose ref is ``ref``, as if it had one of its own."""
        return MessageRecord(self.state, self.attempts, self.owner, self.provider_id(ref), self.code, self.ts)


@dataclass(frozen=True, slots=True)
class Record:
    """One message's outcome as exports show it (its stored record without the owner)."""

    batch: int
    index: int
    state: str
    attempts: int
    provider_id: str
    code: str
    ts: float | None
    recipient_id: str = ""
    #: The provider its request went to ('' when unknown: never issued, or a group's member).
    provider: str = ""

    @classmethod
    def of(cls, batch: int, index: int, stored: MessageRecord, recipient_id: str = "") -> Record:
        return cls(
            batch,
            index,
            stored.state,
            stored.attempts,
            stored.provider_id,
            stored.code,
            stored.ts,
            recipient_id,
            stored.provider,
        )


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
        self._receipt = client.register_script(_script("receipt.lua"))
        self._claim_group = client.register_script(_script("claim_group.lua"))
        self._finish_group = client.register_script(_script("finish_group.lua"))
        self._issue = client.register_script(_script("issue.lua"))
        self._release = client.register_script(_script("release.lua"))

    async def claim(self, campaign_id: str, batch: int, owner: str, indices: Sequence[int]) -> list[Claim] | None:
        """Take the batch's lease and read its messages' states; ``None`` when the campaign is not
        running, :data:`BATCH_BUSY` (empty) when a live worker holds the lease, else one
        :class:`Claim` per index."""
        raw = await self._claim(
            keys=[keys.records(campaign_id, batch), keys.control(campaign_id)],
            args=[
                owner,
                f"{time.time():.3f}",
                keys.worker_alive(""),
                self._ttl,
                keys.run_member(campaign_id, batch),
                *indices,
            ],
        )
        if raw and raw[0] == -1:
            return None
        if raw and raw[0] == -2:
            return BATCH_BUSY
        claims: list[Claim] = []
        for i in range(0, len(raw), 3):
            code, attempts = int(raw[i]), int(raw[i + 1])
            if code == CLAIM_IN_DOUBT:
                issued_at, provider = _in_doubt_fields(raw[i + 2])
                claims.append(Claim(code, attempts, issued_at, provider))
            else:
                claims.append(Claim(code, attempts, retry=raw[i + 2] in {b"retry", "retry"}))
        return claims

    async def issue(
        self, campaign_id: str, batch: int, owner: str, entries: Sequence[tuple[str, int, str]]
    ) -> list[bool]:
        """Mark messages ``sending`` as their requests are issued: ``entries`` of (field: an index
        or ``"g"``, attempts so far, provider). True for each one this owner may send."""
        args: list[Any] = [owner, f"{time.time():.3f}"]
        for entry in entries:
            args.extend(entry)
        raw = await self._issue(keys=[keys.records(campaign_id, batch)], args=args)
        return [bool(int(x)) for x in raw]

    async def batch_done(self, campaign_id: str, batch: int) -> None:
        """Every message of the batch has its final outcome (``dispatch.send.sweeper`` reads it)."""
        pipe = self._client.pipeline(transaction=False)
        pipe.sadd(keys.done_batches(campaign_id), batch)
        pipe.expire(keys.done_batches(campaign_id), self._ttl)
        await pipe.execute()

    async def batch_waiting(self, campaign_id: str, batch: int, until: float) -> None:
        """The batch may not be sent before ``until`` (epoch s): it is not stalled meanwhile."""
        pipe = self._client.pipeline(transaction=False)
        pipe.hset(keys.records(campaign_id, batch), "W", f"{until:.3f}")
        pipe.expire(keys.records(campaign_id, batch), self._ttl)
        await pipe.execute()

    async def release(self, campaign_id: str, batch: int, owner: str) -> None:
        """End a batch's run: drop its lease."""
        await self._release(keys=[keys.records(campaign_id, batch)], args=[owner])

    async def finish(
        self, campaign_id: str, batch: int, owner: str, outcomes: Sequence[Outcome], *, retries: int = 0
    ) -> int:
        """Record outcomes of messages claimed one by one (per-message channels)."""
        return await self.finish_group(campaign_id, batch, owner, outcomes, None, retries=retries)

    async def claim_group(self, campaign_id: str, batch: int, owner: str, count: int) -> GroupClaim | None:
        """Claim a batch of ``count`` messages for a batch channel: one group record for every
        message without a record of its own; ``None`` when the campaign is not running."""
        raw = await self._claim_group(
            keys=[keys.records(campaign_id, batch), keys.control(campaign_id)],
            args=[
                owner,
                f"{time.time():.3f}",
                keys.worker_alive(""),
                self._ttl,
                count,
                keys.run_member(campaign_id, batch),
            ],
        )
        if raw and raw[0] == -1:
            return None
        if raw and raw[0] == -2:
            return GroupClaim(CLAIM_BUSY, 0, 0, -1, 0, {}, busy=True)
        others: dict[int, tuple[int, int]] = {}
        others_issued: dict[int, float] = {}
        for i in range(6, len(raw), 4):
            index, code = int(raw[i]), int(raw[i + 1])
            others[index] = (code, int(raw[i + 2]))
            issued, _ = _in_doubt_fields(raw[i + 3])
            if code == CLAIM_IN_DOUBT and issued is not None:
                others_issued[index] = issued
        group_issued, _ = _in_doubt_fields(raw[5])
        return GroupClaim(
            int(raw[0]),
            int(raw[1]),
            int(raw[2]),
            int(raw[3]),
            int(raw[4]),
            others,
            issued_at=group_issued,
            others_issued=others_issued,
        )

    async def finish_group(
        self,
        campaign_id: str,
        batch: int,
        owner: str,
        outcomes: Sequence[Outcome],
        group: GroupOutcome | None,
        *,
        retries: int = 0,
    ) -> int:
        """Record a batch-channel run: ``outcomes`` of single messages first (a group member
        among them leaves the group), then ``group`` for the group's remaining members (``None``:
        the group keeps its claim). Returns the number of messages whose outcome was applied."""
        applied = await self._finish_group(
            keys=self._finish_keys(campaign_id, batch),
            args=self._finish_args(campaign_id, batch, owner, outcomes, group, retries),
        )
        return int(applied)

    async def advance(
        self,
        campaign_id: str,
        batch: int,
        owner: str,
        outcomes: Sequence[Outcome],
        entries: Sequence[tuple[str, int, str]],
        *,
        retries: int = 0,
    ) -> list[bool]:
        """Record ``outcomes`` (as :meth:`finish`) and issue ``entries`` (as :meth:`issue`) in one
        round trip; the issue answers."""
        finish = bool(outcomes or retries)
        finish_keys = self._finish_keys(campaign_id, batch)
        finish_args = self._finish_args(campaign_id, batch, owner, outcomes, None, retries) if finish else []
        issue_args: list[Any] = [owner, f"{time.time():.3f}"]
        for entry in entries:
            issue_args.extend(entry)
        issue_keys = [keys.records(campaign_id, batch)]
        if not entries:
            if finish:
                await self._finish_group(keys=finish_keys, args=finish_args)
            return []
        if not finish:
            raw = await self._issue(keys=issue_keys, args=issue_args)
            return [bool(int(x)) for x in raw]
        # both in one round trip: EVALSHA in a plain pipeline (a pipeline given Script objects
        # asks SCRIPT EXISTS first, a second round trip); both scripts are idempotent, so after
        # NOSCRIPT (a restarted server) they are loaded and the pipeline is sent again
        for _ in range(2):
            pipe = self._client.pipeline(transaction=False)
            pipe.evalsha(self._finish_group.sha, len(finish_keys), *finish_keys, *finish_args)
            pipe.evalsha(self._issue.sha, len(issue_keys), *issue_keys, *issue_args)
            try:
                results = await pipe.execute()
            except NoScriptError:
                self._finish_group.sha = await self._client.script_load(self._finish_group.script)
                self._issue.sha = await self._client.script_load(self._issue.script)
                continue
            return [bool(int(x)) for x in results[-1]]
        raise RuntimeError("scripts could not be loaded")

    @staticmethod
    def _finish_keys(campaign_id: str, batch: int) -> list[str]:
        return [keys.records(campaign_id, batch), keys.counters(campaign_id), keys.dead_letters(campaign_id)]

    @staticmethod
    def _finish_args(  # noqa: PLR0917 - finish_group's arguments, in its order
        campaign_id: str,
        batch: int,
        owner: str,
        outcomes: Sequence[Outcome],
        group: GroupOutcome | None,
        retries: int,
    ) -> list[Any]:
        if group is not None and group.state not in GROUP_STATES:
            raise ValueError(f"a group record cannot be {group.state!r}")
        args: list[Any] = [owner, f"{time.time():.3f}", batch, retries]
        if group is None:
            args.extend(("", 0, "", ""))
        else:
            args.extend((group.state, group.attempts, group.provider_prefix, group.code))
        args.append(make_ref(campaign_id, batch, 0)[:-1])
        for o in outcomes:
            args.extend((o.index, o.state, o.attempts, o.provider_id, o.code))
        return args

    async def apply_receipt(self, ref: str, state: str, code: str | None, *, channel: str) -> int:
        """Move a sent message of ``channel`` to delivered/failed/bounced; see receipt.lua for
        return codes (-2: the message belongs to another channel and is left alone)."""
        campaign_id, batch, index = parse_ref(ref)
        result = await self._receipt(
            keys=[keys.records(campaign_id, batch), keys.counters(campaign_id), keys.manifest(campaign_id)],
            args=[index, state, code or "", f"{time.time():.3f}", ref, channel],
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
    from dispatch.plan.snapshot import iter_batches

    unclaimed = "skipped" if cancelled else "queued"
    for snapshot in iter_batches(client, campaign_id, batches):
        found = {record.index: record for record in _batch_records(client, campaign_id, snapshot.number)}
        for index, row in enumerate(snapshot.rows):
            record = found.get(index)
            if record is None:
                record = Record(snapshot.number, index, unclaimed, 0, "", "", None)
            yield Record(
                record.batch,
                index,
                record.state,
                record.attempts,
                record.provider_id,
                record.code,
                record.ts,
                row.recipient_id,
                record.provider,
            )


def iter_records(client: redis.Redis, campaign_id: str, batches: int) -> Iterator[Record]:
    """Every message's record, batch by batch; messages never claimed are absent."""
    for batch in range(batches):
        yield from _batch_records(client, campaign_id, batch)


def record_value(
    records: Mapping[bytes, bytes | None], campaign_id: str, batch: int, index: int
) -> MessageRecord | None:
    """One message's record from a batch's raw records hash (``HGETALL``, or ``HMGET`` of
    ``str(index)`` and ``"g"`` as a mapping): its own record, else its group's; ``None`` when it
    has neither."""
    own = records.get(str(index).encode())
    if own is not None:
        return MessageRecord.decode(own)
    group = records.get(GROUP_FIELD.encode())
    if group is None:
        return None
    resolved = GroupRecord.decode(group)
    if not resolved.first <= index <= resolved.last:
        return None
    return resolved.member(make_ref(campaign_id, batch, index))


def _batch_records(client: redis.Redis, campaign_id: str, batch: int) -> Iterator[Record]:
    raw: dict[bytes, bytes] = client.hgetall(keys.records(campaign_id, batch))  # type: ignore[assignment]
    records: dict[int, Record] = {}
    for field, value in raw.items():
        if not field.isdigit():
            continue
        records[int(field)] = Record.of(batch, int(field), MessageRecord.decode(value))
    group_raw = raw.get(GROUP_FIELD.encode())
    if group_raw is not None:
        group = GroupRecord.decode(group_raw)
        for index in range(group.first, group.last + 1):
            if index not in records:
                records[index] = Record.of(batch, index, group.member(make_ref(campaign_id, batch, index)))
    for index in sorted(records):
        yield records[index]
