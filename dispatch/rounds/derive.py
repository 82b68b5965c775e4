"""Derived audiences: a follow-up round's recipients, taken from an earlier campaign's outcomes.

    audience = { from = "offer-1", where = "opened and not clicked", after = "72h" }

:func:`scan_masks` streams the source campaign batch by batch: per chunk of
:data:`dispatch.plan.snapshot.WRITE_CHUNK` batches, one pipelined round trip reads the snapshot
batches, their records hashes (``dispatch.send.tracking``) and their engagement hashes
(``dispatch.engage.ledger``), and each message gets a bit mask of the ``where`` predicates
(:data:`dispatch.rounds.where.PREDICATES`). Memory holds one chunk, whatever the audience size.
Engagement after ``cutoff`` (the derivation instant) is left out, so the lineage says exactly
which events were seen.

A recipient who opted out (``opted_out``: an ``optout`` or ``spamreport`` event) is never part
of a derived audience, whatever the expression (counted as ``excluded_opted_out``); the planner's
suppression check applies on top.

Where the new round's addresses come from:

- same channel as the source: the source snapshot's row (recipient id, normalized address, the
  template fields it kept) is the new row; a recipient's timezone, consent and ``updated_at`` are
  not in a snapshot, so quiet hours use the round's ``default_timezone`` and a freshness policy
  sees rows without ``updated_at``;
- another channel (email round 1, SMS round 2), or whenever ``contacts`` is given: the qualifying
  recipient ids are collected (a set of ids: memory grows with the *qualifying* count, not the
  source's) and ``contacts`` (an audience file, usually the one round 1 was planned from) is
  filtered to the rows of those ids: a plain CSV file with an ``id`` column by the C csv reader
  into a temporary CSV that ``Planner.plan_file`` plans like any file (:meth:`Deriver.filter_contacts`),
  anything else (JSONL, gzip, a row the C reader refuses) row by row (:meth:`Deriver.contacts_rows`);
  their phone, timezone, consent and ``updated_at`` then go through every planner check as in
  any plan. Qualifying ids missing from the file are counted (``missing_in_contacts``).

Either way the rows go through :meth:`dispatch.plan.planner.Planner.plan` (every check:
validation, consent, freshness, quiet hours, dedup, suppression, frequency cap), frozen as the
round's own snapshot, and the manifest's ``lineage`` records the source, the expression, when it
was derived, the cutoff and the counts (:class:`Deriver.lineage`).
"""

from __future__ import annotations

import csv
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import compress
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, cast

import orjson
import redis

from dispatch.errors import AudienceError, CampaignNotFound, PlanError
from dispatch.plan.audience import Recipient, read_audience
from dispatch.plan.manifest import Manifest
from dispatch.plan.snapshot import WRITE_CHUNK, load_manifest
from dispatch.rounds.where import MASKS, PREDICATES, Where, parse_where
from dispatch.rules.validation import ADDRESS_FIELD
from dispatch.send.tracking import GROUP_FIELD
from dispatch.store import keys

if TYPE_CHECKING:
    from dispatch.campaign import CampaignSpec, FollowUp
    from dispatch.plan.planner import Planner, PlanReport

__all__ = ["EVENT_BITS", "STATE_BITS", "Deriver", "EmptyRound", "MaskedBatch", "plan_round", "scan_masks"]

_SENT, _DELIVERED, _BOUNCED = PREDICATES["sent"], PREDICATES["delivered"], PREDICATES["bounced"]
_OPTED_OUT: Final = PREDICATES["opted_out"]
_GZIP_MAGIC: Final = b"\x1f\x8b"
#: Record state (bytes, as stored) -> its predicate bits (a ``failed`` record without an owner,
#: an undelivered receipt's, is ``sent`` too: see ``_apply_records``).
STATE_BITS: Final = {
    b"sent": _SENT,
    b"delivered": _SENT | _DELIVERED,
    b"undelivered": _SENT,
    b"bounced": _SENT | _BOUNCED,
}
#: Ledger event (bytes, as stored) -> its predicate bit (bot clicks count for nothing).
EVENT_BITS: Final = {
    b"open": PREDICATES["opened"],
    b"machine_open": PREDICATES["machine_opened"],
    b"click": PREDICATES["clicked"],
    b"reply": PREDICATES["replied"],
    b"optout": _OPTED_OUT,
    b"spamreport": _OPTED_OUT,
}


class EmptyRound(PlanError):
    """Nobody qualifies for a follow-up round: there is nothing to plan or start."""


@dataclass(frozen=True, slots=True)
class MaskedBatch:
    """One snapshot batch's rows (``[recipient_id, address, attrs]`` lists) and one mask each."""

    number: int
    rows: list[list[Any]]
    masks: bytearray


def scan_masks(
    client: redis.Redis, campaign_id: str, batches: int, *, cutoff: float | None = None
) -> Iterator[MaskedBatch]:
    """Every batch of ``campaign_id`` with its messages' predicate masks, in batch order."""
    cutoff_ms = None if cutoff is None else int(cutoff * 1000)
    for start in range(0, batches, WRITE_CHUNK):
        numbers = range(start, min(batches, start + WRITE_CHUNK))
        pipe = client.pipeline(transaction=False)
        pipe.mget([keys.batch(campaign_id, n) for n in numbers])
        for n in numbers:
            pipe.hgetall(keys.records(campaign_id, n))
            pipe.hgetall(keys.engagement(campaign_id, n))
        replies = pipe.execute()
        raws = cast(list[bytes | None], replies[0])
        for i, n in enumerate(numbers):
            raw = raws[i]
            if raw is None:
                raise CampaignNotFound(f"campaign {campaign_id!r} has no batch {n} (expired)")
            rows: list[list[Any]] = orjson.loads(raw)[1]
            masks = bytearray(len(rows))
            _apply_records(masks, replies[1 + 2 * i])
            _apply_events(masks, replies[2 + 2 * i], cutoff_ms)
            yield MaskedBatch(n, rows, masks)


_GROUP: Final = GROUP_FIELD.encode()


def _apply_records(masks: bytearray, records: dict[bytes, bytes]) -> None:
    group = records.get(_GROUP)
    if group is not None:  # state|attempts|owner|prefix|code|ts|first|last|members
        parts = group.split(b"|")
        bits = STATE_BITS.get(parts[0], 0)
        if bits:
            first, last = int(parts[6]), min(int(parts[7]), len(masks) - 1)
            masks[first : last + 1] = bytes([bits]) * (last - first + 1)
    for field, value in records.items():
        if field.isdigit():  # a record of its own wins over the group's
            index = int(field)
            if index < len(masks):
                state, _, rest = value.partition(b"|")
                own = STATE_BITS.get(state)
                if own is None:
                    # a receipt's 'failed' (undelivered after the provider accepted it) is written
                    # without an owner (receipt.lua); a refused send keeps the worker's id
                    own = _SENT if state == b"failed" and rest.split(b"|", 2)[1:2] == [b""] else 0
                masks[index] = own


def _apply_events(masks: bytearray, events: dict[bytes, bytes], cutoff_ms: int | None) -> None:
    for field, value in events.items():
        index, _, event = field.partition(b".")
        bit = EVENT_BITS.get(event)
        if bit is None or (cutoff_ms is not None and int(value) > cutoff_ms):
            continue
        i = int(index)
        if i < len(masks):
            masks[i] |= bit


class Deriver:
    """The rows of a derived audience, and the counts its lineage records.

    ``rows()`` yields plain mappings for :meth:`Planner.plan` (same channel) and
    ``contacts_rows()`` the contacts file's recipients whose ids qualify (see the module
    docstring); :meth:`lineage` is complete once either has been consumed."""

    def __init__(
        self,
        client: redis.Redis,
        source: Manifest,
        where: Where,
        *,
        channel: str,
        cutoff: float,
        contacts: str | None = None,
    ) -> None:
        self._client = client
        self._source = source
        self.where = where
        self._channel = channel
        self.cutoff = cutoff
        self._contacts = contacts
        table = where.table
        self._keep = tuple(table[m] and not m & _OPTED_OUT for m in range(MASKS))
        self._excluded = tuple(table[m] and bool(m & _OPTED_OUT) for m in range(MASKS))
        self.scanned = 0
        self.matched = 0
        self.excluded_opted_out = 0
        self.missing_in_contacts: int | None = None
        #: Rows handed to the planner.
        self.yielded = 0

    def qualifying(self) -> Iterator[list[Any]]:
        """The source rows the expression keeps (opted-out recipients left out)."""
        keep, excluded = self._keep.__getitem__, self._excluded.__getitem__
        src = self._source
        for batch in scan_masks(self._client, src.campaign_id, src.batches, cutoff=self.cutoff):
            self.scanned += len(batch.rows)
            self.excluded_opted_out += sum(map(excluded, batch.masks))
            kept = list(compress(batch.rows, map(keep, batch.masks)))
            self.matched += len(kept)
            yield from kept

    def rows(self) -> Iterator[dict[str, Any]]:
        """Same channel: each qualifying snapshot row as a planner row."""
        column = ADDRESS_FIELD[self._channel]
        for rid, address, attrs in self.qualifying():
            self.yielded += 1
            yield {**(attrs or {}), "id": rid, column: address}

    def contacts_rows(self, path: Path) -> Iterator[Recipient]:
        """The recipients of the contacts file ``path`` whose ids qualify, in file order."""
        wanted = {row[0] for row in self.qualifying()}
        for item in read_audience(path):
            if isinstance(item, Recipient) and item.id in wanted:
                wanted.discard(item.id)  # a repeated id is planned once, as the first row
                self.yielded += 1
                yield item
        self.missing_in_contacts = len(wanted)

    def filter_contacts(self, path: Path, out: Path) -> bool:
        """Write to ``out`` the header and the rows of the plain CSV file ``path`` whose ``id``
        qualifies (each id once, its first row), copied as they are; True when done, False when
        ``path`` is not a plain CSV file with an ``id`` column the C reader can read (the caller
        then takes :meth:`contacts_rows`). The planner then reads ``out`` like any audience
        file (``Planner.plan_file``: the header checks and the parallel CSV scan)."""
        if path.suffix.lower() != ".csv":
            return False
        try:
            with path.open("rb") as probe:
                if probe.read(2) == _GZIP_MAGIC:
                    return False
        except OSError as exc:
            raise AudienceError(f"cannot open contacts {path.name!r}: {exc.strerror}") from None
        wanted = {row[0] for row in self.qualifying()}
        try:
            with (
                path.open(newline="", encoding="utf-8", errors="surrogateescape") as source,
                out.open("w", newline="", encoding="utf-8", errors="surrogateescape") as sink,
            ):
                reader = csv.reader(source)
                header = next(reader, None)
                if header is None or "id" not in header:
                    return False
                column = header.index("id")
                writer = csv.writer(sink)
                writer.writerow(header)
                for row in reader:
                    if len(row) > column and row[column] in wanted:
                        wanted.discard(row[column])
                        self.yielded += 1
                        writer.writerow(row)
        except csv.Error:
            self.yielded = 0  # a row the C reader refuses: the per-row reader rejects it properly
            return False
        self.missing_in_contacts = len(wanted)
        return True

    def lineage(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "from": self._source.campaign_id,
            "from_channel": self._source.channel,
            "where": self.where.text,
            "derived_at": self.cutoff,
            "source_accepted": self._source.accepted,
            "scanned": self.scanned,
            "matched": self.matched,
            "excluded_opted_out": self.excluded_opted_out,
        }
        if self._contacts is not None:
            out["contacts"] = self._contacts
            out["missing_in_contacts"] = self.missing_in_contacts
        return out


def source_manifest(client: redis.Redis, spec: CampaignSpec, follow: FollowUp) -> Manifest:
    """The source campaign's manifest; PlanError when the round cannot derive from it."""
    if follow.source == spec.id:
        raise PlanError(f"campaign {spec.id}: audience.from names the campaign itself")
    try:
        source = load_manifest(client, follow.source)
    except CampaignNotFound:
        raise PlanError(
            f"campaign {spec.id}: audience.from names {follow.source!r}, which is not a planned campaign (or expired)"
        ) from None
    if source.triggered:
        raise PlanError(f"campaign {spec.id}: audience.from cannot be a triggered-messages campaign")
    if source.channel != spec.channel and follow.contacts is None:
        raise PlanError(
            f"campaign {spec.id}: {follow.source!r} went out on {source.channel!r}, this round on {spec.channel!r}: "
            "give audience.contacts (an audience file with the recipients' addresses for this channel)"
        )
    return source


def plan_round(
    planner: Planner,
    client: redis.Redis,
    spec: CampaignSpec,
    follow: FollowUp,
    *,
    clock: Callable[[], float] = time.time,
    base_dir: Path | None = None,
) -> PlanReport:
    """Plan the follow-up round ``spec`` with the audience ``follow``. A round already planned is
    returned as it is (``existing=True``): a derived audience is frozen once, never derived again."""
    stored = planner.stored_plan(spec)
    if stored is not None:
        return stored
    source = source_manifest(client, spec, follow)
    deriver = Deriver(
        client,
        source,
        parse_where(follow.where),
        channel=spec.channel,
        cutoff=clock(),
        contacts=follow.contacts,
    )
    try:
        if follow.contacts is None:
            return planner.plan(spec, deriver.rows(), lineage=deriver.lineage)
        path = Path(follow.contacts)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        with tempfile.TemporaryDirectory(prefix="dispatch-round-") as tmp:
            filtered = Path(tmp) / "contacts.csv"
            if deriver.filter_contacts(path, filtered):
                return planner.plan_file(spec, filtered, lineage=deriver.lineage)
        deriver = Deriver(
            client, source, deriver.where, channel=spec.channel, cutoff=deriver.cutoff, contacts=follow.contacts
        )
        return planner.plan(spec, deriver.contacts_rows(path), lineage=deriver.lineage)
    except PlanError:
        if deriver.yielded == 0:
            raise EmptyRound(
                f"campaign {spec.id}: nobody of {follow.source!r} qualifies for {follow.where!r} "
                f"({deriver.scanned:,} scanned, {deriver.excluded_opted_out:,} opted out)"
            ) from None
        raise
