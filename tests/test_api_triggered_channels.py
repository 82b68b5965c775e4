"""Triggered messages on every channel that has a provider, through the real API, real worker
processes (LocalCluster) and the mock provider's twin of each channel (SendGrid, FCM, our signed
webhook): each message reaches its provider exactly once with its own subject and rendered body,
a repeated Idempotency-Key answers the same message, and the channel's limits (a subject for
email, SMS and push body sizes) are 422s naming the field."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import orjson
import pytest
import redis
import redis.asyncio as aredis
import yarl
from aiohttp import web
from test_api_support import Api, running_api

from channels import default_registry
from dispatch.api.client import DispatchClient
from dispatch.config import Settings
from dispatch.send.broker import build_broker, enqueue_batch
from dispatch.send.tracking import parse_ref
from dispatch.store.connect import with_db
from dispatch.triggered.accept import state_key
from loadtest.cluster import LocalCluster
from loadtest.mock_recorder import Recorded, RecordingServer

#: Messages sent per channel.
COUNT = 4
#: (channel, address of recipient i, the setting that points the workers at the provider, its path)
CHANNELS: dict[str, tuple[str, str, str]] = {
    "email": ("user{i}@example.com", "DISPATCH_EMAIL_BASE_URL", ""),
    "push": ("fcm-{i:06d}-" + "a" * 80, "DISPATCH_PUSH_BASE_URL", ""),
    "webhook": ("https://hooks.example.com/u/{i}", "DISPATCH_WEBHOOK_URL", "/webhook"),
}
#: Response headers of a twin the adapters read.
_KEPT_HEADERS = ("Content-Type", "X-Message-Id", "Retry-After")


def test_triggered_messages_take_every_channel_that_has_a_provider() -> None:
    assert set(default_registry().channel_names(sendable=True)) == {"sms", *CHANNELS}


class Forwarder:
    """Records each provider request, then hands it unchanged to the mock provider's twin and
    answers with the twin's answer: the wire format is seen, the twin does the provider's work."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session
        self.target = ""

    async def __call__(self, recorded: Recorded) -> web.StreamResponse:
        headers = {k: v for k, v in recorded.headers.items() if k.lower() not in ("host", "content-length")}
        url = self.target + yarl.URL(recorded.url).path_qs
        async with self.session.request(recorded.method, url, data=recorded.body, headers=headers) as response:
            body = await response.read()
            kept = {name: response.headers[name] for name in _KEPT_HEADERS if name in response.headers}
            return web.Response(status=response.status, body=body, headers=kept)


def _message(channel: str, i: int) -> dict[str, Any]:
    message: dict[str, Any] = {
        "channel": channel,
        "to": CHANNELS[channel][0].format(i=i),
        "body": "Order $order is on its way",
        "attributes": {"order": f"A-{i}"},
        "recipient_id": f"user-{i}",
    }
    if channel != "webhook":  # a subject is the email's subject, the push title; optional elsewhere
        message["subject"] = f"Order A-{i} shipped"
    return message


def _delivered(channel: str, requests: list[Recorded]) -> list[tuple[str, str | None, str]]:
    """(address, subject, rendered body) of every message the provider got, as sent on the wire."""
    found: list[tuple[str, str | None, str]] = []
    for request in requests:
        payload = orjson.loads(request.body)
        if channel == "email":
            (content,) = payload["content"]
            for item in payload["personalizations"]:
                body = content["value"]
                for tag, value in (item.get("substitutions") or {}).items():
                    body = body.replace(tag, value)
                found += [(to["email"], item.get("subject"), body) for to in item["to"]]
        elif channel == "push":
            message = payload["message"]
            found.append((message["token"], message["notification"].get("title"), message["notification"]["body"]))
        else:
            found.append((payload["to"], payload["subject"], payload["body"]))
    return found


async def _wait_sent(api: Api, message_ids: list[str], timeout_s: float = 60.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while True:
        records = [(await api.call("GET", f"/v1/messages/{m}", token="read")).json for m in message_ids]
        if all(r["state"] == "sent" for r in records) or time.monotonic() > deadline:
            return records
        await asyncio.sleep(0.2)


@pytest.mark.parametrize("channel", sorted(CHANNELS))
async def test_triggered_messages_reach_each_channels_provider_exactly_once(
    e2e_settings: Settings, clients: tuple[aredis.Redis, redis.Redis], channel: str
) -> None:
    assert e2e_settings.redis_url is not None
    app_client, sync_client = clients
    address, setting, path = CHANNELS[channel][0], CHANNELS[channel][1], CHANNELS[channel][2]
    broker = build_broker(e2e_settings, with_db(e2e_settings.redis_url, e2e_settings.broker_db))
    now = time.time()  # the API's clock: the per-hour triggered campaign cannot roll over mid-test
    try:
        async with (
            aiohttp.ClientSession() as session,
            RecordingServer(forwarder := Forwarder(session)) as provider,
            running_api(
                e2e_settings,
                app_client,
                sync_client,
                enqueue=lambda c, n, d: enqueue_batch(broker, c, n, d),
                clock=lambda: now,
            ) as api,
        ):
            with LocalCluster(e2e_settings, workers=1, worker_env={setting: provider.url + path}) as cluster:
                forwarder.target = cluster.mock_url
                sent = await asyncio.gather(
                    *(
                        api.call(
                            "POST", "/v1/messages", json=_message(channel, i), headers={"Idempotency-Key": f"k{i}"}
                        )
                        for i in range(COUNT)
                    )
                )
                assert [reply.status for reply in sent] == [202] * COUNT, [reply.body for reply in sent]
                ids = [str(reply.json["message_id"]) for reply in sent]
                await api.flush()
                records = await _wait_sent(api, ids)
                again = await api.call(
                    "POST", "/v1/messages", json=_message(channel, 0), headers={"Idempotency-Key": "k0"}
                )
                await asyncio.to_thread(cluster.wait_drained)  # any duplicate would have been sent by then
                stats = cluster.mock_stats()
                cid = parse_ref(ids[0])[0]
                status = (await api.call("GET", f"/v1/campaigns/{cid}", token="read")).json
    finally:
        broker.close()
    assert cid.startswith(f"triggered:{channel}-")
    assert [r["state"] for r in records] == ["sent"] * COUNT, records
    assert all(r["provider_id"] for r in records)
    assert again.status == 200 and again.json["message_id"] == ids[0] and again.json["replayed"] is True
    assert stats["by_channel"] == {channel: COUNT} and stats["accepted"] == COUNT
    assert stats["duplicates"] == 0 and stats["rejected"] == 0
    expected = {
        (address.format(i=i), _message(channel, i).get("subject"), f"Order A-{i} is on its way") for i in range(COUNT)
    }
    delivered = _delivered(channel, provider.requests)
    assert sorted(delivered, key=str) == sorted(expected, key=str)  # each once, its own subject and body
    assert status["counters"]["sent"] == COUNT and status["not_sent"] == 0
    if channel == "email":  # the grouped path: one SendGrid request per micro-batch at most
        assert len(provider.requests) <= status["batches"] < COUNT + 1


async def test_channel_limits_of_triggered_messages_are_422_with_field_errors(
    e2e_settings: Settings, clients: tuple[aredis.Redis, redis.Redis]
) -> None:
    app_client, sync_client = clients
    now = time.time()  # the API's clock: the per-hour triggered campaign cannot roll over mid-test
    email = {"channel": "email", "to": "ada@example.com", "body": "Hi $name", "attributes": {"name": "Ada"}}
    refused: dict[str, tuple[dict[str, Any], str]] = {
        "email without a subject": (email, "subject"),
        "email with a blank subject": ({**email, "subject": "  "}, "subject"),
        "sms over 1,600 characters": ({"channel": "sms", "to": "+447400123456", "body": "x" * 1601}, "body"),
        "sms over 1,600 characters once rendered": (
            {
                "channel": "sms",
                "to": "+447400123456",
                "body": "Hi $a $b",
                "attributes": {"a": "y" * 900, "b": "z" * 900},
            },
            "body",
        ),
        "push over 4,096 bytes": ({"channel": "push", "to": "fcm-" + "a" * 80, "body": "é" * 2049}, "body"),
        "a channel without a provider": ({"channel": "wechat", "to": "o" * 28, "body": "Hi"}, "channel"),
    }
    async with running_api(e2e_settings, app_client, sync_client, clock=lambda: now) as api:
        answers = {
            case: await api.call("POST", "/v1/messages", json=body, headers={"Idempotency-Key": f"case-{n}"})
            for n, (case, (body, _)) in enumerate(refused.items())
        }
        # the same messages within the limits are accepted
        fits = [
            {**email, "subject": "Hello"},
            {"channel": "sms", "to": "+447400123456", "body": "x" * 1600},
            {"channel": "push", "to": "fcm-" + "a" * 80, "body": "é" * 2048, "subject": "Title"},
            {"channel": "webhook", "to": "https://hooks.example.com/u/1", "body": "z" * 5000},
        ]
        accepted = [
            await api.call("POST", "/v1/messages", json=body, headers={"Idempotency-Key": f"fits-{n}"})
            for n, body in enumerate(fits)
        ]
        client = DispatchClient(api.base, api.tokens["write"])
        by_client = await asyncio.to_thread(
            lambda: client.send_message(
                channel="email", to="bo@example.com", subject="Hi", body="Hi Bo", idempotency_key="client-1"
            )
        )
    for case, (_, field) in refused.items():
        answer = answers[case]
        assert answer.status == 422, (case, answer.body)
        assert [error["field"] for error in answer.json["errors"]] == [field], (case, answer.json)
    reasons = {case: answers[case].json["errors"][0]["reason"] for case in refused}
    assert reasons["email without a subject"].startswith("required for channel email")
    assert "1600 characters" in reasons["sms over 1,600 characters once rendered"]
    assert "4096 bytes" in reasons["push over 4,096 bytes"]
    assert reasons["a channel without a provider"] == "expected one of sms, email, push, webhook"
    assert [reply.status for reply in accepted] == [202] * len(fits), [reply.body for reply in accepted]
    assert by_client["state"] == "queued" and by_client["campaign_id"] == accepted[0].json["campaign_id"]
    # a refused message is counted nowhere: only the accepted ones are in their campaigns
    counts = [sync_client.hget(state_key(reply.json["campaign_id"]), "accepted") for reply in accepted]
    assert counts == [b"2", b"1", b"1", b"1"]  # email: the one above and the client's
