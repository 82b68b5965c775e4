"""The frozen audience of a campaign: a manifest plus compact batches, written once.

A batch is one Redis string holding ``orjson([not_before, [[recipient_id, address, attrs], ...]])``
where ``attrs`` keeps only the template fields the message uses. One row is a :class:`SnapshotRow`;
the planner and the triggered path build a batch from rows encoded one by one *without their
closing bracket* (:func:`encode_open_row`, :func:`decode_open_row`), so that the row can be
hashed and joined without copying it again. The manifest is a
:class:`dispatch.plan.manifest.Manifest`, stored by its own codec. The manifest records counts,
policy, a checksum over every batch in order, and when it was made. A snapshot, once committed,
is never changed; a replan of the same campaign id returns it as it is.

Commit: a plan writes its batches under staging keys of its own attempt
(``keys.staged_batch(cid, token, n)``, a random token per :class:`SnapshotWriter`, TTL
:data:`STAGING_TTL_S`), then :meth:`SnapshotWriter.commit` renames them to their final names and
writes the manifest in one Lua script (``commit_snapshot.lua``; every key carries the campaign's
hash tag, so it runs on Redis Cluster too). The manifest's presence is the commit point: a
planner stopped mid-plan (SIGKILL, out of memory) leaves only staging keys, which no reader
looks at, which expire on their own and which never block the next plan of that id.

Lifetime: once the plan commits, the manifest and every batch get one expiry instant,
``expires_at = max(predicted finish, deadline) + retention_s`` (recorded in the manifest). A
campaign that runs longer than predicted, or is started late, should have its snapshot kept: the engine calls
:func:`extend_retention` when a campaign ends (``retention_s`` from then on), and may call it
when a campaign starts. A planned campaign that is never started expires on its own.
"""

from __future__ import annotations

import functools
import hashlib
import secrets
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import NamedTuple, cast

import orjson
import redis

from dispatch.errors import CampaignNotFound, PlanError
from dispatch.plan.manifest import Manifest
from dispatch.store import keys

__all__ = [
    "Batch",
    "Row",
    "SnapshotRow",
    "SnapshotWriter",
    "batch_row",
    "decode_batch",
    "decode_open_row",
    "decode_row",
    "decode_rows",
    "discard_batches",
    "encode_open_row",
    "expire_snapshot",
    "extend_retention",
    "iter_batches",
    "load_batch",
    "load_manifest",
    "verify_snapshot",
]

#: Batches written per pipeline round trip.
WRITE_CHUNK = 64
#: Lifetime of a staged batch: longer than any plan takes, short enough that an abandoned one goes.
STAGING_TTL_S = 24 * 3600


class SnapshotRow(NamedTuple):
    """One recipient of a snapshot batch, stored as the JSON array ``[recipient_id, address, attrs]``."""

    recipient_id: str
    #: The address on the campaign's channel (phone number, email, token): never logged.
    address: str
    #: The template fields the body uses, None when it uses none.
    attrs: dict[str, str] | None


#: A row as writers hand it over: a :class:`SnapshotRow` or the same plain tuple.
Row = tuple[str, str, dict[str, str] | None]


def encode_open_row(row: Row) -> bytes:
    """A row's JSON without its closing bracket (how batches are assembled and hashed)."""
    return orjson.dumps(tuple(row))[:-1]  # tuple(): orjson refuses a NamedTuple


def decode_open_row(raw: bytes) -> SnapshotRow:
    """A row from :func:`encode_open_row`'s bytes."""
    return decode_row(raw + b"]")


def decode_row(raw: bytes) -> SnapshotRow:
    """A row from its whole JSON array (a triggered batch still open keeps its rows so)."""
    return SnapshotRow._make(orjson.loads(raw))


def decode_rows(raw: bytes) -> list[SnapshotRow]:
    """The rows of a stored batch (its ``not_before`` left out)."""
    return list(map(SnapshotRow._make, orjson.loads(raw)[1]))


def batch_row(raw: bytes, index: int) -> SnapshotRow | None:
    """Row ``index`` of a stored batch, None beyond its end (only that row is made a SnapshotRow)."""
    rows = orjson.loads(raw)[1]
    return SnapshotRow._make(rows[index]) if 0 <= index < len(rows) else None


@dataclass(frozen=True, slots=True)
class Batch:
    campaign_id: str
    number: int
    not_before: float
    rows: list[SnapshotRow]


class SnapshotWriter:
    """Accumulates encoded batches and writes them in pipelined chunks under this attempt's
    staging keys; :meth:`commit` publishes them with the manifest, :meth:`discard` drops them."""

    def __init__(self, client: redis.Redis, campaign_id: str, *, ttl_s: int = STAGING_TTL_S) -> None:
        self._client = client
        self._cid = campaign_id
        self._ttl = ttl_s
        self.token = secrets.token_hex(8)
        self._pending: list[tuple[int, bytes]] = []
        self._digest = hashlib.sha256()
        self.batches = 0
        self.bytes = 0

    def add(self, not_before: float, rows: Sequence[Row]) -> int:
        return self.add_encoded(not_before, orjson.dumps([tuple(row) for row in rows]))

    def add_encoded(self, not_before: float, rows: bytes) -> int:
        """:meth:`add` with the rows already encoded (``orjson.dumps(rows)``, or the same bytes
        joined from each row's encoding): the stored batch is the same byte for byte."""
        data = b"[" + orjson.dumps(not_before) + b"," + rows + b"]"
        number = self.batches
        self._digest.update(data)
        self._pending.append((number, data))
        self.batches += 1
        self.bytes += len(data)
        if len(self._pending) >= WRITE_CHUNK:
            self.flush()
        return number

    def flush(self) -> None:
        if not self._pending:
            return
        pipe = self._client.pipeline(transaction=False)
        for number, data in self._pending:
            pipe.set(keys.staged_batch(self._cid, self.token, number), data, ex=self._ttl)
        pipe.execute()
        self._pending.clear()

    def commit(self, manifest: Manifest, ttl_ms: int) -> bool:
        """Publish the staged batches and the manifest atomically, all expiring ``ttl_ms`` from
        now; False (nothing changed) when the campaign already has a manifest. Raises PlanError
        when a staged batch is gone (it outlived :data:`STAGING_TTL_S`)."""
        self.flush()
        n = self.batches
        script = self._client.register_script(_commit_script())
        staged = [keys.staged_batch(self._cid, self.token, i) for i in range(n)]
        final = [keys.batch(self._cid, i) for i in range(n)]
        done = int(
            script(keys=[keys.manifest(self._cid), *staged, *final], args=[manifest.encode(), max(1000, ttl_ms), n])
        )
        if done < 0:
            raise PlanError(f"campaign {self._cid!r}: staged batches expired before the plan committed; plan again")
        if done == 0:
            self.discard()
        return done == 1

    def discard(self) -> None:
        """Delete what this attempt staged (its keys expire on their own anyway)."""
        self._pending.clear()
        for start in range(0, self.batches, WRITE_CHUNK):
            end = min(self.batches, start + WRITE_CHUNK)
            self._client.delete(*[keys.staged_batch(self._cid, self.token, n) for n in range(start, end)])

    @property
    def checksum(self) -> str:
        return self._digest.hexdigest()


@functools.cache
def _commit_script() -> str:
    return resources.files("dispatch.plan").joinpath("commit_snapshot.lua").read_text(encoding="utf-8")


def load_manifest(client: redis.Redis, campaign_id: str) -> Manifest:
    raw = cast(bytes | None, client.get(keys.manifest(campaign_id)))
    if raw is None:
        raise CampaignNotFound(f"no campaign {campaign_id!r}")
    return Manifest.decode(raw, campaign_id=campaign_id)


def decode_batch(campaign_id: str, number: int, raw: bytes | None) -> Batch:
    if raw is None:
        raise CampaignNotFound(f"campaign {campaign_id!r} has no batch {number} (expired or never planned)")
    not_before, rows = orjson.loads(raw)
    return Batch(
        campaign_id=campaign_id, number=number, not_before=float(not_before), rows=list(map(SnapshotRow._make, rows))
    )


def load_batch(client: redis.Redis, campaign_id: str, number: int) -> Batch:
    return decode_batch(campaign_id, number, cast(bytes | None, client.get(keys.batch(campaign_id, number))))


def iter_batches(client: redis.Redis, campaign_id: str, count: int) -> Iterator[Batch]:
    for start in range(0, count, WRITE_CHUNK):
        numbers = range(start, min(count, start + WRITE_CHUNK))
        raws = cast(list[bytes | None], client.mget([keys.batch(campaign_id, n) for n in numbers]))
        for n, raw in zip(numbers, raws, strict=True):
            yield decode_batch(campaign_id, n, raw)


def verify_snapshot(client: redis.Redis, campaign_id: str) -> bool:
    """Recompute the checksum over every batch and compare it with the manifest's."""
    manifest = load_manifest(client, campaign_id)
    digest = hashlib.sha256()
    count = manifest.batches
    for start in range(0, count, WRITE_CHUNK):
        numbers = range(start, min(count, start + WRITE_CHUNK))
        for raw in cast(list[bytes | None], client.mget([keys.batch(campaign_id, n) for n in numbers])):
            if raw is None:
                return False
            digest.update(raw)
    return digest.hexdigest() == manifest.checksum


def discard_batches(client: redis.Redis, campaign_id: str, count: int) -> None:
    """Delete batches 0..count-1 of a plan that failed before its manifest was written."""
    for start in range(0, count, WRITE_CHUNK):
        client.delete(*[keys.batch(campaign_id, n) for n in range(start, min(count, start + WRITE_CHUNK))])


def expire_snapshot(client: redis.Redis, campaign_id: str, count: int, ttl_ms: int) -> None:
    """Make the manifest and batches 0..count-1 expire ``ttl_ms`` from now.

    Relative, never absolute: the instant is the caller's clock (injected in the planner) while
    Redis expires keys by its own; a relative TTL means the same thing on both."""
    ttl_ms = max(1000, ttl_ms)
    pipe = client.pipeline(transaction=False)
    pipe.pexpire(keys.manifest(campaign_id), ttl_ms)
    for n in range(count):
        pipe.pexpire(keys.batch(campaign_id, n), ttl_ms)
        if len(pipe) >= 1_000:
            pipe.execute()
    pipe.execute()


def extend_retention(client: redis.Redis, campaign_id: str, seconds: float) -> float:
    """Keep a campaign's snapshot until ``seconds`` from now (never shortens it); returns the
    new expiry (epoch seconds). The engine calls this when a campaign ends, with
    ``settings.retention_s``. Raises CampaignNotFound when the snapshot is already gone."""
    manifest = load_manifest(client, campaign_id)
    target = time.time() + seconds
    current = float(manifest.expires_at or 0.0)
    if target <= current:
        return current
    client.set(keys.manifest(campaign_id), manifest.replace(expires_at=target).encode(), xx=True, keepttl=True)
    expire_snapshot(client, campaign_id, manifest.batches, int(seconds * 1000))
    return target
