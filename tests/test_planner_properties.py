"""Property tests through the full Planner (suppression, frequency cap, freshness, consent and
quiet hours all active): the counts always add up, and no input crashes it."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dispatch.campaign import CampaignSpec
from dispatch.config import load_settings
from dispatch.errors import PlanError
from dispatch.plan.planner import Planner
from dispatch.plan.snapshot import iter_batches, verify_snapshot
from dispatch.rules.frequency import FrequencyCap, FrequencyStore
from dispatch.rules.suppression import GLOBAL, AddressHasher, SuppressionStore
from dispatch.store import keys

NOW = (datetime.now(UTC) + timedelta(days=1)).replace(microsecond=0).timestamp()
PHONES = [f"+447400{i:06d}" for i in range(12)] + ["+44 7400 000001", "12345", "", "+4930123456"]
ZONES = ["Europe/London", "America/New_York", "Asia/Tokyo", "Australia/Sydney", None, "", "Not/AZone"]
CONSENT = ["yes", "no", "", "maybe", "1", "FALSE"]
AGES = [None, 0.0, 3600.0, 20 * 86_400.0, 40 * 86_400.0, -86_400.0, "not a date"]
_ids = itertools.count()

rows_strategy = st.lists(
    st.fixed_dictionaries(
        {
            "phone": st.sampled_from(PHONES),
            "timezone": st.sampled_from(ZONES),
            "consent_sms": st.sampled_from(CONSENT),
            "age": st.sampled_from(AGES),
            "first_name": st.sampled_from(["Ann", "Zoë", "李" * 90]),
            "id": st.sampled_from(["x", "", " "]),
        }
    ),
    max_size=40,
)

#: The suppression key of this test's stores (a deployment's come from ``hasher_for(settings)``).
TEST_HASHER = AddressHasher(key=b"test-suppression-key")


def _audience(raw: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for i, r in enumerate(raw):
        age = r["age"]
        updated = NOW - age if isinstance(age, float) else age
        out.append({**r, "id": f"{r['id']}{i}" if r["id"] == "x" else r["id"], "updated_at": updated})
        del out[-1]["age"]
    return out


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    raw=rows_strategy,
    suppressed=st.sets(st.sampled_from(PHONES[:12]), max_size=4),
    blocked=st.sets(st.sampled_from(PHONES[:12]), max_size=2),
    capped=st.sets(st.sampled_from(PHONES[:12]), max_size=3),
    batch_size=st.integers(1, 5),
)
def test_counts_add_up_with_every_check_active(  # noqa: PLR0917
    redis_client: redis.Redis,
    tmp_path: Path,
    raw: list[dict[str, Any]],
    suppressed: set[str],
    blocked: set[str],
    capped: set[str],
    batch_size: int,
) -> None:
    store = SuppressionStore(redis_client, hasher=TEST_HASHER, prefix=f"t:sup:{next(_ids)}")
    store.add("sms", suppressed)
    store.add(GLOBAL, blocked)
    cap = FrequencyCap(limit=1, window=timedelta(hours=1))
    prefix = f"t:freq:{next(_ids)}"
    for phone in capped:  # one send recorded a minute before the plan
        redis_client.zadd(f"{prefix}:sms:".encode() + store.hasher(phone), {b"m": (NOW - 60) * 1000})
    settings_ = load_settings({"DISPATCH_HOME": str(tmp_path), "DISPATCH_BATCH_SIZE": str(batch_size)})
    planner = Planner(
        redis_client,
        settings_,
        suppression=store,
        frequency=FrequencyStore(redis_client, cap, hasher=TEST_HASHER, prefix=prefix),
        clock=lambda: NOW,
    )
    cid = f"prop-{next(_ids)}"
    spec = CampaignSpec(id=cid, channel="sms", body="Hi $first_name", max_staleness=timedelta(days=30))
    rows = _audience(raw)
    if not rows:  # an empty audience fails the plan and freezes nothing
        with pytest.raises(PlanError, match="no rows"):
            planner.plan(spec, rows)
        assert redis_client.get(keys.manifest(cid)) is None
        return
    report = planner.plan(spec, rows)
    assert report.total == len(rows)
    assert report.total == report.accepted + sum(report.rejected.values())
    lines = Path(str(report.rejected_file)).read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1 + sum(report.rejected.values())
    batches = list(iter_batches(redis_client, cid, report.batches))
    assert sum(len(b.rows) for b in batches) == report.accepted
    assert all(1 <= len(b.rows) <= batch_size for b in batches)
    assert [b.not_before for b in batches] == sorted(b.not_before for b in batches)
    assert all(b.not_before >= NOW for b in batches)
    sent = [r[1] for b in batches for r in b.rows]
    assert len(sent) == len(set(sent))  # one message per number
    assert not (set(sent) & (suppressed | blocked | capped))
    assert verify_snapshot(redis_client, cid)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    lines=st.lists(
        st.one_of(
            st.binary(max_size=60),
            st.text(alphabet='ab,"\r\n+0123456789 \x00é', max_size=40).map(str.encode),
            st.just(b"r1,+447400000001,Europe/London,yes,Ann"),
        ),
        max_size=25,
    ),
    gz=st.booleans(),
)
def test_malformed_files_never_crash_the_planner(
    redis_client: redis.Redis, tmp_path: Path, lines: list[bytes], gz: bool
) -> None:
    import gzip

    data = b"id,phone,timezone,consent_sms,first_name\n" + b"\n".join(lines)
    path = tmp_path / f"a{next(_ids)}.csv{'.gz' if gz else ''}"
    path.write_bytes(gzip.compress(data) if gz else data)
    settings_ = load_settings({"DISPATCH_HOME": str(tmp_path), "DISPATCH_BATCH_SIZE": "3"})
    planner = Planner.with_redis_checks(
        redis_client, settings_, frequency_cap=FrequencyCap(limit=2, window=timedelta(days=1))
    )
    cid = f"mal-{next(_ids)}"
    try:
        report = planner.plan_file(CampaignSpec(id=cid, channel="sms", body="Hi"), path)
    except PlanError as exc:  # no data row at all: refused, nothing frozen
        assert "no rows" in str(exc)
        assert redis_client.get(keys.manifest(cid)) is None
        return
    assert report.total > 0
    assert report.total == report.accepted + sum(report.rejected.values())
    assert sum(len(b.rows) for b in iter_batches(redis_client, cid, report.batches)) == report.accepted
