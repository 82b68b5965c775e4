"""The planner: audience in, frozen snapshot + batches + prediction out.

Planning streams the audience once. Every row is either accepted or rejected with one reason
(written with its row number to ``<home>/plans/<campaign>.rejected.csv``, never with the raw
address), so ``total == accepted + sum(rejected.values())`` always holds. The checks, in order:

1. the row itself (``malformed_row``, ``bad_encoding``, ``missing_column``, ``field_too_large``:
   see ``dispatch.audience``);
2. the channel's address (``missing_address``, ``invalid_phone``, ``not_sms_capable``, ...);
3. consent for the channel (``no_consent``; ``CampaignSpec.require_consent``);
4. freshness (``stale``, ``stale_missing``, ``stale_future``) when the campaign sets
   ``max_staleness``; a source whose watermark is itself too old fails the plan (PlanError);
5. the recipient's local time (``unknown_timezone``; see ``CampaignSpec.require_timezone``);
6. dedup (``duplicate``): one message per normalized address per campaign;
7. suppression (``suppressed``): the channel's opt-out list and the global blocklist;
8. frequency cap (``frequency_capped``): sends already recorded inside the rolling window.

Steps 1-5 run per row in ``dispatch.planner_csv.RowScanner`` (for a large CSV file, in worker
processes over byte ranges); steps 6-8 run here over its chunks in row order: dedup in a compact
fingerprint set, suppression and frequency cap as batched Redis lookups (``CHECK_CHUNK`` addresses
per round trip). The rejected file lists rows in row order.

Quiet hours do not reject anyone: a recipient outside their allowed local window gets a later
``not_before``. Accepted recipients are grouped into batches by ``not_before`` (batches never mix
two instants), numbered in time order, and the prediction walks that schedule, so quiet-hour gaps
are part of the predicted finish. Batches due now are written to Redis as they fill; later ones
are spilled to a temporary file and written after them.

Template fields: every ``$field`` of the body must be a column of the source (checked against a
CSV header before anything is read) and present in at least one row; otherwise the plan fails
with PlanError and whatever was written is removed. A row without the field renders it empty.

Planning a campaign id again returns the existing plan when the spec is the same, and refuses a
different spec under the same id. Snapshot lifetime: see ``dispatch.snapshot``.
"""

from __future__ import annotations

import csv
import hashlib
import os
import tempfile
import time
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import chain, islice, repeat
from pathlib import Path
from typing import IO, Any, Final

import orjson
import redis

from channels.sms import segments
from dispatch import keys
from dispatch.audience import (
    ColumnMap,
    ReadLimits,
    Recipient,
    RowRejected,
    from_records,
    read_audience,
    read_header,
)
from dispatch.campaign import CampaignSpec
from dispatch.checks import (
    FreshnessPolicy,
    Reason,
    require_fresh_source,
)
from dispatch.config import Settings
from dispatch.errors import PlanError
from dispatch.frequency import FrequencyCap, FrequencyStore
from dispatch.planner_csv import CHUNK_ROWS, Chunk, RowScanner, ScanConfig, scan_csv_file
from dispatch.prediction import Capacity, cpu_costs, predict
from dispatch.snapshot import Row, SnapshotWriter, discard_batches, expire_snapshot, load_manifest
from dispatch.suppression import AddressHasher, SuppressionStore
from dispatch.validation import ADDRESS_FIELD, AddressValidator

__all__ = ["FingerprintSet", "PlanReport", "Planner", "read_csv_rows"]

#: Most recipients per request of each channel's provider API (per-message APIs use the setting).
PROVIDER_BATCH_LIMITS = {"email": 1000}
#: Addresses per suppression / frequency-cap round trip.
CHECK_CHUNK: Final = 1_000
#: Distinct rendered bodies whose SMS segment count is remembered.
_SEGMENT_CACHE: Final = 65_536


@dataclass(frozen=True, kw_only=True)
class PlanReport:
    campaign_id: str
    total: int
    accepted: int
    rejected: dict[str, int]
    batches: int
    cost_units: int
    prediction: dict[str, Any]
    rejected_file: str | None
    existing: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "campaign_id": self.campaign_id,
            "total": self.total,
            "accepted": self.accepted,
            "rejected": dict(self.rejected),
            "batches": self.batches,
            "cost_units": self.cost_units,
            "prediction": self.prediction,
            "rejected_file": self.rejected_file,
            "existing": self.existing,
        }


AudienceRow = Recipient | RowRejected


def read_csv_rows(path: Path) -> Iterator[AudienceRow]:
    """Stream an audience file (CSV or JSONL, optionally gzip) in bounded memory."""
    return read_audience(path)


def as_audience(rows: Iterable[AudienceRow | Mapping[str, Any]]) -> Iterator[AudienceRow]:
    """Accept parsed rows as they are and plain mappings (the Python iterable API) via ``from_records``."""
    iterator = iter(rows)
    for first in iterator:
        if isinstance(first, Recipient | RowRejected):
            yield first
            yield from iterator  # type: ignore[misc]
        else:
            yield from from_records(chain([first], iterator))  # type: ignore[arg-type]
        return


class FingerprintSet:
    """An exact set of 64-bit fingerprints in open-addressed ``array('Q')`` shards.

    About 11-21 bytes per member (load factor 0.375-0.75), against ~70 for a Python ``set`` of
    8-byte ``bytes``: 10 million distinct addresses fit in ~150 MiB. Shards grow one at a time,
    so a resize never needs more than 1/64 of the memory on top. Two addresses share a
    fingerprint with probability ~n^2/2^64 (a few in a million for 10 million): the cost of
    such a collision is one recipient wrongly counted as a duplicate.
    """

    _SHARD_BITS: Final = 6

    def __init__(self) -> None:
        shards = 1 << self._SHARD_BITS
        self._tables = [array("Q", [0]) * 1024 for _ in range(shards)]
        self._counts = [0] * shards
        self.size = 0

    def add(self, fingerprint: int) -> bool:
        """Add a 64-bit value; False when it was already there."""
        fp = fingerprint | 1  # 0 marks an empty slot
        shard = fp >> (64 - self._SHARD_BITS)
        table = self._tables[shard]
        mask = len(table) - 1
        i = (fp >> 1) & mask
        while True:
            value = table[i]
            if value == 0:
                break
            if value == fp:
                return False
            i = (i + 1) & mask
        table[i] = fp
        count = self._counts[shard] + 1
        self._counts[shard] = count
        self.size += 1
        if count * 4 > len(table) * 3:
            self._grow(shard)
        return True

    def add_all(self, values: Iterable[int]) -> bytearray:
        """:meth:`add` for each value in order; a flag per value (1: new, 0: already there)."""
        out = bytearray()
        flag = out.append
        tables, counts, bits = self._tables, self._counts, 64 - self._SHARD_BITS
        added = 0
        for value in values:
            fp = value | 1
            shard = fp >> bits
            table = tables[shard]
            mask = len(table) - 1
            i = (fp >> 1) & mask
            while True:
                slot = table[i]
                if slot == 0:
                    break
                if slot == fp:
                    break
                i = (i + 1) & mask
            if slot == fp:
                flag(0)
                continue
            table[i] = fp
            flag(1)
            added += 1
            count = counts[shard] + 1
            counts[shard] = count
            if count * 4 > len(table) * 3:
                self._grow(shard)
        self.size += added
        return out

    def _grow(self, shard: int) -> None:
        old = self._tables[shard]
        table = array("Q", [0]) * (len(old) * 2)
        mask = len(table) - 1
        for fp in old:
            if fp:
                i = (fp >> 1) & mask
                while table[i]:
                    i = (i + 1) & mask
                table[i] = fp
        self._tables[shard] = table

    @property
    def nbytes(self) -> int:
        return sum(t.itemsize * len(t) for t in self._tables)


class _Rejects:
    """The rejected-rows file and the counts by reason."""

    def __init__(self, handle: IO[str]) -> None:
        self.counts: Counter[str] = Counter()
        self._write = csv.writer(handle).writerow
        self._write(["row", "recipient_id", "field", "reason"])

        self._write_many = csv.writer(handle).writerows

    def add(self, row: int, rid: str, field_name: str, reason: str) -> None:
        self.counts[reason] += 1
        self._write([row, rid, field_name, reason])

    def add_many(self, rows: list[tuple[int, str, str, str]]) -> None:
        """Rejections as (row, recipient id, field, reason) tuples, written in the given order."""
        self.counts.update(row[3] for row in rows)
        self._write_many(rows)


class _Schedule:
    """Accepted recipients grouped into batches by ``not_before``, written in time order.

    Rows arrive encoded, without their closing bracket (see ``dispatch.planner_csv.Chunk``). Batches due at ``now`` (the
    earliest possible instant) go to the snapshot as they fill; batches for later instants are
    spilled to a temporary file and written after them.
    """

    def __init__(self, writer: SnapshotWriter, now: float, size: int, spill_dir: Path) -> None:
        self._writer = writer
        self._now = now
        self._size = size
        self._spill_dir = spill_dir
        self._spill: IO[bytes] | None = None
        self._spilled: list[tuple[float, int, int, int]] = []  # (not_before, offset, length, n)
        self._pending: dict[float, list[bytes]] = {}
        self.batches: list[tuple[float, int]] = []  # (not_before, n) in batch-number order

    def add(self, not_before: float, row: Row) -> None:
        self.add_encoded(not_before, orjson.dumps(row)[:-1])

    def add_encoded(self, not_before: float, row: bytes) -> None:
        rows = self._pending.get(not_before)
        if rows is None:
            rows = self._pending[not_before] = []
        rows.append(row)
        if len(rows) >= self._size:
            del self._pending[not_before]
            self._emit(not_before, rows)

    def _emit(self, not_before: float, rows: list[bytes]) -> None:
        data = b"[" + b"],".join(rows) + b"]]"
        if not_before <= self._now:
            self._writer.add_encoded(not_before, data)
            self.batches.append((not_before, len(rows)))
            return
        if self._spill is None:
            self._spill = tempfile.TemporaryFile(dir=self._spill_dir, prefix="plan-spill-")  # noqa: SIM115
        offset = self._spill.seek(0, os.SEEK_END)
        self._spill.write(data)
        self._spilled.append((not_before, offset, len(data), len(rows)))

    def finish(self) -> None:
        for not_before in sorted(self._pending):
            rows = self._pending.pop(not_before)
            self._emit(not_before, rows)
        spill = self._spill
        if spill is not None:
            for not_before, offset, length, n in sorted(self._spilled, key=lambda s: (s[0], s[1])):
                spill.seek(offset)
                self._writer.add_encoded(not_before, spill.read(length))
                self.batches.append((not_before, n))
            spill.close()
        self._writer.flush()

    def close(self) -> None:
        if self._spill is not None:
            self._spill.close()


def _config_hash(settings: Settings, size: int, cap: FrequencyCap | None, region: str | None) -> str:
    data = {
        "batch_size": size,
        "sms_rate": settings.sms_rate,
        "workers": settings.workers,
        "worker_threads": settings.worker_threads,
        "send_concurrency": settings.send_concurrency,
        "provider_latency_ms": settings.provider_latency_ms,
        "cpu_per_message_us": settings.cpu_per_message_us,
        "retention_s": settings.retention_s,
        "frequency_cap": [cap.limit, cap.window.total_seconds()] if cap else None,
        "default_region": region,
    }
    return hashlib.sha256(orjson.dumps(data, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


class Planner:
    """Builds campaign snapshots. One instance per process; it holds no campaign state.

    Plan-time Redis checks are switched on by what is passed in (explicit construction):
    ``suppression``: the opt-out store to consult (None: no plan-time suppression check; the send
    path re-checks anyway); ``frequency_cap`` (or a ready ``frequency`` store): the cross-campaign
    cap (None: none). Both must hash addresses the same way (``hasher``, default: the
    suppression store's). :meth:`with_redis_checks` builds a planner with both on.
    """

    def __init__(
        self,
        client: redis.Redis,
        settings: Settings,
        *,
        default_region: str | None = None,
        frequency_cap: FrequencyCap | None = None,
        hasher: AddressHasher | None = None,
        suppression: SuppressionStore | None = None,
        frequency: FrequencyStore | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._client = client
        self._settings = settings
        self._region = default_region
        self._validator = AddressValidator(default_region)
        self._hasher = hasher or (suppression.hasher if suppression is not None else AddressHasher())
        self._suppression = suppression
        if frequency is None and frequency_cap is not None:
            frequency = FrequencyStore(client, frequency_cap, hasher=self._hasher)
        self._frequency = frequency
        for store in (suppression, frequency):
            if store is not None and store.hasher != self._hasher:
                raise ValueError("the suppression and frequency stores must hash addresses the same way")
        self._clock = clock
        self._segments: dict[str, int] = {}

    @classmethod
    def for_settings(cls, client: redis.Redis, settings: Settings, *, default_region: str | None = None) -> Planner:
        """The deployment's planner: suppression lists, and the frequency cap when configured,
        checked with the deployment's address hasher (the same one the workers use)."""
        from dispatch.suppression import hasher_for

        cap = None
        if settings.frequency_limit > 0:
            cap = FrequencyCap(limit=settings.frequency_limit, window=timedelta(seconds=settings.frequency_window_s))
        return cls.with_redis_checks(
            client, settings, frequency_cap=cap, hasher=hasher_for(settings), default_region=default_region
        )

    @classmethod
    def with_redis_checks(
        cls,
        client: redis.Redis,
        settings: Settings,
        *,
        frequency_cap: FrequencyCap | None = None,
        hasher: AddressHasher | None = None,
        default_region: str | None = None,
    ) -> Planner:
        """A planner that checks the suppression lists (default key prefix) and, when given,
        the frequency cap at plan time."""
        return cls(
            client,
            settings,
            default_region=default_region,
            frequency_cap=frequency_cap,
            hasher=hasher,
            suppression=SuppressionStore(client, hasher=hasher),
        )

    def capacity(self, spec: CampaignSpec) -> Capacity:
        s = self._settings
        machine_cpu, worker_cpu = cpu_costs(spec.channel, s.cpu_per_message_us / 1e6)
        return Capacity(
            processes=s.workers,
            inflight_per_process=min(s.send_concurrency, s.worker_threads * self.batch_size(spec)),
            latency_s=s.provider_latency_ms / 1000.0,
            provider_rate=(s.sms_rate or None) if spec.channel == "sms" else None,
            campaign_rate=spec.rate,
            cpu_per_message_s=machine_cpu,
            worker_cpu_per_message_s=worker_cpu,
        )

    def batch_size(self, spec: CampaignSpec) -> int:
        size = spec.batch_size or self._settings.batch_size
        return min(size, PROVIDER_BATCH_LIMITS.get(spec.channel, size))

    def plan_file(
        self,
        spec: CampaignSpec,
        path: Path,
        *,
        columns: ColumnMap | None = None,
        delimiter: str = ",",
        processes: int | None = None,
    ) -> PlanReport:
        """Plan from a CSV or JSONL file (optionally gzip); a CSV header is checked against the
        template before any row is read. A large plain CSV file is scanned by ``processes``
        worker processes (default: one per CPU; see ``dispatch.planner_csv``)."""
        if self._client.exists(keys.manifest(spec.id)):
            return self.plan(spec, [])
        cols = columns or ColumnMap()
        header = read_header(path, delimiter=delimiter)
        if header is not None:
            available = set(cols.attribute_columns(header)) & set(header)
            missing = [f for f in spec.template_fields if f not in available]
            if missing:
                raise PlanError(
                    f"campaign {spec.id}: the body uses ${', $'.join(missing)} but the audience has no such "
                    f"column (it has: {', '.join(sorted(available)) or 'none'})"
                )

            def csv_chunks(config: ScanConfig) -> Iterator[tuple[int, Chunk]]:
                base = 0
                for chunk in scan_csv_file(config, path, processes=processes):
                    yield base, chunk
                    base += chunk.total

            return self._plan(spec, csv_chunks, cols, delimiter)
        return self.plan(spec, read_audience(path, columns=cols, delimiter=delimiter))

    def plan(self, spec: CampaignSpec, rows: Iterable[AudienceRow | Mapping[str, Any]]) -> PlanReport:
        def item_chunks(config: ScanConfig) -> Iterator[tuple[int, Chunk]]:
            scanner = RowScanner(config, validator=self._validator)
            items = as_audience(rows)
            while True:
                part = list(islice(items, CHUNK_ROWS))
                if not part:
                    return
                yield 0, scanner.scan_items(part)

        return self._plan(spec, item_chunks, ColumnMap(), ",")

    def _plan(
        self,
        spec: CampaignSpec,
        source: Callable[[ScanConfig], Iterator[tuple[int, Chunk]]],
        columns: ColumnMap,
        delimiter: str,
    ) -> PlanReport:
        existing = self._client.get(keys.manifest(spec.id))
        if existing is not None:
            manifest = orjson.loads(existing)
            if manifest["fingerprint"] != spec.fingerprint():
                raise PlanError(
                    f"campaign {spec.id!r} was already planned with a different spec; use a new campaign id"
                )
            return self._report(manifest, existing=True)
        if spec.channel not in ADDRESS_FIELD:
            raise PlanError(f"campaign {spec.id}: channel {spec.channel!r} has no address field")

        started = self._clock()
        now = datetime.fromtimestamp(started, UTC)
        as_of = spec.as_of or now
        freshness = FreshnessPolicy(max_staleness=spec.max_staleness) if spec.max_staleness else None
        if freshness is not None:
            require_fresh_source(as_of, now, freshness)
        config = ScanConfig(
            channel=spec.channel,
            region=self._region,
            hash_key=self._hasher.key,
            started=now,
            as_of=as_of,
            freshness=freshness,
            quiet_hours=spec.quiet_hours,
            default_timezone=spec.default_timezone,
            require_timezone=spec.require_timezone,
            require_consent=spec.require_consent,
            template_fields=tuple(spec.template_fields),
            body=spec.body,
            columns=columns,
            limits=ReadLimits(),
            delimiter=delimiter,
        )

        size = self.batch_size(spec)
        writer = SnapshotWriter(self._client, spec.id, ttl_s=self._settings.retention_s)
        plans_dir = self._settings.home / "plans"
        plans_dir.mkdir(parents=True, exist_ok=True)
        rejected_path = plans_dir / f"{spec.id}.rejected.csv"
        schedule = _Schedule(writer, started, size, plans_dir)
        try:
            with rejected_path.open("w", newline="", encoding="utf-8") as handle:
                rejects = _Rejects(handle)
                total, accepted, cost_units, unseen = self._merge(spec, source(config), rejects, schedule, started)
                if unseen:
                    raise PlanError(
                        f"campaign {spec.id}: the body uses ${', $'.join(sorted(unseen))} but no recipient row "
                        "has a value for it"
                    )
                schedule.finish()
        except BaseException:
            schedule.close()
            discard_batches(self._client, spec.id, writer.batches)
            raise

        deadline = spec.deadline.timestamp() if spec.deadline else None
        prediction = predict(
            schedule=schedule.batches,
            cost_units=cost_units,
            capacity=self.capacity(spec),
            start=started,
            deadline=deadline,
        )
        retention = self._settings.retention_s
        expires_at = max(prediction.finish, deadline or 0.0) + retention
        cap = self._frequency.cap if self._frequency else None
        manifest = {
            "campaign_id": spec.id,
            "fingerprint": spec.fingerprint(),
            "channel": spec.channel,
            "body": spec.body,
            "subject": spec.subject,
            "rate": spec.rate,
            "deadline": deadline,
            "total": total,
            "accepted": accepted,
            "rejected": dict(rejects.counts),
            "batches": writer.batches,
            "batch_size": size,
            "cost_units": cost_units,
            "checksum": writer.checksum,
            "snapshot_bytes": writer.bytes,
            "created_at": started,
            "watermark": as_of.timestamp(),
            "policy": {
                **spec.policy(),
                "frequency_cap": {"limit": cap.limit, "window_s": cap.window.total_seconds()} if cap else None,
            },
            "config_hash": _config_hash(self._settings, size, cap, self._region),
            "schedule": _schedule_summary(schedule.batches),
            "expires_at": expires_at,
            "prediction": prediction.as_dict(),
            "rejected_file": str(rejected_path),
        }
        ttl_ms = max(1000, int((expires_at - self._clock()) * 1000))
        if not self._client.set(keys.manifest(spec.id), orjson.dumps(manifest), nx=True, px=ttl_ms):
            discard_batches(self._client, spec.id, writer.batches)
            raise PlanError(f"campaign {spec.id!r} was planned concurrently by another process")
        expire_snapshot(self._client, spec.id, writer.batches, expires_at)
        self._client.zadd(keys.CAMPAIGNS, {spec.id: started})
        return self._report(manifest, existing=False)

    def _merge(
        self,
        spec: CampaignSpec,
        chunks: Iterator[tuple[int, Chunk]],
        rejects: _Rejects,
        schedule: _Schedule,
        started: float,
    ) -> tuple[int, int, int, set[str]]:
        """Steps 6-8 over scanned chunks in row order; returns (total, accepted, cost units,
        template fields never seen). ``chunks`` yields (row offset, chunk)."""
        channel = spec.channel
        field_name = ADDRESS_FIELD[channel]
        unseen = set(spec.template_fields)
        seen = FingerprintSet()
        duplicate, suppressed = str(Reason.DUPLICATE), str(Reason.SUPPRESSED)
        frequency_capped = str(Reason.FREQUENCY_CAPPED)
        total = accepted = cost_units = 0
        add_encoded = schedule.add_encoded
        for base, chunk in chunks:
            total += chunk.total
            rows, ids, encoded, hashes = chunk.rows, chunk.ids, chunk.encoded, chunk.hashes
            refused = [(base + r[0], r[1], r[2], r[3]) for r in chunk.rejects] if base else chunk.rejects
            fresh = seen.add_all(chunk.fingerprints)
            keep = [i for i, new in enumerate(fresh) if new]
            if len(keep) != len(fresh):
                refused.extend(
                    (base + rows[i], ids[i], field_name, duplicate) for i, new in enumerate(fresh) if not new
                )
            if unseen:
                for i in keep:
                    attrs = orjson.loads(encoded[i] + b"]")[2]
                    unseen.difference_update([k for k in unseen if attrs.get(k)])
                    if not unseen:
                        break
            not_before, cost = chunk.not_before, chunk.cost
            for start in range(0, len(keep), CHECK_CHUNK):
                window = keep[start : start + CHECK_CHUNK]
                digests = [hashes[16 * i : 16 * i + 16] for i in window]
                blocked = (
                    self._suppression.contains_hashes(channel, digests)
                    if self._suppression is not None
                    else repeat(False)
                )
                capped = (
                    self._frequency.capped_hashes(channel, digests, now=started)
                    if self._frequency is not None
                    else repeat(False)
                )
                for i, is_blocked, is_capped in zip(window, blocked, capped):  # noqa: B905 - repeat() is endless
                    if is_blocked:
                        refused.append((base + rows[i], ids[i], field_name, suppressed))
                    elif is_capped:
                        refused.append((base + rows[i], ids[i], field_name, frequency_capped))
                    else:
                        accepted += 1
                        cost_units += cost[i]
                        add_encoded(not_before[i], encoded[i])
            if refused:
                refused.sort()
                rejects.add_many(refused)
        return total, accepted, cost_units, unseen if seen.size else set()

    def _cost(self, body: str) -> int:
        cached = self._segments.get(body)
        if cached is None:
            cached = segments(body)
            if len(self._segments) < _SEGMENT_CACHE:
                self._segments[body] = cached
        return cached

    def _report(self, manifest: dict[str, Any], *, existing: bool) -> PlanReport:
        return PlanReport(
            campaign_id=manifest["campaign_id"],
            total=manifest["total"],
            accepted=manifest["accepted"],
            rejected=manifest["rejected"],
            batches=manifest["batches"],
            cost_units=manifest["cost_units"],
            prediction=manifest["prediction"],
            rejected_file=manifest.get("rejected_file"),
            existing=existing,
            extra={k: manifest.get(k) for k in ("schedule", "watermark", "policy", "expires_at", "config_hash")},
        )

    def manifest(self, campaign_id: str) -> dict[str, Any]:
        return load_manifest(self._client, campaign_id)


def _schedule_summary(batches: list[tuple[float, int]]) -> list[dict[str, float | int]]:
    """Recipients and batches per distinct not-before instant, in time order."""
    groups: dict[float, list[int]] = {}
    for not_before, n in batches:
        group = groups.setdefault(not_before, [0, 0])
        group[0] += n
        group[1] += 1
    return [{"not_before": nb, "recipients": g[0], "batches": g[1]} for nb, g in sorted(groups.items())]
