"""Freshness boundaries, source watermark, consent and quiet hours (incl. DST gaps and folds)."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatch.errors import PlanError
from dispatch.rules.checks import (
    ConsentPolicy,
    FreshnessPolicy,
    QuietHours,
    QuietHoursPlanner,
    Reason,
    check_consent,
    check_freshness,
    next_allowed,
    require_fresh_source,
)

AS_OF = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
POLICY = FreshnessPolicy(max_staleness=timedelta(days=30), future_skew=timedelta(minutes=5))
NY = ZoneInfo("America/New_York")


@pytest.mark.parametrize(
    ("updated", "want"),
    [
        (None, Reason.STALE_MISSING),
        (AS_OF - timedelta(days=30), None),
        (AS_OF - timedelta(days=30, microseconds=1), Reason.STALE),
        (AS_OF, None),
        (AS_OF + timedelta(minutes=5), None),
        (AS_OF + timedelta(minutes=5, microseconds=1), Reason.STALE_FUTURE),
        (datetime(2026, 11, 20, 7, 0, tzinfo=NY), None),  # other offsets compare as instants
    ],
)
def test_freshness_boundaries(updated: datetime | None, want: Reason | None) -> None:
    assert check_freshness(updated, AS_OF, POLICY) == want


def test_source_watermark_too_old_fails_plan_with_explanation() -> None:
    require_fresh_source(AS_OF, AS_OF + timedelta(days=30), POLICY)
    with pytest.raises(PlanError) as info:
        require_fresh_source(AS_OF, AS_OF + timedelta(days=31, hours=2), POLICY)
    text = str(info.value)
    assert "31 d 2 h 0 min old" in text
    assert "at most 30 d 0 h 0 min" in text
    with pytest.raises(PlanError, match="in the future"):
        require_fresh_source(AS_OF + timedelta(hours=1), AS_OF, POLICY)
    strict = FreshnessPolicy(max_staleness=timedelta(days=30), max_source_age=timedelta(hours=24))
    with pytest.raises(PlanError, match="at most 1 d 0 h 0 min"):
        require_fresh_source(AS_OF, AS_OF + timedelta(hours=25), strict)


def test_consent() -> None:
    explicit, lenient = ConsentPolicy(), ConsentPolicy(require_explicit=False)
    assert check_consent({"sms": True}, "sms", explicit) is None
    assert check_consent({}, "sms", explicit) == Reason.NO_CONSENT
    assert check_consent({"sms": False}, "sms", lenient) == Reason.NO_CONSENT
    assert check_consent({"email": True}, "sms", lenient) is None


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


def test_quiet_hours_basic() -> None:
    window = QuietHours()
    # 12:00 UTC = 07:00 New York (EST): wait until 08:00 local = 13:00 UTC
    assert next_allowed(utc(2026, 1, 15, 12), NY, window) == utc(2026, 1, 15, 13)
    assert next_allowed(utc(2026, 1, 15, 15), NY, window) == utc(2026, 1, 15, 15)
    # 21:00 local is outside: next morning
    assert next_allowed(utc(2026, 1, 16, 2), NY, window) == utc(2026, 1, 16, 13)
    # wrapping window 22:00-06:00
    night = QuietHours(time(22), time(6))
    assert next_allowed(utc(2026, 1, 15, 12), NY, night) == utc(2026, 1, 16, 3)


def test_quiet_hours_dst_gap() -> None:
    # 2026-03-08: New York jumps 02:00 EST -> 03:00 EDT; 02:30 does not exist
    window = QuietHours(time(2, 30), time(21))
    got = next_allowed(utc(2026, 3, 8, 5), NY, window)  # 00:00 EST
    assert got == utc(2026, 3, 8, 7)  # the transition: 03:00 EDT
    assert got.astimezone(NY).time() == time(3, 0)


def test_quiet_hours_dst_fold_takes_first_occurrence() -> None:
    # 2026-11-01: 01:00-02:00 happens twice in New York
    window = QuietHours(time(1, 30), time(21))
    got = next_allowed(utc(2026, 11, 1, 4), NY, window)  # 00:00 EDT
    assert got == utc(2026, 11, 1, 5, 30)  # 01:30 EDT, the first one


@settings(max_examples=200, deadline=None)
@given(
    start=st.datetimes(min_value=datetime(2020, 1, 1), max_value=datetime(2030, 1, 1)),
    zone=st.sampled_from(["America/New_York", "Europe/Berlin", "Australia/Lord_Howe", "Asia/Kolkata", "UTC"]),
    a=st.integers(0, 47),
    b=st.integers(0, 47),
)
def test_next_allowed_properties(start: datetime, zone: str, a: int, b: int) -> None:
    tz = ZoneInfo(zone)
    window = QuietHours(time(a // 2, 30 * (a % 2)), time(b // 2, 30 * (b % 2)))
    begin = start.replace(tzinfo=UTC)
    got = next_allowed(begin, tz, window)
    assert got >= begin
    assert got - begin <= timedelta(days=1, hours=2)
    assert window.allows(got.astimezone(tz).time().replace(tzinfo=None))
    # earliest: one minute earlier (if still >= begin) is not allowed
    before = got - timedelta(minutes=1)
    if before >= begin:
        assert not window.allows(before.astimezone(tz).time().replace(tzinfo=None))


def test_planner_timezone_policy() -> None:
    start = utc(2026, 1, 15, 12)
    strict = QuietHoursPlanner(start)
    assert strict.not_before("Not/AZone") == Reason.UNKNOWN_TIMEZONE
    assert strict.not_before(None) == Reason.UNKNOWN_TIMEZONE
    assert strict.not_before("America/New_York") == utc(2026, 1, 15, 13)
    fallback = QuietHoursPlanner(start, default_timezone=ZoneInfo("Europe/Berlin"))
    assert fallback.not_before("") == start  # 13:00 in Berlin: allowed
