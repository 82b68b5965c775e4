"""The full planner with every check on: reasons, quiet-hour scheduling, template errors, lifetime."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from datetime import time as dtime
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aredis

from dispatch.campaign import CampaignSpec
from dispatch.config import Settings, load_settings
from dispatch.errors import PlanError
from dispatch.plan.dedup import FingerprintSet
from dispatch.plan.planner import Planner
from dispatch.plan.snapshot import extend_retention, iter_batches, load_manifest, verify_snapshot
from dispatch.rules.checks import QuietHours
from dispatch.rules.frequency import AsyncFrequencyStore, FrequencyCap
from dispatch.rules.suppression import GLOBAL, AddressHasher, SuppressionStore
from dispatch.store import keys

#: The suppression key of this test's stores (a deployment's come from ``hasher_for(settings)``).
TEST_HASHER = AddressHasher(key=b"test-suppression-key")


def _noon_utc() -> float:
    """The next 12:00 UTC (a fixed plan clock that is still in the future for Redis TTLs)."""
    now = datetime.now(UTC)
    noon = now.replace(hour=12, minute=0, second=0, microsecond=0)
    return (noon if noon > now else noon + timedelta(days=1)).timestamp()


NOON = _noon_utc()
CAP = FrequencyCap(limit=1, window=timedelta(hours=1))


def _settings(tmp_path: Path, **extra: str) -> Settings:
    return load_settings({"DISPATCH_HOME": str(tmp_path), "DISPATCH_BATCH_SIZE": "2", **extra})


def _planner(client: redis.Redis, settings: Settings, cap: FrequencyCap | None = CAP) -> Planner:
    return Planner(
        client,
        settings,
        frequency_cap=cap,
        suppression=SuppressionStore(client, hasher=TEST_HASHER),
        clock=lambda: NOON,
    )


def _row(i: int, **fields: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": f"r{i}",
        "phone": f"+447400{i:06d}",
        "timezone": "Europe/London",
        "consent_sms": "yes",
        "updated_at": NOON - 86_400,
        "first_name": "Ann",
    }
    row.update(fields)
    return row


async def test_every_check_has_its_reason(
    redis_client: redis.Redis, aredis_client: aredis.Redis, tmp_path: Path
) -> None:
    store = SuppressionStore(redis_client, hasher=TEST_HASHER)
    store.add("sms", ["+447400000005"])
    store.add(GLOBAL, ["+447400000006"])
    store.add("email", ["+447400000007"])  # another channel's opt-out does not apply
    await AsyncFrequencyStore(aredis_client, CAP, hasher=TEST_HASHER).reserve(
        "sms", "+447400000008", "earlier", now=NOON - 60
    )
    rows = [
        _row(0),
        _row(1, consent_sms="no"),
        _row(2, updated_at=NOON - 40 * 86_400),
        _row(3, updated_at=None),
        _row(4, timezone="Mars/Olympus"),
        _row(5),
        _row(6),
        _row(7),
        _row(8),
        _row(9, phone="+44 7400 000000"),  # the same number as row 0, written differently
        _row(10, updated_at=NOON + 3600),
        _row(11, phone="12"),
        _row(12, consent_sms=""),
    ]
    spec = CampaignSpec(id="checks-1", channel="sms", body="Hi $first_name", max_staleness=timedelta(days=30))
    report = _planner(redis_client, _settings(tmp_path)).plan(spec, rows)
    assert report.rejected == {
        "no_consent": 1,
        "stale": 1,
        "stale_missing": 1,
        "unknown_timezone": 1,
        "suppressed": 2,
        "frequency_capped": 1,
        "duplicate": 1,
        "stale_future": 1,
        "invalid_phone": 1,
    }
    assert report.accepted == 3  # rows 0, 7 and 12 (an empty consent is not a no)
    assert report.total == 13 == report.accepted + sum(report.rejected.values())
    lines = Path(str(report.rejected_file)).read_text().splitlines()[1:]  # noqa: ASYNC240
    assert sorted(int(line.split(",")[0]) for line in lines) == [2, 3, 4, 5, 6, 7, 9, 10, 11, 12]
    assert all("+44" not in line and "7400" not in line for line in lines)
    accepted = {r[0] for b in iter_batches(redis_client, "checks-1", report.batches) for r in b.rows}
    assert accepted == {"r0", "r7", "r12"}
    # an explicit-consent campaign also refuses the row that said nothing
    strict = CampaignSpec(id="checks-2", channel="sms", body="Hi", require_consent=True)
    assert _planner(redis_client, _settings(tmp_path)).plan(strict, [_row(20, consent_sms="")]).rejected == {
        "no_consent": 1
    }


def test_a_stale_source_fails_the_whole_plan(redis_client: redis.Redis, tmp_path: Path) -> None:
    spec = CampaignSpec(
        id="stale-src",
        channel="sms",
        body="Hi",
        max_staleness=timedelta(days=1),
        as_of=datetime.fromtimestamp(NOON, UTC) - timedelta(days=3),
    )
    with pytest.raises(PlanError, match="source is 3 d 0 h 0 min old"):
        _planner(redis_client, _settings(tmp_path)).plan(spec, [_row(0)])
    assert not redis_client.exists(keys.manifest("stale-src"), keys.batch("stale-src", 0))


def test_quiet_hours_schedule_later_batches_in_time_order(redis_client: redis.Redis, tmp_path: Path) -> None:
    zones = ["Asia/Tokyo", "Europe/London", "America/New_York", "Europe/London", "Asia/Tokyo", "Asia/Tokyo"]
    rows = [_row(i, timezone=tz) for i, tz in enumerate(zones)] + [_row(6, timezone=None)]
    settings = _settings(tmp_path, DISPATCH_SMS_RATE="1")
    spec = CampaignSpec(id="quiet-1", channel="sms", body="Hi")
    report = _planner(redis_client, settings).plan(spec, rows)
    assert report.accepted == 7 and report.total == 7
    batches = list(iter_batches(redis_client, "quiet-1", report.batches))
    # at 12:00 UTC London (12:00) and no timezone are due now; New York (07:00) at 13:00 UTC;
    # Tokyo (21:00, just closed) at 08:00 JST = 23:00 UTC
    starts = [b.not_before - NOON for b in batches]
    assert starts == sorted(starts) == [0, 0, 3600, 11 * 3600, 11 * 3600]
    assert [len(b.rows) for b in batches] == [2, 1, 1, 2, 1]
    assert {r[0] for b in batches[3:] for r in b.rows} == {"r0", "r4", "r5"}
    # the prediction waits for the last window: 3 due now at 1 msg/s, the Tokyo ones from 23:00
    assert report.prediction["finish"] == pytest.approx(NOON + 11 * 3600 + 3, abs=0.01)
    schedule = load_manifest(redis_client, "quiet-1").schedule
    assert [s["recipients"] for s in schedule] == [3, 1, 3]
    # without quiet hours (transactional) everyone is due now; a wrapped window works too
    off = CampaignSpec(id="quiet-2", channel="sms", body="Hi", quiet_hours=None)
    assert _planner(redis_client, settings).plan(off, rows).extra["schedule"][0]["recipients"] == 7
    night = CampaignSpec(id="quiet-3", channel="sms", body="Hi", quiet_hours=QuietHours(dtime(22), dtime(6)))
    groups = _planner(redis_client, settings).plan(night, rows).extra["schedule"]
    assert [(g["not_before"] - NOON, g["recipients"]) for g in groups] == [
        (0, 1),
        (3600, 3),
        (10 * 3600, 2),
        (15 * 3600, 1),
    ]


def test_unknown_timezone_policy(redis_client: redis.Redis, tmp_path: Path) -> None:
    rows = [_row(0, timezone=None), _row(1, timezone="Nowhere/Else")]
    strict = CampaignSpec(id="tz-1", channel="sms", body="Hi", require_timezone=True)
    assert _planner(redis_client, _settings(tmp_path)).plan(strict, rows).rejected == {"unknown_timezone": 2}
    fallback = CampaignSpec(id="tz-2", channel="sms", body="Hi", default_timezone="America/New_York")
    report = _planner(redis_client, _settings(tmp_path)).plan(fallback, rows)
    # the default is for a recipient without a zone; a zone that is given but unknown is not guessed
    assert report.accepted == 1 and report.rejected == {"unknown_timezone": 1}
    assert report.extra["schedule"] == [{"not_before": NOON + 3600, "recipients": 1, "batches": 1}]


def test_template_fields_must_exist(redis_client: redis.Redis, tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    spec = CampaignSpec(id="tpl-1", channel="sms", body="Hi $first_name, code $promo")
    with pytest.raises(PlanError, match=r"\$promo but no recipient row"):
        _planner(redis_client, settings).plan(spec, [_row(i) for i in range(5)])
    assert redis_client.keys("dp:{tpl-1}*") == []  # nothing left behind
    audience = tmp_path / "a.csv"
    audience.write_text("id,phone,first_name\nr1,+447400000001,Ann\n")
    with pytest.raises(PlanError, match=r"\$promo but the audience has no such column"):
        _planner(redis_client, settings).plan_file(spec, audience)
    # a field present in some rows is fine; the others render it empty
    rows = [_row(0), _row(1, promo="X1")]
    report = _planner(redis_client, settings).plan(spec, rows)
    batch = next(iter_batches(redis_client, "tpl-1", 1))
    assert report.accepted == 2 and [r[2] for r in batch.rows] == [
        {"first_name": "Ann", "promo": ""},
        {"first_name": "Ann", "promo": "X1"},
    ]


def test_manifest_and_snapshot_lifetime(redis_client: redis.Redis, tmp_path: Path) -> None:
    settings = _settings(tmp_path, DISPATCH_RETENTION_S="3600")
    deadline = datetime.fromtimestamp(NOON, UTC) + timedelta(hours=5)
    spec = CampaignSpec(id="life-1", channel="sms", body="Hi", deadline=deadline, max_staleness=timedelta(days=2))
    report = _planner(redis_client, settings).plan(spec, [_row(i) for i in range(5)])
    manifest = load_manifest(redis_client, "life-1")
    assert manifest.expires_at == deadline.timestamp() + 3600  # deadline later than the finish
    assert manifest.watermark == NOON and manifest.created_at == NOON
    assert manifest.policy["max_staleness_s"] == 172_800
    assert manifest.policy["frequency_cap"] == {"limit": 1, "window_s": 3600.0}
    assert len(manifest.config_hash) == 16 and verify_snapshot(redis_client, "life-1")
    for key in (keys.manifest("life-1"), keys.batch("life-1", report.batches - 1)):
        ttl = int(redis_client.ttl(key))  # type: ignore[arg-type]
        # relative to the planner's clock (the TTL means the same on Redis's clock, whatever the date)
        assert abs(ttl - (deadline.timestamp() + 3600 - NOON)) < 5
    later = extend_retention(redis_client, "life-1", 30 * 86_400)
    assert later == pytest.approx(time.time() + 30 * 86_400, abs=5)
    assert int(redis_client.ttl(keys.batch("life-1", 0))) > 29 * 86_400  # type: ignore[arg-type]
    assert extend_retention(redis_client, "life-1", 60) == later  # never shortens


def test_fingerprint_set_is_exact() -> None:
    seen = FingerprintSet()
    values = [(i * 0x9E3779B97F4A7C15) & (2**64 - 1) for i in range(50_000)]
    assert all(seen.add(v) for v in values)
    assert not any(seen.add(v) for v in values[::7])
    assert seen.size == 50_000 and seen.nbytes < 50_000 * 24
