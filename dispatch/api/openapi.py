"""The route table of the HTTP API and the OpenAPI 3.1 document built from it.

:data:`OPERATIONS` is the one list of routes: ``dispatch.api.app.build_app`` mounts a handler per
``operation_id`` with the scope given here, and :func:`openapi_document` publishes the same table
with the components generated from the models of ``dispatch.api.schemas``; the API tests check
live responses against the document (:func:`response_errors`, with the model each names).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from dispatch.api.auth import Scope
from dispatch.api.problems import PROBLEM_JSON
from dispatch.api.schemas import CAMPAIGN_PATH_ID_PATTERN, MODELS, SCHEMAS, SUPPRESSION_LISTS, errors_of

__all__ = ["OPERATIONS", "Operation", "find_operation", "openapi_document", "response_errors"]

JSON: Final = "application/json"


@dataclass(frozen=True, kw_only=True)
class Operation:
    operation_id: str
    method: str
    path: str
    scope: Scope | None
    summary: str
    #: media type -> schema (a component name, or an inline schema)
    request: dict[str, Any] = field(default_factory=dict)
    #: status -> (media type, schema component name) or None for an empty body
    responses: dict[int, tuple[str, str] | None] = field(default_factory=dict)
    parameters: list[dict[str, Any]] = field(default_factory=list)
    description: str = ""


def _path_param(name: str, schema: dict[str, Any], description: str = "") -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": schema, "description": description}


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


_CID = _path_param("id", {"type": "string", "pattern": CAMPAIGN_PATH_ID_PATTERN}, "campaign id")
_STATUS = (JSON, "CampaignStatus")

_CREATE_DESCRIPTION = """\
Plan a campaign under a client-supplied id. Two body forms:

* `multipart/form-data`: a `spec` part (JSON `CampaignSpec`, first) and an `audience` part, the
  CSV or JSONL audience file (optionally gzip), streamed to disk in bounded memory. The format comes
  from the part's `Content-Type` (`text/csv`, `application/x-ndjson`, `application/jsonl`) or its
  filename (`.csv`, `.jsonl`, `.ndjson`, optionally `.gz`).
* `application/json`: `{"spec": CampaignSpec, "recipients": [ {...row...} ]}` for small audiences
  (the JSON body limit applies), or `{"spec": CampaignSpec, "audience": {"source": "NAME"}}` to
  plan from an audience source configured on the server (`[sources.NAME]` in its settings: a
  PostgreSQL query or a CSV/JSONL file on the server). An unknown name is a 422 with the field
  `audience.source`; a source whose database cannot be reached is a 503. Connection details never
  appear in answers.

Idempotent: the same id and spec answer the existing plan (200, `existing: true`) without reading
the audience again; the same id with another spec is a 409. A campaign planned from a source
answers only a create naming the same source: another source, or an uploaded audience, is a 409
(and a source create for an id planned from an upload is too). A new plan is a 201."""

OPERATIONS: Final[tuple[Operation, ...]] = (
    Operation(
        operation_id="createCampaign",
        method="POST",
        path="/v1/campaigns",
        scope="write",
        summary="Plan a campaign (spec + streamed audience, or a configured source)",
        description=_CREATE_DESCRIPTION,
        request={
            "multipart/form-data": {
                "type": "object",
                "properties": {
                    "spec": {"$ref": "#/components/schemas/CampaignSpec"},
                    "audience": {"type": "string", "contentMediaType": "text/csv"},
                },
                "required": ["spec", "audience"],
            },
            JSON: {
                "oneOf": [
                    {"$ref": "#/components/schemas/CampaignCreateJson"},
                    {"$ref": "#/components/schemas/CampaignCreateFromSource"},
                ]
            },
        },
        responses={201: (JSON, "PlanReport"), 200: (JSON, "PlanReport")},
    ),
    Operation(
        operation_id="getCampaign",
        method="GET",
        path="/v1/campaigns/{id}",
        scope="read",
        summary="State, counters, rate, ETA, prediction and verdict",
        parameters=[_CID],
        responses={200: _STATUS},
    ),
    Operation(
        operation_id="patchCampaign",
        method="PATCH",
        path="/v1/campaigns/{id}",
        scope="write",
        summary="Re-rate a campaign (takes effect on every worker within about a second)",
        parameters=[_CID],
        request={JSON: "CampaignPatch"},
        responses={200: _STATUS},
    ),
    *(
        Operation(
            operation_id=f"{action}Campaign",
            method="POST",
            path=f"/v1/campaigns/{{id}}/{action}",
            scope="write",
            summary=summary,
            parameters=[_CID],
            responses={200: _STATUS},
        )
        for action, summary in (
            ("start", "Start sending (starting again is a no-op)"),
            ("pause", "Pause every worker's sends of this campaign"),
            ("resume", "Resume a paused campaign"),
            ("cancel", "Cancel: unsent messages are skipped"),
        )
    ),
    Operation(
        operation_id="getCampaignReport",
        method="GET",
        path="/v1/campaigns/{id}/report",
        scope="read",
        summary="Counts, rates, cost and timing of a campaign and of the follow-up rounds derived from it",
        description="The campaign's round report, followed by those of every registered funnel round derived "
        "from it (directly or through another round) that was planned; totals per channel and per provider. "
        "`?format=csv` answers text/csv (one row per round) and `?format=png` an image/png funnel chart.",
        parameters=[_CID, _query("format", {"type": "string", "enum": ["json", "csv", "png"]}, "answer format")],
        responses={200: (JSON, "CampaignReport")},
    ),
    Operation(
        operation_id="listCampaignMessages",
        method="GET",
        path="/v1/campaigns/{id}/messages",
        scope="read",
        summary="Per-message outcomes, paged (recipient ids, never addresses)",
        parameters=[
            _CID,
            _query("batch", {"type": "integer", "minimum": 0}, "only this batch"),
            _query("cursor", {"type": "string", "pattern": r"^\d+\.\d+$"}, "next_cursor of the previous page"),
            _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}, "page size"),
        ],
        responses={200: (JSON, "MessagePage")},
    ),
    Operation(
        operation_id="sendMessage",
        method="POST",
        path="/v1/messages",
        scope="write",
        summary="Send one triggered message (Idempotency-Key required)",
        description=(
            "Checked like campaign messages (address, suppression, frequency cap, quiet hours when "
            "`timezone` is given) and sent by the same workers. A repeated Idempotency-Key with the same body "
            "answers the original message (200, `replayed: true`); with another body it is a 409. "
            "Accepted messages are sent in micro-batches (sealed every ~15 ms or at 100 messages); "
            "`message_id` is `<campaign_id>.<batch>.<index>` (readable at once with getMessage), or "
            "`<campaign_id>.s.<n>` for a suppressed message and `<campaign_id>.f.<n>` for one refused by "
            "the frequency cap (state `frequency_capped`: the address already got `DISPATCH_FREQUENCY_LIMIT` "
            "messages on this channel in the window); neither has a record. The cap counts sends "
            "already made; the workers check it again at send time."
        ),
        parameters=[
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": True,
                "schema": {"type": "string", "minLength": 1, "maxLength": 255},
            }
        ],
        request={JSON: "TriggeredMessage"},
        responses={202: (JSON, "TriggeredAccepted"), 200: (JSON, "TriggeredAccepted")},
    ),
    Operation(
        operation_id="getMessage",
        method="GET",
        path="/v1/messages/{message_id}",
        scope="read",
        summary="One message's record (campaign or triggered)",
        parameters=[_path_param("message_id", {"type": "string"}, "message_id from sendMessage or a page")],
        responses={200: (JSON, "MessageRecord")},
    ),
    Operation(
        operation_id="addSuppressions",
        method="POST",
        path="/v1/suppressions",
        scope="write",
        summary="Suppress addresses on a channel, or globally (stored hashed)",
        request={JSON: "SuppressionAdd"},
        responses={200: (JSON, "SuppressionResult")},
    ),
    Operation(
        operation_id="removeSuppression",
        method="DELETE",
        path="/v1/suppressions/{channel}/{address}",
        scope="admin",
        summary="Lift a suppression (admin: it makes an address reachable again)",
        parameters=[
            _path_param("channel", {"type": "string", "enum": list(SUPPRESSION_LISTS)}),
            _path_param("address", {"type": "string"}, "percent-encoded address (`+` as %2B)"),
        ],
        responses={200: (JSON, "SuppressionResult")},
    ),
    Operation(
        operation_id="recordPushOpen",
        method="POST",
        path="/v1/events/push-open",
        scope="write",
        summary="Record that a push message was opened (reported by the app)",
        description=(
            "The app sends the `ref` it received in the push's data. Recorded once per message in the "
            "engagement ledger (`open`); a repeat answers `recorded: false`. A ref of no known campaign "
            "is a 404, one of a campaign on another channel than push a 422."
        ),
        request={JSON: "PushOpen"},
        responses={200: (JSON, "EngagementRecorded")},
    ),
    Operation(
        operation_id="openapi",
        method="GET",
        path="/v1/openapi.json",
        scope=None,
        summary="This document",
        responses={200: (JSON, "")},
    ),
    Operation(
        operation_id="healthz",
        method="GET",
        path="/healthz",
        scope=None,
        summary="The process is up",
        responses={200: (JSON, "Health")},
    ),
    Operation(
        operation_id="readyz",
        method="GET",
        path="/readyz",
        scope=None,
        summary="Redis answers and will not evict keys",
        responses={200: (JSON, "Health"), 503: (JSON, "Health")},
    ),
    Operation(
        operation_id="metrics",
        method="GET",
        path="/metrics",
        scope=None,
        summary="Prometheus metrics of the API process",
        responses={200: ("text/plain", "")},
    ),
)

_ERRORS_BY_SCOPE: Final = {None: (), "read": (401, 403), "write": (401, 403), "admin": (401, 403)}
_ERROR_TEXT: Final = {
    400: "malformed request (e.g. JSON that does not parse, a missing Idempotency-Key)",
    401: "no valid API key",
    403: "the API key's scope is too weak",
    404: "no such campaign or message",
    409: "conflicts with the current state or an earlier request",
    413: "body too large",
    415: "unsupported Content-Type",
    422: "a field is invalid (see errors)",
    503: "no broker configured, Redis unavailable, or an audience source unreachable",
}


def _media(schema: Any) -> dict[str, Any]:
    if isinstance(schema, str):
        return {"schema": {"$ref": f"#/components/schemas/{schema}"} if schema else {}}
    return {"schema": schema}


def _operation(op: Operation) -> dict[str, Any]:
    out: dict[str, Any] = {"operationId": op.operation_id, "summary": op.summary}
    if op.description:
        out["description"] = op.description
    if op.parameters:
        out["parameters"] = op.parameters
    if op.request:
        out["requestBody"] = {"required": True, "content": {m: _media(s) for m, s in op.request.items()}}
    responses: dict[str, Any] = {}
    for status, body in sorted(op.responses.items()):
        entry: dict[str, Any] = {"description": "success" if status < 400 else "unavailable"}
        if body is not None:
            entry["content"] = {body[0]: _media(body[1])}
        responses[str(status)] = entry
    errors: set[int] = set(_ERRORS_BY_SCOPE[op.scope])
    if op.scope is not None:
        errors |= {400, 404, 409, 422, 503}
        if op.request:
            errors |= {413, 415}
    for status in sorted(errors):
        responses.setdefault(
            str(status),
            {"description": _ERROR_TEXT[status], "content": {PROBLEM_JSON: _media("Problem")}},
        )
    out["responses"] = responses
    if op.scope is not None:
        out["security"] = [{"bearer": [op.scope]}]
        out["x-scope"] = op.scope
    return out


def openapi_document() -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        paths.setdefault(op.path, {})[op.method.lower()] = _operation(op)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "dispatch campaign API",
            "version": "1",
            "description": (
                "Plan, start and watch message campaigns; send triggered messages. Authenticate "
                "with `Authorization: Bearer <token>` (`dispatch apikey create --scope read|write|admin`); "
                "scopes are ordered read < write < admin. Errors are RFC 9457 `application/problem+json`."
            ),
        },
        "jsonSchemaDialect": "https://json-schema.org/draft/2020-12/schema",
        "paths": paths,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def _template_regex(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)) + "$")


def find_operation(document: dict[str, Any], method: str, path: str) -> tuple[str, dict[str, Any]] | None:
    """(path template, operation object) of the documented operation serving ``method path``."""
    for template, item in document["paths"].items():
        if _template_regex(template).match(path) and method.lower() in item:
            return template, item[method.lower()]
    return None


def response_errors(
    document: dict[str, Any], method: str, path: str, status: int, *, content_type: str, body: bytes
) -> list[str]:
    """Every way a live response departs from ``document`` (empty when it conforms): the status
    must be documented for the operation, the media type must match and the body must validate."""
    found = find_operation(document, method, path)
    if found is None:
        return [f"{method} {path} is not documented"]
    template, operation = found
    entry = operation["responses"].get(str(status))
    if entry is None:
        return [f"{method} {template}: status {status} is not documented"]
    content: dict[str, Any] = entry.get("content", {})
    if not content:
        return [] if not body else [f"{method} {template} {status}: documented without a body"]
    media = content_type.split(";", maxsplit=1)[0].strip().lower()
    if media not in content:
        return [f"{method} {template} {status}: media type {media!r} is not one of {sorted(content)}"]
    schema = content[media].get("schema") or {}
    if not schema or not media.endswith("json"):
        return []
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return [f"{method} {template} {status}: body is not JSON"]
    name = str(schema.get("$ref", "")).rpartition("/")[2]
    if name not in MODELS or name not in document["components"]["schemas"]:
        return [f"{method} {template} {status}: no component for {schema}"]
    return [f"{method} {template} {status}: {e.field}: {e.reason}" for e in errors_of(MODELS[name], value)]
