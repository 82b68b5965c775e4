"""``dispatch serve``: the HTTP API (aiohttp on uvloop) and ``dispatch apikey``.

Build the application with :func:`build_app` (everything passed in: Redis clients, the enqueue
function, the metrics registry), serve it with :func:`serve`. Routes, scopes and schemas are
listed once in ``dispatch.api.openapi.OPERATIONS`` and published at ``/v1/openapi.json``.

Blocking work never runs on the event loop: planning (CPU-bound) runs on a small planning
executor with the sync Redis client, after the audience upload has been streamed to a temporary
file under ``<home>/uploads`` (bounded memory, ``ApiLimits.audience_bytes`` at most), or from a
configured audience source named in a JSON create (``dispatch.plan.sources``); campaign control and
the dramatiq enqueue (sync client) run on an I/O executor.

Create is idempotent on (id, spec, audience origin): a campaign planned from source ``NAME``
carries ``audience_source: NAME`` in its manifest (and, while it is being planned, in
:func:`origin_key`), so creating it again from another source, or from an uploaded audience, is
a 409 like another spec; an uploaded audience is not compared (it is not read again).

``POST /v1/messages`` is the hot path: after auth it is one Lua call on a shared pipelined
connection (``dispatch.api.pipelined``), and accepted messages are sent in micro-batches sealed and
enqueued by a background task (``dispatch.triggered.accept``, ``dispatch.triggered.sealer``), one broker
message per batch. ``dispatch serve`` trusts a looked-up API key for ``SERVE_AUTH_CACHE_S``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import re
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar, cast
from urllib.parse import unquote

import orjson
import redis
import redis.asyncio as aredis
from aiohttp import BodyPartReader, web
from prometheus_client import CollectorRegistry, Histogram
from pydantic import BaseModel

from channels.receipts import RedisReplayGuard
from dispatch.api.auth import (
    API_KEY,
    SCOPES,
    SERVE_AUTH_CACHE_S,
    ApiKeyStore,
    AsyncApiKeyLookup,
    PathOnlyAccessLogger,
    Scope,
    auth_middleware,
)
from dispatch.api.connections import ConnectionLimits, GuardedAppRunner, connection_cap
from dispatch.api.openapi import OPERATIONS, openapi_document
from dispatch.api.pipelined import PipelinedRedis
from dispatch.api.problems import ApiProblem, FieldError, problem_middleware
from dispatch.api.schemas import (
    CAMPAIGN_PATH_ID_PATTERN,
    SUPPRESSION_LISTS,
    CampaignCreateFromSource,
    CampaignCreateJson,
    CampaignPatch,
    PushOpen,
    SuppressionAdd,
    TriggeredMessage,
    parse,
)
from dispatch.campaign import CampaignSpec
from dispatch.config import Settings
from dispatch.engage.service import Engagement, build_engagement
from dispatch.errors import AudienceError, CampaignNotFound, CampaignStateError, DispatchError, PlanError
from dispatch.plan.audience import AudienceFormat, read_audience
from dispatch.plan.manifest import Manifest
from dispatch.plan.planner import Planner, PlanReport
from dispatch.plan.snapshot import SnapshotRow, batch_row, decode_row, decode_rows, load_manifest
from dispatch.plan.sources import SourceUnavailable, plan_from_source
from dispatch.rounds.report import (
    RoundReport,
    parse_prices,
    publish_report,
    render_funnel_png,
    report_csv,
    report_json,
    rounds_report,
)
from dispatch.rules.checks import Reason
from dispatch.rules.suppression import GLOBAL, AddressHasher, AsyncSuppressionStore, check_suppression_key, hasher_for
from dispatch.rules.validation import AddressValidator
from dispatch.send.control import CampaignControl, EnqueueFn
from dispatch.send.receipts import ReceiptApplier, configured_receipt_routes
from dispatch.send.tracking import GROUP_FIELD, MessageRecord, Tracker, make_ref, parse_ref, record_value
from dispatch.store import keys
from dispatch.triggered.accept import (
    TriggeredSender,
    open_key,
    split_recipient,
    state_key,
    triggered_counts,
)
from dispatch.triggered.sealer import TriggeredSealer
from monitoring.exposition import metrics_handler
from monitoring.metrics import Metrics

__all__ = ["SEALER", "ApiLimits", "add_commands", "build_app", "guarded_runner", "make_runner", "origin_key", "serve"]

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

_PATH_ID: Final = re.compile(CAMPAIGN_PATH_ID_PATTERN)
#: Audience formats by part Content-Type.
_AUDIENCE_TYPES: Final[dict[str, AudienceFormat]] = {
    "text/csv": "csv",
    "application/csv": "csv",
    "application/x-ndjson": "jsonl",
    "application/jsonl": "jsonl",
    "application/x-jsonlines": "jsonl",
    "application/json-lines": "jsonl",
}
#: Bytes read from an upload per chunk.
UPLOAD_CHUNK: Final = 256 * 1024
#: Idempotency keys: printable ASCII.
_MAX_IDEMPOTENCY_KEY: Final = 255
#: Manifest field naming the configured source a campaign was planned from (absent: uploaded).
AUDIENCE_SOURCE: Final = "audience_source"
#: How long the origin claim of a source create outlives its planning (the manifest then says it).
_ORIGIN_CLAIM_S: Final = 3600


@dataclass(frozen=True, kw_only=True)
class ApiLimits:
    """Request size limits (bytes)."""

    json_bytes: int = 1024 * 1024
    spec_bytes: int = 64 * 1024
    audience_bytes: int = 2 * 1024**3


@dataclass
class _Deps:
    settings: Settings
    client: aredis.Redis
    sync: redis.Redis
    enqueue: EnqueueFn | None
    limits: ApiLimits
    io_pool: ThreadPoolExecutor
    plan_pool: ThreadPoolExecutor
    suppression: AsyncSuppressionStore
    triggered: TriggeredSender
    sealer: TriggeredSealer | None
    validator: AddressValidator = field(default_factory=AddressValidator)
    metrics: Metrics | None = None
    engagement: Engagement | None = None

    async def io(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.io_pool, fn, *args)

    def control(self) -> CampaignControl:
        return CampaignControl(self.sync, self.enqueue, retention_s=self.settings.retention_s)


DEPS: Final = web.AppKey("dispatch_api_deps", _Deps)
#: The app's triggered-message sealer (absent without a broker): ``await app[SEALER].flush()``.
SEALER: Final = web.AppKey("dispatch_api_sealer", TriggeredSealer)


# --- request helpers ---------------------------------------------------------------------------


def _media_type(request: web.Request) -> str:
    return request.content_type.lower() if request.headers.get("Content-Type") else ""


async def _read_json(request: web.Request, model: type[M], limit: int) -> M:
    return parse(model, await _read_json_value(request, limit))


async def _read_json_value(request: web.Request, limit: int) -> Any:
    if _media_type(request) != "application/json":
        raise ApiProblem(415, "send the body as application/json", headers={"Accept": "application/json"})
    if request.content_length is not None and request.content_length > limit:
        raise ApiProblem(413, f"request body over {limit} bytes")
    return _loads(await request.read())


def _loads(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiProblem(
            400, f"the body is not valid JSON ({exc.msg} at character {exc.pos})", slug="malformed-json"
        ) from None


def _campaign_id(request: web.Request) -> str:
    cid = request.match_info["id"]
    if not _PATH_ID.match(cid):
        raise ApiProblem(404, "no such campaign")
    return cid


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json", headers=headers)


def _report_body(report: PlanReport) -> dict[str, Any]:
    body = report.as_dict()
    body.pop("rejected_file", None)  # a server path: not the client's business
    return body


# --- campaigns ---------------------------------------------------------------------------------


def origin_key(campaign_id: str) -> str:
    """The source a campaign is being planned from (a claim taken before planning, kept an hour:
    the manifest's ``audience_source`` says it for good once the plan is written)."""
    return f"{keys.PREFIX}:{{{campaign_id}}}:audience-source"


def _origin_text(source: str | None) -> str:
    return f"source {source!r}" if source else "an uploaded audience"


def _existing_plan(deps: _Deps, spec: CampaignSpec, source: str | None = None) -> PlanReport | None:
    """409 when this id was planned with another spec or audience origin (``source``: the
    configured source's name, None for an audience in the request). The stored plan for the same
    source, which is not read again; None otherwise (an uploaded audience is planned again, and
    the planner answers the stored plan only for the same audience)."""
    pipe = deps.sync.pipeline(transaction=False)
    pipe.get(keys.manifest(spec.id))
    pipe.get(origin_key(spec.id))
    raw, claimed = pipe.execute()
    if raw is None:
        return None
    manifest = Manifest.decode(cast(bytes, raw), campaign_id=spec.id)
    if manifest.fingerprint != spec.fingerprint():
        raise ApiProblem(409, f"campaign {spec.id!r} exists with a different spec; use a new id", slug="conflict")
    planned_from = manifest.audience_source or (claimed.decode() if claimed else None)
    if planned_from != source:
        raise ApiProblem(
            409,
            f"campaign {spec.id!r} was planned from {_origin_text(planned_from)}, not {_origin_text(source)}; "
            "use a new id",
            slug="conflict",
        )
    if source is None:
        return None
    return Planner.for_settings(deps.sync, deps.settings).stored_plan(spec)  # the stored plan, reads nothing


def _plan(deps: _Deps, spec: CampaignSpec, rows: Any) -> PlanReport:
    return _planning(deps, spec, lambda planner: planner.plan(spec, rows), "audience")


def _planning(deps: _Deps, spec: CampaignSpec, run: Callable[[Planner], PlanReport], where: str) -> PlanReport:
    try:
        return run(Planner.for_settings(deps.sync, deps.settings))
    except SourceUnavailable as exc:
        raise ApiProblem(503, f"the audience source is unavailable: {exc}") from None
    except AudienceError as exc:
        raise ApiProblem(422, "the audience cannot be read", errors=[FieldError(where, str(exc))]) from None
    except PlanError as exc:
        if deps.sync.exists(keys.manifest(spec.id)):
            raise ApiProblem(409, str(exc)) from None
        raise ApiProblem(422, "the campaign cannot be planned", errors=[FieldError("spec", str(exc))]) from None


def _plan_source(deps: _Deps, spec: CampaignSpec, name: str) -> PlanReport:
    """Plan from the configured source ``name``, holding the id's origin claim while planning."""
    claim = origin_key(spec.id)
    if not deps.sync.set(claim, name, nx=True, ex=_ORIGIN_CLAIM_S):
        held = cast(bytes | None, deps.sync.get(claim))
        if held is not None and held.decode() != name:
            raise ApiProblem(
                409,
                f"campaign {spec.id!r} is being planned from {_origin_text(held.decode())}; use a new id",
                slug="conflict",
            )
    source = deps.settings.sources[name]
    try:
        report = _planning(deps, spec, lambda planner: plan_from_source(planner, spec, source), "audience.source")
    except BaseException:
        if deps.sync.get(claim) == name.encode():  # not planned from it (another create may have won)
            deps.sync.delete(claim)
        raise
    if not report.existing:
        _note_source(deps, spec.id, name)
    return report


#: Add a field to a manifest (a JSON object) in place, keeping its TTL; the value is JSON text.
#: String surgery rather than cjson, whose number encoding would round the manifest's floats.
_ANNOTATE: Final = """
local manifest = redis.call('GET', KEYS[1])
if not manifest or string.find(manifest, '"' .. ARGV[1] .. '":', 1, true) then
  return 0
end
redis.call('SET', KEYS[1], string.sub(manifest, 1, -2) .. ',"' .. ARGV[1] .. '":' .. ARGV[2] .. '}', 'KEEPTTL')
return 1
"""


def _note_source(deps: _Deps, campaign_id: str, name: str) -> None:
    """Write ``audience_source`` into the new manifest (kept by every later rewrite of it)."""
    deps.sync.eval(_ANNOTATE, 1, keys.manifest(campaign_id), AUDIENCE_SOURCE, orjson.dumps(name))


async def _run_plan(deps: _Deps, fn: Callable[..., PlanReport], *args: Any) -> web.Response:
    report = await asyncio.get_running_loop().run_in_executor(deps.plan_pool, fn, *args)
    if deps.metrics is not None and not report.existing:
        for reason, count in report.rejected.items():
            deps.metrics.record_planner_rejections(reason, count)
    status = 200 if report.existing else 201
    return _json(_report_body(report), status, {"Location": f"/v1/campaigns/{report.campaign_id}"})


async def create_campaign(request: web.Request) -> web.StreamResponse:
    deps = request.app[DEPS]
    media = _media_type(request)
    if media == "application/json":
        data = await _read_json_value(request, deps.limits.json_bytes)
        body: CampaignCreateFromSource | CampaignCreateJson
        if isinstance(data, dict) and "audience" in data:
            body = parse(CampaignCreateFromSource, data)
        else:
            body = parse(CampaignCreateJson, data)
        spec = body.spec
        name = body.audience.source if isinstance(body, CampaignCreateFromSource) else None
        if name is not None and name not in deps.settings.sources:
            known = ", ".join(sorted(deps.settings.sources)) or "none"
            raise ApiProblem(
                422,
                "no such audience source",
                errors=[FieldError("audience.source", f"no configured source named {name!r} (configured: {known})")],
            )
        existing = await deps.io(_existing_plan, deps, spec, name)
        if existing is not None:  # a source's plan stands; it is not read again
            return _json(_report_body(existing), 200, {"Location": f"/v1/campaigns/{spec.id}"})
        if name is not None:
            return await _run_plan(deps, _plan_source, deps, spec, name)
        assert isinstance(body, CampaignCreateJson)
        return await _run_plan(deps, _plan, deps, spec, body.recipients)
    if media != "multipart/form-data":
        raise ApiProblem(415, "send multipart/form-data (spec + audience parts) or application/json")
    reader = await request.multipart()
    part = await reader.next()
    if not isinstance(part, BodyPartReader) or part.name != "spec":
        raise ApiProblem(422, "the first part must be 'spec'", errors=[FieldError("spec", "required")])
    spec = parse(CampaignSpec, _loads(await _read_part(part, deps.limits.spec_bytes)), "spec")
    await deps.io(_existing_plan, deps, spec)  # 409s only: the upload is read and compared
    part = await reader.next()
    if not isinstance(part, BodyPartReader) or part.name != "audience":
        raise ApiProblem(422, "the second part must be 'audience'", errors=[FieldError("audience", "required")])
    fmt = _audience_format(part)
    path = await _spool(deps, part)
    try:
        return await _run_plan(deps, _plan_file, deps, spec, path, fmt)
    finally:
        await deps.io(path.unlink, True)


def _plan_file(deps: _Deps, spec: CampaignSpec, path: Path, fmt: AudienceFormat) -> PlanReport:
    return _plan(deps, spec, read_audience(path, format=fmt))


async def _read_part(part: BodyPartReader, limit: int) -> bytes:
    data = bytearray()
    while chunk := await part.read_chunk(UPLOAD_CHUNK):
        data += chunk
        if len(data) > limit:
            raise ApiProblem(413, f"the '{part.name}' part is over {limit} bytes")
    return bytes(data)


def _audience_format(part: BodyPartReader) -> AudienceFormat:
    declared = part.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if declared in _AUDIENCE_TYPES:
        return _AUDIENCE_TYPES[declared]
    if declared not in {"", "application/octet-stream", "application/gzip"}:
        raise ApiProblem(415, f"the audience part is {declared}; send text/csv or application/x-ndjson")
    name = (part.filename or "").lower().removesuffix(".gz")
    if name.endswith(".csv"):
        return "csv"
    if name.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    raise ApiProblem(415, "the audience part must be text/csv or application/x-ndjson (or a .csv/.jsonl filename)")


async def _spool(deps: _Deps, part: BodyPartReader) -> Path:
    """Stream the part to a temporary file (bounded memory); 413 past the audience limit."""
    uploads = deps.settings.home / "uploads"
    await deps.io(lambda: uploads.mkdir(parents=True, exist_ok=True))
    fd, name = await deps.io(lambda: tempfile.mkstemp(dir=uploads, suffix=".upload"))
    path = Path(name)
    size = 0
    try:
        while chunk := await part.read_chunk(UPLOAD_CHUNK):
            size += len(chunk)
            if size > deps.limits.audience_bytes:
                raise ApiProblem(413, f"the audience is over {deps.limits.audience_bytes} bytes")
            await deps.io(_write_all, fd, chunk)
    except BaseException:
        await deps.io(os.close, fd)
        await deps.io(path.unlink, True)
        raise
    await deps.io(os.close, fd)
    return path


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _status_body(deps: _Deps, campaign_id: str) -> dict[str, Any]:
    manifest = load_manifest(deps.sync, campaign_id)
    current = deps.control().status(campaign_id)
    triggered = manifest.triggered
    batches = manifest.batches
    if triggered:
        accepted, batches = triggered_counts(cast(dict[bytes, bytes], deps.sync.hgetall(state_key(campaign_id))))
        current = current.with_accepted(accepted)
    status = current.as_dict()
    return {
        **status,
        "kind": "triggered" if triggered else "campaign",
        "channel": manifest.channel,
        "total": status["accepted"] if triggered else manifest.total,
        "rejected": manifest.rejected,
        "batches": batches,
        "verdict": manifest.verdict,
        "prediction": manifest.prediction,
    }


def _translate(fn: Callable[..., T]) -> Callable[..., T]:
    def run(*args: Any) -> T:
        try:
            return fn(*args)
        except CampaignNotFound as exc:
            raise ApiProblem(404, str(exc)) from None
        except CampaignStateError as exc:
            raise ApiProblem(409, str(exc)) from None

    return run


async def get_campaign(request: web.Request) -> web.StreamResponse:
    deps = request.app[DEPS]
    return _json(await deps.io(_translate(_status_body), deps, _campaign_id(request)))


async def patch_campaign(request: web.Request) -> web.StreamResponse:
    deps = request.app[DEPS]
    cid = _campaign_id(request)
    body = await _read_json(request, CampaignPatch, deps.limits.json_bytes)

    def run() -> dict[str, Any]:
        deps.control().set_rate(cid, body.rate)
        return _status_body(deps, cid)

    return _json(await deps.io(_translate(run)))


def _action(name: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handle(request: web.Request) -> web.StreamResponse:
        deps = request.app[DEPS]
        cid = _campaign_id(request)
        if name == "start" and deps.enqueue is None:
            raise ApiProblem(503, "this API server has no broker to start campaigns with")

        def run() -> dict[str, Any]:
            if load_manifest(deps.sync, cid).triggered and name in {"start", "resume"}:
                deps.control().resume(cid)
            else:
                getattr(deps.control(), name)(cid)
            return _status_body(deps, cid)

        return _json(await deps.io(_translate(run)))

    return handle


def _int_param(request: web.Request, name: str, low: int, high: int, default: int | None) -> int | None:
    raw = request.query.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise ApiProblem(422, f"invalid query parameter {name}", errors=[FieldError(name, f"integer {low}..{high}")])
    return int(raw)


def _messages_page(deps: _Deps, cid: str, only: int | None, start: tuple[int, int], limit: int) -> dict[str, Any]:
    manifest = load_manifest(deps.sync, cid)
    triggered = manifest.triggered
    if triggered:
        batches = triggered_counts(cast(dict[bytes, bytes], deps.sync.hgetall(state_key(cid))))[1]
    else:
        batches = manifest.batches
    last = min(batches, only + 1) if only is not None else batches
    batch, index = start
    if only is not None:
        batch = max(batch, only)
    items: list[dict[str, Any]] = []
    while batch < last:
        pipe = deps.sync.pipeline(transaction=False)
        pipe.get(keys.batch(cid, batch))
        pipe.hgetall(keys.records(cid, batch))
        if triggered:
            pipe.lrange(open_key(cid, batch), 0, -1)
        raw_batch, records, *still_open = pipe.execute()
        rows = _rows(raw_batch, still_open[0] if still_open else None)
        for i in range(index, len(rows)):
            if len(items) >= limit:
                return {"items": items, "next_cursor": f"{batch}.{i}"}
            record = record_value(records, cid, batch, i)
            items.append(_record(cid, batch, i, rows[i].recipient_id, record, triggered=triggered))
        batch, index = batch + 1, 0
    return {"items": items, "next_cursor": None}


def _rows(raw_batch: bytes | None, open_rows: list[bytes] | None) -> list[SnapshotRow]:
    """A batch's rows: the sealed snapshot batch, else a triggered batch still open (a list of
    encoded rows, sealed within milliseconds), else none."""
    if raw_batch:
        return decode_rows(raw_batch)
    return [decode_row(row) for row in open_rows or ()]


def _record(
    cid: str, batch: int, index: int, rid: str, stored: MessageRecord | None, *, triggered: bool
) -> dict[str, Any]:
    record = stored or _PENDING
    return {
        "message_id": make_ref(cid, batch, index),
        "recipient_id": split_recipient(rid) if triggered else rid,
        "batch": batch,
        "index": index,
        "state": record.state,
        "attempts": record.attempts,
        "provider_id": record.provider_id,
        "code": record.code,
        "ts": record.ts,
    }


#: What the API shows for a message not claimed yet.
_PENDING: Final = MessageRecord("pending", 0, "", "", "", None)


def _campaign_reports(deps: _Deps, cid: str) -> list[RoundReport]:
    reports = rounds_report(deps.sync, cid, parse_prices(deps.settings.prices))
    if deps.metrics is not None:
        for report in reports:
            publish_report(deps.metrics, report)
    return reports


async def get_campaign_report(request: web.Request) -> web.StreamResponse:
    deps = request.app[DEPS]
    cid = _campaign_id(request)
    fmt = request.query.get("format", "json")
    if fmt not in {"json", "csv", "png"} or set(request.query) - {"format"}:
        raise ApiProblem(422, "bad query", errors=[FieldError("format", "one of json, csv, png; no other parameter")])
    reports = await deps.io(_translate(_campaign_reports), deps, cid)
    if fmt == "csv":
        return web.Response(body=report_csv(reports).encode(), content_type="text/csv", charset="utf-8")
    if fmt == "png":
        return web.Response(body=await deps.io(render_funnel_png, reports), content_type="image/png")
    return _json(report_json(reports))


async def list_messages(request: web.Request) -> web.StreamResponse:
    deps = request.app[DEPS]
    cid = _campaign_id(request)
    unknown = set(request.query) - {"batch", "cursor", "limit"}
    if unknown:
        raise ApiProblem(
            422, "unknown query parameter", errors=[FieldError(name, "unknown parameter") for name in sorted(unknown)]
        )
    only = _int_param(request, "batch", 0, 10**9, None)
    limit = cast(int, _int_param(request, "limit", 1, 1000, 100))
    start = (0, 0)
    cursor = request.query.get("cursor")
    if cursor is not None:
        b, _, i = cursor.partition(".")
        if not (b.isdigit() and i.isdigit()):
            raise ApiProblem(422, "invalid cursor", errors=[FieldError("cursor", "use next_cursor of a page")])
        start = (int(b), int(i))
    return _json(await deps.io(_translate(_messages_page), deps, cid, only, start, limit))


# --- triggered messages ------------------------------------------------------------------------


async def send_message(request: web.Request) -> web.StreamResponse:
    deps = request.app[DEPS]
    key = request.headers.get("Idempotency-Key", "")
    if not key or len(key) > _MAX_IDEMPOTENCY_KEY or not key.isascii() or not key.isprintable():
        raise ApiProblem(
            400,
            "send an Idempotency-Key header (1-255 printable ASCII characters)",
            errors=[FieldError("Idempotency-Key", "required")],
        )
    if deps.enqueue is None:
        raise ApiProblem(503, "this API server has no broker to send with")
    body = await _read_json_value(request, deps.limits.json_bytes)
    parse(TriggeredMessage, body)
    # The body as sent (checked): its bytes are the idempotency fingerprint, as before the model.
    status, answer = await deps.triggered.submit(request[API_KEY].id, key, body)
    return _json(answer, status)


async def get_message(request: web.Request) -> web.StreamResponse:
    deps = request.app[DEPS]
    try:
        cid, batch, index = parse_ref(request.match_info["message_id"])
    except ValueError:
        raise ApiProblem(404, "no such message") from None
    triggered = keys.is_triggered(cid)
    pipe = deps.client.pipeline(transaction=False)
    pipe.get(keys.batch(cid, batch))
    pipe.hmget(keys.records(cid, batch), [str(index), GROUP_FIELD])
    if triggered:
        pipe.lindex(open_key(cid, batch), index)
    raw_batch, (own, group), *open_row = await pipe.execute()
    raw_record = record_value({str(index).encode(): own, GROUP_FIELD.encode(): group}, cid, batch, index)
    if raw_batch:
        row = batch_row(raw_batch, index)
    elif open_row and open_row[0]:
        row = decode_row(open_row[0])
    else:
        row = None
    if row is None:
        raise ApiProblem(404, "no such message")
    return _json(_record(cid, batch, index, row.recipient_id, raw_record, triggered=triggered))


# --- suppressions ------------------------------------------------------------------------------


def _normalize(deps: _Deps, channel: str, address: str) -> tuple[str | None, str]:
    if channel == GLOBAL:
        return deps.validator.check_any(address)
    return deps.validator.check(channel, address)


async def add_suppressions(request: web.Request) -> web.StreamResponse:
    deps = request.app[DEPS]
    body = await _read_json(request, SuppressionAdd, deps.limits.json_bytes)
    channel = body.channel
    normalized: list[str] = []
    errors: list[FieldError] = []
    for i, raw in enumerate(body.addresses):
        reason, address = _normalize(deps, channel, raw)
        if reason is not None:
            errors.append(FieldError(f"addresses[{i}]", str(reason)))
        normalized.append(address)
    if errors:
        raise ApiProblem(422, "some addresses are not valid; nothing was added", errors=errors)
    added = await deps.suppression.add(channel, normalized)
    return _json({"channel": channel, "added": added})


async def remove_suppression(request: web.Request) -> web.StreamResponse:
    deps = request.app[DEPS]
    channel = request.match_info["channel"]
    if channel not in SUPPRESSION_LISTS:
        raise ApiProblem(404, "no such suppression list")
    reason, address = _normalize(deps, channel, unquote(request.match_info["address"]))
    if reason is not None:
        raise ApiProblem(422, "the address is not valid", errors=[FieldError("address", str(reason))])
    removed = await deps.suppression.remove(channel, [address])
    return _json({"channel": channel, "removed": removed})


# --- engagement --------------------------------------------------------------------------------


async def record_push_open(request: web.Request) -> web.StreamResponse:
    """An app-reported push open (``open`` in the ledger, once per message)."""
    deps = request.app[DEPS]
    assert deps.engagement is not None
    body = await _read_json(request, PushOpen, deps.limits.json_bytes)
    try:
        cid, batch, _ = parse_ref(body.ref)
    except ValueError:
        raise ApiProblem(404, "no such message") from None
    raw = await deps.client.get(keys.manifest(cid))
    if raw is None:
        raise ApiProblem(404, "no such message")
    manifest = Manifest.decode(raw, campaign_id=cid)
    if batch >= manifest.batches and not manifest.triggered:
        raise ApiProblem(404, "no such message")
    if manifest.channel != "push":
        raise ApiProblem(422, "not a push message", errors=[FieldError("ref", f"a {manifest.channel} message")])
    recorded = await deps.engagement.ledger.record(body.ref, "open")
    if recorded.outcome == "unknown":
        raise ApiProblem(404, "no such message")
    return _json({"ref": body.ref, "event": "open", "recorded": recorded.outcome == "first"})


# --- health, docs ------------------------------------------------------------------------------


async def healthz(request: web.Request) -> web.StreamResponse:
    return _json({"status": "ok"})


async def readyz(request: web.Request) -> web.StreamResponse:
    client = request.app[DEPS].client
    checks: dict[str, str] = {}
    try:
        async with asyncio.timeout(2.0):
            await client.ping()
            checks["redis"] = "ok"
            try:
                config = await client.config_get("maxmemory-policy")
                policy = config.get("maxmemory-policy")
            except redis.ResponseError:
                policy = (await client.info("memory")).get("maxmemory_policy")
            policy = policy.decode() if isinstance(policy, bytes) else str(policy)
            checks["eviction_policy"] = "ok" if policy == "noeviction" else f"{policy} (must be noeviction)"
    except (redis.RedisError, OSError, TimeoutError) as exc:
        checks["redis"] = f"unavailable ({type(exc).__name__})"
    ok = all(value == "ok" for value in checks.values()) and len(checks) == 2
    return _json({"status": "ok" if ok else "unavailable", "checks": checks}, 200 if ok else 503)


def _openapi_handler() -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    body = orjson.dumps(openapi_document())

    async def handle(request: web.Request) -> web.StreamResponse:
        return web.Response(body=body, content_type="application/json")

    return handle


# --- the application ---------------------------------------------------------------------------


class _NoSealer:
    """Without a broker nothing is accepted (503), so nothing is ever sealed."""

    def note_open(self, campaign_id: str) -> None:
        return None

    def note_sealed(self, member: str) -> None:
        return None


def _timing_middleware(registry: CollectorRegistry) -> Any:
    histogram = Histogram(
        "dispatch_api_request_duration_seconds",
        "API request handling time by route template, method and status",
        ["route", "method", "status"],
        registry=registry,
        buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0),
    )

    @web.middleware
    async def middleware(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        started = time.perf_counter()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            resource = request.match_info.route.resource
            route = resource.canonical if resource is not None else "unmatched"
            histogram.labels(route, request.method, str(status)).observe(time.perf_counter() - started)

    return middleware


def build_app(
    settings: Settings,
    *,
    app_client: aredis.Redis,
    sync_client: redis.Redis,
    enqueue: EnqueueFn | None = None,
    registry: CollectorRegistry | None = None,
    key_pepper: bytes | None = None,
    suppression_hasher: AddressHasher | None = None,
    public_base_url: str | None = None,
    limits: ApiLimits | None = None,
    io_threads: int = 8,
    plan_threads: int = 2,
    pipelined: PipelinedRedis | None = None,
    auth_cache_s: float = 0.0,
    clock: Callable[[], float] = time.time,
) -> web.Application:
    """The API application. ``enqueue`` hands batches to the broker (None: start and messages
    answer 503); ``public_base_url`` is the URL providers call (their signatures cover it).
    ``key_pepper``, ``suppression_hasher`` and ``limits`` default to what ``settings`` says
    (``api_key_pepper``, ``suppression_key``, ``api_max_*_bytes``). ``pipelined``: the hot path's
    shared connection (auth lookups and triggered messages); without it they use ``app_client``.
    ``auth_cache_s``: how long a valid API key is trusted without a lookup (0: every request).
    ``clock``: what triggered messages take as now (their per-hour campaign, their not-before)."""
    lim = limits or ApiLimits(json_bytes=settings.api_max_json_bytes, audience_bytes=settings.api_max_audience_bytes)
    pepper = key_pepper if key_pepper is not None else settings.api_key_pepper.reveal().encode()
    hasher = suppression_hasher or hasher_for(settings)
    check_suppression_key(sync_client, hasher)
    registry = registry if registry is not None else CollectorRegistry()
    metrics = Metrics(registry)
    io_pool = ThreadPoolExecutor(io_threads, thread_name_prefix="dispatch-api-io")
    plan_pool = ThreadPoolExecutor(plan_threads, thread_name_prefix="dispatch-api-plan")
    suppression = AsyncSuppressionStore(app_client, hasher=hasher)

    async def enqueue_async(cid: str, batch: int, delay_ms: int) -> None:
        assert enqueue is not None
        await asyncio.get_running_loop().run_in_executor(io_pool, enqueue, cid, batch, delay_ms)

    ttl = settings.retention_s + 3600
    sealer = TriggeredSealer(app_client, enqueue_async, ttl_s=ttl) if enqueue is not None else None
    engagement = build_engagement(settings, app_client, hasher=hasher)
    deps = _Deps(
        engagement=engagement,
        settings=settings,
        client=app_client,
        sync=sync_client,
        enqueue=enqueue,
        limits=lim,
        io_pool=io_pool,
        plan_pool=plan_pool,
        suppression=suppression,
        triggered=TriggeredSender(
            settings, app_client, sealer or _NoSealer(), hasher=hasher, pipelined=pipelined, clock=clock
        ),
        sealer=sealer,
        metrics=metrics,
    )
    metrics.register_planner_reasons(reason.value for reason in Reason)
    scopes: dict[str, Scope | None] = {op.operation_id: op.scope for op in OPERATIONS}

    def scope_for(request: web.Request) -> Scope | None:
        name = request.match_info.route.name
        return scopes.get(name) if name is not None else None

    app = web.Application(
        client_max_size=lim.json_bytes,
        middlewares=[
            _timing_middleware(registry),
            problem_middleware,
            auth_middleware(AsyncApiKeyLookup(pipelined or app_client, pepper=pepper, cache_s=auth_cache_s), scope_for),
        ],
    )
    app[DEPS] = deps
    if sealer is not None:
        app[SEALER] = sealer
    handlers: dict[str, Callable[[web.Request], Awaitable[web.StreamResponse]]] = {
        "createCampaign": create_campaign,
        "getCampaign": get_campaign,
        "patchCampaign": patch_campaign,
        "startCampaign": _action("start"),
        "pauseCampaign": _action("pause"),
        "resumeCampaign": _action("resume"),
        "cancelCampaign": _action("cancel"),
        "getCampaignReport": get_campaign_report,
        "listCampaignMessages": list_messages,
        "sendMessage": send_message,
        "getMessage": get_message,
        "addSuppressions": add_suppressions,
        "removeSuppression": remove_suppression,
        "recordPushOpen": record_push_open,
        "openapi": _openapi_handler(),
        "healthz": healthz,
        "readyz": readyz,
        "metrics": metrics_handler(registry),
    }
    for op in OPERATIONS:
        app.router.add_route(op.method, op.path, handlers[op.operation_id], name=op.operation_id)
    # Provider callbacks: authenticated by the providers' signatures, not by API keys.
    applier = ReceiptApplier(Tracker(app_client, ttl_s=settings.retention_s), metrics)
    base = public_base_url or settings.callback_base_url or "http://127.0.0.1:8080"
    # mounted only for providers with a real secret (never the public demo token)
    app.add_routes(
        configured_receipt_routes(
            settings,
            applier,
            replay_guard=RedisReplayGuard(app_client),
            public_base_url=base,
            on_engagement=engagement.applier,
        )
    )
    # tracked links (/r/{token}): authenticated by their MAC, not by API keys
    engagement.mount(app, app_client)

    async def start_sealer(app: web.Application) -> None:
        if sealer is not None:
            sealer.start()

    async def close(app: web.Application) -> None:
        if sealer is not None:
            await sealer.stop()  # seals and enqueues what is left, on the I/O pool
        io_pool.shutdown(wait=True, cancel_futures=True)
        plan_pool.shutdown(wait=True, cancel_futures=True)

    app.on_startup.append(start_sealer)
    app.on_cleanup.append(close)
    return app


def make_runner(app: web.Application) -> web.AppRunner:
    """A runner whose access log carries no headers, no query string and no address (tokens and
    addresses never logged), and whose server applies the settings' header timeout, idle timeout
    and connection cap (``dispatch.api.connections``)."""
    return guarded_runner(app, app[DEPS].settings)


def guarded_runner(app: web.Application, settings: Settings) -> web.AppRunner:
    """:func:`make_runner` for any of our apps (the API, the receipt endpoints): path-only access
    log, the settings' header timeout, idle timeout and connection cap."""
    limits = ConnectionLimits(
        header_timeout_s=settings.api_header_timeout_s,
        keepalive_timeout_s=settings.api_keepalive_timeout_s,
        max_connections=connection_cap(settings.api_max_connections),
    )
    return GuardedAppRunner(app, limits=limits, access_log_class=PathOnlyAccessLogger)


async def serve(
    settings: Settings,
    *,
    host: str,
    port: int,
    public_url: str | None,
    stop: asyncio.Event | None = None,
    rounds: bool = True,
) -> None:
    """Run the API until ``stop`` is set (or SIGTERM/SIGINT). ``rounds``: also run the funnel
    round scheduler (``dispatch.rounds.scheduler``) in a thread of this process."""
    from dispatch.send.broker import build_broker, enqueue_batch
    from dispatch.store.connect import resolve_redis

    target = resolve_redis(settings)
    pool = aredis.BlockingConnectionPool.from_url(target.app_url, max_connections=64, timeout=10)
    client = aredis.Redis(connection_pool=pool)
    sync = redis.Redis.from_url(target.app_url, socket_timeout=10.0)
    pipelined = PipelinedRedis(target.app_url)
    broker = build_broker(settings, target.broker_url)
    app = build_app(
        settings,
        app_client=client,
        sync_client=sync,
        enqueue=lambda cid, n, delay: enqueue_batch(broker, cid, n, delay),
        public_base_url=public_url or settings.callback_base_url or f"http://{host}:{port}",
        pipelined=pipelined,
        auth_cache_s=SERVE_AUTH_CACHE_S,
    )
    runner = make_runner(app)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    # start-up objects (phone metadata, schemas, modules) never die: keep them out of every
    # collection so a full one stays short under load
    gc.collect()
    gc.freeze()
    done = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, done.set)
    print(f"dispatch API listening on http://{host}:{port} (OpenAPI at /v1/openapi.json)", flush=True)
    scheduler_stop = threading.Event()
    scheduler = _round_scheduler(settings, sync, broker, app[DEPS].metrics, scheduler_stop) if rounds else None
    try:
        await done.wait()
    finally:
        scheduler_stop.set()
        if scheduler is not None:
            await asyncio.to_thread(scheduler.join, 30)
        await runner.cleanup()
        await pipelined.aclose()
        await client.aclose()
        sync.close()
        broker.close()


def _round_scheduler(
    settings: Settings, client: redis.Redis, broker: Any, metrics: Metrics | None, stop: threading.Event
) -> threading.Thread:
    """The funnel round scheduler on a daemon thread (planning a round is blocking work)."""
    from dispatch.rounds.scheduler import RoundScheduler
    from dispatch.send.broker import enqueue_batch

    control = CampaignControl(
        client, lambda cid, n, delay: enqueue_batch(broker, cid, n, delay), retention_s=settings.retention_s
    )
    scheduler = RoundScheduler(
        client,
        control,
        lambda: Planner.for_settings(client, settings),
        metrics=metrics,
        prices=parse_prices(settings.prices),
    )
    thread = threading.Thread(target=scheduler.run, args=(stop,), name="dispatch-rounds", daemon=True)
    thread.start()
    return thread


# --- commands ----------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    import logging

    import uvloop

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvloop.run(serve(settings, host=args.host, port=args.port, public_url=args.public_url, rounds=not args.no_rounds))
    return 0


def cmd_apikey(args: argparse.Namespace, settings: Settings) -> int:
    from dispatch.store.connect import resolve_redis

    client = redis.Redis.from_url(resolve_redis(settings).app_url)
    store = ApiKeyStore(client, pepper=settings.api_key_pepper.reveal().encode())
    try:
        if args.action == "create":
            token, key = store.create(args.scope, args.name or "")
            print(f"created key {key.id} (scope {key.scope}); the token is shown only now:", file=sys.stderr)
            print(token)
        elif args.action == "list":
            for key in store.list():
                created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(key.created_at))
                print(f"{key.id}  {key.scope:<5}  {created}  {key.name}")
        else:
            if not args.key_id:
                raise DispatchError("apikey revoke needs the key id (see `dispatch apikey list`)")
            if not store.revoke(args.key_id):
                print(f"no key {args.key_id}")
                return 1
            print(f"revoked {args.key_id}")
    finally:
        client.close()
    return 0


def add_commands(sub: Any) -> None:
    p = sub.add_parser("serve", help="serve the HTTP API (campaigns, messages, suppressions, callbacks)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8080, help="port to listen on")
    p.add_argument(
        "--public-url",
        default=None,
        help="URL providers call back (signatures cover it; default: DISPATCH_CALLBACK_BASE_URL, else http://HOST:PORT)",
    )
    p.add_argument(
        "--no-rounds",
        action="store_true",
        help="do not run the funnel round scheduler here (run `dispatch funnel run` elsewhere instead)",
    )
    p.set_defaults(handler=cmd_serve, uses_redis="always")

    p = sub.add_parser("apikey", help="API keys: create (prints the token once), list, revoke")
    p.add_argument(
        "action", choices=("create", "list", "revoke"), help="create a key (its token is printed once), list, revoke"
    )
    p.add_argument("key_id", nargs="?", default=None, help="key id (revoke)")
    p.add_argument("--scope", choices=SCOPES, default="read", help="what the key may do (create): read < write < admin")
    p.add_argument("--name", default=None, help="a label for the key (who uses it)")
    p.set_defaults(handler=cmd_apikey, uses_redis="always")
