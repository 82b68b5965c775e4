"""The manifest of a campaign: one typed record and its one codec (``Manifest.encode``/``decode``).

The manifest is stored as one JSON object under ``keys.manifest(cid)``. The planner writes it
when a plan commits (``dispatch.plan.snapshot``), ``dispatch.triggered`` writes a fixed one for
each hourly campaign of triggered messages, and three Lua scripts change it in place by text, so
the stored form is a contract, not a detail:

- ``dispatch/triggered/accept.lua`` and ``seal.lua`` rewrite the first ``"total":N``,
  ``"accepted":N`` and ``"batches":N`` of the text: those three keys come before every nested
  object that could hold the same key (``rejected`` is the first nested one);
- ``dispatch/api/app.py`` appends ``"audience_source":"NAME"`` before the closing brace.

Keys are written in the order of the fields below, which is the order the planner has always
written them, so a manifest encoded here is byte for byte what the previous code wrote. Fields
are of three kinds:

- required: every manifest ever written has them (the first planner and the triggered one);
  a manifest without one is refused with :class:`ManifestError` naming the campaign and the key;
- nullable (``subject``, ``rate``, ``deadline``, ``rejected_file``): written as ``null`` when
  unset, as always;
- added later or written by one writer only (:data:`OMITTED_WHEN_UNSET`): absent from older or
  triggered manifests, read as ``None`` and not written while ``None`` (a triggered manifest keeps
  its shape).

Keys this code does not know (a newer writer's) are kept in :attr:`Manifest.extra` and written
back after the known ones, so a rewrite (:func:`dispatch.plan.snapshot.extend_retention`) loses
nothing. Nested objects (``rejected``, ``prediction``, ``policy``, ``schedule``, ``dedup``) stay
the JSON values they were written as: the API and the plan report return them as they are.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import orjson

from dispatch.errors import DispatchError

__all__ = ["OMITTED_WHEN_UNSET", "TRIGGERED", "Manifest", "ManifestError"]

#: ``kind`` of the manifest of a triggered-messages campaign (a planned campaign has none).
TRIGGERED: Final = "triggered"


class ManifestError(DispatchError):
    """A stored manifest cannot be read (not a JSON object, or a required key is missing)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Manifest:
    """What a committed plan records about a campaign (see the module docstring)."""

    campaign_id: str
    #: ``"triggered"`` for a triggered-messages campaign; ``None`` (not written) for a planned one.
    kind: Literal["triggered"] | None = None
    #: ``CampaignSpec.fingerprint()`` of the spec it was planned from (``"triggered"`` for those).
    fingerprint: str
    channel: str
    #: The body template (``string.Template`` syntax).
    body: str
    subject: str | None = None
    #: The campaign's own rate limit (messages per second), None for none.
    rate: float | None = None
    #: The deadline (epoch seconds), None for none.
    deadline: float | None = None
    #: Rows read (a triggered campaign: messages accepted so far).
    total: int
    #: Rows accepted into the snapshot (a triggered campaign: one more until it closes).
    accepted: int
    #: Rejected rows per reason.
    rejected: dict[str, int]
    batches: int
    batch_size: int
    cost_units: int
    #: sha256 over every stored batch, in order (``verify_snapshot``).
    checksum: str
    #: Hash of what planning made of the audience (a replan with another audience is refused).
    audience_digest: str | None = None
    snapshot_bytes: int
    #: When the plan was made (epoch seconds).
    created_at: float
    #: The instant the audience is as fresh as (epoch seconds).
    watermark: float | None = None
    policy: dict[str, Any] | None = None
    config_hash: str | None = None
    schedule: list[Any] | None = None
    dedup: dict[str, Any] | None = None
    #: When the snapshot expires (epoch seconds); ``extend_retention`` moves it.
    expires_at: float | None = None
    #: ``Prediction.as_dict()`` as it was written.
    prediction: dict[str, Any]
    rejected_file: str | None = None
    #: Rejected rows counted but not listed in the rejected file (it reached its size cap).
    rejected_unlisted: int | None = None
    #: The configured source an API-created campaign was planned from (appended by the API).
    audience_source: str | None = None
    #: Tracked links of the body, numbered in order (``dispatch.engage.links``); unset: none.
    links: list[str] | None = None
    #: Where a follow-up round's derived audience came from (``dispatch.rounds.derive``): source
    #: campaign, ``where`` expression, when it was derived, counts.
    lineage: dict[str, Any] | None = None
    #: Keys this code does not know, kept as they were and written after the known ones.
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def triggered(self) -> bool:
        return self.kind == TRIGGERED

    @property
    def predicted_duration_s(self) -> float:
        """The predicted send duration in seconds (0.0 when the prediction has none)."""
        return float(self.prediction.get("duration_s") or 0.0)

    @property
    def verdict(self) -> str:
        """The prediction's verdict: ``fits``, ``at_risk``, ``does_not_fit`` or ``no_deadline``."""
        return str(self.prediction["verdict"])

    def as_dict(self) -> dict[str, Any]:
        """The manifest as the JSON object it is stored as (keys in the stored order)."""
        out: dict[str, Any] = {}
        for name in _KNOWN:
            value = getattr(self, name)
            if value is None and name in OMITTED_WHEN_UNSET:
                continue
            out[name] = value
        out.update(self.extra)
        return out

    def encode(self) -> bytes:
        return orjson.dumps(self.as_dict())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, campaign_id: str = "") -> Manifest:
        """Read a manifest from its JSON object; ``campaign_id`` names it in errors."""
        where = f"campaign {campaign_id or data.get('campaign_id')!r}"
        missing = [name for name in _REQUIRED if name not in data]
        if missing:
            raise ManifestError(f"{where}: the stored manifest has no {', '.join(missing)}")
        known = {name: data[name] for name in _KNOWN if name in data}
        extra = {name: value for name, value in data.items() if name not in _KNOWN_SET}
        kind = known.get("kind")
        if kind is not None and kind != TRIGGERED:
            raise ManifestError(f"{where}: the stored manifest has an unknown kind {kind!r}")
        return cls(**known, extra=extra)

    @classmethod
    def decode(cls, raw: bytes | str, *, campaign_id: str = "") -> Manifest:
        """Read a stored manifest (the bytes :meth:`encode` or any earlier version wrote)."""
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ManifestError(f"campaign {campaign_id!r}: the stored manifest is not JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ManifestError(f"campaign {campaign_id!r}: the stored manifest is not a JSON object")
        return cls.from_dict(data, campaign_id=campaign_id)

    def replace(self, **changes: Any) -> Manifest:
        return dataclasses.replace(self, **changes)


#: Fields absent from older manifests or from one writer's: read as None, not written while None.
OMITTED_WHEN_UNSET: Final = frozenset(
    {
        "kind",
        "audience_digest",
        "watermark",
        "policy",
        "config_hash",
        "schedule",
        "dedup",
        "expires_at",
        "rejected_unlisted",
        "audience_source",
        "links",
        "lineage",
    }
)
#: Stored keys in the order they are written.
_KNOWN: Final = tuple(f.name for f in dataclasses.fields(Manifest) if f.name != "extra")
_KNOWN_SET: Final = frozenset(_KNOWN)
#: Keys every manifest ever written has.
_REQUIRED: Final = tuple(
    f.name
    for f in dataclasses.fields(Manifest)
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
)
