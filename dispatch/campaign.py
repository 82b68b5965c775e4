"""What a campaign system hands us: the campaign spec, read from TOML or JSON."""

from __future__ import annotations

import hashlib
import string
import tomllib
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from dispatch.errors import PlanError

__all__ = ["CampaignSpec", "load_campaign_file"]

CHANNELS = ("sms", "email", "push", "webhook")


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

    def __post_init__(self) -> None:
        if not self.id or len(self.id) > 128 or not all(c.isalnum() or c in "-_." for c in self.id):
            raise PlanError(f"campaign id {self.id!r}: use 1-128 letters, digits, '-', '_' or '.'")
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
        if self.rate is not None and self.rate <= 0:
            raise PlanError(f"campaign {self.id}: rate must be positive, got {self.rate}")
        if self.deadline is not None and self.deadline.tzinfo is None:
            raise PlanError(f"campaign {self.id}: deadline needs a timezone (e.g. 2026-11-25T12:00:00Z)")

    @property
    def template_fields(self) -> tuple[str, ...]:
        return tuple(string.Template(self.body).get_identifiers())

    def fingerprint(self) -> str:
        """Stable hash of the spec: the same id with another body is another campaign."""
        data = asdict(self)
        data["deadline"] = self.deadline.isoformat() if self.deadline else None
        return hashlib.sha256(orjson.dumps(data, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]

    @classmethod
    def from_mapping(cls, data: dict[str, Any]) -> CampaignSpec:
        known = {"id", "channel", "body", "subject", "deadline", "rate", "batch_size", "deadline_in_s"}
        unknown = set(data) - known
        if unknown:
            raise PlanError(f"campaign spec: unknown field(s) {', '.join(sorted(unknown))}")
        for required in ("id", "channel", "body"):
            if required not in data:
                raise PlanError(f"campaign spec: missing required field {required!r}")
        deadline = data.get("deadline")
        if isinstance(deadline, str):
            try:
                deadline = datetime.fromisoformat(deadline.replace("Z", "+00:00"))
            except ValueError:
                raise PlanError(f"campaign spec: deadline {deadline!r} is not an ISO 8601 date-time") from None
        if "deadline_in_s" in data:
            deadline = datetime.now(UTC) + timedelta(seconds=float(data["deadline_in_s"]))
        return cls(
            id=str(data["id"]),
            channel=str(data["channel"]),
            body=str(data["body"]),
            subject=data.get("subject"),
            deadline=deadline,
            rate=float(data["rate"]) if data.get("rate") is not None else None,
            batch_size=int(data["batch_size"]) if data.get("batch_size") is not None else None,
        )


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
