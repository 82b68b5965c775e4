from __future__ import annotations

from pathlib import Path

import pytest
import redis

from dispatch.campaign import CampaignSpec
from dispatch.config import load_settings
from dispatch.errors import PlanError
from dispatch.plan.planner import Planner, read_csv_rows
from dispatch.plan.snapshot import iter_batches, verify_snapshot


def test_every_row_is_accepted_or_rejected_with_a_reason(redis_client: redis.Redis, tmp_path: Path) -> None:
    audience = tmp_path / "audience.csv"
    audience.write_bytes(
        b"id,phone,first_name\n"
        b"a,+447400123456,Ada\n"
        b"b,+447400123456,Bob\n"  # duplicate of a
        b"c,not-a-number,Cy\n"
        b"d,,Di\n"
        b"e,+4915123456789,\xff\xfe\n"  # bad encoding in a field
        b'f,"+33612345678,Fi\n'  # unbalanced quote
        b"g,+61412345678,Gus\n"
    )
    settings = load_settings({"DISPATCH_HOME": str(tmp_path), "DISPATCH_BATCH_SIZE": "2"})
    spec = CampaignSpec(id="plan-1", channel="sms", body="Hi $first_name")
    report = Planner(redis_client, settings).plan(spec, read_csv_rows(audience))
    assert report.total == 7
    assert report.total == report.accepted + sum(report.rejected.values())
    assert report.rejected["duplicate"] == 1
    assert report.rejected["invalid_phone"] == 1
    assert report.rejected["missing_address"] == 1
    rejected_lines = Path(str(report.rejected_file)).read_text().splitlines()
    assert len(rejected_lines) == 1 + sum(report.rejected.values())
    assert all("+44" not in line for line in rejected_lines)  # no raw addresses in the rejects file
    batches = list(iter_batches(redis_client, "plan-1", report.batches))
    assert sum(len(b.rows) for b in batches) == report.accepted
    assert all(len(b.rows) <= 2 for b in batches)
    assert verify_snapshot(redis_client, "plan-1")
    # the snapshot is immutable and replanning returns it; a different spec under the same id is refused
    again = Planner(redis_client, settings).plan(spec, read_csv_rows(audience))
    assert again.existing and again.accepted == report.accepted
    with pytest.raises(PlanError, match="different spec"):
        Planner(redis_client, settings).plan(CampaignSpec(id="plan-1", channel="sms", body="Bye"), [])


def test_prediction_says_whether_it_fits(redis_client: redis.Redis, tmp_path: Path) -> None:
    from datetime import UTC, datetime, timedelta

    rows = [{"id": str(i), "phone": f"+447400{i:06d}", "first_name": "A"} for i in range(1000)]
    settings = load_settings({"DISPATCH_HOME": str(tmp_path), "DISPATCH_SMS_RATE": "10"})
    tight = CampaignSpec(id="plan-tight", channel="sms", body="Hi", deadline=datetime.now(UTC) + timedelta(seconds=30))
    report = Planner(redis_client, settings).plan(tight, rows)
    prediction = report.prediction
    assert prediction["bottleneck"] == "provider_rate"
    assert prediction["duration_s"] == pytest.approx(100.5, rel=0.05)  # 1000 msgs at 10/s + start-up
    assert prediction["verdict"] == "does_not_fit"
    assert "msg/s" in prediction["advice"]
    loose = CampaignSpec(id="plan-loose", channel="sms", body="Hi", deadline=datetime.now(UTC) + timedelta(hours=1))
    assert Planner(redis_client, settings).plan(loose, rows).prediction["verdict"] == "fits"


def test_batch_channels_are_predicted_with_their_per_recipient_cost() -> None:
    from dispatch.plan.prediction import BATCH_CHANNEL_CPU_S, STARTUP_S, Capacity, cpu_costs, predict, size_factor

    email, sms = cpu_costs("email", 350e-6), cpu_costs("sms", 350e-6)
    assert email[0] < sms[0] / 5 and email[1] < sms[1] / 5
    capacity = Capacity(
        processes=2,
        inflight_per_process=256,
        latency_s=0.001,
        provider_rate=None,
        campaign_rate=None,
        cpu_per_message_s=email[0],
        worker_cpu_per_message_s=email[1],
        cores=2,
        channel="email",
    )
    prediction = predict(schedule=[(0.0, 1_000_000)], cost_units=1_000_000, capacity=capacity, start=0.0, deadline=None)
    assert prediction.bottleneck == "cpu"
    per_recipient = BATCH_CHANNEL_CPU_S["email"][0] * size_factor(1_000_000, "email")
    assert prediction.duration_s == pytest.approx(STARTUP_S + 1_000_000 * per_recipient / 2, rel=0.01)


def test_cost_per_message_grows_slowly_with_the_campaign_size() -> None:
    from dispatch.plan.prediction import SIZE_REFERENCE, SIZE_SLOPE, size_factor

    assert size_factor(1) == size_factor(SIZE_REFERENCE) == 1.0
    assert size_factor(SIZE_REFERENCE * 10) == pytest.approx(1 + SIZE_SLOPE["sms"])
    assert size_factor(SIZE_REFERENCE * 100, "email") == pytest.approx(1 + 2 * SIZE_SLOPE["email"])
