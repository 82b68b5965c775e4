"""Per-recipient checks that are not address syntax: reason codes, freshness, quiet hours, consent.

Every exclusion has one :class:`Reason`; the planner counts them so that
``total == accepted + sum(rejected by reason)`` always holds.

Freshness: a campaign sets ``max_staleness`` and the source reports its sync watermark ``as_of``.
A recipient is ``stale`` when ``updated_at < as_of - max_staleness``, ``stale_missing`` without
``updated_at`` and ``stale_future`` when ``updated_at > as_of + future_skew`` (the source claims
data it cannot have had yet: a clock or sync bug). :func:`require_fresh_source` fails the whole
plan when the watermark itself is older than the policy allows.

Quiet hours: each recipient gets a *not-before* instant, the earliest instant at or after the
campaign start when their local wall-clock time is inside the allowed window (default
08:00-21:00). Nobody is dropped for being outside the window, only scheduled later. Timezone
choice, documented: a recipient *without* a timezone gets the campaign's ``default_timezone``
when one is configured, and is rejected as ``unknown_timezone`` otherwise; a recipient whose
timezone is given but is not a known IANA name (``Mars/Olympus``, ``America/New_Yrok``) is
rejected as ``unknown_timezone`` even when a default exists: the source said where they are and
we cannot read it, so the default would be a guess, and quiet hours are a compliance matter
(TCPA: no texts before 08:00 or after 21:00 *recipient* local time); a typo'd zone sent at the
default zone's 09:00 could be 03:00 where the recipient is. The count by reason in the plan
report says how many, and the rejected file which rows.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from dispatch.errors import PlanError

__all__ = [
    "ConsentPolicy",
    "FreshnessPolicy",
    "QuietHours",
    "QuietHoursPlanner",
    "Reason",
    "check_consent",
    "check_freshness",
    "next_allowed",
    "require_fresh_source",
    "resolve_timezone",
]


class Reason(enum.StrEnum):
    """Why a row or recipient was not accepted (values are the report and rejected-file keys)."""

    # the row itself
    MALFORMED_ROW = "malformed_row"
    BAD_ENCODING = "bad_encoding"
    MISSING_COLUMN = "missing_column"
    FIELD_TOO_LARGE = "field_too_large"
    # the address for the campaign's channel
    MISSING_ADDRESS = "missing_address"
    INVALID_PHONE = "invalid_phone"
    NOT_SMS_CAPABLE = "not_sms_capable"
    INVALID_EMAIL = "invalid_email"
    INVALID_PUSH_TOKEN = "invalid_push_token"
    INVALID_URL = "invalid_url"
    INVALID_OPENID = "invalid_openid"
    # policy
    NO_CONSENT = "no_consent"
    STALE = "stale"
    STALE_MISSING = "stale_missing"
    STALE_FUTURE = "stale_future"
    UNKNOWN_TIMEZONE = "unknown_timezone"
    BODY_TOO_LONG = "body_too_long"
    SUPPRESSED = "suppressed"
    DUPLICATE_ID = "duplicate_id"
    DUPLICATE = "duplicate"
    FREQUENCY_CAPPED = "frequency_capped"


# --- freshness ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class FreshnessPolicy:
    """``max_staleness``: oldest acceptable contact data relative to the source watermark.

    ``future_skew`` tolerates clocks slightly ahead of the source's; ``max_source_age`` is how old
    the watermark itself may be relative to now (defaults to ``max_staleness``).
    """

    max_staleness: timedelta
    future_skew: timedelta = timedelta(minutes=5)
    max_source_age: timedelta | None = None

    def __post_init__(self) -> None:
        if self.max_staleness <= timedelta(0):
            raise ValueError("max_staleness must be positive")


def _aware(value: datetime, name: str) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware")
    return value


def check_freshness(updated_at: datetime | None, as_of: datetime, policy: FreshnessPolicy) -> Reason | None:
    """None when fresh, else ``STALE`` / ``STALE_MISSING`` / ``STALE_FUTURE``.

    Boundaries: exactly ``as_of - max_staleness`` is fresh, and so is exactly
    ``as_of + future_skew``.
    """
    if updated_at is None:
        return Reason.STALE_MISSING
    _aware(as_of, "as_of")
    if updated_at < as_of - policy.max_staleness:
        return Reason.STALE
    if updated_at > as_of + policy.future_skew:
        return Reason.STALE_FUTURE
    return None


def _human(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    days, rest = divmod(seconds, 86_400)
    hours, rest = divmod(rest, 3_600)
    minutes = rest // 60
    parts = [f"{days} d"] if days else []
    if hours or days:
        parts.append(f"{hours} h")
    parts.append(f"{minutes} min")
    return " ".join(parts)


def require_fresh_source(as_of: datetime, now: datetime, policy: FreshnessPolicy) -> None:
    """Raise :class:`PlanError` when the source watermark is older than the policy allows.

    A watermark ahead of ``now`` by more than ``future_skew`` is refused as well (clock error).
    """
    _aware(as_of, "as_of")
    _aware(now, "now")
    limit = policy.max_source_age if policy.max_source_age is not None else policy.max_staleness
    age = now - as_of
    if age > limit:
        raise PlanError(
            f"the audience source is {_human(age)} old (synced at {as_of.isoformat()}, now "
            f"{now.isoformat()}), but the campaign allows at most {_human(limit)}: refresh the "
            "source or relax the campaign's max_staleness"
        )
    if -age > policy.future_skew:
        raise PlanError(
            f"the audience source claims a sync time {_human(-age)} in the future "
            f"({as_of.isoformat()}, now {now.isoformat()}): fix the source's clock or watermark"
        )


# --- consent -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ConsentPolicy:
    """``require_explicit``: only an explicit yes counts (marketing); otherwise only an explicit
    no blocks (transactional messages)."""

    require_explicit: bool = True


def check_consent(consent: Mapping[str, bool], channel: str, policy: ConsentPolicy) -> Reason | None:
    """None when the recipient may be contacted on ``channel``, else ``NO_CONSENT``."""
    given = consent.get(channel)
    if given is True or (given is None and not policy.require_explicit):
        return None
    return Reason.NO_CONSENT


# --- quiet hours -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class QuietHours:
    """The *allowed* local window ``[start, end)``; ``start > end`` wraps past midnight and
    ``start == end`` allows the whole day."""

    start: time = time(8)
    end: time = time(21)

    def allows(self, local: time) -> bool:
        if self.start == self.end:
            return True
        if self.start < self.end:
            return self.start <= local < self.end
        return local >= self.start or local < self.end


def resolve_timezone(name: str | None, default: tzinfo | None = None) -> tzinfo | None:
    """The IANA zone ``name``, else ``default`` (None when neither is usable)."""
    if name:
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            pass
    return default


def _wall(instant: datetime, tz: tzinfo) -> time:
    return instant.astimezone(tz).time().replace(tzinfo=None)


def _first_at_or_after(day: date, at: time, tz: tzinfo) -> datetime:
    """The earliest UTC instant on local ``day`` whose wall time is >= ``at``.

    Normally that is ``day at`` (first occurrence in a DST fold); when ``at`` falls in a DST gap
    it is the transition instant itself, found by bisection between the two readings.
    """
    first = datetime.combine(day, at, tzinfo=tz).astimezone(UTC)  # fold=0
    if _wall(first, tz) == at:
        return first
    low = datetime.combine(day, at, tzinfo=tz).replace(fold=1).astimezone(UTC)
    high = first
    low, high = min(low, high), max(low, high)
    while high - low > timedelta(seconds=1):
        mid = low + (high - low) / 2
        if mid.astimezone(tz).replace(tzinfo=None) >= datetime.combine(day, at):
            high = mid
        else:
            low = mid
    return high.replace(microsecond=0) if high.microsecond else high


def next_allowed(start_utc: datetime, tz: tzinfo, window: QuietHours) -> datetime:
    """Earliest instant ``>= start_utc`` (returned in UTC) inside ``window`` in local time ``tz``."""
    _aware(start_utc, "start_utc")
    start_utc = start_utc.astimezone(UTC)
    local = start_utc.astimezone(tz)
    if window.allows(local.time().replace(tzinfo=None)):
        return start_utc
    day = local.date()
    if local.time().replace(tzinfo=None) >= window.start:
        day += timedelta(days=1)
    for _ in range(3):  # a gap can swallow the start; the window opens again the next day
        candidate = _first_at_or_after(day, window.start, tz)
        if candidate >= start_utc:
            return candidate
        day += timedelta(days=1)
    raise AssertionError("unreachable: a local day always has a window start")  # pragma: no cover


#: Distinct timezone names remembered per plan (there are ~600 real ones).
_MAX_ZONE_CACHE = 4_096


@dataclass(slots=True)
class QuietHoursPlanner:
    """Not-before instants for one plan: all recipients share ``start_utc``, so the answer only
    depends on the timezone name and is computed once per name."""

    start_utc: datetime
    window: QuietHours = field(default_factory=QuietHours)
    default_timezone: tzinfo | None = None
    _cache: dict[str, datetime | Reason] = field(default_factory=dict, init=False, repr=False)

    def not_before(self, timezone_name: str | None) -> datetime | Reason:
        """The recipient's not-before instant (UTC), or ``Reason.UNKNOWN_TIMEZONE`` (a name that is
        not an IANA zone, or none and no default: see the module docstring)."""
        key = timezone_name or ""
        found = self._cache.get(key)
        if found is None:
            name = key.strip()  # surrounding spaces are not part of a name; all spaces is none
            tz = resolve_timezone(name) if name else self.default_timezone
            found = Reason.UNKNOWN_TIMEZONE if tz is None else next_allowed(self.start_utc, tz, self.window)
            if len(self._cache) < _MAX_ZONE_CACHE:  # garbage names must not grow memory
                self._cache[key] = found
        return found
