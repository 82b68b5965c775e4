"""The planner: audience in, frozen snapshot + batches + prediction out.

Planning streams the audience once: every row is either accepted or rejected with a reason
(written with its row number to ``<home>/plans/<campaign>.rejected.csv``), so
``total == accepted + sum(rejected.values())`` always holds. Accepted recipients are sharded into
batches sized for the channel's provider and frozen in Redis (see ``dispatch.snapshot``).
Planning a campaign id again returns the existing plan when the spec is the same, and refuses a
different spec under the same id.
"""

from __future__ import annotations

import csv
import string
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import redis

from channels.sms import segments
from dispatch import keys
from dispatch.audience import Recipient, RowRejected, from_records, read_audience
from dispatch.campaign import CampaignSpec
from dispatch.checks import Reason
from dispatch.config import Settings
from dispatch.errors import PlanError
from dispatch.prediction import Capacity, predict
from dispatch.snapshot import Row, SnapshotWriter, load_manifest
from dispatch.validation import ADDRESS_FIELD, AddressValidator

__all__ = ["PlanReport", "Planner", "read_csv_rows"]

#: Most recipients per request of each channel's provider API (per-message APIs use the setting).
PROVIDER_BATCH_LIMITS = {"email": 1000}


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
            yield from from_records([first])
            yield from from_records(iterator)  # type: ignore[arg-type]
        return


class Planner:
    """Builds campaign snapshots. One instance per process; it holds no campaign state."""

    def __init__(self, client: redis.Redis, settings: Settings, *, default_region: str | None = None) -> None:
        self._client = client
        self._settings = settings
        self._validator = AddressValidator(default_region)

    def capacity(self, spec: CampaignSpec) -> Capacity:
        s = self._settings
        return Capacity(
            processes=s.workers,
            inflight_per_process=min(s.send_concurrency, s.worker_threads * self.batch_size(spec)),
            latency_s=s.provider_latency_ms / 1000.0,
            provider_rate=s.sms_rate or None,
            campaign_rate=spec.rate,
            cpu_per_message_s=s.cpu_per_message_us / 1e6,
        )

    def batch_size(self, spec: CampaignSpec) -> int:
        size = spec.batch_size or self._settings.batch_size
        return min(size, PROVIDER_BATCH_LIMITS.get(spec.channel, size))

    def plan(self, spec: CampaignSpec, rows: Iterable[AudienceRow | Mapping[str, Any]]) -> PlanReport:
        existing = self._client.get(keys.manifest(spec.id))
        if existing is not None:
            manifest = orjson.loads(existing)
            if manifest["fingerprint"] != spec.fingerprint():
                raise PlanError(
                    f"campaign {spec.id!r} was already planned with a different spec; use a new campaign id"
                )
            return self._report(manifest, existing=True)
        if spec.channel != "sms":
            raise PlanError(f"campaign {spec.id}: channel {spec.channel!r} is not wired into the planner yet")

        started = time.time()
        fields = spec.template_fields
        template = string.Template(spec.body)
        size = self.batch_size(spec)
        writer = SnapshotWriter(self._client, spec.id, ttl_s=self._settings.retention_s)
        rejected: Counter[str] = Counter()
        seen: set[str] = set()
        total = accepted = cost_units = 0
        pending: list[Row] = []
        schedule: list[tuple[float, int]] = []
        plans_dir = self._settings.home / "plans"
        plans_dir.mkdir(parents=True, exist_ok=True)
        rejected_path = plans_dir / f"{spec.id}.rejected.csv"
        with rejected_path.open("w", newline="", encoding="utf-8") as rej_handle:
            rej = csv.writer(rej_handle)
            rej.writerow(["row", "recipient_id", "field", "reason"])
            field_name = ADDRESS_FIELD[spec.channel]
            for total, row in enumerate(as_audience(rows), start=1):  # noqa: B007 - total is the count
                if isinstance(row, RowRejected):
                    rejected[str(row.reason)] += 1
                    rej.writerow([row.row, "", row.field or "", str(row.reason)])
                    continue
                reason, address = self._validator.check(spec.channel, row.address(field_name))
                if reason is None and address in seen:
                    reason = Reason.DUPLICATE
                if reason is not None:
                    rejected[str(reason)] += 1
                    rej.writerow([row.row, row.id, field_name, str(reason)])
                    continue
                seen.add(address)
                accepted += 1
                attrs = {f: row.attributes.get(f) or "" for f in fields} or None
                body = template.safe_substitute(attrs) if attrs else spec.body
                cost_units += segments(body)
                pending.append((row.id or str(row.row), address, attrs))
                if len(pending) >= size:
                    writer.add(started, pending)
                    schedule.append((started, len(pending)))
                    pending = []
            if pending:
                writer.add(started, pending)
                schedule.append((started, len(pending)))
            writer.flush()
        prediction = predict(
            schedule=schedule,
            cost_units=cost_units,
            capacity=self.capacity(spec),
            start=started,
            deadline=spec.deadline.timestamp() if spec.deadline else None,
        )
        manifest = {
            "campaign_id": spec.id,
            "fingerprint": spec.fingerprint(),
            "channel": spec.channel,
            "body": spec.body,
            "subject": spec.subject,
            "rate": spec.rate,
            "deadline": spec.deadline.timestamp() if spec.deadline else None,
            "total": total,
            "accepted": accepted,
            "rejected": dict(rejected),
            "batches": writer.batches,
            "batch_size": size,
            "cost_units": cost_units,
            "checksum": writer.checksum,
            "snapshot_bytes": writer.bytes,
            "created_at": started,
            "prediction": prediction.as_dict(),
            "rejected_file": str(rejected_path),
        }
        if not self._client.set(keys.manifest(spec.id), orjson.dumps(manifest), nx=True, ex=self._settings.retention_s):
            raise PlanError(f"campaign {spec.id!r} was planned concurrently by another process")
        self._client.zadd(keys.CAMPAIGNS, {spec.id: started})
        return self._report(manifest, existing=False)

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
        )

    def manifest(self, campaign_id: str) -> dict[str, Any]:
        return load_manifest(self._client, campaign_id)
