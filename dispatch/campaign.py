"""What a campaign system hands us: the campaign spec, read from TOML or JSON.

:class:`CampaignSpec` is the one model of a campaign: the campaign file (``dispatch plan``), the
API's create bodies (``dispatch.api.schemas``) and the OpenAPI ``CampaignSpec`` component are all
this pydantic model, so every field the CLI accepts the API accepts, with the same checks and
messages. Building one in code checks the same way; a bad spec is a :class:`PlanError`.

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
    region = "US"                    # reads national phone numbers (ISO 3166 alpha-2); unset: only +...
    require_timezone = false         # true: reject recipients without a usable timezone

``deadline_in_s = 3600`` instead of ``deadline`` sets the deadline that many seconds after the
spec is read. :meth:`CampaignSpec.as_json` is the spec as the API takes it (and
:meth:`CampaignSpec.from_mapping` reads it back equal).
"""

from __future__ import annotations

import hashlib
import math
import re
import string
import tomllib
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from typing import Annotated, Any, Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    ValidationError,
    WithJsonSchema,
    field_serializer,
    model_validator,
)

# The metaclass of every pydantic model, subclassed only to translate the constructor's error.
from pydantic._internal._model_construction import ModelMetaclass

from channels import default_registry
from dispatch.engage.links import find_links, strip_links
from dispatch.errors import PlanError
from dispatch.models import field_errors, problem
from dispatch.rules.checks import QuietHours
from dispatch.rules.validation import parse_region
from dispatch.store import keys

__all__ = [
    "CAMPAIGN_ID_PATTERN",
    "CHANNELS",
    "CampaignSpec",
    "FollowUp",
    "load_campaign_file",
    "parse_duration",
]

#: Channels a campaign can use: the registered ones that have a provider.
CHANNELS: Final = default_registry().channel_names(sendable=True)
#: Slowest campaign rate accepted (messages per second): one message a day.
MIN_RATE = 1 / 86400
#: Campaign ids a client may choose (``triggered-`` is reserved for triggered messages).
CAMPAIGN_ID_PATTERN: Final = rf"^(?!{re.escape(keys.RESERVED_ID_PREFIX)})[A-Za-z0-9._-]{{1,128}}$"
_ID_CHARS: Final = re.compile(r"[A-Za-z0-9._-]{1,128}")
#: Longest body and subject (RFC 5322 line limit for the subject).
MAX_BODY: Final = 10_000
MAX_SUBJECT: Final = 998
#: Largest batch a campaign may ask for.
MAX_BATCH_SIZE: Final = 10_000


def _shown(value: Any) -> str:
    """A short rendering of a refused value (ids, channel names, numbers: never an address)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _campaign_id(value: str) -> str:
    if not _ID_CHARS.fullmatch(value):
        raise problem(f"{_shown(value)}: use 1-128 letters, digits, '-', '_' or '.'")
    if value.startswith(keys.RESERVED_ID_PREFIX):
        raise problem(
            f"ids starting with {keys.RESERVED_ID_PREFIX!r} are reserved for triggered messages; choose another id"
        )
    return value


def _channel(value: str) -> str:
    if value not in CHANNELS:
        raise problem(f"{_shown(value)} is not one of {', '.join(CHANNELS)}")
    return value


def _template(value: str) -> str:
    try:
        valid = string.Template(value).is_valid()
    except ValueError:
        valid = False
    if not valid:
        raise problem("not a valid template: a '$' is not followed by a field name (write $$ for a dollar sign)")
    try:
        find_links(value)
    except ValueError as exc:
        raise problem(str(exc)) from None
    return value


def _number(value: Any) -> Any:
    """A finite number (a JSON/TOML number, not a string or a boolean)."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    if value is None:
        return value
    raise problem(f"must be a finite number, got {_shown(value)}")


def _rate(value: float) -> float:
    if value < MIN_RATE:
        raise problem(f"{value} is out of range: give at least {MIN_RATE:.3g} messages per second (one a day)")
    return value


def _whole(value: Any) -> Any:
    """A whole number (``100`` or ``100.0``; not ``1.5``, a string or a boolean)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise problem(f"must be a whole number, got {_shown(value)}")


def _flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise problem(f"must be true or false, got {_shown(value)}")


def _instant(value: Any) -> datetime | None:
    """An RFC 3339 date-time with an offset (a string, or a TOML/Python datetime)."""
    if value is None:
        return None
    parsed: datetime | None = value if isinstance(value, datetime) else None
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            parsed = None
    if parsed is None:
        raise problem(f"{_shown(value)} is not an ISO 8601 date-time")
    if parsed.tzinfo is None:
        raise problem("needs a timezone (e.g. 2026-11-25T12:00:00Z)")
    return parsed


_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: Any) -> timedelta:
    """Seconds (a number) or a string like ``"30d"``, ``"12h"``, ``"90m"``, ``"45s"``."""
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, bool) or not isinstance(value, int | float | str):
        raise PlanError(f"campaign spec: duration {_shown(value)} is not a number of seconds or like '30d'")
    elif isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.fullmatch(value)
        if match is None:
            raise PlanError(f"campaign spec: duration {_shown(value)} is not a number of seconds or like '30d'")
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if not seconds > 0 or not math.isfinite(seconds):
        raise PlanError(f"campaign spec: duration {_shown(value)} must be positive")
    return timedelta(seconds=seconds)


def _duration(value: Any) -> timedelta | None:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except PlanError as exc:
        raise problem(str(exc).removeprefix("campaign spec: ")) from None


def _clock(value: Any, name: str) -> time:
    if isinstance(value, time):
        return value
    try:
        return time.fromisoformat(str(value))
    except ValueError:
        raise problem(f"{name} {_shown(value)} is not a time like '08:00'") from None


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
    raise problem("must be true, false or {start = 'HH:MM', end = 'HH:MM'}")


def _quiet_json(value: QuietHours | None) -> dict[str, str] | bool:
    if value is None:
        return False
    return {"start": value.start.isoformat("minutes"), "end": value.end.isoformat("minutes")}


def _zone(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise problem(f"expected string, got {_shown(value)}")
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise problem(f"{_shown(value)} is not an IANA zone") from None
    return value


def _region(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise problem(f"expected string, got {_shown(value)}")
    code = parse_region(value)
    if code is None:
        raise problem(
            f"{_shown(value)} is not an ISO 3166 alpha-2 country code with a phone numbering plan (e.g. US, GB)"
        )
    return code


_INSTANT_SCHEMA: Final = {"type": ["string", "null"], "format": "date-time", "description": "RFC 3339, with an offset"}
_CLOCK_SCHEMA: Final = {"type": "string", "pattern": r"^\d{2}:\d{2}(:\d{2})?$"}

Instant = Annotated[datetime | None, PlainValidator(_instant), WithJsonSchema(_INSTANT_SCHEMA)]


def _where(value: Any) -> str:
    from dispatch.rounds.where import WhereError, parse_where

    if not isinstance(value, str):
        raise problem(f"expected a string like 'opened and not clicked', got {_shown(value)}")
    try:
        parse_where(value)
    except WhereError as exc:
        raise problem(str(exc).removeprefix("where: ")) from None
    return value


class FollowUp(BaseModel):
    """A follow-up round's audience: the recipients of campaign ``from`` for whom ``where`` holds
    (``dispatch.rounds.where``), starting ``after`` that campaign finished (``dispatch.rounds``).
    ``contacts``: an audience file with the recipients' addresses for this round's channel (needed
    when it differs from the source's; see ``dispatch.rounds.derive``).

    Like every audience (a file, a configured source), it is given beside the spec, not in it:
    a funnel round's ``audience = { from = ..., where = ... }`` (``dispatch.rounds.funnel``)."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True, title="FollowUp")

    source: Annotated[
        str,
        Field(
            alias="from", description="the earlier campaign's id", json_schema_extra={"pattern": CAMPAIGN_ID_PATTERN}
        ),
        AfterValidator(_campaign_id),
    ]
    where: Annotated[
        str,
        Field(
            description="predicates delivered, opened, machine_opened, clicked, replied, opted_out, bounced, sent "
            "with and / or / not / ()"
        ),
        PlainValidator(_where),
        WithJsonSchema({"type": "string", "description": "e.g. 'opened and not clicked'"}),
    ]
    after: Annotated[
        timedelta | None,
        PlainValidator(_duration),
        PlainSerializer(lambda v: None if v is None else v.total_seconds(), return_type=float | None),
        WithJsonSchema({"type": ["number", "string", "null"], "description": "wait after the source finished: '72h'"}),
    ] = None
    contacts: Annotated[str | None, Field(max_length=4096)] = None

    @classmethod
    def from_mapping(cls, data: Any) -> FollowUp:
        """A follow-up from a funnel file's ``audience`` table (:class:`PlanError` naming each bad field)."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(f"audience.{field}: {reason}" for field, reason in field_errors(exc))
            raise PlanError(problems) from None

    def as_data(self) -> dict[str, Any]:
        return {
            "from": self.source,
            "where": self.where,
            "after": self.after.total_seconds() if self.after else None,
            "contacts": self.contacts,
        }


Flag = Annotated[bool, PlainValidator(_flag), WithJsonSchema({"type": "boolean"})]


class _RaisesPlanError(ModelMetaclass):
    """Building a spec in code (``CampaignSpec(id=...)``) raises :class:`PlanError`, like the file;
    validation of a body that nests a spec (``model_validate``) keeps pydantic's field errors."""

    def __call__(cls, *args: Any, **data: Any) -> Any:
        try:
            return super().__call__(*args, **data)
        except ValidationError as exc:
            raise PlanError(_plan_error_text(data, exc)) from None


class CampaignSpec(BaseModel, metaclass=_RaisesPlanError):
    """One campaign: who (the audience is given separately), what, through which channel, by when."""

    model_config = ConfigDict(frozen=True, extra="forbid", title="CampaignSpec")

    id: Annotated[
        str,
        Field(description="client-supplied campaign id", json_schema_extra={"pattern": CAMPAIGN_ID_PATTERN}),
        AfterValidator(_campaign_id),
    ]
    channel: Annotated[str, Field(json_schema_extra={"enum": list(CHANNELS)}), AfterValidator(_channel)]
    body: Annotated[
        str,
        Field(min_length=1, max_length=MAX_BODY, description="string.Template ($field)"),
        AfterValidator(_template),
    ]
    subject: Annotated[str | None, Field(max_length=MAX_SUBJECT)] = None
    deadline: Instant = None
    #: Campaign-level cap in messages per second on top of the provider's limit (None = none).
    rate: Annotated[
        Annotated[float, Field(gt=0), AfterValidator(_rate)] | None,
        BeforeValidator(_number),
        Field(description="campaign cap, messages/s (at least one a day)"),
    ] = None
    batch_size: Annotated[int | None, BeforeValidator(lambda v: None if v is None else _whole(v))] = Field(
        default=None, ge=1, le=MAX_BATCH_SIZE
    )
    #: Oldest acceptable ``updated_at`` relative to ``as_of`` (None: no freshness check).
    max_staleness: Annotated[
        timedelta | None,
        PlainValidator(_duration),
        PlainSerializer(lambda v: None if v is None else v.total_seconds(), return_type=float | None),
        WithJsonSchema(
            {
                "type": ["number", "string", "null"],
                "pattern": r"^\s*\d+(\.\d+)?\s*[smhd]?\s*$",
                "exclusiveMinimum": 0,
                "description": "oldest acceptable updated_at: seconds, or like '30d', '12h', '90m', '45s'",
            }
        ),
    ] = None
    #: The source's sync watermark (None: the plan time). Only used with ``max_staleness``.
    as_of: Instant = None
    #: True: only an explicit consent for the channel counts; False: only an explicit no blocks.
    require_consent: Flag = False
    #: Allowed local sending window (None: send at any hour, e.g. transactional messages).
    quiet_hours: Annotated[
        QuietHours | None,
        PlainValidator(_quiet_hours),
        PlainSerializer(_quiet_json, return_type=dict[str, str] | bool),
        WithJsonSchema(
            {
                "description": "allowed local sending window: true (08:00-21:00), false/null (none) or {start, end}",
                "anyOf": [
                    {"type": ["boolean", "null"]},
                    {
                        "type": "object",
                        "properties": {"start": _CLOCK_SCHEMA, "end": _CLOCK_SCHEMA},
                        "additionalProperties": False,
                    },
                ],
            }
        ),
    ] = Field(default_factory=QuietHours)
    #: IANA zone for recipients without a timezone (a given but unknown zone is rejected, not defaulted).
    default_timezone: Annotated[
        str | None,
        PlainValidator(_zone),
        WithJsonSchema({"type": ["string", "null"], "description": "IANA zone for recipients without one"}),
    ] = None
    #: The country whose national phone numbers the audience may hold (``07400 123456``, and
    #: ``0044 7400 123456`` through its international prefix), ISO 3166 alpha-2, stored upper
    #: case; a recipient's own ``region``/``country`` column wins. None: only numbers in
    #: international format (``+44 ...``) are valid, unless the planner has a default (``--region``).
    region: Annotated[
        str | None,
        PlainValidator(_region),
        WithJsonSchema(
            {
                "type": ["string", "null"],
                "pattern": "^[A-Za-z]{2}$",
                "description": "ISO 3166 alpha-2 country for national phone numbers (e.g. GB)",
            }
        ),
    ] = None
    #: True: a recipient whose local time cannot be known is rejected (``unknown_timezone``);
    #: False: a recipient *without* a timezone is scheduled as if the window were open (a
    #: timezone that is given but unknown is always rejected).
    require_timezone: Flag = False
    #: Input only: the deadline this many seconds after the spec is read (wins over ``deadline``).
    deadline_in_s: Annotated[
        float | None,
        BeforeValidator(_number),
        Field(exclude=True, description="input only: sets deadline to now + this many seconds"),
    ] = None

    @model_validator(mode="after")
    def _resolve_deadline_in_s(self) -> CampaignSpec:
        if self.deadline_in_s is not None:
            object.__setattr__(self, "deadline", datetime.now(UTC) + timedelta(seconds=self.deadline_in_s))
            object.__setattr__(self, "deadline_in_s", None)
        return self

    @field_serializer("deadline", "as_of")
    def _iso(self, value: datetime | None) -> str | None:
        return value.isoformat() if value is not None else None

    @property
    def template_fields(self) -> tuple[str, ...]:
        return tuple(string.Template(strip_links(self.body)).get_identifiers())

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
            # only when set: a spec without a region keeps the fingerprint it had before the field
            **({"region": self.region} if self.region is not None else {}),
        }

    def fingerprint(self) -> str:
        """Stable hash of the spec: the same id with another body is another campaign (the same
        bytes as before the spec was a model, so stored plans keep matching)."""
        data: dict[str, Any] = {
            "id": self.id,
            "channel": self.channel,
            "body": self.body,
            "subject": self.subject,
            "deadline": self.deadline.isoformat() if self.deadline else None,
            "rate": self.rate,
            "batch_size": self.batch_size,
            **self.policy(),
        }
        return hashlib.sha256(orjson.dumps(data, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]

    def as_json(self) -> dict[str, Any]:
        """The spec as JSON values, as the API takes it (every field; ``from_mapping`` reads it back equal)."""
        return self.model_dump(mode="json", exclude={"deadline_in_s"})

    @classmethod
    def from_mapping(cls, data: dict[str, Any]) -> CampaignSpec:
        """A spec from a campaign file's or a request's mapping (:class:`PlanError` names each bad field)."""
        if not isinstance(data, dict):
            raise PlanError("campaign spec: expected an object")
        return cls(**data)

    @classmethod
    def errors_of(cls, data: Any, prefix: str = "") -> list[tuple[str, str]] | CampaignSpec:
        """The spec, or ``(field, reason)`` for each problem (fields under ``prefix``)."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            return field_errors(exc, prefix)


def _plan_error_text(data: dict[str, Any], exc: ValidationError) -> str:
    where = f"campaign {data['id']}" if isinstance(data.get("id"), str) and _ID_CHARS.fullmatch(data["id"]) else None
    problems = "; ".join(f"{field}: {reason}" for field, reason in field_errors(exc))
    return f"{where or 'campaign spec'}: {problems}"


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
