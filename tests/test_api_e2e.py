"""A whole campaign and a triggered message driven only through the HTTP API, with real worker
processes and the mock provider (LocalCluster); the mock's signed delivery receipts come back to
the API's own callback route."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
import redis.asyncio as aredis
from test_api_support import Api, api_settings, running_api

from channels.receipts import twilio_signature
from dispatch.config import Settings
from dispatch.send.broker import build_broker, enqueue_batch
from dispatch.store.connect import with_db
from loadtest.audience import generate_rows
from loadtest.cluster import LocalCluster


@pytest.fixture
def settings(redis_url: str, tmp_path: Path) -> Iterator[Settings]:
    broker_db = redis.Redis.from_url(with_db(redis_url, 1))
    broker_db.flushdb()
    # receipt routes need a real secret: the public demo token mounts none
    yield api_settings(
        redis_url, tmp_path, DISPATCH_HEARTBEAT_TIMEOUT_MS="3000", DISPATCH_SMS_AUTH_TOKEN="e2e-twilio-auth-token"
    )
    broker_db.flushdb()
    broker_db.close()


async def _wait(api: Api, path: str, done: Any, timeout_s: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        body: dict[str, Any] = (await api.call("GET", path, token="read")).json
        if done(body) or time.monotonic() > deadline:
            return body
        await asyncio.sleep(0.2)


async def _mock_stats(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/_mock/stats") as response:
        stats: dict[str, Any] = await response.json()
        return stats


async def _receipt(api: Api, settings: Settings, item: dict[str, Any], status: str, *, forge: bool = False) -> int:
    url = f"{api.base}/callbacks/twilio?ref={item['message_id']}"
    params = {"MessageSid": item["provider_id"], "MessageStatus": status, "AccountSid": settings.sms_account_sid}
    signature = twilio_signature(url, params, "not-the-token" if forge else settings.sms_auth_token.reveal())
    headers = {"X-Twilio-Signature": signature, "I-Twilio-Idempotency-Token": f"{item['provider_id']}-{status}"}
    async with api.session.post(url, data=params, headers=headers) as response:
        return response.status


@contextlib.asynccontextmanager
async def _api(settings: Settings) -> AsyncIterator[Api]:
    """The API on the test Redis, enqueueing to the real broker (workers come from LocalCluster)."""
    assert settings.redis_url is not None
    app_client = aredis.Redis.from_url(settings.redis_url)
    sync_client = redis.Redis.from_url(settings.redis_url)
    broker = build_broker(settings, with_db(settings.redis_url, settings.broker_db))
    try:
        async with running_api(
            settings, app_client, sync_client, enqueue=lambda c, n, d: enqueue_batch(broker, c, n, d)
        ) as api:
            yield api
    finally:
        broker.close()
        sync_client.close()
        await app_client.aclose()


async def _all_messages(api: Api, campaign_id: str, limit: int) -> list[dict[str, Any]]:
    """Every per-message outcome of a campaign, page by page."""
    items: list[dict[str, Any]] = []
    cursor = ""
    while True:
        path = f"/v1/campaigns/{campaign_id}/messages?limit={limit}{cursor}"
        page = (await api.call("GET", path, token="read")).json
        items += page["items"]
        if page["next_cursor"] is None:
            return items
        cursor = f"&cursor={page['next_cursor']}"


def _write_csv(path: Path, fields: list[str], rows: Iterable[dict[str, str]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


async def test_campaign_and_triggered_message_through_the_api_only(settings: Settings, tmp_path: Path) -> None:
    audience = _write_csv(tmp_path / "audience.csv", ["id", "phone", "first_name"], generate_rows(600, seed=9))
    async with _api(settings) as api:
        with LocalCluster(settings, workers=1) as cluster:
            form = aiohttp.FormData()
            form.add_field("spec", '{"id": "e2e-api", "channel": "sms", "body": "Hi $first_name"}')
            form.add_field("audience", audience.open("rb"), content_type="text/csv", filename="audience.csv")
            plan = (await api.call("POST", "/v1/campaigns", data=form)).json
            assert plan["total"] == 600 == plan["accepted"] + sum(plan["rejected"].values())
            started = await api.call("POST", "/v1/campaigns/e2e-api/start")
            assert started.json["state"] == "running"
            status = await _wait(api, "/v1/campaigns/e2e-api", lambda s: s["state"] == "completed")
            assert status["state"] == "completed", status
            assert status["counters"]["sent"] == plan["accepted"]

            message = {"channel": "sms", "to": "+447400123456", "body": "Hi $name", "attributes": {"name": "Ada"}}
            sent = await api.call("POST", "/v1/messages", json=message, headers={"Idempotency-Key": "signup-42"})
            assert sent.status == 202
            message_id = sent.json["message_id"]
            record = await _wait(api, f"/v1/messages/{message_id}", lambda r: r["state"] == "sent")
            assert record["state"] == "sent" and record["provider_id"]
            again = await api.call("POST", "/v1/messages", json=message, headers={"Idempotency-Key": "signup-42"})
            assert again.status == 200 and again.json["message_id"] == message_id
            await asyncio.to_thread(cluster.wait_drained)  # any duplicate would have been sent by then
            stats = await _mock_stats(cluster.mock_url)

        items = await _all_messages(api, "e2e-api", 1000)

        # provider receipts reach the API's callback route; a forged one changes nothing
        for item in items[:5]:
            assert await _receipt(api, settings, item, "delivered") == 204
        assert await _receipt(api, settings, items[5], "delivered", forge=True) == 401
        delivered = (await api.call("GET", "/v1/campaigns/e2e-api", token="read")).json
    assert stats["accepted"] == plan["accepted"] + 1  # the campaign plus the one triggered message
    assert stats["duplicates"] == 0
    assert len(items) == plan["accepted"]
    assert {item["state"] for item in items} == {"sent"}
    assert len({item["provider_id"] for item in items}) == plan["accepted"]
    assert delivered["counters"]["delivered"] == 5


async def test_email_recipients_show_their_outcome_through_the_api(settings: Settings, tmp_path: Path) -> None:
    """Email recipients are tracked by one group record per request: the API still answers a
    state per recipient (paged and one by one)."""
    rows = ({"id": f"e{i}", "email": f"user{i}@example.com", "first_name": "Ann"} for i in range(1500))
    audience = _write_csv(tmp_path / "audience.csv", ["id", "email", "first_name"], rows)
    async with _api(settings) as api:
        with LocalCluster(settings, workers=1):
            form = aiohttp.FormData()
            spec = '{"id": "e2e-email", "channel": "email", "subject": "Hi", "body": "Hi $first_name"}'
            form.add_field("spec", spec)
            form.add_field("audience", audience.open("rb"), content_type="text/csv", filename="audience.csv")
            plan = (await api.call("POST", "/v1/campaigns", data=form)).json
            assert plan["accepted"] == 1500
            await api.call("POST", "/v1/campaigns/e2e-email/start")
            status = await _wait(api, "/v1/campaigns/e2e-email", lambda s: s["state"] == "completed")
        items = await _all_messages(api, "e2e-email", 400)
        one = (await api.call("GET", f"/v1/messages/{items[-1]['message_id']}", token="read")).json
    assert status["state"] == "completed" and status["counters"]["sent"] == 1500
    assert len(items) == 1500
    assert {item["state"] for item in items} == {"sent"}
    assert one["state"] == "sent" and one["message_id"] == items[-1]["message_id"]
