"""JSON Schemas of the HTTP API and the small validator that enforces them.

The schemas below are the single source: request bodies are checked with :func:`validate` (every
field, unknown fields rejected, one :class:`FieldError` per problem) and the OpenAPI document
(``dispatch.api.openapi``) publishes the same dictionaries. The validator implements the subset of
JSON Schema 2020-12 these schemas use: ``type`` (one or a list), ``properties``, ``required``,
``additionalProperties`` (bool or schema), ``items``, ``enum``, ``minimum``, ``maximum``,
``exclusiveMinimum``, ``minLength``, ``maxLength``, ``pattern``, ``minItems``, ``maxItems``,
``minProperties``, ``maxProperties``, ``format: date-time`` and local ``$ref``. An unsupported keyword
raises ``ValueError`` (so a schema cannot silently promise more than is checked).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any, Final

from dispatch.api.problems import FieldError
from dispatch.campaign import CHANNELS
from dispatch.config import SOURCE_NAME_PATTERN
from dispatch.rules.suppression import GLOBAL

__all__ = ["SCHEMAS", "SUPPRESSION_LISTS", "validate"]

_SUPPORTED: Final = frozenset(
    {
        "type",
        "properties",
        "required",
        "additionalProperties",
        "items",
        "enum",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "minLength",
        "maxLength",
        "pattern",
        "minItems",
        "maxItems",
        "minProperties",
        "maxProperties",
        "format",
        "$ref",
        "description",
        "title",
        "examples",
        "default",
    }
)

_REF_PREFIX: Final = "#/components/schemas/"


def _s(kind: str | list[str], **rest: Any) -> dict[str, Any]:
    return {"type": kind, **rest}


def _obj(properties: dict[str, Any], required: list[str], **rest: Any) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False, **rest}


_NUM = _s("number")
_INT = _s("integer", minimum=0)
_NUM_OR_NULL = _s(["number", "null"])

#: Campaign ids a client may choose: what ``CampaignSpec`` accepts (``triggered-`` is reserved).
CAMPAIGN_ID_PATTERN: Final = r"^(?!triggered-)[A-Za-z0-9._-]{1,128}$"
#: Campaign ids in a path: a client's, a triggered campaign's (``triggered:sms-2026112512``) or
#: one of the former triggered ids (``triggered-sms-2026112512``).
CAMPAIGN_PATH_ID_PATTERN: Final = r"^(?:[A-Za-z0-9._-]{1,128}|triggered:[a-z]+-[0-9]{10})$"

#: Suppression lists the API serves: one per channel a campaign can use, and the global one.
SUPPRESSION_LISTS: Final = (*CHANNELS, GLOBAL)

SCHEMAS: Final[dict[str, dict[str, Any]]] = {
    "CampaignSpec": _obj(
        {
            "id": _s("string", pattern=CAMPAIGN_ID_PATTERN, description="client-supplied campaign id"),
            "channel": _s("string", enum=list(CHANNELS)),
            "body": _s("string", minLength=1, maxLength=10_000, description="string.Template ($field)"),
            "subject": _s(["string", "null"], maxLength=998),
            "deadline": _s(["string", "null"], format="date-time"),
            "rate": _s(["number", "null"], exclusiveMinimum=0, description="campaign cap, messages/s"),
            "batch_size": _s(["integer", "null"], minimum=1, maximum=10_000),
        },
        ["id", "channel", "body"],
    ),
    "CampaignCreateJson": _obj(
        {
            "spec": {"$ref": _REF_PREFIX + "CampaignSpec"},
            "recipients": _s(
                "array",
                maxItems=10_000,
                items=_s(
                    "object",
                    maxProperties=64,
                    additionalProperties=_s(["string", "number", "boolean", "null"]),
                    description="one audience row: id, phone, email, ..., template attributes",
                ),
            ),
        },
        ["spec", "recipients"],
    ),
    "CampaignCreateFromSource": _obj(
        {
            "spec": {"$ref": _REF_PREFIX + "CampaignSpec"},
            "audience": {"$ref": _REF_PREFIX + "AudienceSourceRef"},
        },
        ["spec", "audience"],
    ),
    "AudienceSourceRef": _obj(
        {
            "source": _s(
                "string",
                pattern=SOURCE_NAME_PATTERN,
                description="name of an audience source configured on the server ([sources.NAME] in its settings)",
            )
        },
        ["source"],
    ),
    "Prediction": _obj(
        {
            "messages": _INT,
            "cost_units": _INT,
            "rate": _NUM,
            "bottleneck": _s("string", enum=["provider_rate", "campaign_rate", "worker_capacity", "cpu"]),
            "duration_s": _NUM,
            "start": _NUM,
            "finish": _NUM,
            "deadline": _NUM_OR_NULL,
            "verdict": _s("string", enum=["fits", "does_not_fit", "no_deadline"]),
            "required_rate": _NUM_OR_NULL,
            "advice": _s("string"),
            "speed_factor": _s(
                "number",
                description="machine-speed factor the CPU ceiling was scaled by (1: not measured, >1: slower)",
            ),
        },
        [
            "messages",
            "cost_units",
            "rate",
            "bottleneck",
            "duration_s",
            "start",
            "finish",
            "deadline",
            "verdict",
            "required_rate",
            "advice",
        ],
    ),
    "PlanReport": _obj(
        {
            "campaign_id": _s("string"),
            "total": _INT,
            "accepted": _INT,
            "rejected": _s("object", additionalProperties=_INT, description="rows rejected, by reason"),
            "batches": _INT,
            "cost_units": _INT,
            "prediction": {"$ref": _REF_PREFIX + "Prediction"},
            "existing": _s("boolean", description="true when this id was already planned with this spec"),
        },
        ["campaign_id", "total", "accepted", "rejected", "batches", "cost_units", "prediction", "existing"],
    ),
    "CampaignStatus": _obj(
        {
            "campaign_id": _s("string"),
            "kind": _s("string", enum=["campaign", "triggered"]),
            "channel": _s("string"),
            "state": _s("string", enum=["planned", "running", "paused", "cancelled", "completed"]),
            "total": _INT,
            "accepted": _INT,
            "rejected": _s("object", additionalProperties=_INT),
            "batches": _INT,
            "done": _INT,
            "not_sent": _s("integer"),
            "counters": _s("object", additionalProperties=_INT),
            "rate": _NUM_OR_NULL,
            "current_rate": _NUM,
            "eta_s": _NUM_OR_NULL,
            "predicted_s": _NUM,
            "deadline": _NUM_OR_NULL,
            "started_at": _NUM_OR_NULL,
            "verdict": _s("string", enum=["fits", "does_not_fit", "no_deadline"]),
            "prediction": {"$ref": _REF_PREFIX + "Prediction"},
        },
        [
            "campaign_id",
            "kind",
            "channel",
            "state",
            "total",
            "accepted",
            "rejected",
            "batches",
            "done",
            "not_sent",
            "counters",
            "rate",
            "current_rate",
            "eta_s",
            "predicted_s",
            "deadline",
            "started_at",
            "verdict",
            "prediction",
        ],
    ),
    "CampaignPatch": _obj(
        {"rate": _s(["number", "null"], exclusiveMinimum=0, description="messages/s; null removes the cap")},
        ["rate"],
    ),
    "MessageRecord": _obj(
        {
            "message_id": _s("string"),
            "recipient_id": _s("string"),
            "batch": _INT,
            "index": _INT,
            "state": _s("string", description="pending (not claimed yet), sending, sent, delivered, failed, ..."),
            "attempts": _INT,
            "provider_id": _s("string"),
            "code": _s("string"),
            "ts": _NUM_OR_NULL,
        },
        ["message_id", "recipient_id", "batch", "index", "state", "attempts", "provider_id", "code", "ts"],
    ),
    "MessagePage": _obj(
        {
            "items": _s("array", items={"$ref": _REF_PREFIX + "MessageRecord"}),
            "next_cursor": _s(["string", "null"], description="pass as ?cursor= for the next page"),
        },
        ["items", "next_cursor"],
    ),
    "SuppressionAdd": _obj(
        {
            "channel": _s("string", enum=list(SUPPRESSION_LISTS)),
            "addresses": _s("array", minItems=1, maxItems=1_000, items=_s("string", minLength=1, maxLength=2_048)),
        },
        ["channel", "addresses"],
    ),
    "SuppressionResult": _obj(
        {
            "channel": _s("string"),
            "added": _INT,
            "removed": _INT,
        },
        ["channel"],
    ),
    "TriggeredMessage": _obj(
        {
            "channel": _s("string", enum=["sms"]),
            "to": _s("string", minLength=1, maxLength=2_048, description="the recipient's address"),
            "body": _s("string", minLength=1, maxLength=1_600, description="string.Template ($field)"),
            "attributes": _s("object", maxProperties=64, additionalProperties=_s("string", maxLength=1_024)),
            "recipient_id": _s("string", minLength=1, maxLength=128),
            "timezone": _s(
                ["string", "null"], maxLength=64, description="IANA zone: holds the message to 08:00-21:00 local"
            ),
        },
        ["channel", "to", "body"],
    ),
    "TriggeredAccepted": _obj(
        {
            "message_id": _s("string"),
            "campaign_id": _s("string"),
            "state": _s(
                "string",
                enum=["queued", "suppressed", "frequency_capped"],
                description="queued; or refused (no record): suppressed, frequency_capped",
            ),
            "not_before": _NUM,
            "replayed": _s("boolean", description="true when this answers a repeated Idempotency-Key"),
        },
        ["message_id", "campaign_id", "state", "not_before", "replayed"],
    ),
    "Problem": {
        "type": "object",
        "properties": {
            "type": _s("string"),
            "title": _s("string"),
            "status": _s("integer", minimum=400, maximum=599),
            "detail": _s("string"),
            "instance": _s("string"),
            "errors": _s(
                "array",
                items=_obj({"field": _s("string"), "reason": _s("string")}, ["field", "reason"]),
            ),
        },
        "required": ["type", "title", "status", "detail", "instance"],
        "additionalProperties": False,
    },
    "Health": _obj(
        {"status": _s("string", enum=["ok", "unavailable"]), "checks": _s("object", additionalProperties=_s("string"))},
        ["status"],
    ),
}

_TYPES: Final[dict[str, Any]] = {
    "string": str,
    "integer": int,
    "number": (int, float),
    "boolean": bool,
    "object": dict,
    "array": list,
    "null": type(None),
}


@lru_cache(maxsize=256)
def _regex(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def _is(value: Any, kind: str) -> bool:
    if isinstance(value, bool) and kind in {"integer", "number"}:
        return False
    if kind == "integer" and isinstance(value, float):
        return value.is_integer()
    return isinstance(value, _TYPES[kind])


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def validate(
    schema: Mapping[str, Any],
    value: Any,
    *,
    schemas: Mapping[str, Mapping[str, Any]] = SCHEMAS,
    path: str = "",
    limit: int = 50,
) -> list[FieldError]:
    """Every way ``value`` breaks ``schema`` (at most ``limit``); empty when it conforms."""
    errors: list[FieldError] = []
    _check(schema, value, schemas, path, errors, limit=limit)
    return errors


def _check(
    schema: Mapping[str, Any],
    value: Any,
    schemas: Mapping[str, Mapping[str, Any]],
    path: str,
    errors: list[FieldError],
    *,
    limit: int,
) -> None:
    if len(errors) >= limit:
        return
    unknown = set(schema) - _SUPPORTED
    if unknown:
        raise ValueError(f"schema keyword(s) not supported by the validator: {sorted(unknown)}")
    where = path or "(body)"
    if "$ref" in schema:
        ref = str(schema["$ref"])
        if not ref.startswith(_REF_PREFIX) or ref[len(_REF_PREFIX) :] not in schemas:
            raise ValueError(f"unresolvable $ref {ref}")
        _check(schemas[ref[len(_REF_PREFIX) :]], value, schemas, path, errors, limit=limit)
        return
    kinds = schema.get("type")
    if kinds is not None:
        allowed = [kinds] if isinstance(kinds, str) else list(kinds)
        if not any(_is(value, k) for k in allowed):
            errors.append(FieldError(where, f"expected {' or '.join(allowed)}"))
            return
    if "enum" in schema and value not in schema["enum"]:
        errors.append(FieldError(where, f"expected one of {', '.join(map(str, schema['enum']))}"))
        return
    if isinstance(value, str):
        if "minLength" in schema and len(value) < schema["minLength"]:
            errors.append(FieldError(where, f"shorter than {schema['minLength']} characters"))
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errors.append(FieldError(where, f"longer than {schema['maxLength']} characters"))
        if "pattern" in schema and not _regex(schema["pattern"]).search(value):
            errors.append(FieldError(where, f"does not match {schema['pattern']}"))
        if schema.get("format") == "date-time":
            try:
                parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                errors.append(FieldError(where, "not an RFC 3339 date-time"))
            else:
                if parsed.tzinfo is None:
                    errors.append(FieldError(where, "date-time needs an offset (e.g. Z)"))
    if isinstance(value, int | float) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(FieldError(where, f"less than {schema['minimum']}"))
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(FieldError(where, f"greater than {schema['maximum']}"))
        if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
            errors.append(FieldError(where, f"must be greater than {schema['exclusiveMinimum']}"))
    if isinstance(value, list):
        if "minItems" in schema and len(value) < schema["minItems"]:
            errors.append(FieldError(where, f"fewer than {schema['minItems']} items"))
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            errors.append(FieldError(where, f"more than {schema['maxItems']} items"))
            return
        if "items" in schema:
            for i, item in enumerate(value):
                _check(schema["items"], item, schemas, _join(path, i), errors, limit=limit)
    if isinstance(value, dict):
        if "minProperties" in schema and len(value) < schema["minProperties"]:
            errors.append(FieldError(where, f"fewer than {schema['minProperties']} fields"))
        if "maxProperties" in schema and len(value) > schema["maxProperties"]:
            errors.append(FieldError(where, f"more than {schema['maxProperties']} fields"))
            return
        properties: Mapping[str, Any] = schema.get("properties", {})
        for name in schema.get("required", ()):
            if name not in value:
                errors.append(FieldError(_join(path, name), "required"))
        extra = schema.get("additionalProperties", True)
        for key, item in value.items():
            if key in properties:
                _check(properties[key], item, schemas, _join(path, key), errors, limit=limit)
            elif extra is False:
                errors.append(FieldError(_join(path, key), "unknown field"))
            elif isinstance(extra, Mapping):
                _check(extra, item, schemas, _join(path, key), errors, limit=limit)
