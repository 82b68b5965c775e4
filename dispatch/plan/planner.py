"""The planner: audience in, frozen snapshot + batches + prediction out.

Planning streams the audience once. Every row is either accepted or rejected with one reason
(written with its row number to ``<home>/plans/<campaign>.rejected.csv``, never with the raw
address), so ``total == accepted + sum(rejected.values())`` always holds. The checks, in order:

1. the row itself (``malformed_row``, ``bad_encoding``, ``missing_column``, ``field_too_large``:
   see ``dispatch.plan.audience``);
2. the channel's address (``missing_address``, ``invalid_phone``, ``not_sms_capable``, ...); a
   phone number without ``+`` is read in the recipient's own region, else the campaign's
   (``CampaignSpec.region``, else the planner's ``default_region``); the numbers that failed for
   want of a region are counted, and the report's ``extra["hints"]`` says what to set;
3. consent for the channel (``no_consent``; ``CampaignSpec.require_consent``);
4. freshness (``stale``, ``stale_missing``, ``stale_future``) when the campaign sets
   ``max_staleness``; a source whose watermark is itself too old fails the plan (PlanError);
5. the recipient's local time (``unknown_timezone``; see ``CampaignSpec.require_timezone``);
6. repeated recipient ids (``duplicate_id``): the first row with an id is kept, a later row with
   that id is refused (an id is the idempotency key of its message: two rows with one id would
   share one send record);
7. dedup (``duplicate``): one message per normalized address per campaign;
8. suppression (``suppressed``): the channel's opt-out list and the global blocklist;
9. frequency cap (``frequency_capped``): sends already recorded inside the rolling window.

Steps 1-5 run per row in ``dispatch.plan.csv_scan.RowScanner`` (for a large CSV file, in worker
processes over byte ranges); steps 6-9 run here over its chunks in row order: both dedups in
compact fingerprint sets that spill to disk together (``dispatch.plan.dedup``), suppression and
frequency cap as batched Redis lookups (``CHECK_CHUNK`` addresses per round trip). The rejected
file lists rows in row order, each cell made safe for spreadsheets (``dispatch.csvsafe``), each
text cell cut at ``REJECT_CELL_CHARS`` characters, and stops listing (still counting) past the
``plan_max_rejected_file_bytes`` setting. A plan reads at most ``plan_max_rows`` rows.

An audience without rows, or a CSV file without the channel's address column, fails the plan
(PlanError) and freezes nothing.

Quiet hours do not reject anyone: a recipient outside their allowed local window gets a later
``not_before``. Accepted recipients are grouped into batches by ``not_before`` (batches never mix
two instants), numbered in time order, and the prediction walks that schedule, so quiet-hour gaps
are part of the predicted finish. Batches due now are written to Redis as they fill; later ones
are spilled to a temporary file and written after them.

Template fields: every ``$field`` of the body must be a column of the source (checked against a
CSV header before anything is read) and present in at least one row; otherwise the plan fails
with PlanError and whatever was written is removed. A row without the field renders it empty.

Batches are staged and the plan commits with its manifest (``dispatch.plan.snapshot``): a plan that
fails, or a planner that dies, leaves nothing a reader sees and never blocks planning the id again.

Planning a campaign id again returns the existing plan (``existing=True``) when the spec and the
audience are the same, and refuses a different spec or a different audience under the same id
(PlanError). "The same audience" is the manifest's ``audience_digest``: a hash of what steps 1-5
make of every row (each rejection with its row number, each candidate's snapshot row), so it
does not depend on the planning time, the source's format or how the file was cut; a re-plan
therefore reads the audience again (without writing anything). A freshness policy without
``as_of`` judges rows against the planning time, so such a re-plan may see a different audience.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import heapq
import os
import pickle
import string
import struct
import tempfile
import time
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from itertools import chain, islice
from pathlib import Path
from typing import IO, Any, Final, cast

import orjson
import redis

from channels import default_registry
from dispatch.campaign import CampaignSpec
from dispatch.config import Settings
from dispatch.csvsafe import safe_cell
from dispatch.engage.links import plan_links
from dispatch.errors import PlanError
from dispatch.plan.audience import (
    ColumnMap,
    ReadLimits,
    Recipient,
    RowRejected,
    from_records,
    read_audience,
    read_header,
)
from dispatch.plan.calibration import FACTOR_RANGE, SPEED_MATTERS_S, Speed, busy_cores, measure_speed
from dispatch.plan.csv_scan import CHUNK_ROWS, Chunk, RowScanner, ScanConfig, scan_csv_file
from dispatch.plan.dedup import DEDUP_MEMORY_BYTES, Candidates, Dedup
from dispatch.plan.evidence import EvidenceStore, evidence_speed, provider_of
from dispatch.plan.manifest import Manifest
from dispatch.plan.prediction import Capacity, cpu_costs, predict, speed_shift
from dispatch.plan.snapshot import Row, SnapshotWriter, decode_open_row, encode_open_row, load_manifest
from dispatch.rules.checks import (
    FreshnessPolicy,
    Reason,
    require_fresh_source,
)
from dispatch.rules.frequency import FrequencyCap, FrequencyStore
from dispatch.rules.suppression import AddressHasher, SuppressionStore
from dispatch.rules.validation import ADDRESS_FIELD, AddressValidator
from dispatch.store import keys

__all__ = ["PlanReport", "Planner", "read_csv_rows"]

#: Most recipients per request of each channel's provider API (per-message APIs use the setting),
#: from the registry (``Registry.batch_limit``).
PROVIDER_BATCH_LIMITS: Final = default_registry().batch_limits()
#: Addresses per suppression / frequency-cap round trip.
CHECK_CHUNK: Final = 1_000
#: Rejections per piece of a rejection run (a merge of runs holds one piece of each in memory).
_RUN_PIECE: Final = 512
#: Manifest fields a plan report carries beside the counts.
_REPORT_EXTRA: Final = (
    "schedule",
    "watermark",
    "policy",
    "expires_at",
    "config_hash",
    "dedup",
    "rejected_unlisted",
)
#: Characters of a text cell written to the rejected file (an id or a column name).
REJECT_CELL_CHARS: Final = 256


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


Rejection = tuple[int, str, str, str]  # (row, recipient id, field, reason)


class _Rejects:
    """The rejected-rows file and the counts by reason.

    Every rejection is counted; it is listed while the file is under ``max_bytes``, its text
    cells made safe (:func:`_listed`). :attr:`unlisted` counts those past the cap."""

    def __init__(self, handle: IO[str], max_bytes: int) -> None:
        self.counts: Counter[str] = Counter()
        self.unlisted = 0
        self._handle = handle
        self._max = max_bytes
        writer = csv.writer(handle)
        self._write_many = writer.writerows
        writer.writerow(["row", "recipient_id", "field", "reason"])

    def add(self, row: int, rid: str, field_name: str, reason: str) -> None:
        self.add_many([(row, rid, field_name, reason)])

    def add_many(self, rows: list[Rejection]) -> None:
        """Rejections written in the given order."""
        self.counts.update(row[3] for row in rows)
        self._list(iter(rows))

    def add_merged(self, runs: list[_RejectRun]) -> None:
        """The rows of ``runs`` (each in row order) merged into one row order."""
        for run in runs:
            self.counts.update(run.counts)
        self._list(heapq.merge(*(run.read() for run in runs), key=_row_of))

    def _list(self, rows: Iterator[Rejection]) -> None:
        while True:
            piece = list(islice(rows, _RUN_PIECE))
            if not piece:
                return
            if self.unlisted or self._handle.tell() >= self._max:
                self.unlisted += len(piece) + sum(1 for _ in rows)
                return
            self._write_many(_listed(piece))


def _listed(rows: list[Rejection]) -> list[Rejection]:
    """Rejections as written: text cells cut at :data:`REJECT_CELL_CHARS` and safe to open in a
    spreadsheet (``dispatch.csvsafe``)."""
    out = rows
    for i, (row, rid, field_name, reason) in enumerate(rows):
        safe_id = safe_cell(rid[:REJECT_CELL_CHARS])
        safe_field = safe_cell(field_name[:REJECT_CELL_CHARS])
        if safe_id is not rid or safe_field is not field_name:
            if out is rows:
                out = list(rows)
            out[i] = (row, safe_id, safe_field, reason)
    return out


def _row_of(rejection: Rejection) -> int:
    return rejection[0]


class _RejectRun:
    """Rejections in row order kept in a temporary file until they are merged."""

    def __init__(self, spill_dir: Path) -> None:
        self.counts: Counter[str] = Counter()
        self._file = tempfile.TemporaryFile(dir=spill_dir, prefix="plan-rejects-")  # noqa: SIM115

    def add_many(self, rows: list[Rejection]) -> None:
        self.counts.update(row[3] for row in rows)
        for start in range(0, len(rows), _RUN_PIECE):  # a merge holds one piece per run
            pickle.dump(rows[start : start + _RUN_PIECE], self._file, protocol=pickle.HIGHEST_PROTOCOL)

    def read(self) -> Iterator[Rejection]:
        self._file.seek(0)
        while True:
            try:
                rows: list[Rejection] = pickle.load(self._file)
            except EOFError:
                return
            yield from rows

    def close(self) -> None:
        self._file.close()


class _Schedule:
    """Accepted recipients grouped into batches by ``not_before``, written in time order.

    Rows arrive encoded, without their closing bracket (see ``dispatch.plan.csv_scan.Chunk``).
    Batches due at ``now`` (the earliest possible instant) go to the snapshot as they fill;
    batches for later instants are spilled to a temporary file (length and size header, then the
    batch) and written after them. Memory: one partial batch per distinct instant and 8 bytes per
    spilled batch; :attr:`runs` holds one entry per instant, whatever the audience size.
    """

    _HEADER: Final = struct.Struct("<qq")  # (length, recipients)

    def __init__(self, writer: SnapshotWriter, now: float, size: int, spill_dir: Path) -> None:
        self._writer = writer
        self._now = now
        self._size = size
        self._spill_dir = spill_dir
        self._spill: IO[bytes] | None = None
        self._spilled: dict[float, array[int]] = {}  # not_before -> offsets of its batches
        self._pending: dict[float, list[bytes]] = {}
        #: [not_before, recipients, batches] per run of batches at one instant, in batch-number order.
        self.runs: list[list[float]] = []

    def add(self, not_before: float, row: Row) -> None:
        self.add_encoded(not_before, encode_open_row(row))

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
            self._write(not_before, data, len(rows))
            return
        if self._spill is None:
            self._spill = tempfile.TemporaryFile(dir=self._spill_dir, prefix="plan-spill-")  # noqa: SIM115
        offset = self._spill.seek(0, os.SEEK_END)
        self._spill.write(self._HEADER.pack(len(data), len(rows)))
        self._spill.write(data)
        offsets = self._spilled.get(not_before)
        if offsets is None:
            offsets = self._spilled[not_before] = array("q")
        offsets.append(offset)

    def _write(self, not_before: float, data: bytes, n: int) -> None:
        self._writer.add_encoded(not_before, data)
        runs = self.runs
        if runs and runs[-1][0] == not_before:
            runs[-1][1] += n
            runs[-1][2] += 1
        else:
            runs.append([not_before, n, 1])

    def finish(self) -> None:
        for not_before in sorted(self._pending):
            rows = self._pending.pop(not_before)
            self._emit(not_before, rows)
        spill = self._spill
        if spill is not None:
            header = self._HEADER
            for not_before in sorted(self._spilled):
                for offset in self._spilled.pop(not_before):
                    spill.seek(offset)
                    length, n = header.unpack(spill.read(header.size))
                    self._write(not_before, spill.read(length), n)
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
    suppression store's). :meth:`with_redis_checks` builds a planner with both on. ``speed``: how
    much slower than the reference the machines run now, asked only where it moves the predicted
    finish and only when this deployment's own recent sends of the channel left no evidence
    (:mod:`dispatch.plan.evidence`, always asked first) (default:
    :func:`dispatch.plan.calibration.measure_speed`, or factor 1 when the ``cpu_speed_probe``
    setting is off). ``load``: cores' worth of CPU other processes use now, asked where the speed
    is (default: :func:`dispatch.plan.calibration.busy_cores`; 0 with the probe off or ``speed`` given).
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
        dedup_memory_bytes: int = DEDUP_MEMORY_BYTES,
        speed: Callable[[], Speed] | None = None,
        load: Callable[[], float] | None = None,
    ) -> None:
        self._client = client
        self._speed = speed or (functools.partial(measure_speed, client) if settings.cpu_speed_probe else Speed.off)
        # an injected speed without a load: a test's fixed machine, not this one's load
        self._load = load or (busy_cores if settings.cpu_speed_probe and speed is None else _no_load)
        self._evidence = EvidenceStore(client)
        self._dedup_memory = dedup_memory_bytes
        self._settings = settings
        self._region = default_region
        #: One validator (and its phone caches) per region planned in (``CampaignSpec.region``).
        self._validators: dict[str | None, AddressValidator] = {}
        self._hasher = hasher or (suppression.hasher if suppression is not None else AddressHasher())
        self._suppression = suppression
        if frequency is None and frequency_cap is not None:
            frequency = FrequencyStore(client, frequency_cap, hasher=self._hasher)
        self._frequency = frequency
        for store in (suppression, frequency):
            if store is not None and store.hasher != self._hasher:
                raise ValueError("the suppression and frequency stores must hash addresses the same way")
        self._clock = clock

    @classmethod
    def for_settings(cls, client: redis.Redis, settings: Settings, *, default_region: str | None = None) -> Planner:
        """The deployment's planner: suppression lists, and the frequency cap when configured,
        checked with the deployment's address hasher (the same one the workers use)."""
        from dispatch.rules.suppression import check_suppression_key, hasher_for

        cap = None
        if settings.frequency_limit > 0:
            cap = FrequencyCap(limit=settings.frequency_limit, window=timedelta(seconds=settings.frequency_window_s))
        hasher = hasher_for(settings)
        check_suppression_key(client, hasher)
        return cls.with_redis_checks(client, settings, frequency_cap=cap, hasher=hasher, default_region=default_region)

    @classmethod
    def with_redis_checks(
        cls,
        client: redis.Redis,
        settings: Settings,
        *,
        frequency_cap: FrequencyCap | None = None,
        hasher: AddressHasher | None = None,
        default_region: str | None = None,
        dedup_memory_bytes: int = DEDUP_MEMORY_BYTES,
    ) -> Planner:
        """A planner that checks the suppression lists (default key prefix) and, when given,
        the frequency cap at plan time; ``hasher`` defaults to the deployment's."""
        from dispatch.rules.suppression import hasher_for

        hasher = hasher or hasher_for(settings)
        return cls(
            client,
            settings,
            default_region=default_region,
            dedup_memory_bytes=dedup_memory_bytes,
            frequency_cap=frequency_cap,
            hasher=hasher,
            suppression=SuppressionStore(client, hasher=hasher),
        )

    def measured_speed(self, channel: str) -> Speed:
        """The speed factor for ``channel``: from this deployment's recent sends when they left
        enough evidence (:mod:`dispatch.plan.evidence`), else the ``speed`` callable's (the probe)."""
        evidence = self._evidence.read(channel, provider_of(channel))
        if evidence is not None and evidence.usable(self._clock()):
            return evidence_speed(evidence, batch_api=channel in PROVIDER_BATCH_LIMITS)
        return self._speed()

    def capacity(self, spec: CampaignSpec, speed_factor: float = 1.0) -> Capacity:
        """What the workers can do for ``spec``, their CPU costs scaled by ``speed_factor``
        (:mod:`dispatch.plan.calibration`)."""
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
            batch_messages_in_flight=s.workers * s.worker_threads * self.batch_size(spec),
            channel=spec.channel,
            speed_factor=speed_factor,
        )

    def batch_size(self, spec: CampaignSpec) -> int:
        """Recipients per batch: the campaign's own size, else the provider's batch API limit
        (one request per batch), else the ``batch_size`` setting; never above the API limit."""
        limit = PROVIDER_BATCH_LIMITS.get(spec.channel)
        size = spec.batch_size or limit or self._settings.batch_size
        return min(size, limit or size)

    def plan_file(
        self,
        spec: CampaignSpec,
        path: Path,
        *,
        columns: ColumnMap | None = None,
        delimiter: str = ",",
        processes: int | None = None,
        lineage: Callable[[], dict[str, Any]] | None = None,
    ) -> PlanReport:
        """Plan from a CSV or JSONL file (optionally gzip); a CSV header is checked against the
        template and the channel's address column before any row is read. A large plain CSV
        file is scanned by ``processes`` worker processes (default: one per CPU; see
        ``dispatch.plan.csv_scan``). ``lineage``: as for :meth:`plan`."""
        cols = columns or ColumnMap()
        limits = self._limits()
        header = read_header(path, delimiter=delimiter, limits=limits)
        if header is not None:
            available = set(cols.attribute_columns(header)) & set(header)
            missing = [f for f in spec.template_fields if f not in available]
            if missing:
                raise PlanError(
                    f"campaign {spec.id}: the body uses ${', $'.join(missing)} but the audience has no such "
                    f"column (it has: {', '.join(sorted(available)) or 'none'})"
                )
            address = getattr(cols, ADDRESS_FIELD.get(spec.channel, ""), None)
            if address is None or address not in header:
                raise PlanError(
                    f"campaign {spec.id}: the audience has no {spec.channel} address column "
                    f"({address or 'none mapped'!r}; it has: {', '.join(header)})"
                )

            def csv_chunks(config: ScanConfig) -> Iterator[tuple[int, Chunk]]:
                base = 0
                for chunk in scan_csv_file(config, path, processes=processes):
                    yield base, chunk
                    base += chunk.total

            return self._plan(spec, csv_chunks, cols, delimiter, lineage=lineage)
        return self.plan(spec, read_audience(path, columns=cols, delimiter=delimiter, limits=limits), lineage=lineage)

    def plan(
        self,
        spec: CampaignSpec,
        rows: Iterable[AudienceRow | Mapping[str, Any]],
        *,
        lineage: Callable[[], dict[str, Any]] | None = None,
    ) -> PlanReport:
        """Plan from parsed rows or plain mappings (see the module docstring). ``lineage``: where
        a derived audience came from (``dispatch.rounds.derive``), asked once the rows are read and
        recorded in the manifest."""

        def item_chunks(config: ScanConfig) -> Iterator[tuple[int, Chunk]]:
            scanner = RowScanner(config, validator=self._validator(config.region))
            items = as_audience(rows)
            while True:
                part = list(islice(items, CHUNK_ROWS))
                if not part:
                    return
                yield 0, scanner.scan_items(part)

        return self._plan(spec, item_chunks, ColumnMap(), ",", lineage=lineage)

    def stored_plan(self, spec: CampaignSpec) -> PlanReport | None:
        """The committed plan of ``spec.id`` (``existing=True``) without reading any audience;
        None when there is none. Raises PlanError when it was planned with another spec."""
        raw = self._client.get(keys.manifest(spec.id))
        if raw is None:
            return None
        manifest = Manifest.decode(cast(bytes, raw), campaign_id=spec.id)
        self._same_spec(spec, manifest)
        return self._report(manifest, existing=True)

    @staticmethod
    def _same_spec(spec: CampaignSpec, manifest: Manifest) -> None:
        if manifest.fingerprint != spec.fingerprint():
            raise PlanError(f"campaign {spec.id!r} was already planned with a different spec; use a new campaign id")

    def _validator(self, region: str | None) -> AddressValidator:
        found = self._validators.get(region)
        if found is None:
            found = self._validators[region] = AddressValidator(region)
        return found

    def _limits(self) -> ReadLimits:
        s = self._settings
        return ReadLimits(max_decompressed_bytes=s.plan_max_decompressed_bytes, max_gzip_ratio=s.plan_max_gzip_ratio)

    def _plan(
        self,
        spec: CampaignSpec,
        source: Callable[[ScanConfig], Iterator[tuple[int, Chunk]]],
        columns: ColumnMap,
        delimiter: str,
        *,
        lineage: Callable[[], dict[str, Any]] | None = None,
    ) -> PlanReport:
        raw = self._client.get(keys.manifest(spec.id))
        stored = Manifest.decode(cast(bytes, raw), campaign_id=spec.id) if raw is not None else None
        if stored is not None:
            self._same_spec(spec, stored)
        if spec.channel not in ADDRESS_FIELD:
            raise PlanError(f"campaign {spec.id}: channel {spec.channel!r} has no address field")
        planned_links = plan_links(
            spec.body,
            channel=spec.channel,
            campaign_id=spec.id,
            base_url=self._settings.link_base_url or self._settings.callback_base_url,
        )
        _check_channel_limits(spec, planned_links.sized)

        now = datetime.fromtimestamp(self._clock(), UTC)
        started = now.timestamp()  # rounded as the scanner's not-before instants are: due-now batches stream
        as_of = spec.as_of or now
        freshness = FreshnessPolicy(max_staleness=spec.max_staleness) if spec.max_staleness else None
        region = spec.region or self._region  # the campaign's, else the planner's (``--region``)
        config = ScanConfig(
            channel=spec.channel,
            region=region,
            hash_key=self._hasher.key,
            started=now,
            as_of=as_of,
            freshness=freshness,
            quiet_hours=spec.quiet_hours,
            default_timezone=spec.default_timezone,
            require_timezone=spec.require_timezone,
            require_consent=spec.require_consent,
            template_fields=tuple(spec.template_fields),
            body=planned_links.sized,  # costs and length checks see tracked links at their sent length
            columns=columns,
            limits=self._limits(),
            delimiter=delimiter,
        )
        if stored is not None:
            return self._replan(spec, stored, source(config))
        if freshness is not None:
            require_fresh_source(as_of, now, freshness)

        size = self.batch_size(spec)
        writer = SnapshotWriter(self._client, spec.id)
        plans_dir = self._settings.home / "plans"
        plans_dir.mkdir(parents=True, exist_ok=True)
        rejected_path = plans_dir / f"{spec.id}.rejected.csv"
        schedule = _Schedule(writer, started, size, plans_dir)
        digest = _AudienceDigest()
        try:
            with rejected_path.open("w", newline="", encoding="utf-8") as handle:
                rejects = _Rejects(handle, self._settings.plan_max_rejected_file_bytes)
                national = _Tally()
                total, accepted, cost_units, unseen, deferred = self._merge(
                    spec, national.count(source(config)), rejects, schedule, started, spill_dir=plans_dir, digest=digest
                )
                if total == 0:
                    raise PlanError(f"campaign {spec.id}: the audience has no rows; nothing was planned")
                if unseen:
                    raise PlanError(
                        f"campaign {spec.id}: the body uses ${', $'.join(sorted(unseen))} but no recipient row "
                        "has a value for it"
                    )
                schedule.finish()

            deadline = spec.deadline.timestamp() if spec.deadline else None
            runs = [(run[0], int(run[1])) for run in schedule.runs]
            capacity = self.capacity(spec)
            speed_source = "off"
            if speed_shift(schedule=runs, cost_units=cost_units, capacity=capacity, slower=FACTOR_RANGE[1]) >= (
                SPEED_MATTERS_S
            ):
                speed = self.measured_speed(spec.channel)
                capacity = replace(
                    self.capacity(spec, speed.factor), speed_spread=speed.spread, busy_cores=self._load()
                )
                speed_source = speed.source
            prediction = predict(
                schedule=runs,
                cost_units=cost_units,
                capacity=capacity,
                start=started,
                deadline=deadline,
                speed_source=speed_source,
            )
            retention = self._settings.retention_s
            expires_at = max(prediction.finish, deadline or 0.0) + retention
            cap = self._frequency.cap if self._frequency else None
            manifest = Manifest(
                campaign_id=spec.id,
                fingerprint=spec.fingerprint(),
                channel=spec.channel,
                body=planned_links.body,
                subject=spec.subject,
                rate=spec.rate,
                deadline=deadline,
                total=total,
                accepted=accepted,
                rejected=dict(rejects.counts),
                batches=writer.batches,
                batch_size=size,
                cost_units=cost_units,
                checksum=writer.checksum,
                audience_digest=digest.hexdigest(total),
                snapshot_bytes=writer.bytes,
                created_at=started,
                watermark=as_of.timestamp(),
                policy={
                    **spec.policy(),
                    "frequency_cap": {"limit": cap.limit, "window_s": cap.window.total_seconds()} if cap else None,
                },
                config_hash=_config_hash(self._settings, size, cap, region),
                schedule=_schedule_summary(schedule.runs),
                dedup={"memory_bytes": self._dedup_memory, "spilled": deferred > 0, "deferred_rows": deferred},
                expires_at=expires_at,
                prediction=prediction.as_dict(),
                rejected_file=str(rejected_path),
                rejected_unlisted=rejects.unlisted,
                links=list(planned_links.links) or None,
                lineage=lineage() if lineage is not None else None,
            )
            ttl_ms = max(1000, int((expires_at - self._clock()) * 1000))
            committed = writer.commit(manifest, ttl_ms)
        except BaseException:
            schedule.close()
            writer.discard()
            raise
        if not committed:
            raise PlanError(f"campaign {spec.id!r} was planned concurrently by another process")
        self._client.zadd(keys.CAMPAIGNS, {spec.id: started})
        return self._report(manifest, existing=False, hints=_hints(national.n, region))

    def _replan(self, spec: CampaignSpec, stored: Manifest, chunks: Iterator[tuple[int, Chunk]]) -> PlanReport:
        """The stored plan when ``chunks`` (the new audience, scanned) is the audience it was
        planned from; PlanError otherwise. Writes nothing."""
        digest = _AudienceDigest()
        total = 0
        for base, chunk in chunks:
            total += chunk.total
            self._check_rows(spec, total)
            digest.add(_absolute(chunk.rejects, base), chunk.encoded)
        known = stored.audience_digest
        if known is not None and known != digest.hexdigest(total):
            raise PlanError(
                f"campaign {spec.id!r} was already planned with a different audience ({stored.total:,} rows "
                f"then, {total:,} now, or other rows); the existing plan is unchanged: use a new campaign id"
            )
        return self._report(stored, existing=True)

    def _check_rows(self, spec: CampaignSpec, total: int) -> None:
        if total > self._settings.plan_max_rows:
            raise PlanError(
                f"campaign {spec.id}: the audience has more than {self._settings.plan_max_rows:,} rows "
                "(setting plan_max_rows); nothing was planned"
            )

    def _merge(
        self,
        spec: CampaignSpec,
        chunks: Iterator[tuple[int, Chunk]],
        rejects: _Rejects,
        schedule: _Schedule,
        started: float,
        *,
        spill_dir: Path,
        digest: _AudienceDigest,
    ) -> tuple[int, int, int, set[str], int]:
        """Steps 6-9 over scanned chunks in row order; returns (total, accepted, cost units,
        template fields never seen, candidates deferred by the dedup's spill). ``chunks`` yields
        (row offset, chunk).

        Until the dedups spill (``dispatch.plan.dedup``; the id and the address dedup spill together,
        when their sets hold ``dedup_memory_bytes`` between them), each chunk is decided as it
        comes and its rejections written in row order. After, each chunk's candidates are
        deferred to both dedups' partitions (ids: row and fingerprint only) and get their
        suppression and frequency-cap verdicts at once (while the scan goes on). When the scan
        ends, the id partitions mark the rows whose id came earlier (a bitmap over row numbers),
        then the address partitions are decided one by one; rejections go to runs in row order,
        merged into the rejected file at the end (which stays in row order)."""
        admit = _Admission(self, spec, schedule, started)
        dedup = Dedup(spill_dir, memory_bytes=self._dedup_memory)
        ids = Dedup(spill_dir, memory_bytes=self._dedup_memory)
        total = 0
        runs: list[_RejectRun] = []
        try:
            for base, chunk in chunks:
                total += chunk.total
                self._check_rows(spec, total)
                refused = _absolute(chunk.rejects, base)
                digest.add(refused, chunk.encoded)
                candidates = _candidates(chunk, base)
                if dedup.spilled:
                    runs[0].add_many(refused)
                    ids.defer_columns(chunk.id_fingerprints, (candidates.rows, chunk.id_fingerprints))
                    dedup.defer(candidates, admit.verdicts(candidates.hashes, range(len(candidates.rows))))
                    continue
                fresh = ids.add_all(chunk.id_fingerprints)
                if not all(fresh):
                    candidates, _ = admit.repeated_ids(candidates, fresh, refused)
                admit(candidates, dedup.add_all(candidates.fingerprints), refused)
                if refused:
                    refused.sort()
                    rejects.add_many(refused)
                if dedup.nbytes + ids.nbytes > self._dedup_memory:
                    dedup.spill()
                    ids.spill()
                    runs.append(_RejectRun(spill_dir))
            repeated = bytearray()
            if ids.spilled:
                repeated = bytearray(total // 8 + 1)  # rows whose id came earlier
                for seen, id_blocks in ids.partition_columns():
                    for rows, fps in id_blocks:
                        for row, new in zip(rows, seen.add_all(fps), strict=True):
                            if not new:
                                repeated[row >> 3] |= 1 << (row & 7)
            for seen, blocks in dedup.partitions():
                run = _RejectRun(spill_dir)
                runs.append(run)
                for deferred, tags in blocks:
                    refused = []
                    block, verdicts = deferred, tags
                    flags = bytearray(0 if repeated[r >> 3] & (1 << (r & 7)) else 1 for r in deferred.rows)
                    if not all(flags):
                        block, keep = admit.repeated_ids(deferred, flags, refused)
                        verdicts = bytes(tags[i] for i in keep)
                    admit(block, seen.add_all(block.fingerprints), refused, verdicts)
                    refused.sort()
                    run.add_many(refused)
            if runs:
                rejects.add_merged(runs)
        finally:
            dedup.close()
            ids.close()
            for run in runs:
                run.close()
        unseen = admit.unseen if admit.kept else set()
        return total, admit.accepted, admit.cost_units, unseen, dedup.deferred

    def _report(self, manifest: Manifest, *, existing: bool, hints: Sequence[str] = ()) -> PlanReport:
        return PlanReport(
            campaign_id=manifest.campaign_id,
            total=manifest.total,
            accepted=manifest.accepted,
            rejected=manifest.rejected,
            batches=manifest.batches,
            cost_units=manifest.cost_units,
            prediction=manifest.prediction,
            rejected_file=manifest.rejected_file,
            existing=existing,
            extra={**{k: getattr(manifest, k) for k in _REPORT_EXTRA}, "hints": list(hints)},
        )

    def manifest(self, campaign_id: str) -> Manifest:
        return load_manifest(self._client, campaign_id)


class _Tally:
    """Counts ``Chunk.national`` over the chunks passing through :meth:`count`."""

    def __init__(self) -> None:
        self.n = 0

    def count(self, chunks: Iterator[tuple[int, Chunk]]) -> Iterator[tuple[int, Chunk]]:
        for base, chunk in chunks:
            self.n += chunk.national
            yield base, chunk


def _hints(national: int, region: str | None) -> list[str]:
    """What the operator can do about the rejections (the report's ``hints``)."""
    if not national:
        return []
    numbers = f"{national:,} number{'s were' if national != 1 else ' was'} not in international format"
    if region is None:
        return [
            f'{numbers}; set region = "XX" in the campaign (XX: the ISO 3166 code of their country, e.g. US or '
            "GB), a region column per recipient, or pass --region, to read national numbers"
        ]
    return [f"{numbers} and had a region/country value that is not an ISO 3166 alpha-2 code (e.g. GB)"]


def _absolute(rejects: list[Rejection], base: int) -> list[Rejection]:
    return [(base + r[0], r[1], r[2], r[3]) for r in rejects] if base else rejects


class _AudienceDigest:
    """What steps 1-5 make of an audience, hashed: each rejection with its row number and each
    candidate's snapshot row, in row order (the candidates' row numbers follow from the
    rejections' and the total). Chunk boundaries do not change it."""

    def __init__(self) -> None:
        self._rejects = hashlib.blake2b(digest_size=32)
        self._candidates = hashlib.blake2b(digest_size=32)

    def add(self, rejects: list[Rejection], encoded: list[bytes]) -> None:
        if rejects:
            self._rejects.update(b"".join(orjson.dumps(r) + b"\n" for r in rejects))
        if encoded:
            self._candidates.update(b"\x00".join(encoded) + b"\x00")

    def hexdigest(self, total: int) -> str:
        whole = hashlib.sha256(b"%d:" % total + self._rejects.digest() + self._candidates.digest())
        return whole.hexdigest()[:32]


def _candidates(chunk: Chunk, base: int) -> Candidates:
    rows = [base + r for r in chunk.rows] if base else chunk.rows
    return Candidates(rows, chunk.ids, chunk.encoded, chunk.hashes, chunk.fingerprints, chunk.not_before, chunk.cost)


class _Admission:
    """Steps 6-8 for candidates whose dedup flags are known: duplicates, then suppression and
    the frequency cap (:meth:`verdicts`, in :data:`CHECK_CHUNK` round trips); accepted rows go to
    the schedule."""

    CLEAR, SUPPRESSED, CAPPED = 0, 1, 2

    def __init__(self, planner: Planner, spec: CampaignSpec, schedule: _Schedule, started: float) -> None:
        self._channel = spec.channel
        self._field = ADDRESS_FIELD[spec.channel]
        self._suppression = planner._suppression
        self._frequency = planner._frequency
        self._add = schedule.add_encoded
        self._started = started
        self.unseen = set(spec.template_fields)
        #: First occurrences seen (the template check needs at least one).
        self.kept = 0
        self.accepted = 0
        self.cost_units = 0

    def repeated_ids(self, c: Candidates, fresh: bytearray, refused: list[Rejection]) -> tuple[Candidates, list[int]]:
        """Refuse the candidates whose flag in ``fresh`` is 0 (their id came earlier) as
        ``duplicate_id``; the others, and their indices in ``c``."""
        reason = str(Reason.DUPLICATE_ID)
        keep = [i for i, new in enumerate(fresh) if new]
        refused.extend((c.rows[i], c.ids[i], "id", reason) for i, new in enumerate(fresh) if not new)
        hashes = b"".join(c.hashes[16 * i : 16 * i + 16] for i in keep) if c.hashes else b""
        kept = Candidates(
            [c.rows[i] for i in keep],
            [c.ids[i] for i in keep],
            [c.encoded[i] for i in keep],
            hashes,
            [c.fingerprints[i] for i in keep],
            [c.not_before[i] for i in keep],
            [c.cost[i] for i in keep],
        )
        return kept, keep

    def verdicts(self, hashes: bytes, indices: Sequence[int]) -> bytearray:
        """Per candidate (indexed like ``hashes``; only ``indices`` are looked up, the others
        stay :attr:`CLEAR`): :attr:`SUPPRESSED`, :attr:`CAPPED` or :attr:`CLEAR`."""
        out = bytearray(len(hashes) // 16)
        if self._suppression is None and self._frequency is None:
            return out
        channel = self._channel
        for start in range(0, len(indices), CHECK_CHUNK):
            window = indices[start : start + CHECK_CHUNK]
            digests = [hashes[16 * i : 16 * i + 16] for i in window]
            if self._frequency is not None:
                capped = self._frequency.capped_hashes(channel, digests, now=self._started)
                for i, is_capped in zip(window, capped, strict=True):
                    if is_capped:
                        out[i] = self.CAPPED
            if self._suppression is not None:
                blocked = self._suppression.contains_hashes(channel, digests)
                for i, is_blocked in zip(window, blocked, strict=True):
                    if is_blocked:
                        out[i] = self.SUPPRESSED
        return out

    def __call__(
        self, c: Candidates, fresh: bytearray, refused: list[Rejection], verdicts: bytes | bytearray | None = None
    ) -> None:
        """Decide candidates: duplicates (``fresh`` flag 0) and suppressed or capped ones
        (``verdicts``, looked up here when not given) are refused, the rest scheduled."""
        rows, ids, encoded, field_name = c.rows, c.ids, c.encoded, self._field
        keep = [i for i, new in enumerate(fresh) if new]
        self.kept += len(keep)
        if len(keep) != len(fresh):
            duplicate = str(Reason.DUPLICATE)
            refused.extend((rows[i], ids[i], field_name, duplicate) for i, new in enumerate(fresh) if not new)
        unseen = self.unseen
        if unseen:
            for i in keep:
                attrs = decode_open_row(encoded[i]).attrs or {}
                unseen.difference_update([k for k in unseen if attrs.get(k)])
                if not unseen:
                    break
        if verdicts is None:
            verdicts = self.verdicts(c.hashes, keep)
        reasons = {self.SUPPRESSED: str(Reason.SUPPRESSED), self.CAPPED: str(Reason.FREQUENCY_CAPPED)}
        not_before, cost, add = c.not_before, c.cost, self._add
        accepted = cost_units = 0
        for i in keep:
            verdict = verdicts[i]
            if verdict:
                refused.append((rows[i], ids[i], field_name, reasons[verdict]))
            else:
                accepted += 1
                cost_units += cost[i]
                add(not_before[i], encoded[i])
        self.accepted += accepted
        self.cost_units += cost_units


def _no_load() -> float:
    return 0.0


def _schedule_summary(runs: list[list[float]]) -> list[dict[str, float | int]]:
    """Recipients and batches per distinct not-before instant, in time order."""
    groups: dict[float, list[int]] = {}
    for not_before, n, count in runs:
        group = groups.setdefault(not_before, [0, 0])
        group[0] += int(n)
        group[1] += int(count)
    return [{"not_before": nb, "recipients": g[0], "batches": g[1]} for nb, g in sorted(groups.items())]


def _check_channel_limits(spec: CampaignSpec, body: str) -> None:
    """The channel's message limits, before any row is read (``channels`` declares them): a
    subject where the provider requires one (SendGrid answers 400 without), and a body that no
    recipient's fields can bring under the length limit (Twilio refuses over 1,600 characters:
    21617). A personalized body over the limit for one recipient is that row's ``body_too_long``."""
    limits = default_registry().channel(spec.channel).limits
    if limits.subject_required and not (spec.subject or "").strip():
        raise PlanError(
            f"campaign {spec.id}: channel {spec.channel!r} needs a subject (the provider refuses mail without one)"
        )
    shortest = string.Template(body).safe_substitute(dict.fromkeys(spec.template_fields, ""))
    if limits.max_chars is not None and len(shortest) > limits.max_chars:
        raise PlanError(
            f"campaign {spec.id}: the body is {len(shortest):,} characters without its fields; "
            f"channel {spec.channel!r} allows at most {limits.max_chars:,}"
        )
    if limits.max_bytes is not None and len(shortest.encode()) > limits.max_bytes:
        raise PlanError(
            f"campaign {spec.id}: the body is {len(shortest.encode()):,} bytes without its fields; "
            f"channel {spec.channel!r} allows at most {limits.max_bytes:,}"
        )
