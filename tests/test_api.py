"""The HTTP API against a real Redis: auth, problems, limits, idempotent create, control, paging,
suppressions, triggered messages (enqueue recorded, no workers here; see test_api_e2e.py)."""

from __future__ import annotations

import asyncio
import csv
import gzip
import io
import logging
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis
import redis.asyncio as aredis
from test_api_support import PG_PASSWORD, Api, api_settings, postgres_table, running_api

from dispatch.api.app import ApiLimits, origin_key
from dispatch.api.auth import KEYS_HASH, ApiKeyStore
from dispatch.api.openapi import OPERATIONS, response_errors
from dispatch.api.schemas import CampaignPatch, MessageRecord, errors_of
from dispatch.config import load_settings
from dispatch.rules.checks import QuietHours, next_allowed, resolve_timezone
from dispatch.rules.suppression import SuppressionStore, hasher_for
from dispatch.store import keys
from loadtest.audience import generate_rows

SPEC = {"id": "spring", "channel": "sms", "body": "Hi $first_name"}
ROWS = list(generate_rows(120, seed=4))


def _csv(rows: list[dict[str, str]]) -> bytes:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=["id", "phone", "first_name"])
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue().encode()


def _multipart(spec: dict[str, Any], audience: bytes, content_type: str = "text/csv") -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field("spec", orjson.dumps(spec).decode(), content_type="application/json")
    form.add_field("audience", audience, content_type=content_type, filename="audience.csv")
    return form


@pytest.fixture
async def api(
    redis_url: str, tmp_path: Path, aredis_client: aredis.Redis, redis_client: redis.Redis
) -> AsyncIterator[Api]:
    settings = api_settings(redis_url, tmp_path)
    limits = ApiLimits(json_bytes=64 * 1024, spec_bytes=4 * 1024, audience_bytes=64 * 1024)
    async with running_api(settings, aredis_client, redis_client, limits=limits) as running:
        yield running


def _store(client: redis.Redis, home: Path) -> SuppressionStore:
    """The suppression list as the API (whose home is the test's ``tmp_path``) sees it."""
    return SuppressionStore(client, hasher=hasher_for(load_settings({"DISPATCH_HOME": str(home)})))


# --- auth --------------------------------------------------------------------------------------


async def test_without_a_valid_key_every_change_is_refused_with_401(
    api: Api, redis_client: redis.Redis, tmp_path: Path
) -> None:
    revoked_token, revoked = ApiKeyStore(redis_client).create("admin")
    assert ApiKeyStore(redis_client).revoke(revoked.id)
    attempts: list[dict[str, str] | None] = [
        None,
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "Bearer "},
        {"Authorization": "Bearer dsp_" + "A" * 43},
        {"Authorization": f"Bearer {revoked_token}"},
        {"Authorization": f"Bearer {api.tokens['admin']}x"},
    ]
    for headers in attempts:
        create = await api.call(
            "POST", "/v1/campaigns", token=None, headers=headers, json={"spec": SPEC, "recipients": ROWS}
        )
        assert create.status == 401, create.body
        assert create.headers["Content-Type"].startswith("application/problem+json")
        assert create.headers["WWW-Authenticate"].startswith("Bearer")
        problem = create.json
        assert problem["status"] == 401 and problem["instance"] == "/v1/campaigns"
        assert api.tokens["admin"] not in create.body.decode()
        suppress = await api.call(
            "POST",
            "/v1/suppressions",
            token=None,
            headers=headers,
            json={"channel": "sms", "addresses": ["+14155550100"]},
        )
        assert suppress.status == 401
        send = await api.call(
            "POST",
            "/v1/messages",
            token=None,
            headers={**(headers or {}), "Idempotency-Key": "k1"},
            json={"channel": "sms", "to": "+447400123456", "body": "hi"},
        )
        assert send.status == 401
    assert redis_client.exists(keys.manifest("spring")) == 0
    assert redis_client.zcard(keys.CAMPAIGNS) == 0
    assert _store(redis_client, tmp_path).count("sms") == 0
    assert api.enqueued == []


async def test_scopes_are_ordered_read_write_admin(api: Api, redis_client: redis.Redis, tmp_path: Path) -> None:
    denied = await api.call("POST", "/v1/campaigns", token="read", json={"spec": SPEC, "recipients": ROWS})
    assert denied.status == 403 and "needs 'write'" in denied.json["detail"]
    assert redis_client.exists(keys.manifest("spring")) == 0
    created = await api.call("POST", "/v1/campaigns", token="write", json={"spec": SPEC, "recipients": ROWS})
    assert created.status == 201
    assert (await api.call("GET", "/v1/campaigns/spring", token="read")).status == 200
    assert (await api.call("GET", "/v1/campaigns/spring", token="admin")).status == 200
    await api.call("POST", "/v1/suppressions", json={"channel": "sms", "addresses": ["+447400123456"]})
    lift = await api.call("DELETE", "/v1/suppressions/sms/%2B447400123456", token="write")
    assert lift.status == 403
    assert _store(redis_client, tmp_path).count("sms") == 1
    lift = await api.call("DELETE", "/v1/suppressions/sms/%2B447400123456", token="admin")
    assert lift.status == 200 and lift.json == {"channel": "sms", "removed": 1}
    assert _store(redis_client, tmp_path).count("sms") == 0


async def test_keys_are_stored_hashed_and_tokens_never_logged(
    api: Api, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    stored = redis_client.hgetall(KEYS_HASH)
    dump = b"".join(k + v for k, v in stored.items())
    for token in api.tokens.values():
        assert token.encode() not in dump
    assert {key.scope for key in ApiKeyStore(redis_client).list()} == {"read", "write", "admin"}
    caplog.set_level(logging.DEBUG)
    await api.call("GET", "/v1/campaigns/nothing-here?cursor=x", token="read")
    await api.call("GET", "/v1/campaigns/nothing-here", token="bogus-token-value")
    await asyncio.sleep(0.05)
    assert "/v1/campaigns/nothing-here" in caplog.text  # the access log did run
    for token in [*api.tokens.values(), "bogus-token-value"]:
        assert token not in caplog.text


# --- problems, limits, content types ---------------------------------------------------------


async def _logged(caplog: pytest.LogCaptureFixture, lines: int) -> list[str]:
    """The access log's lines once ``lines`` of them are in (aiohttp logs a request after its answer)."""
    deadline = time.monotonic() + 10
    while True:
        access = [r.getMessage() for r in caplog.records if r.name == "aiohttp.access"]
        if len(access) >= lines or time.monotonic() > deadline:
            return access
        await asyncio.sleep(0.02)


async def test_addresses_in_paths_never_reach_the_access_log_or_a_problem(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    phone, email, token = "+14158230003", "ada.lovelace@example.com", "f" * 40 + ":APA91b" + "x" * 60
    caplog.set_level(logging.INFO, logger="aiohttp.access")
    await api.call("POST", "/v1/suppressions", json={"channel": "sms", "addresses": [phone]})
    calls = [
        ("DELETE", "/v1/suppressions/sms/%2B14158230003", "admin", 200, None),
        ("DELETE", "/v1/suppressions/sms/+1%20415%20823%200003", "write", 403, "/v1/suppressions/sms/{redacted}"),
        ("DELETE", "/v1/suppressions/email/ada.lovelace%40example.com", "admin", 200, None),
        ("DELETE", f"/v1/suppressions/push/{token}", "admin", 200, None),
        ("DELETE", "/v1/suppressions/email/ada.lovelace@example", "admin", 422, "/v1/suppressions/email/{redacted}"),
        ("GET", "/v1/suppressions/sms/+14158230003", "admin", 405, "/v1/suppressions/sms/{redacted}"),
        ("GET", "/v1/messages/14158230003", "read", 404, "/v1/messages/{redacted}"),
        ("GET", f"/v1/campaigns/{email}", "read", 404, "/v1/campaigns/{redacted}"),
        ("GET", "/v1/no-such-route/%2B14158230003/x", "read", 404, "/v1/no-such-route/{redacted}/x"),
    ]
    bodies: list[bytes] = []
    for method, path, scope, status, instance in calls:
        reply = await api.call(method, path, token=scope, check=False)
        assert reply.status == status, (path, reply.body)
        bodies.append(reply.body)
        if instance is not None:
            assert reply.json["instance"] == instance, reply.json
    access = await _logged(caplog, len(calls) + 1)
    assert len(access) == len(calls) + 1, access  # the access log did run, once per request
    assert [line.split()[2] for line in access[1:]] == [
        "/v1/suppressions/sms/{redacted}",
        "/v1/suppressions/sms/{redacted}",
        "/v1/suppressions/email/{redacted}",
        "/v1/suppressions/push/{redacted}",
        "/v1/suppressions/email/{redacted}",
        "/v1/suppressions/sms/{redacted}",
        "/v1/messages/{redacted}",
        "/v1/campaigns/{redacted}",
        "/v1/no-such-route/{redacted}/x",
    ]
    for secret in ("4158230003", "415%20823", "ada.lovelace", "APA91b"):
        assert secret not in caplog.text
        assert all(secret.encode() not in body for body in bodies)
    # what is not an address stays readable
    await api.call("GET", "/v1/campaigns/spring-2026", token="read", check=False)
    assert (await _logged(caplog, len(calls) + 2))[-1].split()[2] == "/v1/campaigns/spring-2026"


async def test_malformed_oversized_and_wrongly_typed_bodies(api: Api, redis_client: redis.Redis) -> None:
    bad_json = await api.call("POST", "/v1/campaigns", data=b'{"spec": {', headers={"Content-Type": "application/json"})
    assert bad_json.status == 400 and bad_json.json["type"].endswith("/malformed-json")
    wrong_type = await api.call("POST", "/v1/campaigns", data=b"id,phone\n", headers={"Content-Type": "text/plain"})
    assert wrong_type.status == 415
    big = {"spec": SPEC, "recipients": [{"id": str(i), "phone": "+447400123456", "pad": "x" * 100} for i in range(700)]}
    too_large = await api.call("POST", "/v1/campaigns", json=big)
    assert too_large.status == 413

    async def chunked() -> AsyncIterator[bytes]:
        yield b'{"spec": {"id": "x", "channel": "sms", "body": "b"}, "recipients": ['
        for _ in range(1000):
            yield b'{"id": "1", "phone": "+447400123456", "pad": "' + b"x" * 100 + b'"},'
        yield b"{}]}"

    streamed = await api.call("POST", "/v1/campaigns", data=chunked(), headers={"Content-Type": "application/json"})
    assert streamed.status == 413
    invalid = await api.call(
        "POST",
        "/v1/campaigns",
        json={
            "spec": {"id": "bad id!", "channel": "fax", "body": "", "rate": -1, "colour": "red"},
            "recipients": [{"id": "1", "nested": {"no": 1}}],
            "extra": True,
        },
    )
    assert invalid.status == 422
    fields = {e["field"]: e["reason"] for e in invalid.json["errors"]}
    assert "use 1-128 letters" in fields["spec.id"]
    assert fields["spec.channel"] == "'fax' is not one of sms, email, push, webhook"
    assert fields["spec.body"].startswith("shorter than")
    assert fields["spec.rate"] == "must be greater than 0"
    assert fields["spec.colour"] == "unknown field"
    assert fields["extra"] == "unknown field"
    assert fields["recipients[0].nested"].startswith("expected string")
    template = await api.call("POST", "/v1/campaigns", json={"spec": {**SPEC, "body": "costs 5$"}, "recipients": ROWS})
    assert template.status == 422 and template.json["errors"][0]["field"] == "spec.body"
    missing = await api.call("GET", "/v1/nowhere", token="read", check=False)
    assert missing.status == 404 and missing.headers["Content-Type"].startswith("application/problem+json")
    assert redis_client.zcard(keys.CAMPAIGNS) == 0


async def test_audience_upload_over_the_limit_is_413_and_leaves_nothing(
    api: Api, redis_client: redis.Redis, tmp_path: Path
) -> None:
    rows = [{"id": f"r{i}", "phone": f"+4474001{i:05d}", "first_name": "A" * 20} for i in range(3000)]
    audience = _csv(rows)
    assert len(audience) > 64 * 1024
    reply = await api.call("POST", "/v1/campaigns", data=_multipart(SPEC, audience))
    assert reply.status == 413
    assert redis_client.exists(keys.manifest("spring")) == 0
    assert list((tmp_path / "uploads").iterdir()) == []
    unknown = await api.call("POST", "/v1/campaigns", data=_multipart(SPEC, b"x", content_type="image/png"))
    assert unknown.status == 415
    big_spec = await api.call("POST", "/v1/campaigns", data=_multipart({**SPEC, "body": "y" * 5000}, b"id\n"))
    assert big_spec.status == 413


# --- campaigns ---------------------------------------------------------------------------------


async def test_create_is_idempotent_and_a_different_spec_is_a_conflict(api: Api, redis_client: redis.Redis) -> None:
    first = await api.call("POST", "/v1/campaigns", data=_multipart(SPEC, _csv(ROWS)))
    assert first.status == 201, first.body
    plan = first.json
    assert plan["total"] == 120 == plan["accepted"] + sum(plan["rejected"].values())
    assert plan["existing"] is False and plan["batches"] == -(-plan["accepted"] // 50)
    assert first.headers["Location"] == "/v1/campaigns/spring"
    manifest = redis_client.get(keys.manifest("spring"))
    again = await api.call("POST", "/v1/campaigns", data=_multipart(SPEC, _csv(ROWS)))
    assert again.status == 200
    assert again.json == {**plan, "existing": True}
    as_json = await api.call("POST", "/v1/campaigns", json={"spec": SPEC, "recipients": ROWS})
    assert as_json.status == 200 and as_json.json["existing"] is True
    other = await api.call("POST", "/v1/campaigns", data=_multipart({**SPEC, "body": "Bye $first_name"}, _csv(ROWS)))
    assert other.status == 409 and other.json["type"].endswith("/conflict")
    # the same spec with another audience is never answered with the stored plan
    fewer = await api.call("POST", "/v1/campaigns", data=_multipart(SPEC, _csv(ROWS[:-5])))
    assert fewer.status == 409 and "different audience" in fewer.json["detail"], fewer.json
    as_json_fewer = await api.call("POST", "/v1/campaigns", json={"spec": SPEC, "recipients": ROWS[:-5]})
    assert as_json_fewer.status == 409 and "different audience" in as_json_fewer.json["detail"]
    assert redis_client.get(keys.manifest("spring")) == manifest
    # JSONL upload plans the same audience to the same counts
    jsonl = b"\n".join(orjson.dumps(r) for r in ROWS)
    second = await api.call(
        "POST", "/v1/campaigns", data=_multipart({**SPEC, "id": "spring-jsonl"}, jsonl, "application/x-ndjson")
    )
    assert second.status == 201
    assert {k: second.json[k] for k in ("total", "accepted", "rejected")} == {
        k: plan[k] for k in ("total", "accepted", "rejected")
    }
    assert api.enqueued == []
    # planner rejections reach /metrics once per new plan (replays are not counted again)
    text = (await api.call("GET", "/metrics", token=None)).body.decode()
    for reason, count in plan["rejected"].items():
        assert f'dispatch_planner_rejections_total{{reason="{reason}"}} {2 * count:.1f}' in text, reason
    assert 'dispatch_planner_rejections_total{reason="stale"} 0.0' in text  # every reason is primed


async def test_control_and_paged_messages(api: Api) -> None:
    plan = (await api.call("POST", "/v1/campaigns", json={"spec": SPEC, "recipients": ROWS})).json
    status = (await api.call("GET", "/v1/campaigns/spring", token="read")).json
    assert status["state"] == "planned" and status["accepted"] == plan["accepted"]
    assert status["verdict"] == "no_deadline" and status["kind"] == "campaign"
    started = await api.call("POST", "/v1/campaigns/spring/start")
    assert started.json["state"] == "running"
    assert sorted(n for _, n, _ in api.enqueued) == list(range(plan["batches"]))
    await api.call("POST", "/v1/campaigns/spring/start")
    assert len(api.enqueued) == plan["batches"]  # starting twice enqueues once
    assert (await api.call("POST", "/v1/campaigns/spring/pause")).json["state"] == "paused"
    assert (await api.call("POST", "/v1/campaigns/spring/resume")).json["state"] == "running"
    rated = await api.call("PATCH", "/v1/campaigns/spring", json={"rate": 25.5})
    assert rated.json["rate"] == 25.5
    bad_rate = await api.call("PATCH", "/v1/campaigns/spring", json={"rate": 0})
    assert bad_rate.status == 422
    assert (await api.call("POST", "/v1/campaigns/spring/cancel")).json["state"] == "cancelled"
    conflict = await api.call("POST", "/v1/campaigns/spring/resume")
    assert conflict.status == 409
    assert (await api.call("POST", "/v1/campaigns/nope/start")).status == 404

    seen: list[dict[str, Any]] = []
    cursor = None
    pages = 0
    while True:
        query = "?limit=30" + (f"&cursor={cursor}" if cursor else "")
        page = (await api.call("GET", f"/v1/campaigns/spring/messages{query}", token="read")).json
        seen += page["items"]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == plan["accepted"] and pages == -(-plan["accepted"] // 30)
    assert {item["state"] for item in seen} == {"pending"}
    accepted_ids = {row["id"] for row in ROWS}
    assert {item["recipient_id"] for item in seen} <= accepted_ids
    assert len({item["message_id"] for item in seen}) == plan["accepted"]
    one_batch = (await api.call("GET", "/v1/campaigns/spring/messages?batch=1&limit=1000", token="read")).json
    assert {item["batch"] for item in one_batch["items"]} == {1} and one_batch["next_cursor"] is None
    single = await api.call("GET", f"/v1/messages/{seen[0]['message_id']}", token="read")
    assert single.json == seen[0]
    for query in ("?limit=0", "?limit=abc", "?cursor=zz", "?page=2"):
        bad = await api.call("GET", f"/v1/campaigns/spring/messages{query}", token="read")
        assert bad.status == 422, query


# --- configured audience sources ---------------------------------------------------------------


def _counts(plan: dict[str, Any]) -> dict[str, Any]:
    return {k: plan[k] for k in ("total", "accepted", "rejected", "batches")}


async def test_create_from_a_configured_file_source_is_idempotent_per_source(
    redis_url: str, tmp_path: Path, aredis_client: aredis.Redis, redis_client: redis.Redis
) -> None:
    exports = tmp_path / "exports"
    exports.mkdir()
    (exports / "nightly.csv").write_bytes(_csv(ROWS))
    (exports / "weekly.jsonl.gz").write_bytes(gzip.compress(b"\n".join(orjson.dumps(r) for r in ROWS[:50])))
    sources = {
        "nightly": {"kind": "file", "path": str(exports / "nightly.csv")},
        "weekly": {"kind": "file", "path": str(exports / "weekly.jsonl.gz")},
        "gone": {"kind": "file", "path": str(exports / "gone.csv")},
    }
    settings = api_settings(redis_url, tmp_path, DISPATCH_SOURCES=orjson.dumps(sources).decode())
    async with running_api(settings, aredis_client, redis_client) as api:
        uploaded = await api.call("POST", "/v1/campaigns", data=_multipart({**SPEC, "id": "uploaded"}, _csv(ROWS)))
        assert uploaded.status == 201
        from_source = {"spec": SPEC, "audience": {"source": "nightly"}}
        first = await api.call("POST", "/v1/campaigns", json=from_source)
        assert first.status == 201, first.body
        assert first.headers["Location"] == "/v1/campaigns/spring"
        plan = first.json
        assert _counts(plan) == _counts(uploaded.json) and plan["existing"] is False
        assert orjson.loads(redis_client.get(keys.manifest("spring")))["audience_source"] == "nightly"
        again = await api.call("POST", "/v1/campaigns", json=from_source)
        assert again.status == 200 and again.json == {**plan, "existing": True}
        # another audience for the same id and spec is another request body: 409, nothing changes
        manifest = redis_client.get(keys.manifest("spring"))
        for other in (
            {"json": {"spec": SPEC, "audience": {"source": "weekly"}}},
            {"json": {"spec": SPEC, "recipients": ROWS}},
            {"data": _multipart(SPEC, _csv(ROWS))},
            {"json": {"spec": {**SPEC, "body": "Bye $first_name"}, "audience": {"source": "nightly"}}},
        ):
            conflict = await api.call("POST", "/v1/campaigns", **other)
            assert conflict.status == 409 and conflict.json["type"].endswith("/conflict"), other
        assert redis_client.get(keys.manifest("spring")) == manifest
        # once the planning claim has expired the manifest alone answers
        assert redis_client.delete(origin_key("spring")) == 1
        assert (await api.call("POST", "/v1/campaigns", json=from_source)).status == 200
        assert (await api.call("POST", "/v1/campaigns", json={"spec": SPEC, "recipients": ROWS})).status == 409
        # an id planned from an upload is not answered for a source
        upload_then_source = await api.call(
            "POST", "/v1/campaigns", json={"spec": {**SPEC, "id": "uploaded"}, "audience": {"source": "nightly"}}
        )
        assert upload_then_source.status == 409 and "uploaded audience" in upload_then_source.json["detail"]
        # gzip JSONL source
        weekly = await api.call(
            "POST", "/v1/campaigns", json={"spec": {**SPEC, "id": "wk"}, "audience": {"source": "weekly"}}
        )
        assert weekly.status == 201 and weekly.json["total"] == 50
        # field-level problems: unknown name, bad name, both audiences, a source that cannot be read
        unknown = await api.call(
            "POST", "/v1/campaigns", json={"spec": {**SPEC, "id": "u"}, "audience": {"source": "crm"}}
        )
        assert unknown.status == 422 and unknown.json["errors"] == [
            {
                "field": "audience.source",
                "reason": "no configured source named 'crm' (configured: gone, nightly, weekly)",
            }
        ]
        bad = await api.call(
            "POST",
            "/v1/campaigns",
            json={"spec": {**SPEC, "id": "u"}, "audience": {"source": "../etc/passwd", "path": "/x"}, "recipients": []},
        )
        assert bad.status == 422
        assert {e["field"] for e in bad.json["errors"]} == {"audience.source", "audience.path", "recipients"}
        gone = await api.call(
            "POST", "/v1/campaigns", json={"spec": {**SPEC, "id": "g"}, "audience": {"source": "gone"}}
        )
        assert gone.status == 422 and gone.json["errors"][0]["field"] == "audience.source"
        assert str(exports) not in gone.body.decode()
        assert redis_client.exists(keys.manifest("u"), keys.manifest("g"), origin_key("g")) == 0
    assert {(m, p) for m, p, _ in api.seen} == {("POST", "/v1/campaigns")}


async def test_create_from_a_configured_postgres_source_never_shows_its_dsn(
    redis_url: str,
    tmp_path: Path,
    aredis_client: aredis.Redis,
    redis_client: redis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    with postgres_table(ROWS) as (dsn, table):
        sources = {
            "crm": {"kind": "postgres", "dsn": dsn, "query": f"SELECT * FROM {table} ORDER BY id"},
            "broken": {"kind": "postgres", "dsn": dsn, "query": "SELECT * FROM no_such_table_here"},
            "down": {"kind": "postgres", "dsn": f"postgresql://reader:{PG_PASSWORD}@127.0.0.1:1/test", "query": "x"},
        }
        settings = api_settings(redis_url, tmp_path, DISPATCH_SOURCES=orjson.dumps(sources).decode())
        assert PG_PASSWORD not in repr(settings)
        async with running_api(settings, aredis_client, redis_client) as api:
            uploaded = await api.call("POST", "/v1/campaigns", json={"spec": {**SPEC, "id": "up"}, "recipients": ROWS})
            created = await api.call("POST", "/v1/campaigns", json={"spec": SPEC, "audience": {"source": "crm"}})
            assert created.status == 201, created.body
            assert _counts(created.json) == _counts(uploaded.json)
            again = await api.call("POST", "/v1/campaigns", json={"spec": SPEC, "audience": {"source": "crm"}})
            assert again.status == 200 and again.json == {**created.json, "existing": True}
            down = await api.call(
                "POST", "/v1/campaigns", json={"spec": {**SPEC, "id": "d"}, "audience": {"source": "down"}}
            )
            assert down.status == 503 and "source 'down'" in down.json["detail"]
            broken = await api.call(
                "POST", "/v1/campaigns", json={"spec": {**SPEC, "id": "b"}, "audience": {"source": "broken"}}
            )
            assert broken.status == 422 and broken.json["errors"][0]["field"] == "audience.source"
            assert "no_such_table_here" in broken.json["errors"][0]["reason"]
            replies = b"".join(r.body for r in (created, again, down, broken))
            status = await api.call("GET", "/v1/campaigns/spring", token="read")
            replies += status.body
    for secret in (PG_PASSWORD, dsn, "127.0.0.1:5432"):
        assert secret.encode() not in replies
        assert secret not in caplog.text


# --- suppressions ------------------------------------------------------------------------------


async def test_suppressions_are_normalized_validated_and_all_or_nothing(
    api: Api, redis_client: redis.Redis, tmp_path: Path
) -> None:
    added = await api.call("POST", "/v1/suppressions", json={"channel": "sms", "addresses": ["+44 7400 123456"]})
    assert added.json == {"channel": "sms", "added": 1}
    store = _store(redis_client, tmp_path)
    assert store.contains_many("sms", ["+447400123456"]) == [True]
    again = await api.call("POST", "/v1/suppressions", json={"channel": "sms", "addresses": ["+447400123456"]})
    assert again.json["added"] == 0
    invalid = await api.call(
        "POST", "/v1/suppressions", json={"channel": "email", "addresses": ["a@example.com", "not-an-email"]}
    )
    assert invalid.status == 422 and invalid.json["errors"] == [{"field": "addresses[1]", "reason": "invalid_email"}]
    assert store.count("email") == 0
    glob = await api.call("POST", "/v1/suppressions", json={"channel": "global", "addresses": ["A@Example.COM"]})
    assert glob.json["added"] == 1
    assert store.contains_many("email", ["A@example.com"]) == [True]


async def test_campaigns_are_planned_with_the_suppression_lists(api: Api) -> None:
    rows = [dict(row) for row in ROWS[:10]]
    rows[3]["phone"] = "+447400123456"
    await api.call("POST", "/v1/suppressions", json={"channel": "sms", "addresses": ["+44 7400 123456"]})
    plan = (await api.call("POST", "/v1/campaigns", json={"spec": SPEC, "recipients": rows})).json
    assert plan["rejected"]["suppressed"] == 1
    assert plan["total"] == 10 == plan["accepted"] + sum(plan["rejected"].values())


# --- triggered messages ------------------------------------------------------------------------


async def test_triggered_message_is_idempotent_and_checked(api: Api, redis_client: redis.Redis) -> None:
    message = {"channel": "sms", "to": "+447400123456", "body": "Your cart: $item", "attributes": {"item": "socks"}}
    no_key = await api.call("POST", "/v1/messages", json=message)
    assert no_key.status == 400 and no_key.json["errors"][0]["field"] == "Idempotency-Key"
    first = await api.call("POST", "/v1/messages", json=message, headers={"Idempotency-Key": "cart-1"})
    assert first.status == 202 and first.json["state"] == "queued" and first.json["replayed"] is False
    cid = first.json["campaign_id"]
    assert cid.startswith("triggered:sms-") and first.json["message_id"] == f"{cid}.0.0"
    await api.flush()
    assert api.enqueued == [(cid, 0, 0)]
    batch = orjson.loads(redis_client.get(keys.batch(cid, 0)))
    assert batch == [0, [["#0.0", "+447400123456", {"body": "Your cart: socks"}]]]
    replay = await api.call("POST", "/v1/messages", json=message, headers={"Idempotency-Key": "cart-1"})
    assert replay.status == 200 and replay.json == {**first.json, "replayed": True}
    reused = await api.call(
        "POST", "/v1/messages", json={**message, "to": "+447400123457"}, headers={"Idempotency-Key": "cart-1"}
    )
    assert reused.status == 409 and reused.json["type"].endswith("/idempotency-key-reuse")
    reused_invalid = await api.call(
        "POST", "/v1/messages", json={**message, "to": "+1555"}, headers={"Idempotency-Key": "cart-1"}
    )
    assert reused_invalid.status == 409
    bad_address = await api.call(
        "POST", "/v1/messages", json={**message, "to": "+1555"}, headers={"Idempotency-Key": "cart-2"}
    )
    assert bad_address.status == 422 and bad_address.json["errors"] == [{"field": "to", "reason": "invalid_phone"}]
    await api.call("POST", "/v1/suppressions", json={"channel": "global", "addresses": ["+447400999999"]})
    suppressed = await api.call(
        "POST", "/v1/messages", json={**message, "to": "+447400999999"}, headers={"Idempotency-Key": "cart-3"}
    )
    assert suppressed.status == 202 and suppressed.json["state"] == "suppressed"
    assert (await api.call("GET", f"/v1/messages/{suppressed.json['message_id']}", token="read")).status == 404
    zone = await api.call(
        "POST",
        "/v1/messages",
        json={**message, "timezone": "Pacific/Kiritimati"},
        headers={"Idempotency-Key": "cart-4"},
    )
    expected = next_allowed(
        datetime.fromtimestamp(api.clock(), UTC), resolve_timezone("Pacific/Kiritimati"), QuietHours()
    )  # type: ignore[arg-type]
    assert abs(zone.json["not_before"] - expected.timestamp()) < 5
    await api.flush()
    # the replay enqueued nothing more; the suppressed one never was; a held message has its own
    # batch, enqueued with a delay up to its not-before (or sent now when Kiritimati is awake)
    zone_batch = int(zone.json["message_id"].split(".")[-2])
    assert [(c, n) for c, n, _ in api.enqueued] == [(cid, 0), (cid, zone_batch)]
    assert abs(api.enqueued[1][2] / 1000 - (expected.timestamp() - time.time())) < 5
    bad_zone = await api.call(
        "POST", "/v1/messages", json={**message, "timezone": "Mars/Olympus"}, headers={"Idempotency-Key": "cart-5"}
    )
    assert bad_zone.status == 422
    record = await api.call("GET", f"/v1/messages/{first.json['message_id']}", token="read")
    assert record.json["state"] == "pending" and record.json["recipient_id"] == ""
    status = (await api.call("GET", f"/v1/campaigns/{cid}", token="read")).json
    assert status["kind"] == "triggered" and status["state"] == "running"
    assert status["accepted"] == 2 and status["batches"] == 2 and status["pending"] == 2 and status["not_sent"] == 0


# --- health, metrics, the document -------------------------------------------------------------


async def test_health_readiness_metrics_and_document(api: Api) -> None:
    assert (await api.call("GET", "/healthz", token=None)).json == {"status": "ok"}
    ready = await api.call("GET", "/readyz", token=None)
    assert ready.status == 200 and ready.json["checks"] == {"redis": "ok", "eviction_policy": "ok"}
    metrics = await api.call("GET", "/metrics", token=None)
    text = metrics.body.decode()
    assert 'dispatch_api_request_duration_seconds_count{method="GET",route="/readyz",status="200"} 1.0' in text
    document = (await api.call("GET", "/v1/openapi.json", token=None)).json
    assert document["openapi"] == "3.1.0"
    documented = {(m.upper(), p) for p, item in document["paths"].items() for m in item}
    assert documented == {(op.method, op.path) for op in OPERATIONS}


def test_the_response_checker_catches_departures_from_the_document() -> None:
    from dispatch.api.openapi import openapi_document

    doc = openapi_document()
    ok = b'{"status": "ok"}'
    assert response_errors(doc, "GET", "/healthz", 200, content_type="application/json", body=ok) == []
    assert response_errors(doc, "GET", "/healthz", 201, content_type="application/json", body=ok)
    assert response_errors(doc, "GET", "/healthz", 200, content_type="text/html", body=ok)
    assert response_errors(doc, "GET", "/healthz", 200, content_type="application/json", body=b'{"status": 1}')
    assert response_errors(doc, "GET", "/nowhere", 200, content_type="application/json", body=ok)
    page = b'{"items": [{"message_id": "c.0.0"}], "next_cursor": null}'
    errors = response_errors(doc, "GET", "/v1/campaigns/x/messages", 200, content_type="application/json", body=page)
    assert any("items[0].recipient_id: required" in e for e in errors)


def test_models_report_every_field_and_coerce_nothing() -> None:
    errors = errors_of(CampaignPatch, {"rate": "fast", "burst": 3})
    assert [(e.field, e.reason) for e in errors] == [("rate", "expected number"), ("burst", "unknown field")]
    assert errors_of(CampaignPatch, {"rate": None}) == []
    assert errors_of(CampaignPatch, {"rate": True})  # a bool is not a number
    assert errors_of(MessageRecord, {"message_id": 1})[0].reason == "expected string"
