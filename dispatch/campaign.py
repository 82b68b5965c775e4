"""What a campaign system hands us: the campaign spec, read from TOML or JSON.

Planning policy lives in the spec (the same audience may be fine for one campaign and stale for
another). In a campaign file::

    id = "black-friday"
    channel = "sms"
    body = "Hi $first_name, 20% off today"
    deadline = "2026-11-27T20:00:00Z"
    max_staleness = "30d"            # seconds, or a number with s / m / h / d; unset: no check
    as_of = "2026-11-26T06:00:00Z"   # the source's sync watermark; unset: the plan time
    require_consent = true           # only an explicit yes counts (default: only a no blocks)
    quiet_hours = { start = "08:00", end = "21:00" }   # the default; false turns it off
    default_timezone = "America/New_York"  # for recipients without a timezone
    require_timezone = false         # true: reject recipients without a usable timezone
"""

from __future__ import annotations

import hashlib
import math
import re
import string
import tomllib
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from typing import Any, Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson

from channels import default_registry
from dispatch.errors import PlanError
from dispatch.rules.checks import QuietHours
from dispatch.store import keys

__all__ = ["CampaignSpec", "load_campaign_file", "parse_duration"]

#: Channels a campaign can use: the registered ones that have a provider.
CHANNELS: Final = default_registry().channel_names(sendable=True)
#: Slowest campaign rate accepted (messages per second): one message a day.
MIN_RATE = 1 / 86400


@dataclass(frozen=True, kw_only=True)
class CampaignSpec:
    """One campaign: who (the audience is given separately), what, through which channel, by when."""

    id: str
    channel: str
    body: str
    subject: str | None = None
    deadline: datetime | None = None
    #: Campaign-level cap in messages per second on top of the provider's limit (None = none).
    rate: float | None = None
    batch_size: int | None = None
    #: Oldest acceptable ``updated_at`` relative to ``as_of`` (None: no freshness check).
    max_staleness: timedelta | None = None
    #: The source's sync watermark (None: the plan time). Only used with ``max_staleness``.
    as_of: datetime | None = None
    #: True: only an explicit consent for the channel counts; False: only an explicit no blocks.
    require_consent: bool = False
    #: Allowed local sending window (None: send at any hour, e.g. transactional messages).
    quiet_hours: QuietHours | None = field(default_factory=QuietHours)
    #: IANA zone for recipients without a (known) timezone.
    default_timezone: str | None = None
    #: True: a recipient whose local time cannot be known is rejected (``unknown_timezone``);
    #: False: a recipient *without* a timezone is scheduled as if the window were open (a
    #: timezone that is given but unknown is always rejected).
    require_timezone: bool = False

    def __post_init__(self) -> None:
        if not self.id or len(self.id) > 128 or not all(c.isalnum() or c in "-_." for c in self.id):
            raise PlanError(f"campaign id {self.id!r}: use 1-128 letters, digits, '-', '_' or '.'")
        if self.id.startswith(keys.RESERVED_ID_PREFIX):
            raise PlanError(
                f"campaign id {self.id!r}: ids starting with {keys.RESERVED_ID_PREFIX!r} are reserved for "
                "triggered messages; choose another id"
            )
        if self.channel not in CHANNELS:
            raise PlanError(f"campaign {self.id}: channel {self.channel!r} is not one of {', '.join(CHANNELS)}")
        if not self.body:
            raise PlanError(f"campaign {self.id}: body is empty")
        try:
            template = string.Template(self.body)
            if not template.is_valid():
                raise ValueError("a '$' is not followed by a field name (write $$ for a dollar sign)")
        except ValueError as exc:
            raise PlanError(f"campaign {self.id}: body template: {exc}") from None
        _check_types(self)
        if self.rate is not None and self.rate <= 0:
            raise PlanError(f"campaign {self.id}: rate must be positive, got {self.rate}")
        if self.rate is not None and not (MIN_RATE <= self.rate < math.inf):
            raise PlanError(
                f"campaign {self.id}: rate {self.rate} is out of range: give at least {MIN_RATE:.3g} messages "
                "per second (one a day) and a finite number"
            )
        if self.deadline is not None and self.deadline.tzinfo is None:
            raise PlanError(f"campaign {self.id}: deadline needs a timezone (e.g. 2026-11-25T12:00:00Z)")
        if self.as_of is not None and self.as_of.tzinfo is None:
            raise PlanError(f"campaign {self.id}: as_of needs a timezone (e.g. 2026-11-25T06:00:00Z)")
        if self.max_staleness is not None and self.max_staleness <= timedelta(0):
            raise PlanError(f"campaign {self.id}: max_staleness must be positive")
        if self.batch_size is not None and self.batch_size < 1:
            raise PlanError(f"campaign {self.id}: batch_size must be at least 1")
        if self.default_timezone is not None:
            try:
                ZoneInfo(self.default_timezone)
            except (ZoneInfoNotFoundError, ValueError):
                raise PlanError(
                    f"campaign {self.id}: default_timezone {self.default_timezone!r} is not an IANA zone"
                ) from None

    @property
    def template_fields(self) -> tuple[str, ...]:
        return tuple(string.Template(self.body).get_identifiers())

    def policy(self) -> dict[str, Any]:
        """The planning policy as plain JSON values (recorded in the manifest)."""
        return {
            "max_staleness_s": self.max_staleness.total_seconds() if self.max_staleness else None,
            "as_of": self.as_of.isoformat() if self.as_of else None,
            "require_consent": self.require_consent,
            "quiet_hours": (
                [self.quiet_hours.start.isoformat("minutes"), self.quiet_hours.end.isoformat("minutes")]
                if self.quiet_hours
                else None
            ),
            "default_timezone": self.default_timezone,
            "require_timezone": self.require_timezone,
        }

    def fingerprint(self) -> str:
        """Stable hash of the spec: the same id with another body is another campaign."""
        data: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        data["deadline"] = self.deadline.isoformat() if self.deadline else None
        data.update(self.policy())
        del data["max_staleness"]
        return hashlib.sha256(orjson.dumps(data, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]

    @classmethod
    def from_mapping(cls, data: dict[str, Any]) -> CampaignSpec:
        known = {
            "id",
            "channel",
            "body",
            "subject",
            "deadline",
            "rate",
            "batch_size",
            "deadline_in_s",
            "max_staleness",
            "as_of",
            "require_consent",
            "quiet_hours",
            "default_timezone",
            "require_timezone",
        }
        unknown = set(data) - known
        if unknown:
            raise PlanError(f"campaign spec: unknown field(s) {', '.join(sorted(unknown))}")
        for required in ("id", "channel", "body"):
            if required not in data:
                raise PlanError(f"campaign spec: missing required field {required!r}")
        deadline = _instant(data.get("deadline"), "deadline")
        if "deadline_in_s" in data:
            deadline = datetime.now(UTC) + timedelta(seconds=_number(data["deadline_in_s"], "deadline_in_s"))
        return cls(
            id=str(data["id"]),
            channel=str(data["channel"]),
            body=str(data["body"]),
            subject=data.get("subject"),
            deadline=deadline,
            rate=_number(data["rate"], "rate") if data.get("rate") is not None else None,
            batch_size=_whole(data["batch_size"], "batch_size") if data.get("batch_size") is not None else None,
            max_staleness=parse_duration(data["max_staleness"]) if data.get("max_staleness") is not None else None,
            as_of=_instant(data.get("as_of"), "as_of"),
            require_consent=_flag(data.get("require_consent", False), "require_consent"),
            quiet_hours=_quiet_hours(data.get("quiet_hours", True)),
            default_timezone=str(data["default_timezone"]) if data.get("default_timezone") else None,
            require_timezone=_flag(data.get("require_timezone", False), "require_timezone"),
        )


_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: Any) -> timedelta:
    """Seconds (a number) or a string like ``"30d"``, ``"12h"``, ``"90m"``, ``"45s"``."""
    if isinstance(value, bool):
        raise PlanError(f"campaign spec: duration {value!r} is not a number of seconds or like '30d'")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        match = _DURATION.fullmatch(str(value))
        if match is None:
            raise PlanError(f"campaign spec: duration {value!r} is not a number of seconds or like '30d'")
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if seconds <= 0:
        raise PlanError(f"campaign spec: duration {value!r} must be positive")
    return timedelta(seconds=seconds)


def _number(value: Any, name: str) -> float:
    """A finite number (a JSON/TOML number, not a string or a boolean)."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    raise PlanError(f"campaign spec: {name} must be a finite number, got {value!r}")


def _whole(value: Any, name: str) -> int:
    """A whole number (``100`` or ``100.0``; not ``1.5``, a string or a boolean)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise PlanError(f"campaign spec: {name} must be a whole number, got {value!r}")


def _check_types(spec: CampaignSpec) -> None:
    """Fields built in code (not through ``from_mapping``) get the same type checks."""
    if spec.rate is not None:
        _number(spec.rate, "rate")
    if spec.batch_size is not None and (not isinstance(spec.batch_size, int) or isinstance(spec.batch_size, bool)):
        raise PlanError(f"campaign spec: batch_size must be a whole number, got {spec.batch_size!r}")
    if spec.subject is not None and not isinstance(spec.subject, str):
        raise PlanError(f"campaign spec: subject must be a string, got {spec.subject!r}")


def _instant(value: Any, name: str) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            pass
    raise PlanError(f"campaign spec: {name} {value!r} is not an ISO 8601 date-time")


def _flag(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    raise PlanError(f"campaign spec: {name} must be true or false, got {value!r}")


def _clock(value: Any, name: str) -> time:
    if isinstance(value, time):
        return value
    try:
        return time.fromisoformat(str(value))
    except ValueError:
        raise PlanError(f"campaign spec: quiet_hours {name} {value!r} is not a time like '08:00'") from None


def _quiet_hours(value: Any) -> QuietHours | None:
    """``true`` (the default window), ``false``/``null`` (none), or ``{start, end}``."""
    if value is None or value is False:
        return None
    if value is True:
        return QuietHours()
    if isinstance(value, QuietHours):
        return value
    if isinstance(value, dict) and set(value) <= {"start", "end"}:
        default = QuietHours()
        return QuietHours(
            _clock(value.get("start", default.start), "start"), _clock(value.get("end", default.end), "end")
        )
    raise PlanError("campaign spec: quiet_hours must be true, false or {start = 'HH:MM', end = 'HH:MM'}")


def load_campaign_file(path: Path) -> CampaignSpec:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PlanError(f"cannot read campaign file {path}: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode()) if path.suffix == ".toml" else orjson.loads(raw)
    except (tomllib.TOMLDecodeError, orjson.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PlanError(
            f"campaign file {path}: not valid {'TOML' if path.suffix == '.toml' else 'JSON'}: {exc}"
        ) from None
    if not isinstance(data, dict):
        raise PlanError(f"campaign file {path}: expected an object at the top level")
    return CampaignSpec.from_mapping(data)
