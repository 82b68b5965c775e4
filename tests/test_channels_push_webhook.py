"""FcmPush and SignedWebhook against the mock twins; the channel registry."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest
from aiohttp import web

from channels.base import Channel, Message, Permanent, Retryable, Sent
from channels.errors import DuplicateChannel, PermanentProviderError, UnknownChannel
from channels.push import FcmConfig, FcmPush
from channels.registry import ChannelRegistry
from channels.signing import sign_webhook, signed_headers, verify_webhook
from channels.webhook import SignedWebhook, WebhookConfig
from loadtest.mock_provider import FaultMix, MockConfig, MockProvider
from loadtest.mock_recorder import Recorded, RecordingServer

FCM_TOKEN = "ya29.test"
SECRET = "a-webhook-secret-of-some-length"


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.fixture
async def mock() -> AsyncIterator[MockProvider]:
    async with MockProvider(MockConfig(fcm_access_token=FCM_TOKEN, webhook_secret=SECRET)) as provider:
        yield provider


def push_message(i: int, token: str | None = None) -> Message:
    return Message(
        ref=f"p:{i}",
        address=token or f"device-token-{i}",
        body="Your order shipped",
        subject="Order",
        idempotency_key=f"p:{i}",
        attributes={"order": str(i)},
    )


def fcm(session: aiohttp.ClientSession, mock: MockProvider, **overrides: object) -> FcmPush:
    settings: dict[str, object] = {"base_url": mock.url, "project_id": "demo-proj", "access_token": FCM_TOKEN}
    settings.update(overrides)
    return FcmPush(session, FcmConfig(**settings))  # type: ignore[arg-type]


async def test_fcm_wire_format(session: aiohttp.ClientSession) -> None:
    async def ok(recorded: Recorded) -> web.StreamResponse:
        return web.json_response({"name": "projects/demo-proj/messages/0:1"})

    async with RecordingServer(ok) as server:
        channel = FcmPush(session, FcmConfig(base_url=server.url, project_id="demo-proj", access_token=FCM_TOKEN))
        results = await channel.send([push_message(0), push_message(1)])
        assert results == [
            Sent("p:0", "projects/demo-proj/messages/0:1"),
            Sent("p:1", "projects/demo-proj/messages/0:1"),
        ]
        assert len(server.requests) == 2  # one message per request
        request = server.requests[0]
    assert request.path == "/v1/projects/demo-proj/messages:send"
    assert request.headers["Authorization"] == f"Bearer {FCM_TOKEN}"
    body = orjson.loads(request.body)
    assert body["message"]["notification"] == {"title": "Order", "body": "Your order shipped"}
    assert body["message"]["token"] in {"device-token-0", "device-token-1"}
    assert body["message"]["data"] in ({"order": "0"}, {"order": "1"})


async def test_fcm_against_the_mock(session: aiohttp.ClientSession, mock: MockProvider) -> None:
    results = await fcm(session, mock).send(
        [push_message(0), push_message(1, "bad-token"), push_message(2, "not a token")]
    )
    ok, unregistered, invalid = results
    assert isinstance(ok, Sent) and ok.provider_id.startswith("projects/demo-proj/messages/")
    assert isinstance(unregistered, Permanent)
    assert (unregistered.code, unregistered.status, unregistered.suppress) == ("UNREGISTERED", 404, True)
    assert isinstance(invalid, Permanent)
    assert (invalid.code, invalid.suppress) == ("INVALID_ARGUMENT", True)
    assert mock.ledger.by_channel == {"push": 1}


@pytest.mark.parametrize(("kind", "status"), [("p_429", 429), ("p_500", 500), ("p_503", 503)])
async def test_fcm_retryable(session: aiohttp.ClientSession, mock: MockProvider, kind: str, status: int) -> None:
    mock.set_faults(FaultMix(**{kind: 1.0}, retry_after_s=4))  # type: ignore[arg-type]
    (result,) = await fcm(session, mock).send([push_message(0)])
    assert isinstance(result, Retryable)
    assert result.status == status
    assert result.retry_after == (4.0 if status == 429 else None)


async def test_fcm_bad_token_raises(session: aiohttp.ClientSession, mock: MockProvider) -> None:
    with pytest.raises(PermanentProviderError) as caught:
        await fcm(session, mock, access_token="expired").send([push_message(0)])
    assert caught.value.status == 401


async def test_fcm_token_source(session: aiohttp.ClientSession, mock: MockProvider) -> None:
    calls = []

    async def source() -> str:
        calls.append(1)
        return FCM_TOKEN

    (result,) = await fcm(session, mock, access_token=None, token_source=source).send([push_message(0)])
    assert isinstance(result, Sent)
    assert calls == [1]


# -- webhook ------------------------------------------------------------------------------------


def hook(session: aiohttp.ClientSession, url: str, secret: str = SECRET) -> SignedWebhook:
    return SignedWebhook(session, WebhookConfig(url=url, secret=secret))


async def test_webhook_wire_format_and_signature(session: aiohttp.ClientSession) -> None:
    async with RecordingServer() as server:
        (result,) = await hook(session, server.url + "/in").send([push_message(0, "user-1")])
        (request,) = server.requests
    assert result == Sent("p:0", "p:0")
    assert orjson.loads(request.body) == {
        "ref": "p:0",
        "to": "user-1",
        "subject": "Order",
        "body": "Your order shipped",
        "attributes": {"order": "0"},
    }
    timestamp = request.headers["X-Dispatch-Timestamp"]
    assert abs(int(timestamp) - time.time()) < 5
    assert request.headers["X-Dispatch-Signature"] == sign_webhook(SECRET, int(timestamp), request.body)
    assert request.headers["Idempotency-Key"] == "p:0"
    assert verify_webhook(SECRET, timestamp, request.headers["X-Dispatch-Signature"], request.body)


def test_webhook_signature_rejections() -> None:
    body = b'{"a":1}'
    headers = signed_headers(SECRET, body, now=1_000_000)
    ts, sig = headers["X-Dispatch-Timestamp"], headers["X-Dispatch-Signature"]
    assert verify_webhook(SECRET, ts, sig, body, now=1_000_100)
    assert not verify_webhook(SECRET, ts, sig, b'{"a":2}', now=1_000_100)  # altered
    assert not verify_webhook("another-secret-entirely", ts, sig, body, now=1_000_100)  # forged
    assert not verify_webhook(SECRET, ts, sig, body, now=1_000_301)  # stale
    assert not verify_webhook(SECRET, str(1_000_001), sig, body, now=1_000_100)  # timestamp changed
    assert not verify_webhook(SECRET, None, sig, body)
    assert verify_webhook(SECRET, ts, f"v1=deadbeef, {sig}", body, now=1_000_000)  # rotation


async def test_webhook_against_the_mock(session: aiohttp.ClientSession, mock: MockProvider) -> None:
    channel = hook(session, mock.url + "/webhook")
    sent, unknown = await channel.send([push_message(0, "user-1"), push_message(1, "bad-user")])
    assert isinstance(sent, Sent) and sent.provider_id.startswith("wh_")
    assert isinstance(unknown, Permanent)
    assert (unknown.code, unknown.status, unknown.suppress) == ("unknown_recipient", 422, True)
    assert mock.ledger.by_channel == {"webhook": 1}

    with pytest.raises(PermanentProviderError) as caught:  # the mock verifies our signature
        await hook(session, mock.url + "/webhook", "the-wrong-secret-123").send([push_message(0)])
    assert caught.value.status == 401

    mock.set_faults(FaultMix(p_429=1.0, retry_after_s=2))
    (limited,) = await channel.send([push_message(3)])
    assert isinstance(limited, Retryable) and (limited.status, limited.retry_after) == (429, 2.0)


# -- registry -----------------------------------------------------------------------------------


async def test_registry(session: aiohttp.ClientSession, mock: MockProvider) -> None:
    registry = ChannelRegistry()
    registry.register("webhook", lambda url: hook(session, url))
    with pytest.raises(DuplicateChannel):
        registry.register("webhook", lambda url: hook(session, url))
    with pytest.raises(UnknownChannel, match="webhook"):
        registry.create("sms")
    channel: Channel = registry.create("webhook", mock.url + "/webhook")
    assert isinstance(channel, SignedWebhook)
    assert "webhook" in registry and registry.names() == ["webhook"]
